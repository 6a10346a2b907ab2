"""alphascope dashboard entry point: `streamlit run app.py`."""
import streamlit as st

st.set_page_config(page_title="alphascope", layout="wide")
st.title("alphascope")
st.write("Heavy-tailed spectral analysis of LLM weights, and pruning guided by it.")
