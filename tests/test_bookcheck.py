"""stealnb.report.bookcheck without a browser: how DevTools events are classified, when a page counts
as settled, the wait for that condition, what a settled page must not contain (requests that left
the machine, raw TeX, TensorFlow log lines), the charts an executed notebook made, and how
Chromium is found (``STEALNB_CHROMIUM``)."""
import asyncio
import json
import os

import pytest

from stealnb.report import bookcheck
from stealnb.report.bookcheck import notebook_plots, page_errors, pending_requests, settled


def ev(method, **params):
    return {"method": method, "params": params}


def console(kind, *values):
    return ev("Runtime.consoleAPICalled", type=kind, args=[{"type": "string", "value": v} for v in values])


def test_page_errors_keeps_errors_and_drops_the_rest():
    events = [
        console("log", "hello"), console("warning", "deprecated"), console("info", "x"), console("debug", "y"),
        console("error", "Plotly is not defined", "(x)"),
        console("assert", "console.assert"),
        ev("Runtime.exceptionThrown", exceptionDetails={"text": "Uncaught", "exception": {
            "description": "TypeError: a is undefined\n    at f (page.html:3)"}}),
        ev("Runtime.exceptionThrown", exceptionDetails={"text": "Uncaught SyntaxError"}),
        ev("Log.entryAdded", entry={"level": "warning", "source": "other", "text": "meh"}),
        ev("Log.entryAdded", entry={"level": "error", "source": "network", "text": "Failed to load resource",
                                    "url": "file:///b/_static/x.js"}),
        ev("Network.requestWillBeSent", requestId="7", request={"url": "file:///b/_static/missing.css"}),
        ev("Network.loadingFailed", requestId="7", errorText="net::ERR_FILE_NOT_FOUND"),
        ev("Network.requestWillBeSent", requestId="8", request={"url": "file:///b/img.png"}),
        ev("Network.loadingFailed", requestId="8", errorText="net::ERR_ABORTED", canceled=True),
        ev("Network.loadingFailed", requestId="9", errorText="net::ERR_FAILED"),  # no request seen
        ev("Page.loadEventFired", timestamp=1.0),
    ]
    assert page_errors(events) == [
        "console.error: Plotly is not defined (x)",
        "console.assert: console.assert",
        "exception: TypeError: a is undefined\n    at f (page.html:3)",
        "exception: Uncaught SyntaxError",
        "network: Failed to load resource file:///b/_static/x.js",
        "load failed: net::ERR_FILE_NOT_FOUND file:///b/_static/missing.css",
        "load failed: net::ERR_FAILED request 9",
    ]
    assert page_errors([console("log", "ok"), ev("Page.loadEventFired")]) == []


def test_pending_requests():
    events = [ev("Network.requestWillBeSent", requestId="1", request={"url": "a"}),
              ev("Network.requestWillBeSent", requestId="2", request={"url": "b"}),
              ev("Network.requestWillBeSent", requestId="3", request={"url": "c"}),
              ev("Network.loadingFinished", requestId="1"), ev("Network.loadingFailed", requestId="3")]
    assert pending_requests(events) == ["b"]
    assert pending_requests(events + [ev("Network.loadingFinished", requestId="2")]) == []


@pytest.mark.parametrize("state, pending, expected, ok", [
    ({"ready": "complete", "plots": 3, "rendered": 3}, [], None, True),
    ({"ready": "complete", "plots": 3, "rendered": 3}, [], 3, True),
    ({"ready": "complete", "plots": 0, "rendered": 0}, [], None, True),  # a text page
    ({"ready": "complete", "plots": 3, "rendered": 2}, [], 3, False),  # one chart not drawn yet
    ({"ready": "complete", "plots": 2, "rendered": 2}, [], 3, False),  # a placeholder not there yet
    ({"ready": "interactive", "plots": 3, "rendered": 3}, [], 3, False),
    ({"ready": "complete", "plots": 3, "rendered": 3}, ["file:///x.js"], 3, False),
    ({"ready": "complete", "plots": 0, "rendered": 0, "math": 4, "math_rendered": 4}, [], None, True),
    ({"ready": "complete", "plots": 0, "rendered": 0, "math": 4, "math_rendered": 1}, [], None, False),  # MathJax busy
])
def test_settled(state, pending, expected, ok):
    assert settled(state, pending, expected) is ok


