"""App state: the shared model cache, shared background jobs, and each session's private copy.

Sharing rules (README, "Memory model")
-------------
- The loaded model lives in a process-wide registry keyed by (source, device, dtype,
  trust_remote_code) and is shared by every browser session. Its weights are dense for everyone
  who reads them: every reader (the shared jobs below, an evaluation of the dense weights, making a
  private copy) reads through the model's `ModelGate` (analysis/session.py).
- Results every session would compute identically (spectra per model+fit+FARMS, dense perplexity
  per model+eval settings, OWL outlier ratios) are shared background `Job`s in a process-wide
  registry, so the second session to ask gets the running or finished job instead of a new one.
- Pruning happens on a per-session deep copy (`WorkingCopy.model`) when the device has room for one
  (made in the background when the session opens the Prune page, or by the first prune). When it
  has not, the session leases the shared model exclusively, prunes it in place with the original
  values kept on the host, and restores them bit for bit before releasing it; other sessions' reads
  wait in the gate's queue meanwhile (shown on their pages) and never see pruned weights.
"""
from __future__ import annotations

import copy
import gc
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime import exists as runtime_exists
from streamlit.runtime.scriptrunner import get_script_run_ctx

# analysis.loading imports transformers' Auto classes at module level: that resolves transformers'
# lazy attributes once, at the app's first run, in one thread. Resolved lazily, two script threads
# (a rerun overlapping the previous run, or two sessions) could both trigger the lazy import and
# one of them would see a half-initialized module ("cannot import name").
from analysis.data import is_split
from analysis.jobs import CANCELLED, DONE, ERROR, Job
from analysis.layers import zero_fraction
from analysis.loading import (
    PACKAGED,
    LoadedModel,
    NoTokenizerError,
    load_model,
    memory_estimate,
    offloaded,
    packaged_key,
    streamable_folder,
)
from analysis.pipeline import calibration_batch, evaluation_windows
from analysis.pruning import non_finite
from analysis.session import ModelGate, WorkingCopy, evaluate_job, outlier_ratios_job
from analysis.settings import QUICK_EVALUATION, CalibrationSettings, EvaluationSettings, SpectraSettings
from analysis.spectra import NotStreamable, analyze, analyze_checkpoint
from analysis.store import RunStore

ModelKey = tuple[str, str, str, bool]  # (source, device, dtype, trust_remote_code)

MODEL_PAGE = "pages/model.py"
CUSTOM_ON_PRUNE = "custom curve (Allocation page)"  # the Prune page's allocation that prunes the drawn curve


# --------------------------------------------------------------------------------------------
# the shared model


MAX_MODELS = 3  # models kept loaded at once (least recently loaded dropped first)


@st.cache_resource(show_spinner=False)
def _models() -> tuple[dict[ModelKey, LoadedModel], dict[ModelKey, threading.Lock], threading.Lock]:
    return {}, {}, threading.Lock()


def load_shared_model(source: str, device: str, dtype: str, trust_remote_code: bool,
                      progress: Callable[[str, float], None] | None = None) -> LoadedModel:
    """Load once per key for the whole server (process-wide registry); a failed load raises and is
    not remembered. A per-key lock makes a second session wait for a load in progress instead of
    loading the same model twice. (Not `st.cache_resource` on the loader itself: its element replay
    forbids updating a progress bar created outside the cached function.)"""
    models, key_locks, lock = _models()
    key = (source, device, dtype, bool(trust_remote_code))
    with lock:
        if key in models:
            return models[key]
        key_lock = key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with lock:
            if key in models:
                return models[key]
        how = dict(device=device, dtype=dtype, trust_remote_code=trust_remote_code, progress=progress)
        try:
            loaded = load_model(source, **how)
        except NoTokenizerError:  # weights and config.json alone: spectra and allocations from them still work
            loaded = load_model(source, **how, tokenizer=False)
        gate = model_gate(key)
        gate.dense_zero_fraction = zero_fraction(loaded.model)  # the shared weights stay dense
        gate.non_finite = None if offloaded(loaded.model) else non_finite(loaded.model)  # (not read from disk)
        with lock:
            models[key] = loaded
            if len(models) > MAX_MODELS:
                gc.unfreeze()  # let the cycle collector reclaim what the dropped model leaves
                while len(models) > MAX_MODELS:
                    models.pop(next(iter(models)))
            # Keep the cycle collector off the objects that live as long as the server (modules,
            # the model, its tokenizer). The server allocates steadily, and every full collection
            # walked all of them with the GIL held: right after loading SmolLM2 it took most of the
            # process's CPU time and stalled the spectra workers.
            gc.collect()
            gc.freeze()
        return loaded


