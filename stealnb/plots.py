"""Small plotting helpers shared by the notebooks (plotly)."""
from __future__ import annotations

import os


def setup(renderer: str | None = None) -> None:
    """Configure plotly for notebooks that papermill executes and the book renders offline.

    The figure's JavaScript must be embedded (no CDN on an offline machine), hence the
    ``notebook`` renderer by default; ``STEALNB_PLOTLY_RENDERER`` overrides it.
    """
    import plotly.io as pio

    pio.renderers.default = renderer or os.environ.get("STEALNB_PLOTLY_RENDERER", "notebook")
