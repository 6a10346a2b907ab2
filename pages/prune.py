"""Prune page: prune this session's private copy in the background, watch perplexity live."""
import pandas as pd
import streamlit as st

from analysis.checkpoint import local_folder
from analysis.data import MAX_UPLOAD_MB, DataError, check_encoding, save_text, text_source_problem
from analysis.export import (
    COMPRESSED_NOTE,
    DEFAULT_FORMAT,
    FORMATS,
    RECIPE_PRUNERS,
    export,
    module_order,
    ratios_npy,
    recipe_caveats,
    recipe_note,
    recipe_pruner_for,
    recipe_yaml,
)
from analysis.jobs import CANCELLED, DONE, ERROR, PENDING, Job
from analysis.loading import ModelPreview
from analysis.pipeline import evaluation_windows
from analysis.pruners import PRUNERS, ROWWISE, nm_sparsity, parse_nm
from analysis.session import (
    ABANDON_S,
    evaluate_weights_job,
    prune_and_evaluate,
    prune_need,
    zeroshot_weights_job,
)
from analysis.settings import (
    QUICK_EVALUATION,
    QUICK_ZEROSHOT,
    SPECTRA_METHODS,
    AllocationSettings,
    CalibrationSettings,
    EvaluationSettings,
    ModelSettings,
    PruneSettings,
    RunSettings,
    SettingsError,
    SpectraSettings,
)
from analysis.store import StoreError, to_json
from analysis.zeroshot import PAPER_TASKS, local_tasks
from components.figures import ppl_figure
from components.state import (
    CUSTOM_ON_PRUNE,
    dense_ppl_job,
    model_key,
    non_finite_note,
    owl_job,
    peek_dense_ppl_job,
    remember_prune_data,
    require_model,
    require_tokenizer,
    runs_store,
    session_weights,
    session_work,
    spectra_job,
    through_app,
    weights_zero_fraction,
)

through_app(__file__)  # (after a server restart, a tab that comes back starts from app.py)

ALLOCATIONS = {"alphapruning (α-guided)": "alphapruning", "uniform": "uniform", "FARMS (α-guided)": "farms",
               "OWL (outlier-guided)": "owl", CUSTOM_ON_PRUNE: "custom"}
OWN_TEXT = "your own text (file path or hf:...)"
EVAL_SOURCES = ["default", "wikitext2:test", "wikitext2:valid", OWN_TEXT]
ALLOC_DEFAULT, CALIB_DEFAULT = AllocationSettings(), CalibrationSettings()


def _use_uploaded_text() -> None:
    """Keep an uploaded .txt and make it the evaluation text (a callback: runs before the widgets)."""
    up = st.session_state.get("prune_text_upload")
    st.session_state.pop("prune_upload_error", None)
    if hasattr(up, "getvalue"):  # not None, nor a DeletedFile (an upload gone from Streamlit's storage)
        try:
            encoding = st.session_state.get("prune_encoding") or CALIB_DEFAULT.encoding
            path = save_text(up.name, up.getvalue(), encoding=encoding)
        except DataError as e:  # too large or not text: refused, the evaluation text stays as it was
            st.session_state["prune_upload_error"] = str(e)
            return
        st.session_state["prune_eval_source"] = OWN_TEXT
        st.session_state["prune_eval_own"] = str(path)


st.title("Prune")
loaded = require_model()
require_tokenizer(loaded)
work = session_work()
job: Job | None = work.job
busy = job is not None and not job.done

st.caption("Pruning changes only your session's weights: a private copy of the model when memory allows, "
           "else the shared model itself, held for you until you restore it (other sessions' work on the "
           "dense weights waits meanwhile). Other sessions never see your pruned weights.")

c1, c2, c3, c4 = st.columns(4)
method = c1.selectbox("Method", list(PRUNERS), index=list(PRUNERS).index(PruneSettings.method), key="prune_method",
                      help="; ".join(f"{p.name}: {p.summary}" for p in PRUNERS.values()))
nm = c2.selectbox("Pattern", ["unstructured", "2:4", "4:8"], key="prune_nm",
                  help="N:M keeps N of every M consecutive weights of a row: the sparsity is fixed at (M-N)/M.")
alloc_label = c3.selectbox("Allocation", list(ALLOCATIONS), key="prune_alloc", disabled=nm != "unstructured",
                           help="With an N:M pattern every matrix is (M-N)/M sparse: no allocation applies.")
