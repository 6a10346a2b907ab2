"""A dashboard session's private working copy of the shared model, and the job bodies that change
or measure it (run in analysis.jobs threads; no streamlit here either).

The shared model is read by every session and never changed: pruning happens on a session's own
`WorkingCopy`, and restoring copies the prunable weights back from the shared model, so no second
dense copy is kept per session. Results every session would compute alike (spectra, the dense
baseline, OWL outlier ratios) are shared jobs made by components/state.py from the steps here.
"""
from __future__ import annotations

import copy
import threading
from typing import Any

from torch import nn

from analysis.allocation import Allocation
from analysis.evaluation import PplUpdate, perplexity_stream
from analysis.jobs import DONE, Job, JobCancelled
from analysis.owl import collect_outlier_ratios
from analysis.pipeline import Timer, build_allocation, make_record, prepare_data, record_config
from analysis.pruning import DenseSnapshot, prune
from analysis.settings import RunSettings


class WorkingCopy:
    """A private deep copy of a shared model, for pruning without touching what others read.

    The copy is made by `ensure` (the first prune does it, or `prepare` ahead of time in the
    background, since copying takes a few seconds on a CPU). `restore()` undoes a prune by copying
    the prunable weights back from the shared model, which is never changed. `version` is bumped on
    every change of the weights (caches key on it); `label` says what the weights are ("dense" or a
    short description of the last prune).
    """

    def __init__(self, key: Any = None):
        self.key = key
        self.model = None
        self.dense = None  # DenseSnapshot.view of the shared model: where restore() copies from
        self.label = "dense"
        self.version = 0
        self.allocation = None  # the Allocation the copy was last pruned with
        self.job: Job | None = None  # the running or last prune/eval job of the owner
        self.lock = threading.Lock()  # one job at a time may change the weights

    @property
    def pruned(self) -> bool:
        return self.model is not None and self.label != "dense"

    def ensure(self, shared_model: nn.Module) -> nn.Module:
        """The copy, made from `shared_model` on first use (deepcopy only reads the shared weights)."""
        if self.model is None:
            model = copy.deepcopy(shared_model)
            self.dense = DenseSnapshot.view(shared_model)
            self.model = model
        return self.model

    def prepare(self, shared_model: nn.Module) -> None:
        """Make the copy in a background thread now, so a later prune does not wait for it."""
        def run() -> None:
            with self.lock:
                self.ensure(shared_model)

        if self.model is None and not self.lock.locked():
            threading.Thread(target=run, name="working-copy", daemon=True).start()

    def restore(self) -> None:
        """Back to the dense weights (no-op when nothing was pruned)."""
        if self.pruned:
            self.dense.restore(self.model)
            self.label, self.allocation = "dense", None
            self.version += 1

    def drop(self) -> None:
        """Free the copy's memory; the owner then reads the shared model again."""
        self.model = self.dense = self.allocation = None
        self.label = "dense"
        self.version += 1


def evaluate_job(job: Job, model: nn.Module, windows, lo: float = 0.0, hi: float = 1.0,
                 after_first=None) -> PplUpdate | None:
    """Stream running perplexity over `windows` into job.emit (one PplUpdate per window), with
    progress from `lo` to `hi`; returns the last PplUpdate (None if stopped before the first window).
    `after_first`: called once after the first window (e.g. to start a job that would compete for CPU)."""
    last = None
    for u in perplexity_stream(model, windows, stop=job.stop):
        first, last = last is None, u
        job.emit(u)
        if first and after_first is not None:
            after_first()
        job.report(f"perplexity: window {u.windows_done}/{u.windows_total}, ppl {u.ppl:.2f}",
                   lo + (hi - lo) * u.windows_done / max(u.windows_total, 1))
    return last


def outlier_ratios_job(job: Job, shared_model: nn.Module, calib, threshold_m: float) -> dict[int, float]:
    """OWL outlier ratios of a shared model, measured on a throw-away copy: collecting activations
    registers forward hooks and intercepts the first block's inputs, which would disturb every other
    session running the shared model at the same time."""
    job.report("copying the model for the activation walk", 0.0)
    model = copy.deepcopy(shared_model)
    try:
        return collect_outlier_ratios(model, calib, threshold_m, progress=job.report)
    finally:
        del model


