"""alphascope dashboard entry point: `streamlit run app.py`.

The pages in pages/ are thin views: computations live in analysis/, figures in components/figures.py,
shared state (model cache, background jobs, per-session copies) in components/state.py.
"""
import streamlit as st

from components.state import current_model, model_key, model_label, session_work

st.set_page_config(page_title="alphascope", page_icon=":material/troubleshoot:", layout="wide")

PAGES = [
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/spectra.py", title="Spectra", icon=":material/insights:"),
    st.Page("pages/allocation.py", title="Allocation", icon=":material/tune:"),
    st.Page("pages/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/learn.py", title="Learn", icon=":material/school:"),
]
nav = st.navigation(PAGES)

with st.sidebar:
    st.markdown("### alphascope")
    st.caption("Heavy-tailed spectral analysis of LLM weights, and pruning guided by it.")
    key = model_key()
    if key is None:
        st.caption("No model loaded.")
    else:
        loaded = current_model()
        st.markdown(f"**Model:** {model_label(key)}  \n`{loaded.info.device}` · `{loaded.info.dtype}`")
        work = session_work()
        st.caption(f"Your weights: {'pruned copy — ' + work.label if work.pruned else 'dense (shared model)'}")

nav.run()
