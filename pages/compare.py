"""Compare page: every finished prune run from the run store (SQLite), side by side, and sweeps
(a grid of runs, launched here as a background job)."""
from dataclasses import replace

import pandas as pd
import streamlit as st

from analysis.jobs import ERROR
from analysis.loading import model_group
from analysis.pruners import PRUNERS, ROWWISE
from analysis.settings import (
    QUICK_EVALUATION,
    SEARCH_OBJECTIVES,
    SEARCH_SPACES,
    SEARCH_STEP_MAX,
    VERIFY_MODES,
    AllocationSettings,
    CalibrationSettings,
    ModelSettings,
    PruneSettings,
    RunSettings,
    SettingsError,
)
from analysis.store import RunStore, StoreError, run_summary
from analysis.sweep import (
    NAMED_ALLOCATIONS,
    SweepGrid,
    check_address,
    grid_from_text,
    outcome_table,
    run_line,
    run_sweep,
    sweep_row,
)
from analysis.zeroshot import record_accuracy
from components.figures import curves_figure, model_names, ppl_vs_sparsity_figure, sweep_figure
from components.labels import OBJECTIVE_LABELS, SPACE_LABELS, VERIFY_LABELS
from components.state import model_key, runs_store, start_sweep_job, sweep_job, through_app

through_app(__file__)  # (after a server restart, a tab that comes back starts from app.py)

st.title("Compare runs")
try:
    store = runs_store()
    runs = store.all()
except StoreError as e:
    st.error(str(e))
    st.stop()
st.caption(f"Runs are kept in {store.path}; every finished prune on the Prune "
           "page (from any session) is added there.")


def _grid(f: dict) -> SweepGrid:
    """The sweep the form describes (SettingsError on a bad field)."""
    evaluation = replace(QUICK_EVALUATION, source=f["eval"].strip(), max_windows=int(f["max_windows"]))
    base = RunSettings(model=ModelSettings(f["model"].strip()), evaluation=evaluation,
                       allocation=AllocationSettings(search_steps=int(f["search_steps"]),
                                                     search_step=float(f["search_step"]),
                                                     search_space=f["search_space"],
                                                     search_objective=f["search_objective"],
                                                     search_verify=f["search_verify"],
                                                     search_text=f["search_text"].strip() or None,
                                                     search_then_steps=int(f["search_then_steps"])))
    return grid_from_text(base, methods=",".join(f["methods"]), allocations=",".join([*f["allocations"], f["files"]]),
                          sparsities=f["sparsities"], epsilons=f["epsilons"], owl_lambdas=f["owl_lambdas"],
                          seeds=f["seeds"], curves=tuple(f["curves"].splitlines()), rowwise=",".join(f["rowwise"]))


