"""Open every page of the built book in headless Chromium and report what went wrong.

Uses the system's Chromium (Debian package ``chromium``; nothing is downloaded) through the
Chrome DevTools Protocol over a websocket (tornado's client, already a Jupyter dependency).
Per page it collects console errors, uncaught exceptions and failed resource loads
(:func:`page_errors`), waits until the page has settled -- loaded, every plotly chart drawn, every
equation typeset by MathJax, no request pending (:func:`wait_until_settled`; a condition, not a
fixed sleep) -- and counts the plotly charts and equations placed and drawn. The book must render
offline, so a request for anything but a local file is an error (:func:`offsite_requests`), and
so are TeX left unrendered in the page's text (:func:`raw_math`) and a TensorFlow log line in it
(:func:`tf_log_lines`). Given the number of charts each executed notebook made
(:func:`notebook_plots`), a page that shows fewer or more is an error. It can save a screenshot.

The browser is ``$STEALNB_CHROMIUM`` when set (a path or a command name; when it does not
resolve to an executable there is no fallback, so pointing it at a missing file behaves like a
machine without Chromium), else the first of ``chromium``, ``chromium-browser`` and
``google-chrome`` on ``PATH``.

``stealnb check-book [_build/html]`` runs it from the command line.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_ENV = "STEALNB_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
    "--allow-file-access-from-files", "--window-size=1280,1600",
)

# A chart's placeholder is the ``plotly-graph-div`` of the figure's HTML snippet
# (stealnb.report.plots); Plotly.newPlot marks it ``js-plotly-plot`` and draws its ``svg.main-svg``.
# Counting placeholders (not only ``js-plotly-plot``) makes a chart whose script never ran visible.
# Sphinx writes each equation as ``span.math`` / ``div.math`` holding its TeX; MathJax 3 puts an
# ``mjx-container`` inside once it has typeset it.
_STATE_JS = """(() => {
  const divs = Array.from(document.querySelectorAll('.plotly-graph-div, .js-plotly-plot'));
  const math = Array.from(document.querySelectorAll('span.math, div.math'));
  return {ready: document.readyState, plots: divs.length,
          rendered: divs.filter(d => d.classList.contains('js-plotly-plot')
                                     && d.querySelector('svg.main-svg') !== null).length,
          math: math.length,
          math_rendered: math.filter(m => m.querySelector('mjx-container') !== null).length};
})()"""
# The page's text: all of it (``text``, for TensorFlow's log lines: cell outputs are <pre>), and
# the prose only (``prose``: without code, typeset equations, scripts and styles) where TeX
# delimiters must not be left.
_TEXT_JS = """(() => {
  const prose = document.body.cloneNode(true);
  prose.querySelectorAll('pre, code, .highlight, mjx-container, mjx-assistive-mml, script, style')
       .forEach(e => e.remove());
  return {text: document.body.innerText, prose: prose.textContent};
})()"""
# URL schemes that do not leave the machine.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
# TeX delimiters MathJax would have replaced: display $$...$$, inline \(...\) and display \[...\].
_RAW_MATH = re.compile(r"\$\$|\\\(|\\\[")
# TensorFlow's log lines: Abseil records (severity, MMDD hh:mm:ss.micros, thread, file:line]),
# Abseil's notice about its set-up, and Python-side ``WARNING:tensorflow:`` / oneDNN / CUDA
# start-up messages (stealnb.core._tflog keeps them out of the notebooks; a page must not show one).
_TF_LOG = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]\s]+:\d+\] .*"
    r"|.*All log messages before absl::InitializeLog\(\) is called.*"
    r"|(?:WARNING|INFO|ERROR):tensorflow:.*"
    r"|.*oneDNN custom operations are on.*"
    r"|.*This TensorFlow binary is optimized to use available CPU instructions.*"
    r"|.*Unable to register cu(?:DNN|FFT|BLAS) factory.*"
    r"|.*(?:TF-TRT Warning|cuda_(?:dnn|blas|fft|executor)\.cc).*)$", re.M)
_PLOTLY_DIV = 'class="plotly-graph-div"'
_PLOTLY_MIME = "application/vnd.plotly.v1+json"


def find_chromium() -> str | None:
    """The Chromium executable to use, or None (see the module docstring)."""
    env = os.environ.get(CHROMIUM_ENV)
    if env:
        return shutil.which(env)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_missing_reason() -> str:
    """Why :func:`find_chromium` found nothing, and how to fix it."""
    env = os.environ.get(CHROMIUM_ENV)
    if env:
        return (f"Chromium not found: {CHROMIUM_ENV}={env} is not an executable "
                f"(unset it to look for {', '.join(CHROMIUM_NAMES)} on PATH)")
    return (f"Chromium not found: none of {', '.join(CHROMIUM_NAMES)} is on PATH "
            f"(Debian: apt-get install chromium, or `make sysdeps` as root; or set {CHROMIUM_ENV})")


@dataclass
class PageReport:
    page: str
    errors: list[str] = field(default_factory=list)
    plots: int = 0  # plotly charts placed on the page
    rendered_plots: int = 0  # of those, drawn by plotly.js
    expected_plots: int | None = None  # charts the executed notebook made (None: not a notebook page)
    math: int = 0  # equations placed on the page
    rendered_math: int = 0  # of those, typeset by MathJax
    seconds: float = 0.0  # from navigation until the page settled (or the timeout)
    screenshot: str | None = None


# -- what the notebooks made ---------------------------------------------------------------------

def notebook_plots(nb) -> int:
    """The plotly charts an executed notebook (a path or its JSON dict) shows: per output, the
    figure placeholders in its ``text/html`` (what the book renders), or one for an output that
    carries only plotly's JSON mimetype (a chart the static book cannot show: the page then has
    fewer charts than the notebook made, which :func:`check_book` reports)."""
    if not isinstance(nb, dict):
        nb = json.loads(Path(nb).read_text())
    n = 0
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = out.get("data") or {}
            html = data.get("text/html", "")
            html = "".join(html) if isinstance(html, list) else str(html)
            n += max(html.count(_PLOTLY_DIV), 1 if _PLOTLY_MIME in data else 0)
    return n


def expected_from_sources(html_dir) -> dict[str, int]:
    """``{page: charts}`` for every notebook page of a Sphinx build, read from the notebook
    copies Sphinx keeps under ``_sources/`` (``book/x.ipynb`` -> ``book/x.html``)."""
    html_dir = Path(html_dir)
    src = html_dir / "_sources"
    out = {}
    for nb in sorted(src.rglob("*.ipynb")) if src.is_dir() else []:
        rel = nb.relative_to(src)
        out[str(rel.with_suffix(".html"))] = notebook_plots(nb)
    return out


# -- classifying the browser's events --------------------------------------------------------------

def _request_urls(events: list[dict]) -> dict[str, str]:
    return {e["params"].get("requestId"): e["params"].get("request", {}).get("url", "")
            for e in events if e.get("method") == "Network.requestWillBeSent"}


def pending_requests(events: list[dict]) -> list[str]:
    """URLs of requests the page started and that neither finished nor failed yet."""
    urls = _request_urls(events)
    done = {e.get("params", {}).get("requestId") for e in events
            if e.get("method") in ("Network.loadingFinished", "Network.loadingFailed")}
    return [u for r, u in urls.items() if r not in done]


def page_errors(events: list[dict]) -> list[str]:
    """The problems among a page's DevTools events, one line each: ``console.error`` and failed
    ``console.assert`` calls, uncaught exceptions, error-level log entries (e.g. a resource that
    failed to load) and failed network loads (with their URL; a load the page itself cancelled
    is not an error). Warnings, info and debug messages are not errors."""
    urls = _request_urls(events)
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            out.append(f"console.{p['type']}: {args}")
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + ((d.get("exception") or {}).get("description") or d.get("text", "")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            en = p["entry"]
            out.append(f"{en.get('source', 'log')}: {en.get('text', '')} {en.get('url', '')}".strip())
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            url = urls.get(p.get("requestId")) or f"request {p.get('requestId')}"
            out.append(f"load failed: {p.get('errorText')} {url}")
    return out


def offsite_requests(events: list[dict]) -> list[str]:
    """URLs of the requests the page made for anything but a local file (``file:``; ``data:``,
    ``blob:`` and ``about:`` URLs leave nothing either): the book must render offline."""
    return [u for u in _request_urls(events).values() if not u.startswith(LOCAL_SCHEMES)]


def raw_math(prose: str) -> list[str]:
    """The TeX left unrendered in a page's prose (``$$``, ``\\(``, ``\\[`` with a little
    context), one string per place."""
    return [" ".join(prose[max(0, m.start() - 30):m.end() + 30].split()) for m in _RAW_MATH.finditer(prose)]


def tf_log_lines(text: str) -> list[str]:
    """The lines of a page's text that TensorFlow's logging wrote (see :data:`_TF_LOG`)."""
    return [m.group(0).strip() for m in _TF_LOG.finditer(text)]


def settled(state: dict, pending: list[str], expected: int | None = None) -> bool:
    """A page is settled when the document has loaded, every chart on it is drawn, every equation
    typeset, no request is pending and (when ``expected`` is given) at least that many charts
    have been placed."""
    plots = int(state.get("plots", 0))
    return (state.get("ready") == "complete" and int(state.get("rendered", 0)) == plots and not pending
            and int(state.get("math_rendered", 0)) == int(state.get("math", 0))
            and (expected is None or plots >= expected))


async def wait_until_settled(cdp, expected: int | None = None, timeout: float = 30.0, poll: float = 0.05,
                             clock=time.monotonic) -> tuple[dict, bool]:
    """Poll the page (``cdp``: an object with ``call(method, params)`` and the ``events`` seen so
    far) until :func:`settled` or ``timeout`` seconds on ``clock``; returns (last state, settled).
    Events that arrive meanwhile are collected, so late console errors are seen too. A query
    that meets a document being replaced (Chromium's "Inspected target navigated or closed", seen
    on a loaded machine when a load event arrives for the page before) counts as not settled yet."""
    deadline = clock() + timeout
    while True:
        try:
            res = await cdp.call("Runtime.evaluate", {"expression": _STATE_JS, "returnByValue": True})
        except RuntimeError as e:
            if "navigated or closed" not in str(e):
                raise
            res = {}
        state = res.get("result", {}).get("value") or {}
        if settled(state, pending_requests(cdp.events), expected):
            return state, True
        if clock() >= deadline:
            return state, False
        await cdp.drain(poll)


class _CDP:
    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def call(self, method: str, params: dict | None = None, timeout: float = 60.0):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.write_message(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(self.ws.read_message(), max(0.1, deadline - time.monotonic()))
            if msg is None:
                raise RuntimeError("Chromium closed the DevTools connection")
            data = json.loads(msg)
            if data.get("id") == my_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
            self.events.append(data)

    async def wait_event(self, method: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if any(e.get("method") == method for e in self.events):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                msg = await asyncio.wait_for(self.ws.read_message(), left)
            except asyncio.TimeoutError:
                return False
            if msg is None:
                return False
            self.events.append(json.loads(msg))

    async def drain(self, seconds: float) -> None:
        """Collect the events that arrive within ``seconds`` (returns early on a closed socket)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await asyncio.wait_for(self.ws.read_message(), left)
            except asyncio.TimeoutError:
                return
            if msg is None:
                return
            self.events.append(json.loads(msg))


