"""stealnb.core.progress: one progress bar for the package; in a Jupyter kernel a finished
``leave=False`` bar is hidden, its widget model kept (a closed model leaves the saved notebook an
output that JupyterLab cannot draw after a reload)."""
import io

from stealnb.core import progress


def test_a_finished_leave_false_notebook_bar_is_hidden_and_its_widget_kept():
    bar = progress.notebook_bar_class()(total=3, desc="epochs", leave=False)
    bar.update(3)
    bar.close()
    assert bar.container.layout.display == "none"
    assert bar.container.comm is not None  # closing a widget drops its comm (the model) -- not done here


def test_a_leave_true_notebook_bar_stays_visible():
    bar = progress.notebook_bar_class()(total=2, desc="folds")
    bar.update(2)
    bar.close()
    assert bar.container.layout.display != "none" and bar.container.comm is not None


def test_outside_a_kernel_the_bar_is_tqdms_text_bar():
    from tqdm.notebook import tqdm as notebook_tqdm

    out = io.StringIO()
    bar = progress.progress_bar(range(3), desc="pool", file=out)
    assert list(bar) == [0, 1, 2] and not isinstance(bar, notebook_tqdm)
    assert "pool" in out.getvalue()
