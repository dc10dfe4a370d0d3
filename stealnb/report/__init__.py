"""From result files to what a reader sees: tables (``results``), figures (``plots``), the notebook
grid and the book (``pipeline``, on Dask: ``cluster``), the book's browser check (``bookcheck``),
its Sphinx extension (``sphinxext``) and its benchmarks page (``benchpage``)."""
