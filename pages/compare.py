"""Compare page: every finished prune run from the run store (SQLite), side by side."""
import json

import streamlit as st

from components.figures import curves_figure, ppl_vs_sparsity_figure

st.title("📊 Compare runs")
try:
    from analysis.runs import RunStore
except ImportError:
    st.info("The run store is not available in this installation.")
    st.stop()

store = RunStore()
runs = store.all()
st.caption(f"Runs are kept in {getattr(store, 'path', 'the run store')}; every finished prune on the Prune "
           "page (from any session) is added there.")
if runs.empty:
    st.info("No runs yet. Prune a model on the Prune page; finished runs appear here.")
    st.stop()

if "model" in runs.columns and runs["model"].nunique() > 1:
    models = sorted(runs["model"].astype(str).unique())
    chosen = st.multiselect("Models", models, default=models, key="compare_models")
    runs = runs[runs["model"].astype(str).isin(chosen)]

group = "allocation" if "allocation" in runs.columns else "method"
x = "achieved" if "achieved" in runs.columns else "sparsity"
methods = sorted(runs["method"].astype(str).unique()) if "method" in runs.columns else []
if len(methods) > 1:
    pick = st.radio("Pruning method", methods, horizontal=True, key="compare_method")
    view = runs[runs["method"].astype(str) == pick]
else:
    view = runs

st.subheader("Perplexity vs sparsity, per allocation")
if "ppl" in view.columns and len(view):
    st.plotly_chart(ppl_vs_sparsity_figure(view.dropna(subset=["ppl"]), x=x, y="ppl", color=group),
                    key="compare_ppl")

st.subheader("Allocation curves")


def _per_block(v):
    """per_block as stored: a list, or its JSON text."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return None
    return [float(r) for r in v] if isinstance(v, (list, tuple)) and v else None


if "per_block" in runs.columns:
    id_col = "id" if "id" in runs.columns else None
    labels = {i: f"#{row[id_col] if id_col else i} {row.get('method', '')} {row.get(group, '')} "
                 f"{float(row.get(x, 0)):.0%}" for i, row in runs.iterrows()}
    chosen_runs = st.multiselect("Runs to overlay", list(labels), default=list(labels)[-5:],
                                 format_func=labels.get, key="compare_curves")
    curves = [(labels[i], pb) for i in chosen_runs if (pb := _per_block(runs.loc[i, "per_block"]))]
    if curves:
        st.plotly_chart(curves_figure(curves), key="compare_curves_chart")

st.subheader("All runs")
st.dataframe(runs, hide_index=True, key="compare_table")
st.download_button("Download runs (CSV)", runs.to_csv(index=False).encode(), file_name="runs.csv",
                   mime="text/csv", key="compare_csv")