running = sweep_job()
running = running if running is not None and not running.done else None
with st.expander("Run a sweep", expanded=False):
    st.caption("Every combination of the values below is pruned and evaluated like a run on the Prune page "
               f"(calibration: the embedded corpus, {CalibrationSettings.n_samples} x {CalibrationSettings.seqlen} "
               "tokens) and stored here; configurations already stored are skipped. More than one worker, or a "
               "Ray address, runs them as Ray tasks; the sweep loads its own copy of the model. `auto` runs the "
               "allocation search in each configuration, seeded by its calibration seed.")
    # locked while a sweep runs: a field typed in meanwhile would be submitted later while showing an older value
    locked = running is not None
    with st.form("sweep_form", enter_to_submit=False):  # Enter in a field is an edit, not a sweep of many runs
        c1, c2, c3 = st.columns(3)
        form = {
            "model": c1.text_input("Model", value=(model_key() or ("default",))[0], key="sweep_model", disabled=locked),
            "methods": c1.multiselect("Pruners", list(PRUNERS), default=[PruneSettings.method],
                                    key="sweep_methods", disabled=locked),
            "rowwise": c1.multiselect("Row-wise sparsity", ["none", *ROWWISE], default=["none"], key="sweep_rowwise",
                                      disabled=locked, help="Per-row ratios inside each matrix (TRIM), as on the "
                                                            "Prune page; both runs every configuration both ways."),
            "allocations": c1.multiselect("Allocations", list(NAMED_ALLOCATIONS), default=["uniform", "alphapruning"],
                                          key="sweep_allocations", disabled=locked),
            "files": c1.text_input("Allocation JSON files (comma-separated)", key="sweep_files", disabled=locked),
            "curves": c2.text_area("Custom curves, one per line (depth:sparsity,...)", key="sweep_curves",
                                   disabled=locked, placeholder="0:0.4,0.5:0.6,1:0.8"),
            "sparsities": c2.text_input("Sparsities", "0.5,0.6,0.7", key="sweep_sparsities", disabled=locked),
            "epsilons": c2.text_input("Epsilons (alphapruning, farms)", f"{AllocationSettings.epsilon:g}",
                                      key="sweep_epsilons", disabled=locked),
            "owl_lambdas": c2.text_input("OWL lambdas", f"{AllocationSettings.owl_lambda:g}", key="sweep_owl_lambdas",
                                          disabled=locked),
            "search_steps": c2.number_input("Search generations (auto)", 1, 500, AllocationSettings.search_steps,
                                            key="sweep_search_steps", disabled=locked),
            "search_then_steps": c2.number_input("Then: more generations (auto)", 0, 500,
                                                 AllocationSettings.search_then_steps, key="sweep_search_then_steps",
                                                 disabled=locked,
                                                 help="A second stage from the search's result, its real prunes "
                                                      "scored on twice the windows of the search text, which it "
                                                      "needs (as on the Allocation page)."),
            "search_step": c2.number_input("Search step (auto)", 0.005, SEARCH_STEP_MAX, AllocationSettings.search_step,
                                           0.005, format="%.3f", key="sweep_search_step", disabled=locked),
            "search_text": c2.text_input("Search scored on (auto; empty: the calibration text)",
                                         key="sweep_search_text", disabled=locked,
                                         help="A held-out text source, best the valid split of the evaluation "
                                              "text's domain (wikitext2:valid for wikitext2:test); never the "
                                              "evaluation text."),
            "search_space": c2.selectbox("Search space (auto)", SEARCH_SPACES, key="sweep_search_space",
                                         disabled=locked,
                                         index=SEARCH_SPACES.index(AllocationSettings.search_space),
                                         format_func=SPACE_LABELS.get,
                                         help="Per block, or also one offset per matrix kind shared by every block "
                                              "(as on the Allocation page)."),
            "search_objective": c2.selectbox("Search objective (auto)", SEARCH_OBJECTIVES, key="sweep_search_objective",
                                             disabled=locked,
                                             index=SEARCH_OBJECTIVES.index(AllocationSettings.search_objective),
                                             format_func=OBJECTIVE_LABELS.get),
            "search_verify": c2.selectbox("Prune for real (auto)", VERIFY_MODES, key="sweep_search_verify",
                                          disabled=locked,
                                          index=VERIFY_MODES.index(AllocationSettings.search_verify),
                                          format_func=VERIFY_LABELS.get,
                                          help="What the search confirms with a full prune instead of its fast proxy "
                                               "(as on the Allocation page)."),
            "seeds": c3.text_input("Calibration seeds", "0,1", key="sweep_seeds", disabled=locked),
            "eval": c3.text_input("Evaluation text", QUICK_EVALUATION.source, key="sweep_eval", disabled=locked),
            "max_windows": c3.number_input("Evaluation windows", 1, 10_000, QUICK_EVALUATION.max_windows,
                                           key="sweep_max_windows", disabled=locked),
            "workers": c3.number_input("Workers", 1, 64, 1, key="sweep_workers", disabled=locked),
            "address": c3.text_input("Ray address (empty: this machine)", key="sweep_address", disabled=locked,
                                     help="An existing cluster: host:port (its GCS, from a node of the cluster) "
                                     "or ray://host:10001 (Ray Client). A cluster with token authentication "
                                     "needs the app started with RAY_AUTH_MODE=token and the token "
                                     "(RAY_AUTH_TOKEN or ~/.ray/auth_token).").strip() or None,
        }
        start = st.form_submit_button("Start the sweep", disabled=running is not None,
                                      help="One sweep runs at a time in this server; the running one is shown "
                                           "below this form, in every tab." if running is not None else None)
    if start:
        try:
            grid = _grid(form)
            check_address(form["address"])
        except (SettingsError, ValueError) as e:
            st.error(f"{str(e.field).removeprefix('sweep.') + ': ' if getattr(e, 'field', None) else ''}{e}")
            st.session_state.pop("sweep_seen", None)  # an earlier sweep's outcome is not this form's
        else:
            path, workers, address = str(store.path), int(form["workers"]), form["address"]
            job = start_sweep_job(lambda j: run_sweep(grid, RunStore(path), workers=workers, address=address,
                                                      progress=j.report, detail=True, stop=j.stop,
                                                      on_outcome=j.emit))
            if job is None:
                st.error("Another sweep is running in this server (started in another tab); wait for it to end "
                         "or cancel it below.")
            else:
                st.session_state["sweep_seen"] = job
                st.rerun()  # the form redrawn with its button disabled while the sweep runs

