"""App state: the shared model cache, shared background jobs, and each session's private copy.

Sharing rules
-------------
- The loaded model lives in `st.cache_resource`, keyed by (source, device, dtype, trust_remote_code),
  and is shared READ-ONLY by every browser session: spectra and dense perplexity only read it.
  Nothing that mutates weights or registers hooks (pruning, calibration walks) ever touches it.
- Results every session would compute identically (spectra per model+fit+FARMS, dense perplexity
  per model+eval settings, OWL outlier ratios) are shared background `Job`s in a process-wide
  registry, so the second session to ask gets the running or finished job instead of a new one.
- Pruning happens on a per-session deep copy (`SessionWork.model`), made lazily on the first prune.
  Why a copy and not a lock plus restore on the shared model: a prune takes seconds to minutes, and
  a lock would block every other session's reads (spectra, dense perplexity) for that whole time,
  while restoring afterwards would still let them read half-pruned weights if they skipped the lock.
  A copy costs one model's memory per pruning session (~0.5 GB for SmolLM2-135M in float32).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import streamlit as st

from analysis.jobs import CANCELLED, ERROR, Job
from analysis.models import PACKAGED, LoadedModel, load_model, packaged_key

ModelKey = tuple[str, str, str, bool]  # (source, device, dtype, trust_remote_code)

MODEL_PAGE = "pages/model.py"


# --------------------------------------------------------------------------------------------
# the shared model


@st.cache_resource(show_spinner=False, max_entries=3)
def load_shared_model(source: str, device: str, dtype: str, trust_remote_code: bool,
                      _progress: Callable[[str, float], None] | None = None) -> LoadedModel:
    """Load once per key for the whole server; a failed load is not cached (it raises)."""
    return load_model(source, device=None if device == "auto" else device,
                      dtype=None if dtype == "auto" else dtype, trust_remote_code=trust_remote_code,
                      progress=_progress)


def model_key() -> ModelKey | None:
    return st.session_state.get("model_key")


def current_model() -> LoadedModel | None:
    """This session's chosen model (from the shared cache), or None before a model was loaded."""
    key = model_key()
    return load_shared_model(*key) if key else None


def require_model() -> LoadedModel:
    """The current model, or a pointer to the Model page and a stop of the page script."""
    loaded = current_model()
    if loaded is None:
        st.info("No model loaded yet. Load one on the Model page first (the packaged default takes ~2 s).")
        st.page_link(MODEL_PAGE, label="Go to the Model page", icon="🧠")
        st.stop()
    return loaded


def model_label(key: ModelKey) -> str:
    pk = packaged_key(key[0])
    return PACKAGED[pk].title if pk else key[0]


# --------------------------------------------------------------------------------------------
# shared jobs


@st.cache_resource(show_spinner=False)
def _registry() -> tuple[dict[tuple, Job], threading.Lock]:
    return {}, threading.Lock()


def shared_job(key: tuple, fn: Callable[[Job], Any], name: str) -> Job:
    """The job registered under `key`, started with `fn` if there is none yet (or it was cancelled).

    A job that failed stays registered so every session sees the same error; `forget_job` clears it.
    """
    jobs, lock = _registry()
    with lock:
        job = jobs.get(key)
        if job is None or job.status == CANCELLED:
            job = jobs[key] = Job(fn, name=name).start()
    return job


def peek_job(key: tuple) -> Job | None:
    jobs, lock = _registry()
    with lock:
        return jobs.get(key)


def forget_job(key: tuple) -> None:
    jobs, lock = _registry()
    with lock:
        job = jobs.pop(key, None)
    if job is not None:
        job.cancel()


def spectra_job(loaded: LoadedModel, fit: str = "peak", farms: bool = False) -> Job:
    """Spectra of the shared (dense) model, computed once per (model, fit rule, FARMS) for everyone."""
    from analysis.spectra import analyze  # noqa: PLC0415 (torch-heavy; only pages that need it)

    key = ("spectra", model_key(), fit, bool(farms))
    return shared_job(key, lambda job: analyze(loaded.model, fit=fit, farms=farms, include_outside=True,
                                               progress=job.report), name="spectra")


def job_failed(job: Job) -> bool:
    return job.status == ERROR


# --------------------------------------------------------------------------------------------
# the session's private copy


@dataclass
class SessionWork:
    """What one browser session prunes: a deep copy of the shared model, made on first use.

    model: the copy (None until the first prune); snapshot: its dense prunable weights
    (analysis.pruning.DenseSnapshot) to restore without re-copying; label: what the weights are now
    ("dense" or a short run description); job: the running or last prune/eval job of this session.
    """

    key: ModelKey
    model: Any = None
    snapshot: Any = None
    label: str = "dense"
    allocation: Any = None  # the Allocation the copy was pruned with
    job: Job | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pruned(self) -> bool:
        return self.model is not None and self.label != "dense"


def session_work() -> SessionWork:
    """This session's SessionWork for the current model (a new one when the model changed)."""
    key = model_key()
    work = st.session_state.get("work")
    if work is None or work.key != key:
        if work is not None and work.job is not None:
            work.job.cancel()
        work = st.session_state["work"] = SessionWork(key)
    return work
