"""Compare page: every finished prune run from the run store (SQLite), side by side."""
import pandas as pd
import streamlit as st

from analysis.store import RunStore, StoreError, run_summary
from analysis.zeroshot import record_accuracy
from components.figures import curves_figure, ppl_vs_sparsity_figure
from components.state import runs_store

st.title("Compare runs")
try:
    store = runs_store()
    runs = store.all()
except StoreError as e:
    st.error(str(e))
    st.stop()
st.caption(f"Runs are kept in {store.path}; every finished prune on the Prune "
           "page (from any session) is added there.")
if runs.empty:
    st.info("No runs yet. Prune a model on the Prune page; finished runs appear here.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=1024)
def _details(path: str, run_id: int) -> dict:
    """Achieved sparsity, per-block allocation and zero-shot accuracies of a run (records never change
    once stored)."""
    record = RunStore(path).get(run_id)
    return {**run_summary(record), "zeroshot": record_accuracy(record)}


details = [_details(str(store.path), int(i)) for i in runs["id"]]
runs = runs.assign(achieved=[d["achieved"] for d in details], eval=[d["eval"] for d in details])
# one "acc <task>" column per zero-shot task any run was scored on (runs pruned with --tasks)
accuracy = pd.DataFrame([d["zeroshot"] for d in details], index=runs.index).add_prefix("acc ")
runs = pd.concat([runs, accuracy], axis=1)
per_block = {int(i): d["per_block"] for i, d in zip(runs["id"], details)}

f1, f2, f3 = st.columns(3)
models = sorted(runs["model"].astype(str).unique())
chosen = f1.multiselect("Models", models, default=models, key="compare_models")
methods = sorted(runs["method"].astype(str).unique())
pick = f2.multiselect("Pruning methods", methods, default=methods, key="compare_methods")
evals = sorted(runs["eval"].astype(str).unique())
ev = f3.selectbox("Evaluation text", evals, key="compare_eval",
                  help="Perplexities are only comparable on the same evaluation text.")
view = runs[runs["model"].astype(str).isin(chosen) & runs["method"].astype(str).isin(pick)
            & (runs["eval"].astype(str) == ev)]

st.subheader("Perplexity vs sparsity, per allocation method")
plot = view.dropna(subset=["pruned_ppl"]).assign(
    label=lambda d: d["method"].astype(str) + " + " + d["allocation_method"].astype(str))
if len(plot):
    st.plotly_chart(ppl_vs_sparsity_figure(plot, x="achieved", y="pruned_ppl", color="label"), key="compare_ppl")
dense = view["dense_ppl"].dropna()
if len(dense):
    st.caption(f"Dense perplexity on this text: {dense.iloc[-1]:.2f}")

st.subheader("Allocation curves")
labels = {int(r.id): f"#{r.id} {r.method} + {r.allocation_method} {float(r.achieved or 0):.0%}"
          for r in view.itertuples()}
chosen_runs = st.multiselect("Runs to overlay", list(labels), default=list(labels)[-5:], format_func=labels.get,
                             key="compare_curves")
curves = [(labels[i], per_block[i]) for i in chosen_runs if per_block.get(i)]
if curves:
    st.plotly_chart(curves_figure(curves), key="compare_curves_chart")

st.subheader("All runs")
st.dataframe(runs, hide_index=True, key="compare_table")
st.download_button("Download runs (CSV)", runs.to_csv(index=False).encode(), file_name="runs.csv",
                   mime="text/csv", key="compare_csv")