allocation = ALLOCATIONS[alloc_label] if nm == "unstructured" else "uniform"
if nm == "unstructured":
    sparsity = c4.slider("Target sparsity", 0.05, 0.9, ALLOC_DEFAULT.sparsity, 0.05, key="prune_sparsity",
                         disabled=allocation == "custom")
else:  # the pattern's own sparsity, shown in a slider of its own: the target set above stays for unstructured runs
    kept, group = parse_nm(nm)
    sparsity = nm_sparsity((kept, group))
    c4.slider("Target sparsity", 0.05, 0.9, sparsity, 0.05, key="prune_sparsity_nm", disabled=True,
              help=f"{nm} keeps {kept} of every {group} weights: {sparsity:.0%} of every matrix.")
rowwise = st.selectbox("Row-wise sparsity", ["none", *ROWWISE], key="prune_rowwise",
                       disabled=nm != "unstructured",
                       help="none: every row of a matrix loses the same fraction; trim (TRIM, Beck et al. 2025): "
                            "rows whose output survives pruning well lose more, the others less, each matrix "
                            "keeping its ratio. It costs a few extra pruning passes per matrix: with SparseGPT, "
                            "each is a reconstruction, so the prune takes several times longer.")
if nm != "unstructured":
    st.caption(f"{nm} prunes every matrix to {sparsity:.0%}: the allocation and row-wise sparsity above do not apply "
               "(they stay set for unstructured runs).")
epsilon, owl_lambda = ALLOC_DEFAULT.epsilon, ALLOC_DEFAULT.owl_lambda
if allocation in SPECTRA_METHODS:
    epsilon = st.slider("ε (spread of the α-guided ratios)", 0.0, 0.9, ALLOC_DEFAULT.epsilon, 0.05, key="prune_epsilon")
elif allocation == "owl":
    owl_lambda = st.slider("OWL λ (spread of the OWL ratios)", 0.0, 0.3, ALLOC_DEFAULT.owl_lambda, 0.01,
                           key="prune_owl_lambda", help="Ratios lie in [S-λ, S+λ] before rescaling to the budget.")

with st.expander("Calibration and evaluation data"):
    d1, d2, d3, d4 = st.columns(4)
    calibration_source = d1.text_input("Calibration text", CALIB_DEFAULT.source, key="prune_calib_source",
                                 help="'default' (embedded corpus: its first half calibrates, its second half "
                                      "evaluates), 'wikitext2:valid', a .txt or .jsonl path, or "
                                      "'hf:<dataset>[:<config>]:<split>' (a local save_to_disk folder too). A text "
                                      "named for both calibration and evaluation is split in disjoint halves too.")
    n_samples = d2.number_input("Calibration samples", 1, 256, CALIB_DEFAULT.n_samples, key="prune_n_samples",
                                help="The papers use 128 x 2048 tokens; the default keeps a CPU prune interactive.")
    calib_seqlen = d3.number_input("Calibration length (tokens)", 16, 2048, CALIB_DEFAULT.seqlen, step=16,
                                   key="prune_calib_seqlen")
    calib_seed = d4.number_input("Calibration seed", 0, 2**31 - 1, CALIB_DEFAULT.seed, key="prune_calib_seed",
                                 help="Which random windows of the calibration text are drawn (--seed on the command "
                                      "line): runs of several seeds give the spread of a result.")
    e1, e2, e3, e4 = st.columns(4)
    eval_source = e1.selectbox("Evaluation text", EVAL_SOURCES, key="prune_eval_source")
    if eval_source == OWN_TEXT:
        eval_source = e1.text_input("Evaluation text source", key="prune_eval_own",
                                    placeholder="/path/to/text.txt or hf:wikitext:wikitext-2-raw-v1:test",
                                    help="A UTF-8 text file on this machine, or a Hugging Face dataset "
                                         "(needs the `datasets` package and a reachable hub).").strip()
    eval_seqlen = e2.number_input("Window length (tokens)", 16, 4096, QUICK_EVALUATION.seqlen, step=16,
                                  key="prune_eval_seqlen")
    max_windows = e3.number_input("Windows (0 = all)", 0, 10_000, QUICK_EVALUATION.max_windows, key="prune_windows")
    encoding = e4.text_input("Text encoding", CALIB_DEFAULT.encoding, key="prune_encoding",
                             help="of your own text files, calibration and evaluation (utf-8, latin-1, cp1252, "
                                  "utf-16, ...); the packaged texts are UTF-8 whatever this says.").strip() \
        or CALIB_DEFAULT.encoding
    st.file_uploader("…or upload a text file: it becomes the evaluation text (put its path in Calibration "
                     "text to calibrate on it instead)", type=["txt"], key="prune_text_upload",
                     max_upload_size=MAX_UPLOAD_MB, on_change=_use_uploaded_text)
    if upload_error := st.session_state.get("prune_upload_error"):
        st.error(f"Upload refused: {upload_error}")
