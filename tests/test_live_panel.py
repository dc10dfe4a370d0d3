"""Notebook 07's live panel in a real JupyterLab, driven by headless Chromium (the book check's
browser session, stealnb.report.bookcheck.chromium_session).

JupyterLab runs on a free localhost port with a token and no browser of its own, on a copy of
notebook 07 in a temporary folder (its ci defaults; ``$STEALNB_RESULTS`` points the kernel at a
temporary results root, so a developer's results are untouched). The test runs all cells from
the Run menu, presses "run one round" (the agreement curve gains a point, the status line moves
to round 1), changes the seed field, saves, reloads the page with the kernel still running, and
checks the panel came back with the kernel's state -- curve points, status, the seed field --
then presses "run one round" again: the curve and the gallery title follow to round 2.
Screenshots before and after the reload go to ``_build/test-screenshots/``.

Without Chromium or JupyterLab the test is skipped -- a failure under CI=true (tests/strict_ci.py).
"""
import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stealnb.core import layout
from stealnb.report import bookcheck

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "07_interactive.ipynb"
SHOTS = ROOT / "_build" / "test-screenshots"

# The panel: the widget box holding the two figure Outputs (stealnb.report.plots.figure_output); plotly
# keeps a chart's figure on its div.
_PANEL_JS = """(() => {
  const box = Array.from(document.querySelectorAll('.widget-vbox')).find(b => b.querySelectorAll('.js-plotly-plot').length >= 2);
  if (!box) return null;
  const plots = box.querySelectorAll('.js-plotly-plot');
  const title = p => { const t = p && p.layout && p.layout.title; return t ? (typeof t === 'string' ? t : t.text) : null; };
  const button = Array.from(box.querySelectorAll('button')).find(b => b.textContent.includes('run one round'));
  const seed = Array.from(box.querySelectorAll('.widget-inline-hbox')).find(h => h.textContent.trim().startsWith('seed'));
  const status = box.querySelector('.widget-html-content');
  return {plots: plots.length,
          drawn: Array.from(plots).filter(p => p.querySelector('svg.main-svg')).length,
          points: plots[0].data && plots[0].data[0] ? plots[0].data[0].x.length : null,
          gallery_title: title(plots[1]),
          status: status ? status.textContent : null,
          seed: seed && seed.querySelector('input') ? seed.querySelector('input').value : null,
          button: button ? (button.disabled ? 'disabled' : 'enabled') : null};
})()"""