URL_KEYS = ("model", "device", "dtype")  # the query parameters naming a model key's source, device and dtype


def follow_url_model() -> None:
    """Keep the model in the page's URL (?model=...&device=...&dtype=...) and take it back after a reload
    (a new session), when the server still holds it: a reload does not lose the model, nor pick up another
    dtype of it. Nothing is loaded from a URL; a copy loaded with remote code is taken only where no copy
    without it is held."""
    key = model_key()
    if key is not None:
        for name, value in zip(URL_KEYS, key):
            if st.query_params.get(name) != value:
                st.query_params[name] = value
        return
    source, device, dtype = (st.query_params.get(name) for name in URL_KEYS)  # (older URLs name the source only)
    models, _, lock = _models()
    with lock:
        held = [k for k in models if k[0] == source and device in (None, k[1]) and dtype in (None, k[2])]
    if held:
        st.session_state["model_key"] = min(held, key=lambda k: k[3])  # trust_remote_code False first


SETTINGS_URL_KEY = "s"  # the query parameter naming a tab's settings, which a reload keeps
MAX_KEPT_SETTINGS = 256  # settings of tabs gone away kept for a reload, before the oldest are dropped


@st.cache_resource(show_spinner=False)
def _settings_by_url() -> tuple[dict[str, dict], threading.Lock]:
    return {}, threading.Lock()


def persisted_settings() -> dict[str, Any]:
    """The settings app.py keeps across pages (its PERSIST), kept across a reload too: under a token in the URL
    (?s=...), which a reload (a new session of the same tab) keeps, so it takes them back. A token whose session
    is still connected (a URL copied into a second tab) gives that tab a copy under a token of its own: two tabs
    never share their settings. st.session_state["_restored"] says a reload took them back. They are copied:
    an earlier session that comes back (a dropped connection) keeps its own."""
    if (mine := st.session_state.get("_persisted")) is not None:
        if st.query_params.get(SETTINGS_URL_KEY) != (token := st.session_state["_settings_token"]):
            st.query_params[SETTINGS_URL_KEY] = token  # a page change clears the URL's parameters
        return mine
    kept, lock = _settings_by_url()
    token, connected = st.query_params.get(SETTINGS_URL_KEY), session_connected()
    with lock:
        held = kept.pop(token, None) if token else None
        settings = copy.deepcopy(held["settings"]) if held is not None else {}
        jobs = held.get("jobs", {}) if held is not None else {}  # (an entry from before jobs were kept has none)
        restored = bool(settings)
        if held is not None and held["connected"]():  # another open tab's: it keeps the token (and its jobs)
            kept[token] = held
            token, restored, jobs = None, False, {}
        token = token or uuid.uuid4().hex[:12]
        kept[token] = {"settings": settings, "connected": connected, "jobs": jobs}
        gone = [t for t, entry in kept.items() if not entry["connected"]()]  # oldest first (insertion order)
        for t in gone[:max(0, len(kept) - MAX_KEPT_SETTINGS)]:
            del kept[t]
    st.query_params[SETTINGS_URL_KEY] = st.session_state["_settings_token"] = token
    st.session_state["_persisted"], st.session_state["_restored"] = settings, restored
    for key, job in jobs.items():  # the jobs the tab started before the reload (keep_job)
        if (job := job() if isinstance(job, weakref.ref) else job) is not None:
            st.session_state[key] = job
    return settings