try:
    check_encoding(encoding)
    text_problems = [f"{what}: {problem}"
                     for what, src in (("Calibration text", calibration_source), ("Evaluation text", eval_source))
                     if (problem := text_source_problem(src, encoding))]
except DataError as e:
    text_problems = [str(e)]
for problem in text_problems:
    st.error(problem)

custom = st.session_state.get("alloc_custom")
custom = custom if custom is not None and custom.model == loaded.info.source else None  # not another model's
if allocation == "custom" and custom is None:
    st.warning("No custom curve yet: draw one on the Allocation page.")
elif allocation == "custom":
    st.caption(f"Your curve from the Allocation page prunes {custom.achieved:.1%} of the prunable weights ("
               + ("normalized to its target)." if custom.params["normalize"] else "as drawn).")
               + " The target sparsity here does not apply to it.")
fit = st.session_state.get("spectra_fit", SpectraSettings.fit)
calibration = CalibrationSettings(calibration_source.strip() or CALIB_DEFAULT.source, int(n_samples), int(calib_seqlen),
                                  int(calib_seed), encoding=encoding)
evaluation = EvaluationSettings(eval_source, int(eval_seqlen), int(max_windows) or None, encoding=encoding)
remember_prune_data(calibration, evaluation)
if allocation == "custom" and custom is not None:  # the curve's own settings, so the run record can redo it
    alloc_settings = AllocationSettings(method="custom", sparsity=custom.sparsity, fit=fit,
                                        points=tuple(tuple(p) for p in custom.params["points"]),
                                        as_drawn=not custom.params["normalize"])
else:
    alloc_settings = AllocationSettings(method=allocation, sparsity=float(sparsity), epsilon=float(epsilon), fit=fit,
                                        owl_lambda=float(owl_lambda))
settings = RunSettings(
    model=ModelSettings(*model_key()),  # the loaded model, so its record can be run again
    allocation=alloc_settings,
    prune=PruneSettings(method, None if nm == "unstructured" else nm,
                        None if rowwise == "none" or nm != "unstructured" else rowwise),
    calibration=calibration, evaluation=evaluation)
metrics = None
if allocation in SPECTRA_METHODS and settings.prune.nm is None:
    spec = spectra_job(loaded, fit, farms=allocation == "farms")
    if spec.status == DONE:
        metrics = spec.result.metrics
    else:
        st.info(f"Spectra for {alloc_label} are still being computed ({spec.progress[1]:.0%}); Run waits for them.")

# the inputs above that set each checked setting (SettingsError.field), so an error names what to change
FIELD_LABELS = {"calibration.seqlen": "Calibration length (tokens)", "evaluation.seqlen": "Window length (tokens)"}


def data_problem(calibrate: bool) -> str | None:
    """Why these texts and lengths cannot make a run on this model (window longer than its context,
    text shorter than one window), found before any job starts; None when they can."""
    preview = ModelPreview(loaded.info.source, loaded.tokenizer, loaded.model.config, loaded.info.bos_per_window)
    try:
        if calibrate:
            calibration.check_model(preview, evaluation.source)
        evaluation.check_model(preview, calibration.source)
    except (SettingsError, DataError) as e:
        where = FIELD_LABELS.get(getattr(e, "field", None))
        return f"{where + ': ' if where else ''}{e} Nothing was started."
    return None


b1, b2, b3, b4 = st.columns(4)
ready = not busy and not text_problems and not non_finite_note() and (
    allocation != "custom" or custom is not None) and (
    allocation not in SPECTRA_METHODS or metrics is not None or settings.prune.nm is not None)


