"""Shared fixtures: the real packaged default model, loaded once per test session."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def default_model():
    from analysis.models import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def wikitext_dir():
    if not (WIKITEXT / "test.txt").exists():
        pytest.skip("WikiText-2 not found beside the checkout (../shared/data/wikitext-2)")
    return WIKITEXT