def keep_job(key: str, job, weak: bool = False):
    """Put `job` in this session's state under `key`, and beside the tab's settings (persisted_settings), so that
    a reload of the tab finds it under `key` again, running or finished. A job that should end when the tab is
    closed checks `tab_connected`, which a reload does not make False for long. weak=True keeps it beside the
    settings only while something else holds it (the old session, or its running job): for weights, which a
    closed tab must not hold on to."""
    st.session_state[key] = job
    kept, lock = _settings_by_url()
    with lock:
        if (entry := kept.get(st.session_state.get("_settings_token"))) is not None:
            entry.setdefault("jobs", {})[key] = weakref.ref(job) if weak else job
    return job


def tab_connected() -> Callable[[], bool]:
    """Whether this tab is still open: the session that holds its settings' URL token now (after a reload, the
    new one) is connected. Without that token (a page run alone), whether this session is."""
    token = st.session_state.get("_settings_token")
    if token is None:
        return session_connected()
    kept, lock = _settings_by_url()

    def connected() -> bool:
        with lock:
            entry = kept.get(token)
        return entry is not None and entry["connected"]()
    return connected


def is_loaded(key: ModelKey) -> bool:
    models, _, lock = _models()
    with lock:
        return key in models


@st.cache_resource(show_spinner=False)
def _gates() -> tuple[dict[ModelKey, ModelGate], threading.Lock]:
    return {}, threading.Lock()


def model_gate(key: ModelKey) -> ModelGate:
    """The gate every reader and pruner of the shared model `key` goes through (one per key)."""
    gates, lock = _gates()
    with lock:
        return gates.setdefault(key, ModelGate())


def model_key() -> ModelKey | None:
    return st.session_state.get("model_key")


def non_finite_note() -> str | None:
    """What the pages say when the loaded model has NaN or inf weights (None when it has none): found at load,
    so that no page computes in vain before saying so."""
    key = model_key()
    name = model_gate(key).non_finite if key is not None else None
    if name is None:
        return None
    return (f"'{name}' has non-finite weights (NaN or inf), and perhaps other matrices too (the Spectra page lists "
            "them as not fitted): no pruner can rank such weights, so Run is refused, and the model's perplexity "
            "and OWL's outlier ratios come out as nan. Repair or re-download the checkpoint.")


def current_model() -> LoadedModel | None:
    """This session's chosen model (from the shared cache), or None before a model was loaded."""
    key = model_key()
    return load_shared_model(*key) if key else None


LOAD_KEY = "_model_load"  # the load a session started on the Model page (a Job tagged with its model key)


def start_model_load(key: ModelKey) -> Job:
    """Load the model `key` in the background (load_shared_model), for this session: it goes on when the user
    leaves the Model page, and `finish_model_load` makes it the session's model on whichever page they are."""
    def load(job: Job) -> LoadedModel:
        return load_shared_model(*key, progress=lambda message, frac: job.report(message, min(max(frac, 0.0), 1.0)))
    job = st.session_state[LOAD_KEY] = Job(load, name="model-load", tag=key).start()
    return job


def finish_model_load() -> Job | None:
    """A load this session started that has ended: a loaded model becomes the session's (its spectra start), a
    failed one stays for the Model page to show. Returns the load while it runs (or failed), else None."""
    job = st.session_state.get(LOAD_KEY)
    if job is None or job.status != DONE:
        return job
    del st.session_state[LOAD_KEY]
    st.session_state["model_key"] = job.tag
    spectra_job(job.result)  # the Spectra page opens ready
    return None


def require_model() -> LoadedModel:
    """The current model, or a pointer to the Model page and a stop of the page script; while the session's
    load runs, its progress (the page runs again when it ends). A model with NaN or inf weights gets its
    warning (non_finite_note) on top of every page."""
    if (load := finish_model_load()) is not None and not load.done:
        wait_for(load, f"Loading {load.tag[0]} (started on the Model page)")
    loaded = current_model()
    if loaded is None:
        st.info("No model loaded yet. Load one on the Model page first (the packaged default takes ~2 s).")
        st.page_link(MODEL_PAGE, label="Go to the Model page", icon=":material/memory:")
        st.stop()
    if note := non_finite_note():
        st.warning(note)
    return loaded