async def page_text(cdp) -> dict:
    """``{"text": ..., "prose": ...}`` of the page open in ``cdp`` (see :data:`_TEXT_JS`)."""
    res = await cdp.call("Runtime.evaluate", {"expression": _TEXT_JS, "returnByValue": True})
    return res.get("result", {}).get("value") or {}


def content_errors(events: list[dict], text: dict) -> list[str]:
    """What a settled page must not have: requests that left the machine, unrendered TeX in its
    prose, TensorFlow log lines in its text (``text`` as :func:`page_text` returns it)."""
    out = [f"request left the machine: {u}" for u in offsite_requests(events)]
    out += [f"raw TeX in the page: {t}" for t in raw_math(text.get("prose", ""))]
    out += [f"TensorFlow log line in the page: {t}" for t in tf_log_lines(text.get("text", ""))]
    return out


def _settle_errors(state: dict, pending: list[str], expected: int | None, timeout: float) -> list[str]:
    """What kept a page from settling within ``timeout``."""
    out = []
    plots, rendered = int(state.get("plots", 0)), int(state.get("rendered", 0))
    if state.get("ready") != "complete":
        out.append(f"document not loaded after {timeout:g} s (readyState {state.get('ready')!r})")
    if rendered != plots:
        out.append(f"plotly: {rendered} of {plots} chart(s) drawn after {timeout:g} s")
    math, math_rendered = int(state.get("math", 0)), int(state.get("math_rendered", 0))
    if math_rendered != math:
        out.append(f"MathJax: {math_rendered} of {math} equation(s) typeset after {timeout:g} s")
    if pending:
        out.append(f"{len(pending)} request(s) still pending after {timeout:g} s: " + ", ".join(pending[:5]))
    return out


