"""alphascope engine: heavy-tailed spectral analysis of LLM weights and spectrum-guided pruning.

Never imports Streamlit; the dashboard (app.py, pages/) is a thin view over these modules.
"""
__version__ = "0.1.0"