NO_TOKENIZER_NOTE = ("This model's folder has no tokenizer files: its spectra and the allocations made from them "
                     "(uniform, AlphaPruning, FARMS, a drawn curve) work, but pruning, perplexity, OWL and the search "
                     "read text. Copy the tokenizer files of its model beside config.json and load it again.")


def require_tokenizer(loaded: LoadedModel) -> None:
    """Stop the page script, saying why, when the model was loaded without a tokenizer (NO_TOKENIZER_NOTE)."""
    if loaded.tokenizer is None:
        st.warning(NO_TOKENIZER_NOTE)
        st.stop()


def model_label(key: ModelKey) -> str:
    pk = packaged_key(key[0])
    return PACKAGED[pk].title if pk else key[0]


# --------------------------------------------------------------------------------------------
# shared jobs


@st.cache_resource(show_spinner=False)
def _registry() -> tuple[dict[tuple, Job], threading.Lock]:
    return {}, threading.Lock()


def shared_job(key: tuple, fn: Callable[[Job], Any], name: str, start: bool = True, reads: bool = True) -> Job:
    """The job registered under `key`, made with `fn` if there is none yet (or it was cancelled),
    and started unless start=False (then whoever needs it calls `job.start_once()`).

    Every shared job computes something of the current model's dense weights, so `fn` runs inside a
    read of its gate (reads=False: `fn` goes through the gate itself). A job that failed stays
    registered so every session sees the same error.
    """
    jobs, lock = _registry()
    with lock:
        job = jobs.get(key)
        if job is None or job.status == CANCELLED:
            gate = model_gate(model_key()) if reads else None
            job = jobs[key] = Job(fn if gate is None else _reading(gate, fn), name=name)
    return job.start_once() if start else job


def _reading(gate: ModelGate, fn: Callable[[Job], Any]) -> Callable[[Job], Any]:
    def run(job: Job):
        with gate.reading("a shared job", job):
            return fn(job)
    return run


@st.cache_resource(show_spinner=False)
def _sweep_slot() -> tuple[list[Job | None], threading.Lock]:
    return [None], threading.Lock()


def sweep_job() -> Job | None:
    """The server's latest sweep, whichever session started it: a process runs one sweep at a time
    (analysis.sweep), so every tab sees the running one and can cancel it."""
    slot, lock = _sweep_slot()
    with lock:
        return slot[0]


def start_sweep_job(fn: Callable[[Job], Any]) -> Job | None:
    """Start `fn` as the server's sweep; None while another sweep is running."""
    slot, lock = _sweep_slot()
    with lock:
        if slot[0] is not None and not slot[0].done:
            return None
        slot[0] = Job(fn, name="sweep").start()
        return slot[0]


def peek_job(key: tuple) -> Job | None:
    jobs, lock = _registry()
    with lock:
        return jobs.get(key)


def spectra_job(loaded: LoadedModel, fit: str = SpectraSettings.fit, farms: bool = False,
                min_tail: int = SpectraSettings.min_tail) -> Job:
    """Spectra of the shared (dense) model, computed once per (model, fit rule, FARMS, min_tail) for everyone.

    A model loaded from a safetensors folder (local, the HF cache, or a packaged model's converted
    folder) is streamed from its shards and cached on disk by their content, so reopening it shows
    the spectra at once; others (and trust-remote-code models) are analyzed in memory."""
    key = ("spectra", model_key(), fit, bool(farms), min_tail)
    remote_code = key[1] is not None and key[1][3]  # its modules come from the repository's code: load them
    folder = streamable_folder(loaded.info.path, remote_code)

    def run(job: Job):
        if folder is not None:
            try:
                return analyze_checkpoint(folder, fit=fit, farms=farms, include_outside=True,
                                          device=loaded.info.device, progress=job.report, min_tail=min_tail)
            except NotStreamable:
                pass
        return analyze(loaded.model, fit=fit, farms=farms, include_outside=True, progress=job.report,
                       min_tail=min_tail)
    return shared_job(key, run, name="spectra")