def start_run() -> str | None:
    """Start the prune job; the reason it was not started otherwise."""
    if problem := data_problem(calibrate=True):
        return problem
    try:
        store = runs_store()
    except StoreError as e:
        return f"{e} The run was not started."
    shared, tok, info = loaded.model, loaded.tokenizer, loaded.info
    # registered now, started by the prune job after its first live value (two CPU cores go far further
    # on one job at a time)
    dense_job = dense_ppl_job(loaded, calibration.source, evaluation, start=False)
    owl = owl_job(loaded, calibration, evaluation.source, ALLOC_DEFAULT.owl_threshold, start=False) \
        if allocation == "owl" else None
    work.job = Job(lambda j: prune_and_evaluate(j, work, shared, tok, settings, model_name=info.source,
                                                bos=info.bos_per_window, store=store, dense_job=dense_job,
                                                metrics=metrics, owl_job=owl, custom=custom, model_title=info.title),
                   name="prune").start()
    return None


def start_evaluation() -> str | None:
    """Start perplexity of the current weights (and the shared dense baseline); why not otherwise."""
    if problem := data_problem(calibrate=False):
        return problem
    dense_ppl_job(loaded, calibration.source, evaluation)
    work.job = Job(lambda j: evaluate_weights_job(j, work, loaded.model, evaluation_windows(
        loaded.tokenizer, evaluation, calibration.source, loaded.info.bos_per_window)), name="eval").start()
    return None


refused = None
if b1.button("Run", type="primary", disabled=not ready, key="prune_run"):
    refused = start_run() or st.rerun()
if b2.button("Cancel", disabled=not busy, key="prune_cancel"):
    job.cancel()
if b3.button("Restore dense", disabled=busy or not work.pruned, key="prune_restore"):
    work.restore()
    st.session_state["_prune_restored_after"] = job  # its perplexity is of the weights before the restore
    st.rerun()
if b4.button("Evaluate current weights", disabled=busy or bool(text_problems), key="prune_eval"):
    refused = start_evaluation() or st.rerun()
if refused:
    st.error(refused)

# the dense baseline on these exact windows: started with the first Run/Evaluate, then shared
dense = peek_dense_ppl_job(calibration.source, evaluation)


def zero_share() -> str | None:
    """The share of zeros in this session's weights, None while a prune changes them (a count then would be of
    the blocks pruned so far, and kept for the weights' version)."""
    if work.pruning:
        return None
    return f"{weights_zero_fraction(*session_weights(work, loaded.model)):.2%}"


zeros = zero_share()
st.markdown(f"**Your weights:** {work.describe()}" + (f" · {zeros} of prunable weights are zero" if zeros else ""))
if work.abandoned and not work.leased:  # this session came back after the waiters took its lease
    st.warning(f"While you were away: {work.abandoned}.")
work.gate.reclaim()  # a lease of a closed tab is given back before it is shown as held
waiting = work.gate.queue()
if work.gate.holder == work.owner:
    st.info(f"The shared model is pruned in place for you (no room for a private copy): {len(waiting)} job(s) "
            "of other sessions that need the dense weights wait until you restore them (Restore dense).")
elif work.gate.holder is not None:
    st.warning(f"The shared model is held by {work.gate.holder} (pruned in place, no room for a private copy): "
               f"work on the dense weights waits until it is restored; {len(waiting)} job(s) in the queue. "
               f"(A tab closed or reloaded gives its lease back once it has been gone {ABANDON_S:.0f} s with no job "
               "running.)")
work.prepare(loaded.model, prune_need(loaded.model, settings))  # the private copy, in the background, if it fits


