"""Small plotting helpers shared by the notebooks (plotly)."""
from __future__ import annotations

import os

BOOK_RENDERER = "stealnb_book"


def _register_book_renderer() -> None:
    """A plotly renderer for executed notebooks that the book publishes offline.

    Each figure becomes ``text/html`` *without* the 3.5 MB plotly.js library and without
    MathJax from a CDN: the book loads plotly.js once per page from its own ``_static`` folder
    (:mod:`stealnb.report.sphinxext`). The figure JSON (``application/vnd.plotly.v1+json``) is kept
    beside it, so JupyterLab shows the charts with plotly's own extension.
    """
    import plotly.io as pio
    from plotly.io._base_renderers import MimetypeRenderer

    class BookRenderer(MimetypeRenderer):
        def to_mimebundle(self, fig_dict):
            html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                               default_width="100%", default_height=525, validate=False)
            return {"text/html": html}

    if BOOK_RENDERER not in pio.renderers:
        pio.renderers[BOOK_RENDERER] = BookRenderer()


def setup(renderer: str | None = None) -> None:
    """Configure plotly for notebooks that papermill executes and the book renders offline.

    Default renderer ``plotly_mimetype+stealnb_book`` (see :func:`_register_book_renderer`);
    ``STEALNB_PLOTLY_RENDERER`` or ``renderer`` override it (e.g. ``"notebook"`` for the classic
    Jupyter Notebook, which embeds plotly.js in the notebook).
    """
    import plotly.io as pio

    _register_book_renderer()
    pio.renderers.default = renderer or os.environ.get("STEALNB_PLOTLY_RENDERER", f"plotly_mimetype+{BOOK_RENDERER}")


# -- figure builders for the notebooks (additive; all return plotly Figures) ------------------------

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")


def color(i: int) -> str:
    """The i-th colour of the notebooks' qualitative palette (plotly's D3 order)."""
    return _PALETTE[int(i) % len(_PALETTE)]