job = sweep_job()
if job is not None and (not job.done or st.session_state.get("sweep_seen") is job):
    st.session_state["sweep_seen"] = job  # a tab that saw it running sees how it ended

    @st.fragment(run_every=1.0 if not job.done else None)
    def _sweep_progress():
        msg, frac = job.progress
        # a run in progress stops at its next block (Ray tasks at once): say so until the sweep has ended
        pending = "Cancelling (the run in progress stops at its next block; finished runs stay stored): " \
            if job.cancelled and not job.done else ""
        st.progress(frac, text=f"Sweep ({job.status}): {pending}{msg} ({job.elapsed:.0f} s)")
        if not job.done and not job.cancelled and st.button("Cancel the sweep", key="sweep_cancel"):
            job.cancel()
            st.rerun(scope="fragment")  # without the button, saying it is cancelling
        if job.status == ERROR:
            st.error(f"The sweep failed: {job.error}")
        if job.updates():
            st.dataframe(outcome_table(job.updates(), stored=store.revisions()), hide_index=True,
                         key="sweep_outcomes")
        if job.done and st.session_state.get("sweep_shown") is not job:
            st.session_state["sweep_shown"] = job
            # the sweep just ended: redraw the page with its runs (and the form's button), the filters started
            st.session_state["_compare_reset"] = True  # again (all models and pruners, the newest evaluation)
            st.rerun()

    _sweep_progress()