# --------------------------------------------------------------------------------------------
# the session's private copy


APP_RAN, RETURN_TO = "_app_ran", "_return_to"  # session keys: app.py has run; the page to go back to


def through_app(page_file: str) -> None:
    """First thing on every page (`page_file`: its __file__). A tab that reconnects to a restarted server before any
    session has run app.py gets Streamlit's automatic pages/ navigation, which runs the page on its own: no sidebar,
    no kept settings. Such a page starts again from app.py, whose navigation then holds for the whole server, and
    app.py comes back to the page (`return_to_page`). A page run as the main script (a test of one page) is left."""
    ctx = get_script_run_ctx()
    if ctx is not None and not st.session_state.get(APP_RAN) and Path(ctx.main_script_path).name == "app.py":
        root = Path(ctx.main_script_path).resolve().parent
        st.session_state[RETURN_TO] = str(Path(page_file).resolve().relative_to(root))
        st.switch_page("app.py")


def return_to_page() -> None:
    """app.py, once its navigation is set up: mark the session, and go back to the page `through_app` left."""
    st.session_state[APP_RAN] = True
    if (page := st.session_state.pop(RETURN_TO, None)) is not None:
        st.switch_page(page)


def session_label() -> str:
    """How other sessions' queue messages name this browser session (a random name, kept for the
    session: its id is not shown to others, and is the same for every AppTest session)."""
    return st.session_state.setdefault("_session_label", f"session {uuid.uuid4().hex[:6]}")


def session_work() -> WorkingCopy:
    """This session's weights for the current model (a new WorkingCopy when the model changed: the
    old one's job is cancelled, and a lease of the old model given back once no job holds it). A reload of
    the tab finds them again (keep_job), with the prune that was running or its result.

    The private copy itself is made in the background or by the first prune job
    (analysis.session.WorkingCopy.make_copy)."""
    key = model_key()
    work = st.session_state.get("work")
    if work is None or work.key != key:
        if work is not None:
            work.abandon()
        work = keep_job("work", WorkingCopy(key, model_gate(key) if key else None, session_label(), tab_connected()),
                        weak=True)
    return work


def session_connected() -> Callable[[], bool]:
    """Whether this browser session is still connected: Streamlit keeps a closed or reloaded tab's
    session (and its lease) for a reconnection that never comes (analysis.session.ModelGate.reclaim).
    Always True without a server (AppTest)."""
    runtime, ctx = Runtime.instance() if runtime_exists() else None, get_script_run_ctx()
    if not isinstance(runtime, Runtime) or ctx is None:
        return lambda: True
    session_id = ctx.session_id
    return lambda: runtime.is_active_session(session_id)


def weights_zero_fraction(model, version: int = 0) -> float:
    """Fraction of exactly-zero weights over the prunable matrices (0.0 for a dense model).

    Version 0 is the shared dense model: measured once at load (it may be pruned in place by a
    session holding its lease right now, so it is not counted again). Otherwise counting scans every
    weight (competing with a running prune on a CPU), so the result is kept per
    (model, version): pass the WorkingCopy's version for a session's weights."""
    key = model_key()
    if version == 0 and key is not None and model_gate(key).dense_zero_fraction is not None:
        return model_gate(key).dense_zero_fraction
    cache = st.session_state.setdefault("_zero_fraction", {})
    key = (id(model), version)
    if key not in cache:
        if len(cache) > 8:
            cache.clear()
        cache[key] = zero_fraction(model)
    return cache[key]


def session_weights(work: WorkingCopy, shared_model) -> tuple[Any, int]:
    """(model, version) this session's pages show: its pruned weights, or the shared dense model."""
    return (work.model, work.version) if work.pruned else (shared_model, 0)


