# Two entry points (see README): `make demo` runs the main job, `make test` passes the tests.
# Both create the virtual environment .venv on first use; nothing else needs installing by hand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
PROFILE ?= demo

.PHONY: setup sysdeps demo test lab bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# A .venv made when pyproject.toml asked for tensorflow-cpu still holds it, and pip would put
	@# tensorflow beside it (two distributions writing the same files): remove both, install one.
	if $(BIN)/pip show --quiet tensorflow-cpu 2>/dev/null; then $(BIN)/pip uninstall --quiet --yes tensorflow-cpu tensorflow; fi
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# Optional Debian packages: Chromium for the book's browser test, real Fashion-MNIST for its
# loader test and the demo, the wallpaper photographs of the natural-patches pool
# (stealnb.core.data.WALLPAPER_PHOTOS). Installed when we are root with apt-get (.ci/sysdeps.sh). If
# one is still missing, CI=true fails here (the tests would fail, not skip); locally it warns and
# the tests that need it are skipped (natural-patches then uses the bundled photos only).
SYSPKGS = dataset-fashion-mnist chromium lomiri-wallpapers-16.04 mate-backgrounds
sysdeps:
	@WALLPAPER_PKGS="$(filter-out dataset-fashion-mnist chromium,$(SYSPKGS))" sh .ci/sysdeps.sh

demo: setup sysdeps
	$(BIN)/stealnb run --profile $(PROFILE) --jobs 2

test: sysdeps setup
	$(BIN)/python -m pytest

# JupyterLab on the notebooks. Its kernel is this venv's Python (jupyter_client runs the
# "python3" kernel with the server's interpreter; PATH puts `stealnb` in its terminals too). The
# notebooks' results_dir defaults to the project's results/ (stealnb.core.layout.results_root), so
# they share secrets and runs with papermill and `stealnb run` although the kernel runs in notebooks/.
LAB_PORT ?= 8888
lab: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/jupyter-lab --ServerApp.root_dir=notebooks --port=$(LAB_PORT) \
		$$([ "$$(id -u)" = 0 ] && echo --allow-root)

bench: setup
	$(BIN)/pip install --quiet -e ".[bench]"
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) _build results
