# Two entry points (see README): `make demo` runs the main job, `make test` passes the tests.
# Both create the virtual environment .venv on first use; nothing else needs installing by hand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
PROFILE ?= demo

.PHONY: setup sysdeps demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# A .venv made when pyproject.toml asked for tensorflow-cpu still holds it, and pip would put
	@# tensorflow beside it (two distributions writing the same files): remove both, install one.
	if $(BIN)/pip show --quiet tensorflow-cpu 2>/dev/null; then $(BIN)/pip uninstall --quiet --yes tensorflow-cpu tensorflow; fi
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# Optional Debian packages: real Fashion-MNIST for the demo, Chromium for the book's browser
# test, the wallpaper photographs of the natural-patches pool (stealnb.data.WALLPAPER_PHOTOS).
# Installed when we are root with apt-get; otherwise say what is missing and go on.
SYSPKGS = dataset-fashion-mnist chromium lomiri-wallpapers-16.04 mate-backgrounds
sysdeps:
	@if [ -d /usr/share/datasets/fashion-mnist ] && command -v chromium >/dev/null \
	  && [ -f /usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg ] && [ -d /usr/share/backgrounds/mate/nature ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSPKGS) >/dev/null) \
	  || echo "sysdeps: apt-get failed; Fashion-MNIST runs and the browser test will be skipped, natural-patches uses the bundled photos only"; \
	else echo "sysdeps: not root; run 'sudo apt-get install $(SYSPKGS)' for the full demo, pool and browser test"; fi

demo: setup sysdeps
	$(BIN)/stealnb run --profile $(PROFILE) --jobs 2

test: setup sysdeps
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/pip install --quiet -e ".[bench]"
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) _build results