class FakeCDP:
    """Answers the page-state query from a script of states; ``drain`` advances a fake clock."""

    def __init__(self, states, events=()):
        self.states, self.events, self.now, self.calls = list(states), list(events), 0.0, 0

    async def call(self, method, params=None):
        assert method == "Runtime.evaluate" and params["returnByValue"]
        self.calls += 1
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if isinstance(state, Exception):
            raise state
        return {"result": {"value": state}}

    async def drain(self, seconds):
        self.now += seconds

    def clock(self):
        return self.now


def _wait(cdp, expected, timeout):
    return asyncio.run(bookcheck.wait_until_settled(cdp, expected, timeout, poll=0.5, clock=cdp.clock))


def test_wait_until_settled_returns_once_every_chart_is_drawn():
    loading = {"ready": "interactive", "plots": 0, "rendered": 0}
    placed = {"ready": "complete", "plots": 2, "rendered": 1}
    done = {"ready": "complete", "plots": 2, "rendered": 2}
    cdp = FakeCDP([loading, placed, placed, done, done])
    state, ok = _wait(cdp, 2, timeout=30)
    assert ok and state == done and cdp.calls == 4 and cdp.now == 1.5


def test_wait_until_settled_waits_through_a_document_being_replaced():
    gone = RuntimeError("Runtime.evaluate: {'code': -32000, 'message': 'Inspected target navigated or closed'}")
    done = {"ready": "complete", "plots": 1, "rendered": 1}
    cdp = FakeCDP([gone, done])
    assert _wait(cdp, 1, timeout=30) == (done, True) and cdp.calls == 2
    with pytest.raises(RuntimeError, match="Chromium closed"):  # any other failure is not waited for
        _wait(FakeCDP([RuntimeError("Chromium closed the DevTools connection")]), 1, timeout=30)


def test_wait_until_settled_gives_up_at_the_timeout():
    cdp = FakeCDP([{"ready": "complete", "plots": 2, "rendered": 1}])
    state, ok = _wait(cdp, 2, timeout=5)
    assert not ok and state["rendered"] == 1 and cdp.now == 5.0
    # a pending request also keeps the page from settling
    cdp = FakeCDP([{"ready": "complete", "plots": 0, "rendered": 0}],
                  [ev("Network.requestWillBeSent", requestId="1", request={"url": "file:///slow.js"})])
    assert _wait(cdp, None, timeout=1) == ({"ready": "complete", "plots": 0, "rendered": 0}, False)
    assert bookcheck._settle_errors({"ready": "complete", "plots": 2, "rendered": 1}, ["file:///slow.js"], 2, 5) == [
        "plotly: 1 of 2 chart(s) drawn after 5 s", "1 request(s) still pending after 5 s: file:///slow.js"]


def test_a_page_that_requests_anything_but_local_files_did_not_render_offline():
    events = [ev("Network.requestWillBeSent", requestId="1", request={"url": "file:///b/_static/mathjax/tex-chtml.js"}),
              ev("Network.requestWillBeSent", requestId="2", request={"url": "data:font/woff2;base64,AAAA"}),
              ev("Network.requestWillBeSent", requestId="3",
                 request={"url": "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"}),
              ev("Network.requestWillBeSent", requestId="4", request={"url": "http://127.0.0.1:8000/x.png"}),
              ev("Network.loadingFinished", requestId="1")]
    assert bookcheck.offsite_requests(events) == [
        "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js", "http://127.0.0.1:8000/x.png"]
    assert bookcheck.offsite_requests(events[:2]) == []


def test_raw_tex_left_in_the_prose_is_found_and_typeset_or_plain_dollars_are_not():
    assert bookcheck.raw_math("Agreement is 0.75 and costs $5 a query.") == []
    found = bookcheck.raw_math("the entropy $$ H(p) = -\\sum_i p_i $$ and \\(x\\) inline, \\[y\\] display")
    assert len(found) == 4 and all(any(d in f for d in ("$$", "\\(", "\\[")) for f in found)