@st.fragment(run_every=1.0 if (busy or (dense is not None and dense.running)) else None)
def live() -> None:
    """Progress and perplexity, refreshed every second while a job runs (the job runs in its own
    thread: leaving this page or clicking elsewhere does not stop it)."""
    j = work.job
    m1, m2, m3 = st.columns(3)
    dense_updates = dense.updates() if dense is not None else []
    if dense is None or (dense.status == PENDING and (j is None or j.done)):  # (a Run cancelled before it began)
        m2.metric("Dense baseline perplexity", "–", help="computed with the first Run or Evaluate for these settings")
    elif dense.status == ERROR:
        m2.error(f"Dense baseline failed: {dense.error}")
    elif dense_updates:
        last = dense_updates[-1]
        so_far = f" ({last.windows_done}/{last.windows_total} windows so far)" \
            if last.windows_done < last.windows_total else ""  # (a tab opened while it is measured)
        m2.metric(f"Dense baseline perplexity{so_far}", f"{last.ppl:.2f}",
                  help=f"{last.windows_done}/{last.windows_total} windows")
    else:
        m2.metric("Dense baseline perplexity", "…")
    updates = j.updates() if j is not None else []
    if j is not None:
        msg, frac = j.progress
        if j.done:
            st.caption(f"Last {j.name}: {msg} · {j.status} after {j.elapsed:.0f} s")
        else:
            st.progress(frac, text=f"{j.name}: {msg} · {j.elapsed:.0f} s")
        if updates:
            u = updates[-1]
            before = st.session_state.get("_prune_restored_after") is j
            m1.metric(f"Perplexity ({j.name}{', before Restore dense' if before else ''})", f"{u.ppl:.2f}",
                      delta=f"{u.ppl - dense_updates[min(len(dense_updates), u.windows_done) - 1].ppl:+.2f} vs dense"
                      if dense_updates else None, delta_color="inverse",
                      help=f"running value after {u.windows_done}/{u.windows_total} windows")
        if j.status == ERROR:
            st.error(j.error)
        elif j.status == CANCELLED:
            st.warning("Cancelled; the dense weights were restored." if j.name == "prune" and not work.pruned
                       else "Cancelled.")
        elif j.status == DONE and isinstance(j.result, dict):
            for warning in j.result.get("warnings", []):
                st.warning(warning)
    m3.metric("Zeros in your weights", zero_share() or "…", help=work.describe())
    st.plotly_chart(ppl_figure(updates, dense_updates), key="prune_ppl_chart")
    if j is not None and j.done and st.session_state.get("_prune_seen") is not j:
        st.session_state["_prune_seen"] = j
        st.rerun()  # the job just ended: refresh the buttons and the status line


live()

st.subheader("Export")
x1, x2, x3 = st.columns([3, 1, 1])
out_dir = x1.text_input("Folder", "artifacts/pruned-model", key="prune_export_dir")
save_format = x2.radio("Format", FORMATS, index=FORMATS.index(DEFAULT_FORMAT), key="prune_export_format",
                       help="dense: save_pretrained, loads with transformers and serves with vLLM. dense-ct: "
                            "the same plus compressed-tensors' sparsity metadata in config.json (loads with "
                            "transformers when compressed-tensors is installed). compressed: "
                            "compressed-tensors bitmask (smaller on disk; transformers 5 and vLLM no longer "
                            "decompress it: this tool loads it as a model, or analysis.export.load_pruned reads it).")
overwrite = x3.checkbox("Overwrite", key="prune_export_overwrite",
                        help="replace the model saved in a non-empty folder (a folder of other files is refused)")
if x3.button("Export pruned model", disabled=busy or not work.pruned, key="prune_export"):
    try:
        source = local_folder(loaded.info.path)  # the model's own checkpoint: never saved over
        with st.spinner(f"Saving the pruned model ({save_format}) to {out_dir}…"):
            path = export(work.model, loaded.tokenizer, work.allocation, out_dir, save_format, overwrite,
                          {"the loaded model": source} if source is not None else None, pruner=work.pruner)
    except (OSError, ValueError) as e:
        st.error(f"Export failed: {e}")
    else:
        st.success(f"Saved the pruned model ({save_format}), its tokenizer and allocation.json to {path}")
        if save_format == "compressed":
            st.info(f"{COMPRESSED_NOTE}.")
alloc = work.allocation if work.pruned else None
r1, r2, r3 = st.columns([1, 1, 1])
if st.session_state.get("_prune_recipe_for") != work.version:  # a new prune (or a restore) selects its pruner
    st.session_state["_prune_recipe_for"] = work.version
    st.session_state["prune_recipe_pruner"] = recipe_pruner_for(work.pruner)
recipe_pruner = r1.selectbox("Recipe pruner", list(RECIPE_PRUNERS), key="prune_recipe_pruner",
                             help="the llm-compressor modifier that carries the per-matrix sparsities (the pruner of "
                                  "your last prune where llm-compressor has it)")
per_layer = module_order(alloc.per_layer, work.model) if alloc is not None else {}
# the last prune's own pattern (an N:M run's allocation names it), not the one selected now: an N:M recipe
# prunes every target to its pattern, whatever ratios an unstructured allocation gives
has_targets = any(r > 0 for r in per_layer.values())  # a recipe names the pruned matrices only
recipe = recipe_yaml(per_layer, recipe_pruner, parse_nm(alloc.params.get("nm")), recipe_note(alloc)) if has_targets \
    else ""