@contextlib.asynccontextmanager
async def chromium_session(chromium: str, domains=("Runtime", "Log", "Page", "Network")):
    """Headless ``chromium`` (a fresh profile, no network of its own: :data:`CHROMIUM_FLAGS`)
    on ``about:blank``; yields a DevTools client (``call(method, params)``, ``events``,
    ``wait_event``, ``drain``) with ``domains`` enabled. The browser and its profile are gone
    afterwards. Also drives JupyterLab in the live-panel test (tests/test_live_panel.py)."""
    from tornado.httpclient import AsyncHTTPClient
    from tornado.websocket import websocket_connect

    profile = tempfile.mkdtemp(prefix="stealnb-chromium-")
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{chromium} did not start its DevTools endpoint (exit code {proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        resp = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/json/list")
        target = next(t for t in json.loads(resp.body) if t.get("type") == "page")
        ws = await websocket_connect(target["webSocketDebuggerUrl"], max_message_size=512 * 1024 * 1024)
        cdp = _CDP(ws)
        for domain in domains:
            await cdp.call(f"{domain}.enable")
        try:
            yield cdp
        finally:
            ws.close()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def screenshot(cdp, out, scroll_to: str | None = None) -> Path:
    """Write a PNG of the page's viewport to ``out`` (parent folders created); returns ``Path(out)``.
    ``scroll_to``: a CSS selector whose first element is scrolled into view first (when present)."""
    if scroll_to:
        sel = json.dumps(scroll_to)
        await cdp.call("Runtime.evaluate", {"expression": f"document.querySelector({sel})?.scrollIntoView({{block: 'center'}})",
                                            "returnByValue": True})
    shot = await cdp.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot["data"]))
    return out