if runs.empty:
    st.info("No runs yet. Prune a model on the Prune page; finished runs appear here.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=1024)
def _details(path: str, run_id: int, revision: int) -> dict:
    """Achieved sparsity, per-block allocation, zero-shot accuracies, line and setup of a run, and its sweep row
    if a sweep made it (a record changes only by RunStore.update, which counts its revision)."""
    record = RunStore(path).get(run_id)
    config = record.get("config") or {}
    line = run_line(record) or {"line": f"{config.get('method')} + {config.get('allocation')}", "setup": ""}
    return {**run_summary(record), **line, "zeroshot": record_accuracy(record), "sweep": sweep_row(record)}


revisions = store.revisions()
details = [_details(str(store.path), int(i), revisions.get(int(i), 0)) for i in runs["id"]]
# (a whole number, empty for a run that read no calibration text, not 0.0 in the downloaded CSV)
runs = runs.assign(achieved=[d["achieved"] for d in details],
                   epsilon=pd.array([d["epsilon"] for d in details], dtype="Float64"),
                   owl_lambda=pd.array([d["owl_lambda"] for d in details], dtype="Float64"),
                   calibration=[d["calibration"] for d in details],
                   seed=pd.array([d["seed"] for d in details], dtype="Int64"),
                   eval=[d["eval"] for d in details], line=[d["line"] for d in details],
                   setup=[d["setup"] for d in details], model=runs["model"].map(model_group))
# one "acc <task>" column per zero-shot task any run was scored on (--tasks, or Score on the Prune page)
accuracy = pd.DataFrame([d["zeroshot"] for d in details], index=runs.index).add_prefix("acc ")
runs = pd.concat([runs, accuracy], axis=1)
per_block = {int(i): d["per_block"] for i, d in zip(runs["id"], details)}

reset = st.session_state.pop("_compare_reset", False)


def _filter(key: str, options: list, default):
    """Set the filter widget `key`'s value before it is drawn: `default` at first or after a sweep (`reset`);
    else the user's choice less what is no longer an option (nothing left: `default`; an emptied multiselect stays
    empty). Set through the session state, which the browser's widget follows: a widget's own default does not
    replace a value the browser already shows."""
    current = st.session_state.get(key)
    if reset or current is None:
        value = default
    elif isinstance(current, list):
        value = [v for v in current if v in options] or (default if current else [])
    else:
        value = current if current in options else default
    if value != current:
        st.session_state[key] = value


f1, f2 = st.columns(2)
models = sorted(runs["model"].astype(str).unique())
_filter("compare_models", models, models)
chosen = f1.multiselect("Models", models, key="compare_models")
methods = sorted(runs["method"].astype(str).unique())
_filter("compare_methods", methods, methods)
pick = f2.multiselect("Pruning methods", methods, key="compare_methods")
evals = sorted(runs["eval"].astype(str).unique())
_filter("compare_eval", evals, str(runs.loc[runs["id"].idxmax(), "eval"]))  # the newest run's
ev = st.selectbox("Evaluation", evals, key="compare_eval",  # a row of its own: the labels are long
                  help="Perplexities are only comparable on the same evaluation text, windows and window length.")
view = runs[runs["model"].astype(str).isin(chosen) & runs["method"].astype(str).isin(pick)
            & (runs["eval"].astype(str) == ev)]

st.subheader("Perplexity vs sparsity, per pruner and allocation")
# a line per pruner and allocation as set (ε, λ, curve, TRIM), and per calibration setup where runs differ in it
plot = view.dropna(subset=["pruned_ppl"]).assign(label=lambda d: d["line"])
if plot["setup"].nunique() > 1:
    plot = plot.assign(label=plot["label"] + " · " + plot["setup"])
if plot["model"].nunique() > 1:  # a line joins runs of one model only
    plot = plot.assign(label=plot["model"].astype(str).map(model_names(plot["model"])) + " · " + plot["label"])
if len(plot):
    st.plotly_chart(ppl_vs_sparsity_figure(plot, x="achieved", y="pruned_ppl", color="label"), key="compare_ppl")
dense = view.dropna(subset=["dense_ppl"]).groupby(view["model"].astype(str))["dense_ppl"].last()
if len(dense):
    st.caption("Dense perplexity on this evaluation: "
               + "; ".join(f"{model} {ppl:.2f}" if len(dense) > 1 else f"{ppl:.2f}" for model, ppl in dense.items()))

st.subheader("Sweeps")
sweep = pd.DataFrame([d["sweep"] for d in details if d["sweep"]])
if len(sweep):
    sweep = sweep.assign(model=sweep["model"].map(model_group))
    sweep = sweep[sweep["model"].astype(str).isin(chosen) & sweep["method"].astype(str).isin(pick)
                  & (sweep["eval"].astype(str) == ev)]
if len(sweep):
    st.plotly_chart(sweep_figure(sweep), key="compare_sweep")
    st.caption("Mean perplexity over calibration seeds against the target sparsity, one panel per pruner; bars "
               "span the lowest to the highest seed; the dashed line is each panel's Pareto front (no other "
               "point has both a higher sparsity and a lower perplexity).")
else:
    st.caption("No sweep runs for this selection yet: start one under 'Run a sweep' above, or with "
               "`python -m analysis sweep`.")

st.subheader("Allocation curves")
names = model_names(view["model"]) if view["model"].nunique() > 1 else {}


def _run_label(r, model: str = "") -> str:
    """A run, for a list: id, model (when given), pruner + allocation and achieved sparsity."""
    return f"#{r.id} {model + ' · ' if model else ''}{r.line} {float(r.achieved or 0):.0%}"


labels = {int(r.id): _run_label(r, names.get(str(r.model), "")) for r in view.itertuples()}
_filter("compare_curves", list(labels), list(labels)[-5:])
chosen_runs = st.multiselect("Runs to overlay", list(labels), format_func=labels.get, key="compare_curves")
curves = [(labels[i], per_block[i]) for i in chosen_runs if per_block.get(i)]
if curves:
    st.plotly_chart(curves_figure(curves), key="compare_curves_chart")

st.subheader("All runs")
st.dataframe(runs, hide_index=True, key="compare_table")
st.download_button("Download runs (CSV)", runs.to_csv(index=False).encode(), file_name="runs.csv",
                   mime="text/csv", key="compare_csv")
with st.expander("Delete runs"):
    every = {int(r.id): _run_label(r, str(r.model)) for r in runs.itertuples()}
    _filter("compare_delete", list(every), [])  # less what another tab deleted
    doomed = st.multiselect("Runs to delete", list(every), format_func=every.get, key="compare_delete")
    if st.button("Delete for good", key="compare_delete_go", disabled=not doomed,
                 help="From the run store, for every tab; a sweep that resumes runs a deleted configuration again."):
        held = store.revisions()  # another tab may have deleted some of them already
        store.delete([i for i in doomed if i in held])
        st.session_state.pop("compare_delete")
        st.rerun()