r2.download_button("Download llm-compressor recipe", recipe, file_name="recipe.yaml", mime="application/x-yaml",
                   disabled=not has_targets, key="prune_recipe_download",
                   help="the allocation of your last prune, with its pattern (N:M or unstructured) as the mask "
                        "structure; run it elsewhere with llm-compressor's oneshot(model=..., recipe=...)")
r3.download_button("Download ratios (.npy)", ratios_npy(per_layer) if alloc is not None else b"",
                   file_name="ratios.npy", mime="application/octet-stream", disabled=alloc is None,
                   key="prune_npy_download",
                   help="one ratio per matrix, in module order: the ratios list AlphaPruning's prune functions take")
if alloc is None:
    restored = work.job is not None and st.session_state.get("_prune_restored_after") is work.job
    st.caption("The recipe and ratio downloads describe the allocation of the prune your weights hold: "
               + ("Restore dense cleared it (the Compare page keeps every run's record and allocation)."
                  if restored else "run one first."))
for caveat in recipe_caveats(per_layer):
    st.caption(f"Recipe: {caveat}.")
try:  # the record of the last prune, as the run store keeps it (zero-shot scores included)
    record = runs_store().get(work.run_id) if work.pruned and work.run_id is not None else None
except (StoreError, KeyError):  # deleted on the Compare page, or the store is unreadable: nothing to offer
    record = None
if record is not None:
    record_file = f"run-{work.run_id}.json"
    st.download_button("Download run record (JSON)", to_json(record, indent=2) + "\n", file_name=record_file,
                       mime="application/json", key="prune_record_download",
                       help="every setting of your last prune, its allocation, perplexities and versions")
    st.caption(f"Run it again from the command line: `python -m analysis prune --rerun {record_file}` (or write the "
               f"record from the run store: `python -m analysis runs --show {work.run_id} > {record_file}`).")


st.subheader("Zero-shot accuracy")
st.caption("lm-eval on your current weights (the pruned copy, or the dense shared model), in the background. "
           "'cloze' is local (last words of the embedded corpus's evaluation half, 4 choices, chance 25%); the "
           "papers' tasks need the Hugging Face hub, or their data in the local datasets cache.")
z1, z2, z3 = st.columns([3, 1, 1])
zs_tasks = z1.multiselect("Tasks", [*local_tasks(), *PAPER_TASKS], default=list(QUICK_ZEROSHOT.tasks),
                          key="prune_zs_tasks")
zs_limit = z2.number_input("Documents per task (0 = all)", 0, 100_000, QUICK_ZEROSHOT.limit, key="prune_zs_limit")
if z3.button("Score current weights", disabled=busy or not zs_tasks, key="prune_zs_run"):
    zs_label = work.label if work.pruned else "dense"
    zs_run = work.run_id if work.pruned else None

    def zeroshot_body(j: Job) -> pd.DataFrame:
        result = zeroshot_weights_job(j, work, loaded.model, loaded.tokenizer, zs_tasks, int(zs_limit) or None,
                                      loaded.info.bos_per_window)
        stored = ""
        if zs_run is not None:  # the pruned weights' run record gets the scores (Compare page columns)
            try:
                runs_store().update(zs_run, {"zeroshot": result.to_dict()})
                stored = f"run {zs_run}"
            except (StoreError, KeyError) as e:  # the scores are still shown
                stored = f"not stored: {e}"
        return result.table().assign(weights=zs_label, stored=stored)

    work.job = Job(zeroshot_body, name="zero-shot").start()
    # the last few zero-shot jobs, whose results are shown below (a job holds its model: keep few)
    st.session_state["prune_zs_jobs"] = [*st.session_state.get("prune_zs_jobs", [])[-3:], work.job]
    st.rerun()
zs_done = [j.result for j in st.session_state.get("prune_zs_jobs", []) if j.status == DONE]
if zs_done:
    st.dataframe(pd.concat(zs_done, ignore_index=True)[["weights", "task", "metric", "value", "stderr", "n", "stored"]],
                 hide_index=True, key="prune_zs_table")
st.caption("Scores of pruned weights are added to their run's record (Compare page); the dense model's are shown "
           "here only.")
