"""alphascope engine: heavy-tailed spectral analysis of LLM weights and spectrum-guided pruning.

Never imports Streamlit; the dashboard (app.py, pages/) is a thin view over these modules.
"""
from analysis.runtime import VERSION as __version__  # noqa: F401 (the package's version)