def session_spectra_job(work: WorkingCopy, fit: str, farms: bool, min_tail: int = SpectraSettings.min_tail) -> Job:
    """Spectra of this session's pruned copy (private: no other session has these weights)."""
    jobs = st.session_state.setdefault("work_spectra", {})
    key = (work.key, work.version, fit, bool(farms), min_tail)
    job = jobs.get(key)
    if job is None or job.status == CANCELLED:
        model = work.model
        jobs.clear()  # results of older weights are stale
        job = jobs[key] = Job(lambda j: analyze(model, fit=fit, farms=farms, include_outside=True, progress=j.report,
                                                min_tail=min_tail), name="spectra-session").start()
    return job


def wait_for(job: Job, what: str, every: float = 0.25) -> None:
    """Show a job's progress until it ends, then re-run the page; stops the script meanwhile.

    The polling runs in a fragment, so only the progress bar refreshes while the job works in its
    own thread; on a failed job it shows the error instead."""
    if job.status == ERROR:
        st.error(f"{what} failed: {job.error}")
        st.stop()
    if job.done:
        return

    @st.fragment(run_every=every)
    def _poll():
        msg, frac = job.progress
        st.progress(frac, text=f"{what}: {msg} ({job.elapsed:.0f} s)")
        if job.done:
            st.rerun()

    _poll()
    st.stop()


def dense_ppl_job(loaded: LoadedModel, calibration_source: str, evaluation: EvaluationSettings,
                  start: bool = True) -> Job:
    """Perplexity of the shared dense model on exactly the windows a prune run with these settings
    evaluates (same text split, length, count, BOS), computed once for everyone."""
    def run(job: Job):
        windows = evaluation_windows(loaded.tokenizer, evaluation, calibration_source, loaded.info.bos_per_window)
        last = evaluate_job(job, loaded.model, windows, batch_size=evaluation.batch_size)
        return None if last is None else last.ppl

    return shared_job(_dense_key(calibration_source, evaluation), run, name="dense-ppl", start=start)


def _dense_key(calibration_source: str, evaluation: EvaluationSettings) -> tuple:
    return ("dense_ppl", model_key(), calibration_source, evaluation.source, evaluation.seqlen, evaluation.max_windows,
            evaluation.encoding)


def peek_dense_ppl_job(calibration_source: str, evaluation: EvaluationSettings) -> Job | None:
    """The dense-baseline job for these settings if one was started (by any session), else None."""
    return peek_job(_dense_key(calibration_source, evaluation))


def owl_job(loaded: LoadedModel, calibration: CalibrationSettings, eval_source: str, owl_threshold: float,
            start: bool = True) -> Job:
    """OWL outlier ratios of the shared model (measured on a throw-away copy, or in place under the
    model's lease when no copy fits), once for everyone per
    calibration batch and outlier threshold: the Allocation page's OWL preset and an OWL run on the
    Prune page with the same settings share this job, so they apply the same ratios."""
    def run(job: Job):
        calib = calibration_batch(loaded.tokenizer, calibration, eval_source, loaded.info.bos_per_window)
        need = memory_estimate(loaded.model, loaded.info.dtype, calibration.n_samples, calibration.seqlen)
        return outlier_ratios_job(job, loaded.model, calib, owl_threshold, model_gate(key[1]), need)

    key = ("owl", model_key(), calibration, eval_source if is_split(calibration.source, eval_source) else None,
           owl_threshold)
    return shared_job(key, run, name="owl-ratios", start=start, reads=False)


def remember_prune_data(calibration: CalibrationSettings, evaluation: EvaluationSettings) -> None:
    """The Prune page records its calibration and evaluation settings on every run (a plain session
    key, which outlives the page's widgets), so the Allocation page's OWL preset uses them and the
    Model page's memory estimate counts them."""
    st.session_state["_prune_data"] = (calibration, evaluation)


def prune_data_settings() -> tuple[CalibrationSettings, EvaluationSettings]:
    """The calibration and evaluation settings last chosen on the Prune page (defaults where it was
    never opened): the OWL preset is then the allocation an OWL run there applies."""
    return st.session_state.get("_prune_data", (CalibrationSettings(), QUICK_EVALUATION))


def runs_store() -> RunStore:
    """The run store (SQLite): analysis.store's default ($ALPHASCOPE_RUNS_DB if set, else under the cache folder)."""
    return RunStore()