def _result_of(job: Job, what: str, owner: Job):
    """Wait for a shared input job while `owner` may be cancelled; its result, or its error raised."""
    job.start_once()
    while not job.wait(timeout=0.25):
        owner.check()
    if job.status != DONE:
        raise ValueError(f"{what} failed: {job.error or job.status}")
    return job.result


def prune_and_evaluate(job: Job, work: WorkingCopy, shared_model: nn.Module, tokenizer, settings: RunSettings,
                       model_name: str = "", bos: bool = False, store=None, dense_job: Job | None = None,
                       metrics=None, owl_job: Job | None = None, custom: Allocation | None = None) -> dict:
    """Prune `work`'s private copy block by block, then stream its perplexity window by window.

    Inputs shared with the other pages: `metrics` (the spectra an alphapruning/farms allocation uses),
    `owl_job` (the shared OWL outlier-ratio job for these calibration settings: the Allocation page's
    OWL preset uses the same one), `custom` (the curve drawn on the Allocation page).
    Progress: job.progress goes 0 -> 0.7 over the blocks, then 0.7 -> 1 over the windows; every
    window emits a PplUpdate. Cancelling restores the dense weights. A finished run is added to
    `store` (an analysis.store.RunStore) when given, with the dense perplexity of `dense_job` (the
    shared baseline on the same windows; started after the first pruned window if nobody started it
    yet, so it does not slow down the first live value on a small CPU). Returns the run record.
    """
    s = settings.check()
    timer = Timer()
    outliers = None
    if s.allocation.method == "owl" and s.prune.nm is None and owl_job is not None:
        job.report("waiting for the OWL outlier ratios", 0.0)
        outliers = _result_of(owl_job, "OWL outlier ratios", job)
    with work.lock:
        job.report("copying the shared model (first prune of this session)" if work.model is None
                   else "restoring dense weights", 0.0)
        with timer("copy"):
            model = work.ensure(shared_model)
            work.restore()
        job.report("tokenizing calibration and evaluation text", 0.02)
        with timer("data"):
            data = prepare_data(tokenizer, s.calibration, s.evaluation, bos)
        with timer("allocation"):
            alloc = build_allocation(s.allocation, model, nm=s.prune.nm, calib=data.calib, metrics=metrics,
                                     outlier_ratios=outliers, custom=custom, model_name=model_name,
                                     progress=lambda m, f: job.report(f"allocation: {m}", 0.03 + 0.1 * f))
        with timer("prune"):
            report = prune(model, alloc.per_layer, method=s.prune.method, calib=data.calib, nm=s.prune.nm,
                           progress=lambda m, f: job.report(m, 0.13 + 0.57 * f), stop=job.stop,
                           rowwise=s.prune.rowwise)
        work.version += 1
        if report.stopped or job.cancelled:
            work.label = "partly pruned"
            work.restore()
            raise JobCancelled()
        work.label = f"{s.prune.method} {report.overall:.0%} ({alloc.method}{', ' + s.prune.nm if s.prune.nm else ''})"
        work.allocation = alloc
        job.report(f"pruned to {report.overall:.1%} in {report.seconds:.1f} s; evaluating", 0.7)
        with timer("pruned_eval"):
            last = evaluate_job(job, model, data.windows, 0.7, 1.0,
                                after_first=dense_job.start_once if dense_job else None)
    complete = last is not None and last.windows_done == last.windows_total
    dense = None
    if dense_job is not None and complete:
        dense_job.start_once()
        dense_job.wait(timeout=600)
        dense = dense_job.result if dense_job.status == DONE else None
    config = record_config(s, alloc, data.info, model_name, origin="dashboard")
    record = make_record(config, alloc.to_dict(), report, dense, None if last is None else last.ppl, timer.seconds,
                         complete=complete)
    if store is not None and complete:
        record["id"] = store.add(record)
    return record