async def _check(pages: list[Path], screenshots: dict[Path, Path], expected: dict[Path, int], chromium: str,
                 timeout: float) -> list[PageReport]:
    async with chromium_session(chromium) as cdp:
        reports = []
        for page in pages:
            cdp.events = []
            t0 = time.monotonic()
            await cdp.call("Page.navigate", {"url": page.resolve().as_uri()})
            if not await cdp.wait_event("Page.loadEventFired", 60):
                reports.append(PageReport(str(page), ["page did not finish loading in 60 s"]))
                continue
            want = expected.get(page)
            state, ok = await wait_until_settled(cdp, want, timeout)
            rep = PageReport(str(page), page_errors(cdp.events), expected_plots=want,
                             seconds=round(time.monotonic() - t0, 2))
            rep.plots, rep.rendered_plots = int(state.get("plots", 0)), int(state.get("rendered", 0))
            rep.math, rep.rendered_math = int(state.get("math", 0)), int(state.get("math_rendered", 0))
            if not ok:
                rep.errors += _settle_errors(state, pending_requests(cdp.events), want, timeout)
            rep.errors += content_errors(cdp.events, await page_text(cdp))
            if want is not None and rep.plots != want:
                rep.errors.append(f"plotly: the executed notebook made {want} chart(s), the page has {rep.plots}")
            if page in screenshots:
                # A page with display equations is shown at its first one.
                rep.screenshot = str(await screenshot(cdp, screenshots[page], "div.math" if rep.math else None))
            reports.append(rep)
        return reports


