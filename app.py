"""alphascope dashboard entry point: `streamlit run app.py`.

The pages in pages/ are thin views: computations live in analysis/, figures in components/figures.py,
shared state (model cache, background jobs, per-session copies) in components/state.py.
"""
import streamlit as st

from components.figures import favicon
from components.state import (
    current_model,
    finish_model_load,
    follow_url_model,
    model_key,
    model_label,
    persisted_settings,
    return_to_page,
    session_work,
)

st.set_page_config(page_title="alphascope", page_icon=favicon(), layout="wide")

PAGES = [
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/spectra.py", title="Spectra", icon=":material/insights:"),
    st.Page("pages/allocation.py", title="Allocation", icon=":material/tune:"),
    st.Page("pages/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/learn.py", title="Learn", icon=":material/school:"),
]
nav = st.navigation(PAGES)
return_to_page()  # a page Streamlit ran without this script (after a server restart) is shown again now

# Streamlit drops a widget's value at the end of a run in which its page was not shown. This script
# runs before every page: it keeps a shadow copy of each setting and puts it back when the widget's
# own value is gone, so a page shows what the user chose when they come back to it.
PERSIST = (
    "model_choice", "model_hf_id", "model_folder", "model_cached", "model_device", "model_dtype", "model_trust",
    "spectra_fit", "spectra_min_tail", "spectra_farms", "spectra_weights", "spectra_layer", "spectra_overlay",
    "spectra_depth_metric", "spectra_heat_metric", "spectra_log", "spectra_mp", "spectra_rand",
    "alloc_target", "alloc_epsilon", "alloc_mode", "alloc_more", "alloc_owl_lambda", "alloc_preset",
    "alloc_preset_points",
    "alloc_search_pruner", "alloc_search_steps", "alloc_search_step", "alloc_search_seed", "alloc_search_objective",
    "alloc_search_text", "alloc_search_verify", "alloc_search_samples", "alloc_search_space",
    "alloc_search_then_steps", "alloc_search_then_samples", "alloc_search_from_mine",
    "prune_method", "prune_nm", "prune_alloc", "prune_sparsity", "prune_epsilon", "prune_owl_lambda",
    "prune_calib_source", "prune_calib_seed",
    "prune_n_samples", "prune_calib_seqlen", "prune_eval_source", "prune_eval_own", "prune_eval_seqlen",
    "prune_windows", "prune_encoding", "prune_rowwise", "prune_export_dir", "prune_export_format",
    "prune_recipe_pruner", "prune_zs_tasks", "prune_zs_limit",
    "sweep_methods", "sweep_allocations", "sweep_files", "sweep_curves", "sweep_sparsities",
    "sweep_epsilons", "sweep_owl_lambdas", "sweep_search_steps", "sweep_search_then_steps", "sweep_search_step",
    "sweep_search_text", "sweep_search_space", "sweep_search_objective", "sweep_search_verify", "sweep_seeds",
    "sweep_rowwise", "sweep_eval", "sweep_max_windows", "sweep_workers", "sweep_address",
    "learn_kind", "learn_n", "learn_aspect", "learn_seed", "learn_log", "learn_fit", "learn_mu", "learn_family",
    "learn_strength", "learn_rank",
)
KEPT_STATE = ("alloc_points", "_alloc_offsets")  # the Allocation page's curve: state, not widgets; kept on a reload
# the prefix of each page's setting keys: a reload puts a setting back when its page is first shown (set before its
# widget ever existed in the session, Streamlit would later read that value back over the widget's own)
PAGE_KEYS = {"Model": "model_", "Spectra": "spectra_", "Allocation": "alloc_", "Prune": "prune_", "Compare": "sweep_",
             "Learn": "learn_"}
_shadow = persisted_settings()  # (a reload of the tab takes them back: the URL names them)
_waiting = st.session_state.setdefault("_restore_on_page", set(_shadow) - set(KEPT_STATE))
for _key in (*PERSIST, *KEPT_STATE):
    if _key in st.session_state:
        _shadow[_key] = st.session_state[_key]
    if _key in _waiting and not _key.startswith(PAGE_KEYS[nav.title]):
        continue
    _waiting.discard(_key)
    if _key in _shadow:  # assigning marks the value as the app's, which survives the page change
        st.session_state[_key] = _shadow[_key]

loading = finish_model_load()  # a load started on the Model page ends here, whichever page is shown
follow_url_model()  # a reload finds the model it had

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
        st.caption(f"Your weights: {work.describe()}")
    if loading is not None:
        st.caption(f"Loading {model_label(loading.tag)}…" if not loading.done else
                   f"Loading {model_label(loading.tag)} failed: the Model page says why.")
    if st.session_state.pop("_restored", False):
        st.caption("Your settings are back after the reload, with your weights: a prune started before it goes on "
                   "(Prune page), as do an allocation search (Allocation page) and a sweep (Compare). Finished runs "
                   "are in the run store, on Compare.")

nav.run()