@pytest.fixture(scope="module")
def chromium():
    path = bookcheck.find_chromium()
    if path is None:
        pytest.skip(bookcheck.chromium_missing_reason())
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of notebook 07: yields (base URL, token, its folder)."""
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.skip("JupyterLab is not installed (it is a dependency: pip install -e .)")
    tmp = tmp_path_factory.mktemp("lab")
    with jupyterlab(tmp, tmp / "results") as (base, token):
        yield base, token, tmp


@contextlib.contextmanager
def jupyterlab(tmp: Path, results: Path):
    """JupyterLab on ``tmp/notebooks`` (a copy of notebook 07), its settings and runtime files under
    ``tmp``, kernels writing to ``results`` ($STEALNB_RESULTS); yields (base URL, token)."""
    import httpx

    nb_dir = tmp / "notebooks"
    nb_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "notebooks" / NOTEBOOK, nb_dir / NOTEBOOK)
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    # No news or update check (no request leaves the machine) and no toast asking about them.
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = dict(os.environ, STEALNB_RESULTS=str(results), TF_CPP_MIN_LOG_LEVEL="3",
               JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    log_path = tmp / "jupyterlab.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={nb_dir}", *(["--allow-root"] if os.geteuid() == 0 else [])],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=nb_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/api/status", params={"token": token}, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not start (exit code {proc.poll()}):\n"
                                   + log_path.read_text()[-3000:])
            time.sleep(0.5)
        yield base, token
    finally:
        try:
            httpx.post(f"{base}/api/shutdown", params={"token": token}, timeout=10)  # stops its kernels too
            proc.wait(30)
        except Exception:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


async def _js(cdp, expr):
    res = await cdp.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
    if "exceptionDetails" in res:
        raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
    return res.get("result", {}).get("value")


async def _wait(cdp, what: str, expr: str, test, timeout: float, poll: float = 0.5):
    """Poll ``expr`` in the page until ``test(value)``; returns the value (AssertionError naming
    ``what`` and the last value after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await _js(cdp, expr)
        if test(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:g} s; last state {value!r}")
        await cdp.drain(poll)


async def _click_at(cdp, rect_expr: str, what: str):
    """A real mouse click (move, press, release) at the centre of the element ``rect_expr`` finds."""
    rect = await _wait(cdp, f"{what} on the page", f"""(() => {{ const e = {rect_expr};
        if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
        return r.width > 0 ? {{x: r.x + r.width / 2, y: r.y + r.height / 2}} : null; }})()""", bool, 60)
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        await cdp.call("Input.dispatchMouseEvent", {"type": kind, "x": rect["x"], "y": rect["y"], "button": "left",
                                                    "clickCount": 1})


def _by_text(selector: str, text: str) -> str:
    return f"Array.from(document.querySelectorAll({selector!r})).find(e => e.textContent.trim() === {text!r})"


async def _run_all(cdp):
    await _click_at(cdp, _by_text(".lm-MenuBar-itemLabel", "Run"), "the Run menu")
    await _click_at(cdp, _by_text(".lm-Menu-itemLabel", "Run All Cells"), "Run All Cells")


async def _press_run_one_round(cdp, base, token, tries: int = 4):
    """Press "run one round" until the kernel takes it: the button goes disabled or the status
    line changes. A press is repeated only while the kernel is idle and the panel unchanged -- a
    click that arrives while a freshly reloaded page is still connecting its widgets to the kernel
    is lost (the CI failure of 2026-12-03: after the reload the status stayed at round 1 for
    300 s, button enabled). A panel that never answers still fails, after ``tries`` presses."""
    before = await _js(cdp, _PANEL_JS)
    for _ in range(tries):
        await _click_at(cdp, "Array.from(document.querySelectorAll('.widget-vbox button'))"
                             ".find(b => b.textContent.includes('run one round') && !b.disabled)",
                        "the run-one-round button")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = await _js(cdp, _PANEL_JS)
            if now and (now["button"] == "disabled" or now["status"] != before["status"]):
                return
            await cdp.drain(0.25)
        busy = [k for k in await _kernels(base, token) if k["execution_state"] != "idle"]
        if busy:  # the click arrived and the round runs; the caller waits for its result
            return
    raise AssertionError(f"'run one round' pressed {tries} times, the kernel idle and the panel unchanged: {before}")


async def _kernels(base, token) -> list[dict]:
    import httpx

    return httpx.get(f"{base}/api/kernels", params={"token": token}, timeout=10).json()


async def _kernel_idle(base, token, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        ks = await _kernels(base, token)
        if ks and all(k["execution_state"] == "idle" for k in ks):
            return ks
        if time.monotonic() > deadline:
            raise AssertionError(f"the kernel is still busy after {timeout} s: {ks}")
        await asyncio.sleep(1)


def _saved_notebook(base, token, tries: int = 60) -> dict:
    """The saved notebook's contents model. The test polls while JupyterLab saves; an answer other
    than 200 (CI of 9296528: a model without "content" in the middle of a save; a fresh clone of
    9c531ba beside a two-core smoke run: 404 for 10 s) is asked again, up to ``tries`` times a
    second apart, then fails with its status and body."""
    import httpx

    for _ in range(tries):
        r = httpx.get(f"{base}/api/contents/{NOTEBOOK}", params={"token": token, "content": 1}, timeout=30)
        model = r.json() if r.status_code == 200 else {}
        if model.get("content") is not None:
            return model
        time.sleep(1)
    raise AssertionError(f"GET /api/contents/{NOTEBOOK}: {r.status_code} {r.text[:300]} ({tries} tries)")


def _saved_widget_outputs(base, token) -> int:
    nb = _saved_notebook(base, token)["content"]
    return sum("application/vnd.jupyter.widget-view+json" in (o.get("data") or {})
               for c in nb["cells"] for o in c.get("outputs", []))


def _saved_outputs_summary(base, token) -> str:
    """What the saved file holds, for a failure message: its time and each cell's output types."""
    model = _saved_notebook(base, token)
    cells = [[o.get("output_type") + (":" + ",".join(sorted(o.get("data", {}))) if o.get("data") else "")
              for o in c.get("outputs", [])] for c in model["content"]["cells"] if c["cell_type"] == "code"]
    return f"saved {model.get('last_modified')}; outputs per code cell: {cells}"


async def _save(cdp, base, token):
    """File > Save Notebook, as a user saves before reloading (JupyterLab reloads the notebook and
    its outputs from the saved file). On a loaded machine (a fresh clone of d755aab beside a
    two-core smoke run) nothing was saved in 30 s: the user saves once more after 45 s, and the
    test waits up to 150 s in all."""
    async def click_save():
        await _click_at(cdp, _by_text(".lm-MenuBar-itemLabel", "File"), "the File menu")
        await _click_at(cdp, _by_text(".lm-Menu-itemLabel", "Save Notebook"), "Save Notebook")

    await click_save()
    start = time.monotonic()
    again = True
    while _saved_widget_outputs(base, token) == 0:
        if again and time.monotonic() > start + 45:
            again = False
            await click_save()
        if time.monotonic() > start + 150:
            raise AssertionError("the notebook was not saved with the panel's output (File > Save Notebook): "
                                 + _saved_outputs_summary(base, token))
        await asyncio.sleep(0.5)


async def _reload(cdp):
    cdp.events = []
    await cdp.call("Page.reload", {"ignoreCache": False})
    deadline = time.monotonic() + 60
    while not any(e.get("method") == "Page.loadEventFired" for e in cdp.events):
        if any(e.get("method") == "Page.javascriptDialogOpening" for e in cdp.events):  # "leave the page?"
            await cdp.call("Page.handleJavaScriptDialog", {"accept": True})
            cdp.events = [e for e in cdp.events if e.get("method") != "Page.javascriptDialogOpening"]
        if time.monotonic() > deadline:
            raise AssertionError("the reloaded page did not finish loading in 60 s")
        await cdp.drain(0.2)


def _ready(state) -> bool:
    return bool(state) and state["plots"] >= 2 and state["drawn"] >= 2 and state["button"] == "enabled" \
        and state["points"] is not None and state["gallery_title"] is not None


async def _drive(chromium, base, token):
    async with bookcheck.chromium_session(chromium) as cdp:
        await cdp.call("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 1600, "deviceScaleFactor": 1,
                                                              "mobile": False})
        await cdp.call("Page.navigate", {"url": f"{base}/lab/tree/{NOTEBOOK}?token={token}"})
        await _wait(cdp, "the notebook open", "!!document.querySelector('.jp-Notebook .jp-Cell')", bool, 120)
        await _kernel_idle(base, token, 120)
        await _run_all(cdp)
        # The secret is trained on demand first (ci profile), then one round runs in code.
        first = await _wait(cdp, "the panel after Run All", _PANEL_JS,
                            lambda s: bool(s) and s["drawn"] >= 2 and s["button"] == "enabled", 600)
        await _kernel_idle(base, token)
        first = await _js(cdp, _PANEL_JS)
        assert first["points"] == 1 and "round 0" in first["status"] and first["gallery_title"].startswith("round 0"), first

        await _press_run_one_round(cdp, base, token)
        one = await _wait(cdp, "a point more after 'run one round'", _PANEL_JS,
                          lambda s: _ready(s) and s["points"] == 2 and "round 1" in s["status"], 300)
        assert one["status"] != first["status"] and one["gallery_title"].startswith("round 1"), one
        # A widget choice: the seed field (synced to the kernel on change).
        await _js(cdp, """(() => { const h = Array.from(document.querySelectorAll('.widget-vbox .widget-inline-hbox'))
            .find(h => h.textContent.trim().startsWith('seed')); const i = h.querySelector('input');
            i.value = '3'; i.dispatchEvent(new Event('change', {bubbles: true})); return i.value; })()""")
        await _kernel_idle(base, token, 60)
        await _save(cdp, base, token)
        before = await bookcheck.screenshot(cdp, SHOTS / "live-panel-before-reload.png")

        await _reload(cdp)
        back = await _wait(cdp, "the panel after the reload", _PANEL_JS, _ready, 120)
        await cdp.drain(2)  # let late model updates arrive before judging what the page shows
        back = await _js(cdp, _PANEL_JS)
        # The kernel's state, not the first Run All's: the curve's two points, round 1, seed 3.
        assert back["points"] == 2, f"after the reload the curve shows {back['points']} point(s), the kernel has 2: {back}"
        assert back["gallery_title"].startswith("round 1") and "round 1" in back["status"], back
        assert back["seed"] == "3", f"the seed field did not keep its value across the reload: {back}"

        await _press_run_one_round(cdp, base, token)
        two = await _wait(cdp, "the panel following the kernel to round 2 after the reload", _PANEL_JS,
                          lambda s: _ready(s) and "round 2" in s["status"], 300)
        two = await _wait(cdp, "the curve and gallery at round 2", _PANEL_JS,
                          lambda s: s["points"] == 3 and s["gallery_title"].startswith("round 2"), 30)
        after = await bookcheck.screenshot(cdp, SHOTS / "live-panel-after-reload.png")
        errors = [e for e in bookcheck.page_errors(cdp.events) if "plotly" in e.lower() or "widget" in e.lower()]
        assert not errors, errors
        return first, one, back, two, before, after


@pytest.mark.timeout(1200)
def test_the_live_panel_keeps_the_kernels_state_across_a_page_reload(chromium, lab):
    base, token, tmp = lab
    first, one, back, two, before, after = asyncio.run(_drive(chromium, base, token))
    assert before.is_file() and after.is_file()
    # The kernel worked in the results root $STEALNB_RESULTS named (stealnb.core.layout.results_root).
    assert (layout.profile_dir(tmp / "results", "ci") / "scratch").is_dir()
    assert not (tmp / "notebooks" / "results").exists()
