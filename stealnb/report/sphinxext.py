"""Sphinx extension for the book: serve plotly.js from the build folder (no CDN; the book must
render offline), and drop a duplicated theme script. Enabled in ``_config.yml``
(``sphinx: extra_extensions``).

The executed notebooks' figures are HTML snippets that expect a global ``Plotly``
(:func:`stealnb.report.plots.setup`); this adds ``_static/plotly.min.js`` -- the copy shipped inside the
installed ``plotly`` package, so the versions match -- to every page's ``<head>``.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def _plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in the plotly package at {path}")
    return path


def _copy(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        static = Path(app.outdir) / "_static"
        static.mkdir(parents=True, exist_ok=True)
        shutil.copy2(_plotly_js(), static / "plotly.min.js")


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    """Drop repeated ``<script>`` entries. jupyter-book 1 registers sphinx-thebe's inline
    ``const THEBE_JS_URL = ...`` twice, and the second copy is a SyntaxError on every page."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        # The copies differ only in filename None vs "" (both: an inline script).
        key = (str(getattr(js, "filename", js) or ""), repr(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def setup(app):
    _plotly_js()  # fail at start-up, not with blank charts
    app.add_js_file("plotly.min.js", priority=100)
    app.connect("build-finished", _copy)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