def _short(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def image_gallery(images, captions=None, *, cols: int = 10, row_labels=None, title: str | None = None,
                  scale: int = 2, caption_chars: int = 12, hover=None):
    """A grid of 32x32 images as one PNG-backed plotly figure, a caption above each tile.

    ``images``: float32 ``N x 32 x 32 x 3`` in [0, 1], or a list whose ``None`` entries are blank
    tiles (to start a new row). ``captions`` are shortened to ``caption_chars`` on the figure; the full
    text (or ``hover``) shows on mouse-over. ``row_labels`` name each row (left margin, shortened to
    16 characters, full text on mouse-over)."""
    import base64
    import io

    import numpy as np
    import plotly.graph_objects as go
    from PIL import Image

    from ..core._checks import check_images

    items = list(images)
    if not items:
        raise ValueError("images: expected at least one image")
    real = [im for im in items if im is not None]
    if real:
        check_images(np.stack(real), "images")
    captions = [""] * len(items) if captions is None else [str(c) for c in captions]
    if len(captions) != len(items):
        raise ValueError(f"captions: expected {len(items)}, got {len(captions)}")
    hover = captions if hover is None else [str(h) for h in hover]
    cols = max(1, min(int(cols), len(items)))
    rows = -(-len(items) // cols)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels: expected {rows} (one per row), got {len(row_labels)}")
    pad, cap = 2, 10  # pixels between tiles, caption band above each row (image pixels)
    pw, ph = 32 + pad, 32 + pad + cap
    canvas = np.full((rows * ph, cols * pw, 3), 255, np.uint8)
    xs, ys, texts = [], [], []
    annotations = []
    for i, im in enumerate(items):
        r, c = divmod(i, cols)
        y0, x0 = r * ph + cap, c * pw
        if im is not None:
            canvas[y0 : y0 + 32, x0 : x0 + 32] = np.round(np.asarray(im, np.float64) * 255).astype(np.uint8)
            xs.append(x0 + 16)
            ys.append(y0 + 16)
            texts.append(hover[i])
        if captions[i]:
            annotations.append(dict(x=x0 + 16, y=y0 - 1, xref="x", yref="y", text=_short(captions[i], caption_chars),
                                    showarrow=False, yanchor="bottom", font=dict(size=9)))
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    fig = go.Figure(go.Image(source=src, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=dict(size=scale * 28, opacity=0), text=texts,
                             hoverinfo="text", showlegend=False))
    left = 0
    if row_labels is not None:
        left = 90
        for r, lab in enumerate(row_labels):
            annotations.append(dict(x=0, y=r * ph + cap + 16, xref="paper", yref="y", text=_short(lab, 16), showarrow=False,
                                    xanchor="right", xshift=-6, font=dict(size=11), hovertext=str(lab)))
    fig.update_layout(annotations=annotations, title=title, width=cols * pw * scale + left + 40,
                      height=rows * ph * scale + (90 if title else 40),
                      margin=dict(l=left + 10, r=10, t=60 if title else 10, b=10), plot_bgcolor="white")
    fig.update_xaxes(visible=False, range=[-0.5, cols * pw - 0.5])
    fig.update_yaxes(visible=False, range=[rows * ph - 0.5, -0.5], scaleanchor="x")
    return fig


def line_band(stats, *, x: str = "queries", group: str = "strategy", title: str | None = None,
              y_title: str = "agreement", band: str = "std", percent: bool = False):
    """Mean lines with a band per ``group`` from :func:`stealnb.report.results.curve_stats` output
    (``mean``, ``std``, ``min``, ``max``, ``n``). ``band="std"``: mean ± std over seeds (none for
    a single seed); ``"range"``: min..max."""
    import numpy as np
    import plotly.graph_objects as go

    if band not in ("std", "range"):
        raise ValueError(f"band: expected 'std' or 'range', got {band!r}")
    f = 100.0 if percent else 1.0
    fig = go.Figure()
    for i, (name, g) in enumerate(stats.groupby(group, sort=False)):
        g = g.sort_values(x)
        c = color(i)
        if band == "std":
            lo, hi = g["mean"] - g["std"].fillna(0), g["mean"] + g["std"].fillna(0)
        else:
            lo, hi = g["min"], g["max"]
        if (g["n"] > 1).any():
            fig.add_trace(go.Scatter(x=np.concatenate([g[x], g[x][::-1]]), y=np.concatenate([hi, lo[::-1]]) * f,
                                     mode="lines", fill="toself", fillcolor=c, opacity=0.18, line=dict(width=0),
                                     hoverinfo="skip",
                                     name=f"{name} ({'±1 std' if band == 'std' else 'min–max'})", legendgroup=str(name),
                                     showlegend=False))
        fig.add_trace(go.Scatter(x=g[x], y=g["mean"] * f, mode="lines+markers", name=str(name), legendgroup=str(name),
                                 line=dict(color=c), customdata=np.stack([g["std"].fillna(0) * f, g["n"]], -1),
                                 hovertemplate="%{x}: %{y:.3f} ± %{customdata[0]:.3f} (n=%{customdata[1]})"))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y_title + (" (%)" if percent else ""), height=420)
    return fig


def timing_bars(timings, *, x: str = "round", title: str | None = None):
    """Stacked bars of the seconds per round spent querying, training, evaluating and selecting
    (:func:`stealnb.report.results.timing_table` rows of one run/strategy)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, phase in enumerate(("query", "train", "eval", "select")):
        fig.add_trace(go.Bar(x=timings[x], y=timings[phase], name=phase, marker_color=color(i)))
    fig.update_layout(barmode="stack", title=title, xaxis_title=x, yaxis_title="seconds", height=380)
    return fig


def confusion_heatmap(cm, class_names=None, *, normalize: bool = True, title: str | None = None):
    """Confusion matrix (rows = true class, columns = predicted), row-normalised by default;
    the counts show on hover."""
    import numpy as np
    import plotly.graph_objects as go

    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm: expected a square matrix, got shape {cm.shape}")
    names = [str(c) for c in (class_names if class_names is not None else range(len(cm)))]
    if len(names) != len(cm):
        raise ValueError(f"class_names: expected {len(cm)}, got {len(names)}")
    rows = cm.sum(axis=1, keepdims=True)
    z = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0) if normalize else cm
    fig = go.Figure(go.Heatmap(z=z, x=names, y=names, customdata=cm, colorscale="Blues",
                               hovertemplate="true %{y}, predicted %{x}: %{customdata} (%{z:.3f})<extra></extra>",
                               colorbar=dict(title="row share" if normalize else "count")))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", height=480, width=560)
    fig.update_xaxes(type="category")
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


def fold_box(fold_accuracies: dict, *, title: str | None = None, y_title: str = "test accuracy"):
    """Box plot with every point: ``{name: [accuracy per fold]}`` (thesis Table 5's spread)."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Box(y=list(v), name=str(k), boxpoints="all", jitter=0.3, pointpos=0,
                            marker_color=color(i)) for i, (k, v) in enumerate(fold_accuracies.items())])
    fig.update_layout(title=title, yaxis_title=y_title, height=380, showlegend=False)
    return fig


def figure_output(fig=None):
    """An ``ipywidgets.Output`` showing a plotly figure, for live panels (notebook 07); update it
    with :func:`show_figure`.

    The figure is the Output's one ``display_data`` (plotly's ``application/vnd.plotly.v1+json``,
    drawn by JupyterLab's plotly extension), held in the widget's synced ``outputs`` state. So a
    page reloaded while the kernel runs draws the kernel's current figure, and the widget does not
    depend on a front-end extension of its own. (plotly's ``go.FigureWidget`` did not survive here:
    under JupyterLab 4.6 with plotly 7.1 on anywidget its views were drawn empty and, after a
    reload, stayed at "Loading widget...".)"""
    import ipywidgets as W

    out = W.Output()
    if fig is not None:
        show_figure(out, fig)
    return out


def show_figure(out, fig) -> None:
    """Replace what the Output ``out`` (:func:`figure_output`) shows by ``fig``, in one state update
    (it works from a button callback, where ``with out:`` capture would not)."""
    import json

    import plotly.io as pio

    fig_json = json.loads(pio.to_json(fig, validate=False))  # numpy arrays become JSON lists
    out.outputs = ({"output_type": "display_data", "metadata": {},
                    "data": {"application/vnd.plotly.v1+json": fig_json,
                             "text/plain": f"<plotly figure: {_title(fig_json) or 'untitled'}>"}},)


def shown_figure(out):
    """The plotly figure an Output of :func:`figure_output` shows now (``go.Figure``), or None."""
    import plotly.graph_objects as go

    for o in out.outputs:
        fig_json = o.get("data", {}).get("application/vnd.plotly.v1+json")
        if fig_json is not None:
            return go.Figure(fig_json)
    return None


def _title(fig_json: dict):
    t = fig_json.get("layout", {}).get("title")
    return t.get("text") if isinstance(t, dict) else t