def book_pages(html_dir: Path) -> list[Path]:
    """Every HTML page of a Sphinx build (not the theme's static files)."""
    html_dir = Path(html_dir)
    return sorted(p for p in html_dir.rglob("*.html")
                  if not any(part.startswith("_") for part in p.relative_to(html_dir).parts[:-1]))


def check_book(html_dir, *, screenshots: dict[str, str | Path] | None = None,
               expected_plots: dict[str, int] | None = None, timeout: float = 30.0,
               chromium: str | None = None) -> list[PageReport]:
    """Open every page under ``html_dir``. ``screenshots`` maps a page (relative path, e.g.
    ``"book/generated/results/results.html"``) to the PNG to write; ``expected_plots`` maps a
    page to the number of plotly charts its executed notebook made (a different count on the
    page is an error); ``timeout``: seconds a page may take to settle after loading."""
    html_dir = Path(html_dir)
    if not html_dir.is_dir():
        raise FileNotFoundError(f"no built book at {html_dir} (run `stealnb run` first)")
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(chromium_missing_reason())
    pages = book_pages(html_dir)
    shots = {html_dir / k: Path(v) for k, v in (screenshots or {}).items()}
    want = {html_dir / k: int(v) for k, v in (expected_plots or {}).items()}
    for p in [*shots, *want]:
        if p not in pages:
            raise FileNotFoundError(f"page {p} is not in the book")
    return asyncio.run(_check(pages, shots, want, chromium, timeout))


def _cmd_check_book(args) -> int:
    expected = expected_from_sources(args.html)
    reps = check_book(args.html, screenshots={args.screenshot_page: args.screenshot} if args.screenshot else None,
                      expected_plots=expected, timeout=args.timeout)
    bad = [r for r in reps if r.errors]
    for r in reps:
        if r.screenshot:
            print(f"screenshot: {r.screenshot}")
        flag = "ERR" if r.errors else "ok "
        want = "" if r.expected_plots is None else f" (notebook: {r.expected_plots})"
        math = f"  math {r.rendered_math}/{r.math}" if r.math else ""
        print(f"{flag} {os.path.relpath(r.page, args.html)}  plotly {r.rendered_plots}/{r.plots}{want}{math}"
              f"  {r.seconds:.1f} s")
        for e in r.errors:
            print(f"      {e}")
    print(f"{len(reps)} pages, {len(bad)} with errors")
    return 1 if bad else 0


def register_cli(subparsers) -> None:
    c = subparsers.add_parser("check-book", help="open every page of the built book in headless Chromium")
    c.add_argument("html", nargs="?", default="_build/html", type=Path)
    c.add_argument("--screenshot", type=Path, default=None, help="PNG to write of --screenshot-page")
    c.add_argument("--screenshot-page", default="book/generated/results/results.html")
    c.add_argument("--timeout", type=float, default=30.0, help="seconds a page may take to settle after loading")
    c.set_defaults(func=_cmd_check_book)
