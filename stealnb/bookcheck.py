"""Open every page of the built book in headless Chromium and report what went wrong.

Uses the system's Chromium (Debian package ``chromium``; nothing is downloaded) through the
Chrome DevTools Protocol over a websocket (tornado's client, already a Jupyter dependency).
Per page it collects console errors, uncaught exceptions and failed resource loads, and counts
rendered plotly charts (``.js-plotly-plot`` elements holding an SVG); it can save a screenshot.

``stealnb check-book [_build/html]`` runs it from the command line.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
    "--allow-file-access-from-files", "--window-size=1280,1600",
)

_PLOTLY_JS = """(() => {
  const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
  return {plots: plots.length,
          rendered: plots.filter(p => p.querySelector('svg.main-svg') !== null).length};
})()"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    page: str
    errors: list[str] = field(default_factory=list)
    plots: int = 0
    rendered_plots: int = 0
    screenshot: str | None = None


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
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await asyncio.wait_for(self.ws.read_message(), left)
            except asyncio.TimeoutError:
                return
            if msg is None:
                return
            self.events.append(json.loads(msg))


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            en = p["entry"]
            out.append(f"{en.get('source', 'log')}: {en.get('text', '')} {en.get('url', '')}".strip())
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"load failed: {p.get('errorText')} ({p.get('requestId')})")
    return out


async def _check(pages: list[Path], screenshots: dict[Path, Path], chromium: str, settle: float) -> list[PageReport]:
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
        for domain in ("Runtime", "Log", "Page", "Network"):
            await cdp.call(f"{domain}.enable")
        reports = []
        for page in pages:
            cdp.events = []
            await cdp.call("Page.navigate", {"url": page.resolve().as_uri()})
            if not await cdp.wait_event("Page.loadEventFired", 60):
                reports.append(PageReport(str(page), ["page did not finish loading in 60 s"]))
                continue
            await cdp.drain(settle)  # let plotly and the theme's scripts run
            rep = PageReport(str(page), _errors(cdp.events))
            res = await cdp.call("Runtime.evaluate", {"expression": _PLOTLY_JS, "returnByValue": True})
            val = res.get("result", {}).get("value") or {}
            rep.plots, rep.rendered_plots = int(val.get("plots", 0)), int(val.get("rendered", 0))
            if page in screenshots:
                shot = await cdp.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
                out = screenshots[page]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(base64.b64decode(shot["data"]))
                rep.screenshot = str(out)
            reports.append(rep)
        ws.close()
        return reports
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def book_pages(html_dir: Path) -> list[Path]:
    """Every HTML page of a Sphinx build (not the theme's static files)."""
    html_dir = Path(html_dir)
    return sorted(p for p in html_dir.rglob("*.html")
                  if not any(part.startswith("_") for part in p.relative_to(html_dir).parts[:-1]))


def check_book(html_dir, *, screenshots: dict[str, str | Path] | None = None, settle: float = 1.0,
               chromium: str | None = None) -> list[PageReport]:
    """Open every page under ``html_dir``; ``screenshots`` maps a page (relative path, e.g.
    ``"book/generated/results/results.html"``) to the PNG to write."""
    html_dir = Path(html_dir)
    if not html_dir.is_dir():
        raise FileNotFoundError(f"no built book at {html_dir} (run `stealnb run` first)")
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("Chromium not found; on Debian: apt-get install chromium")
    pages = book_pages(html_dir)
    shots = {html_dir / k: Path(v) for k, v in (screenshots or {}).items()}
    for p in shots:
        if p not in pages:
            raise FileNotFoundError(f"screenshot page {p} is not in the book")
    return asyncio.run(_check(pages, shots, chromium, settle))


def _cmd_check_book(args) -> int:
    reps = check_book(args.html, screenshots={args.screenshot_page: args.screenshot} if args.screenshot else None)
    bad = [r for r in reps if r.errors]
    for r in reps:
        flag = "ERR" if r.errors else "ok "
        print(f"{flag} {os.path.relpath(r.page, args.html)}  plotly {r.rendered_plots}/{r.plots}")
        for e in r.errors:
            print(f"      {e}")
    print(f"{len(reps)} pages, {len(bad)} with errors")
    return 1 if bad else 0


def register_cli(subparsers) -> None:
    c = subparsers.add_parser("check-book", help="open every page of the built book in headless Chromium")
    c.add_argument("html", nargs="?", default="_build/html", type=Path)
    c.add_argument("--screenshot", type=Path, default=None, help="PNG to write of --screenshot-page")
    c.add_argument("--screenshot-page", default="book/generated/results/results.html")
    c.set_defaults(func=_cmd_check_book)
