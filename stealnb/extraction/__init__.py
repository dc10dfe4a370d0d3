"""Model extraction: the query oracle and its ledger (``oracle``), the active-learning strategies
(``selectors``), the ActiveThief loop (``loop``) and Copycat CNN (``copycat``). Import from
:mod:`stealnb.attacks` and :mod:`stealnb.core`; independent of :mod:`stealnb.defenses` (an oracle
applies defences through :mod:`stealnb.core.defense_seam`)."""
