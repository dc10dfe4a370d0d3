"""The chapter studies that compose the layers below: the defences chapter
(``defense_experiment``: defences against extraction attacks, through the HTTP server too) and the
"Which thief pool?" study (``pools``: one extraction per pool, strategy and seed)."""
