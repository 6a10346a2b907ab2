"""Background jobs for the dashboard: run a function in a daemon thread, report progress, cancel.

Streamlit re-runs the page script on every click; a long computation done inside the script would be
interrupted (or would block the page). A `Job` runs its function in its own thread instead, so the
script only polls `job.status`, `job.progress` and `job.updates()` (e.g. from an auto-refreshing
fragment), and a click elsewhere leaves the thread alone. This module does not import streamlit.

The job function receives the `Job` itself and talks back through it:

    def work(job):
        for i in range(n):
            if job.cancelled:                 # or pass job.stop (an Event) to the engine
                return None
            job.report(f"block {i}", i / n)   # progress: (message, fraction in [0, 1])
            job.emit({"step": i})             # a streamed update (e.g. a perplexity value)
        return result                         # -> job.result

    job = Job(work, name="prune").start()
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

PENDING, RUNNING, DONE, ERROR, CANCELLED = "pending", "running", "done", "error", "cancelled"


class JobCancelled(Exception):
    """Raise inside a job function to end it as cancelled (also raised by `Job.check()`)."""


class Job:
    """A function run once in a background daemon thread.

    Attributes (read from any thread):
      status: "pending" | "running" | "done" | "error" | "cancelled"
      progress: (message, fraction in [0, 1]) last reported
      result: the function's return value once status == "done"
      error: one-line message when status == "error" (`traceback` holds the full text)
      stop: threading.Event set by `cancel()`; pass it to engine calls that accept `stop=`
      started_at / finished_at: time.time() stamps (seconds), None until they happen
    """

    def __init__(self, fn: Callable[[Job], Any], name: str = "job", max_updates: int = 10_000):
        self.fn = fn
        self.name = name
        self.status = PENDING
        self.progress: tuple[str, float] = ("waiting", 0.0)
        self.result: Any = None
        self.error: str | None = None
        self.traceback: str | None = None
        self.stop = threading.Event()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._updates: list[Any] = []
        self._max_updates = max_updates
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- control (script thread) ----
    def start(self) -> Job:
        if self._thread is not None:
            raise RuntimeError(f"job '{self.name}' was already started")
        self.status = RUNNING
        self.started_at = time.time()
        # daemon: a job must never keep the server process alive on shutdown
        self._thread = threading.Thread(target=self._run, name=f"alphascope-{self.name}", daemon=True)
        self._thread.start()
        return self

    def start_once(self) -> Job:
        """start() unless some thread already did (safe to call from several threads)."""
        with self._lock:
            if self._thread is None:
                self.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop; it ends as "cancelled" at its next check of `stop`."""
        self.stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (or `timeout` seconds pass); True if it ended."""
        if self._thread is None:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def done(self) -> bool:
        """True once the job has ended, whatever the outcome."""
        return self.status in (DONE, ERROR, CANCELLED)

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    @property
    def cancelled(self) -> bool:
        """True once cancel() was called (the job may still be winding down)."""
        return self.stop.is_set()

    @property
    def elapsed(self) -> float:
        """Seconds since start (until finish once done); 0 before start."""
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.time()) - self.started_at

    # ---- reporting (job thread) ----
    def report(self, message: str, fraction: float | None = None) -> None:
        """Progress callback with the engine's `progress=` signature (message, fraction in [0, 1])."""
        frac = self.progress[1] if fraction is None else min(max(float(fraction), 0.0), 1.0)
        self.progress = (str(message), frac)

    def emit(self, update: Any) -> None:
        """Append a streamed update; the oldest are dropped beyond `max_updates`."""
        with self._lock:
            self._updates.append(update)
            if len(self._updates) > self._max_updates:
                del self._updates[: len(self._updates) - self._max_updates]

    def check(self) -> None:
        """Raise JobCancelled if cancel() was called: a convenient checkpoint inside loops."""
        if self.stop.is_set():
            raise JobCancelled()

    def updates(self) -> list[Any]:
        """A copy of the updates emitted so far, oldest first."""
        with self._lock:
            return list(self._updates)

    def latest(self) -> Any:
        """The last update emitted, or None."""
        with self._lock:
            return self._updates[-1] if self._updates else None

    def _run(self) -> None:
        try:
            result = self.fn(self)
        except JobCancelled:
            self.status = CANCELLED
        except Exception as e:  # noqa: BLE001 (the job's error is shown to the user, not raised)
            # ValueError and ModelLoadError carry messages written for the user; others get their type
            user_facing = isinstance(e, ValueError) or type(e).__name__ == "ModelLoadError"
            self.error = str(e) if user_facing and str(e) else f"{type(e).__name__}: {e}"
            self.traceback = traceback.format_exc()
            self.status = ERROR
        else:
            self.result = result
            self.status = CANCELLED if self.stop.is_set() else DONE
        finally:
            self.finished_at = time.time()

    def __repr__(self) -> str:
        msg, frac = self.progress
        return f"Job({self.name!r}, {self.status}, {frac:.0%} {msg!r})"


