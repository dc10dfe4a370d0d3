"""The package's progress bars: one function, :func:`progress_bar`, for every long loop.

It is ``tqdm.auto.tqdm`` (a text bar in a terminal, an ipywidgets bar in a Jupyter kernel) with
one change in a kernel: a bar made with ``leave=False`` is *hidden* when it ends instead of
*closed*. tqdm's notebook bar closes its widget, which deletes the widget model in the kernel
while the saved notebook still holds an output pointing at it; after a browser reload JupyterLab
then draws "Error displaying widget: model not found" there and logs a console error (seen in
notebook 07's live-panel test, tests/test_live_panel.py). A hidden bar keeps its model.
"""
from __future__ import annotations

_CLASS = None


def _bar_class():
    """tqdm.auto's class, or in a Jupyter kernel its subclass that hides a finished bar."""
    global _CLASS
    if _CLASS is None:
        from tqdm.auto import tqdm

        try:
            from tqdm.notebook import tqdm as notebook_tqdm
        except ImportError:  # no ipywidgets: tqdm.auto is the text bar anyway
            notebook_tqdm = None
        _CLASS = notebook_bar_class() if notebook_tqdm is not None and issubclass(tqdm, notebook_tqdm) else tqdm
    return _CLASS


def notebook_bar_class():
    """tqdm's notebook bar, except that ``leave=False`` hides the widget at the end, keeping its model."""
    from tqdm.notebook import tqdm as notebook_tqdm

    class KeptWidgetBar(notebook_tqdm):
        def close(self):
            if self.disable or self.leave or getattr(self, "container", None) is None:
                return super().close()
            self.leave = True  # tqdm then leaves the widget open ...
            super().close()
            self.container.layout.display = "none"  # ... and it is hidden instead

    return KeptWidgetBar


def progress_bar(iterable=None, *, total=None, desc: str | None = None, unit: str = "it", leave: bool = True,
                 disable: bool = False, **kwargs):
    """A tqdm progress bar (``tqdm.auto``; in a Jupyter kernel a finished ``leave=False`` bar is
    hidden, not closed: see the module docstring). Arguments as ``tqdm``'s."""
    return _bar_class()(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, **kwargs)