def test_tensorflow_log_lines_in_a_pages_text_are_found():
    text = "\n".join([
        "Agreement at 1,000 queries: 0.75",
        "I0000 00:00:1764680000.123456   4242 cpu_feature_guard.cc:210] This TensorFlow binary is optimized",
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "WARNING:tensorflow:5 out of the last 5 calls to <function f> triggered tf.function retracing.",
        "E0000 00:00:1764680000.5   4242 cuda_executor.cc:1228] INTERNAL: CUDA Runtime error",
        "the word tensorflow in a sentence is not a log line",
    ])
    found = bookcheck.tf_log_lines(text)
    assert [f[:12] for f in found] == ["I0000 00:00:", "WARNING: All", "WARNING:tens", "E0000 00:00:"]
    assert bookcheck.tf_log_lines("Agreement 0.75\nno logs here") == []


def test_content_errors_name_each_problem_of_a_settled_page():
    events = [ev("Network.requestWillBeSent", requestId="1", request={"url": "https://cdn.example/x.js"})]
    errors = bookcheck.content_errors(events, {"text": "WARNING:tensorflow:retracing", "prose": "left $$x$$"})
    assert errors[0] == "request left the machine: https://cdn.example/x.js"
    assert [e.split(":")[0] for e in errors[1:]] == ["raw TeX in the page"] * 2 + ["TensorFlow log line in the page"]
    assert bookcheck.content_errors([], {"text": "fine", "prose": "fine $x$"}) == []
    assert bookcheck._settle_errors({"ready": "complete", "plots": 0, "rendered": 0, "math": 3, "math_rendered": 1},
                                    [], None, 5) == ["MathJax: 1 of 3 equation(s) typeset after 5 s"]


def _fig_html(n=1):
    return "".join(f'<div>  <div id="f{i}" class="plotly-graph-div" style="height:525px"></div>'
                   f'<script>Plotly.newPlot("f{i}", [], {{}})</script></div>' for i in range(n))


def test_notebook_plots_counts_the_charts_a_notebook_shows(tmp_path):
    plotly_json = {"data": [], "layout": {}}
    nb = {"cells": [
        {"cell_type": "markdown", "source": [_fig_html()]},  # text, not an output
        {"cell_type": "code", "source": [], "outputs": [
            {"output_type": "display_data", "data": {"application/vnd.plotly.v1+json": plotly_json,
                                                      "text/html": _fig_html()}},  # one chart, two mimetypes
            {"output_type": "stream", "name": "stdout", "text": 'class="plotly-graph-div"'},
        ]},
        {"cell_type": "code", "source": [], "outputs": [
            {"output_type": "execute_result", "data": {"text/html": [_fig_html(2)], "text/plain": "x"}},
            {"output_type": "display_data", "data": {"application/vnd.plotly.v1+json": plotly_json}},  # JSON only
            {"output_type": "display_data", "data": {"text/html": "<table></table>"}},
            {"output_type": "error", "ename": "E", "evalue": "", "traceback": []},
        ]},
        {"cell_type": "code", "source": [], "outputs": []},
    ]}
    assert notebook_plots(nb) == 4
    path = tmp_path / "book" / "x.ipynb"
    path.parent.mkdir()
    path.write_text(json.dumps(nb))
    assert notebook_plots(path) == 4
    html = tmp_path / "html"
    (html / "_sources" / "book").mkdir(parents=True)
    (html / "_sources" / "book" / "x.ipynb").write_text(json.dumps(nb))
    (html / "_sources" / "intro.md").write_text("# intro")
    assert bookcheck.expected_from_sources(html) == {"book/x.html": 4}


def _exe(path):
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_find_chromium_honours_STEALNB_CHROMIUM(tmp_path, monkeypatch):
    fake = _exe(tmp_path / "my-chrome")
    monkeypatch.setenv("STEALNB_CHROMIUM", fake)
    assert bookcheck.find_chromium() == fake
    missing = str(tmp_path / "nope" / "chromium")
    monkeypatch.setenv("STEALNB_CHROMIUM", missing)
    assert bookcheck.find_chromium() is None  # no fallback to PATH
    assert f"STEALNB_CHROMIUM={missing} is not an executable" in bookcheck.chromium_missing_reason()
    with pytest.raises(FileNotFoundError, match="STEALNB_CHROMIUM=.* is not an executable"):
        bookcheck.check_book(tmp_path)
    monkeypatch.delenv("STEALNB_CHROMIUM")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    assert bookcheck.find_chromium() is None
    assert "apt-get install chromium" in bookcheck.chromium_missing_reason()
    _exe(bindir / "chromium-browser")
    assert bookcheck.find_chromium() == os.path.join(bindir, "chromium-browser")