# --------------------------------------------------------------------------------------------
# what the dashboard runs in jobs (engine calls glued together; no streamlit here either)


class WorkingCopy:
    """A private deep copy of a shared model, for pruning without touching what others read.

    The copy is made by `ensure` (the first prune does it, or `prepare` ahead of time in the
    background, since copying takes a few seconds on a CPU). `restore()` undoes a prune by copying
    the prunable weights back from the shared model, which is never changed: no second copy of the
    dense weights per session. `version` is bumped on every change of the weights (caches key on
    it); `label` says what the weights are ("dense" or a short description of the last prune).
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

    def ensure(self, shared_model) -> Any:
        """The copy, made from `shared_model` on first use (deepcopy only reads the shared weights)."""
        import copy  # noqa: PLC0415

        from analysis.pruning import DenseSnapshot  # noqa: PLC0415

        if self.model is None:
            model = copy.deepcopy(shared_model)
            self.dense = DenseSnapshot.view(shared_model)
            self.model = model
        return self.model

    def prepare(self, shared_model) -> None:
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


def evaluate_job(job: Job, model, windows, lo: float = 0.0, hi: float = 1.0, after_first=None):
    """Stream running perplexity over `windows` into job.emit (one PplUpdate per window), with
    progress from `lo` to `hi`; returns the last PplUpdate (None if stopped before the first window).
    `after_first`: called once after the first window (e.g. to start a job that would compete for CPU)."""
    from analysis.evaluation import perplexity_stream  # noqa: PLC0415

    last = None
    for u in perplexity_stream(model, windows, stop=job.stop):
        first, last = last is None, u
        job.emit(u)
        if first and after_first is not None:
            after_first()
        job.report(f"perplexity: window {u.windows_done}/{u.windows_total}, ppl {u.ppl:.2f}",
                   lo + (hi - lo) * u.windows_done / max(u.windows_total, 1))
    return last


def outlier_ratios_job(job: Job, shared_model, calib, threshold_m: float = 5.0) -> dict[int, float]:
    """OWL outlier ratios of a shared model, measured on a throw-away copy.

    Why a copy: collecting activations registers forward hooks and intercepts the first block's
    inputs, which would disturb every other session running the shared model at the same time.
    """
    import copy  # noqa: PLC0415

    from analysis.pruning import collect_outlier_ratios  # noqa: PLC0415

    job.report("copying the model for the activation walk", 0.0)
    model = copy.deepcopy(shared_model)
    try:
        return collect_outlier_ratios(model, calib, threshold_m, progress=job.report)
    finally:
        del model


@dataclass
class PruneSettings:
    """Everything a dashboard prune run needs besides the model.

    sparsity: target fraction of pruned weights; allocation: uniform | alphapruning | farms | owl |
    custom (then `custom` holds the Allocation); metrics / farms_metrics: spectra metrics for
    alphapruning / farms; nm: "2:4"-style string or None; max_windows: evaluation windows (None: all).
    """

    method: str = "wanda"
    sparsity: float = 0.5
    allocation: str = "uniform"
    epsilon: float = 0.3
    nm: str | None = None
    n_samples: int = 8
    calib_seqlen: int = 128
    calib_source: str = "default"
    eval_source: str = "default"
    eval_seqlen: int = 512
    max_windows: int | None = 16
    seed: int = 0
    owl_lambda: float = 0.08
    custom: Any = None
    metrics: Any = field(default=None, repr=False)
    farms_metrics: Any = field(default=None, repr=False)


def make_allocation(s: PruneSettings, model, calib, model_name: str = "", progress=None):
    """The Allocation for a run. OWL measures outlier ratios on `model`, which must be dense and
    private (see outlier_ratios_job); uniform and OWL need no spectra."""
    from analysis.models import layer_table  # noqa: PLC0415
    from analysis.pruning import parse_nm  # noqa: PLC0415
    from analysis.runs import build_allocation, nm_allocation  # noqa: PLC0415

    nm = parse_nm(s.nm)
    if nm is not None:
        return nm_allocation(model, nm, model_name=model_name)
    if s.allocation == "custom":
        if s.custom is None:
            raise ValueError("No custom allocation: draw one on the Allocation page first.")
        return s.custom
    metrics = s.farms_metrics if s.allocation == "farms" else s.metrics
    if metrics is None:
        if s.allocation not in ("uniform", "owl"):
            raise ValueError(f"Allocation '{s.allocation}' needs the spectra metrics; they are not computed yet.")
        metrics = layer_table(model)
    return build_allocation(model, s.allocation, s.sparsity, calib, epsilon=s.epsilon, owl_lambda=s.owl_lambda,
                            model_name=model_name, metrics=metrics, progress=progress)


def prune_and_evaluate(job: Job, work: WorkingCopy, shared_model, tokenizer, settings: PruneSettings,
                       model_name: str = "", bos: bool = False, store=None, dense_job: Job | None = None) -> dict:
    """Prune `work`'s private copy block by block, then stream its perplexity window by window.

    Progress: job.progress goes 0 -> 0.7 over the blocks, then 0.7 -> 1 over the windows; every
    window emits a PplUpdate. Cancelling restores the dense weights. A finished run is added to
    `store` (an analysis.runs.RunStore) when given, with the dense perplexity of `dense_job` (the
    shared baseline on the same windows; started here after the first pruned window if nobody started
    it yet, so it does not slow down the first live value on a small CPU). Returns the run record (analysis.runs.make_record).
    """
    from analysis.pruning import prune  # noqa: PLC0415
    from analysis.runs import Timer, make_record, prepare_data  # noqa: PLC0415

    s = settings
    timer = Timer()
    with work.lock:
        job.report("copying the shared model (first prune of this session)" if work.model is None
                   else "restoring dense weights", 0.0)
        with timer("copy"):
            model = work.ensure(shared_model)
            work.restore()
        job.report("tokenizing calibration and evaluation text", 0.02)
        with timer("data"):
            calib, windows, data_info = prepare_data(tokenizer, s.calib_source, s.eval_source, s.n_samples,
                                                     s.calib_seqlen, s.eval_seqlen, s.max_windows, s.seed, bos)
        with timer("allocation"):
            alloc = make_allocation(s, model, calib, model_name,
                                    progress=lambda m, f: job.report(f"OWL {m}", 0.03 + 0.1 * f))
        base = 0.15 if s.allocation == "owl" else 0.03
        with timer("prune"):
            report = prune(model, alloc.per_layer, method=s.method, calib=calib, nm=s.nm,
                           progress=lambda m, f: job.report(m, base + (0.7 - base) * f), stop=job.stop)
        work.version += 1
        if report.stopped or job.cancelled:
            work.label = "partly pruned"
            work.restore()
            raise JobCancelled()
        work.label = f"{s.method} {report.overall:.0%} ({alloc.method}{', ' + s.nm if s.nm else ''})"
        work.allocation = alloc
        job.report(f"pruned to {report.overall:.1%} in {report.seconds:.1f} s; evaluating", 0.7)
        with timer("pruned_eval"):
            last = evaluate_job(job, model, windows, 0.7, 1.0, after_first=dense_job.start_once if dense_job else None)
    complete = last is not None and last.windows_done == last.windows_total
    dense = None
    if dense_job is not None and complete:
        dense_job.start_once()
        dense_job.wait(timeout=600)
        dense = dense_job.result if dense_job.status == DONE else None
    config = {"model": model_name, "method": s.method, "allocation": alloc.method if not s.nm else "n:m",
              "allocation_source": "dashboard", "sparsity": alloc.sparsity, "epsilon": s.epsilon,
              "nm": [int(x) for x in s.nm.split(":")] if s.nm else None, **data_info, "seed": s.seed}
    record = make_record(config, alloc.to_dict(), report, dense, None if last is None else last.ppl, timer.seconds,
                         complete=complete)
    if store is not None and complete:
        record["id"] = store.add(record)
    return record


def evaluate_weights(job: Job, model, tokenizer, settings: PruneSettings, bos: bool = False):
    """Perplexity of `model` as it is now, on the evaluation windows of `settings`; last PplUpdate."""
    from analysis.runs import prepare_data  # noqa: PLC0415

    s = settings
    job.report("tokenizing evaluation text", 0.0)
    _, windows, _ = prepare_data(tokenizer, s.calib_source, s.eval_source, 1, s.calib_seqlen, s.eval_seqlen,
                                 s.max_windows, s.seed, bos)
    return evaluate_job(job, model, windows)
