"""A dashboard session's weights (a private copy of the shared model, or the shared model itself
leased for a prune in place), the gate that keeps every other reader of the shared model on dense
weights, and the job bodies that change or measure them (run in analysis.jobs threads; no streamlit
here either).

Memory model (README, "Memory model"): a session prunes a private deep copy when the device has
room for one more copy of the weights plus the prune's working memory (fast: nobody waits). When it
has not, the session leases the shared model exclusively through its `ModelGate`, keeps the original
values of the prunable matrices on the host (a `DenseSnapshot`), prunes in place, and copies them
back bit for bit before it releases the lease. Everything else that reads the shared model's
weights (shared spectra, dense baseline and OWL jobs, another session's evaluation or copy) reads
through the gate, so it waits in a visible queue meanwhile and never sees pruned weights.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from analysis.allocation import Allocation, AllocationError
from analysis.evaluation import PplUpdate, default_batch_size, perplexity_stream
from analysis.jobs import DONE, Job, JobCancelled
from analysis.layers import module_device, module_device_dtype
from analysis.loading import (
    OFFLOADED,
    MemoryEstimate,
    available_memory_bytes,
    format_bytes,
    memory_estimate,
    offloaded,
)
from analysis.owl import collect_outlier_ratios
from analysis.pipeline import (
    Timer,
    allocation_warnings,
    build_allocation,
    calibration_batch,
    make_record,
    prepare_data,
    record_config,
    search_windows,
)
from analysis.pruners import PruneError
from analysis.pruning import DenseSnapshot, check_finite, prune
from analysis.settings import AllocationSettings, CalibrationSettings, RunSettings
from analysis.zeroshot import ZeroShotResult
from analysis.zeroshot import evaluate as zeroshot_evaluate

WAIT_POLL_S = 0.25  # how often a waiting job re-checks its cancel flag and its queue position
RECLAIM_S = 5.0  # how often a held lease may cost a cycle collection (ModelGate.reclaim)
ABANDON_S = 30.0  # how long an idle lease holder's session may be disconnected before waiters take the lease back
# (a dropped connection comes back within seconds; a closed tab or a reload never does)


class Absence:
    """How long a browser session has been seen disconnected without a break: each `seconds` is one look."""

    def __init__(self):
        self.since: float | None = None  # time.monotonic() of the first look that found it gone

    def seconds(self, connected: bool, now: float) -> float:
        if connected:
            self.since = None
        elif self.since is None:
            self.since = now
        return 0.0 if self.since is None else now - self.since


class ModelGate:
    """Who may use one shared model's weights: any number of readers at once, or one session that
    leased it to prune it in place (until it restored the dense weights). Waiters queue in order of
    arrival; a reader behind a queued lease waits for that lease, so a lease is never starved.

    `who` names a waiter in the messages other waiters see (e.g. "session 3f2a9c").
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._queue: list[tuple[object, bool, str]] = []  # (ticket, exclusive, who), oldest first
        self.holder: str | None = None  # who leased the model, or None
        self.until = ""  # what the waiters wait for, e.g. "session 3f2a9c's pruned weights to be restored"
        self.dense_zero_fraction: float | None = None  # of the dense weights, set by whoever loaded them
        self.non_finite: str | None = None  # the dense weights' first prunable matrix with NaN or inf, likewise
        self._reclaimed = 0.0  # time.monotonic() of the last reclaim
        self._holder_copy: weakref.ref | None = None  # the WorkingCopy holding the lease, when a session holds it
        self._away = Absence()  # of the holder's session

    def reclaim(self) -> None:
        """Give back a lease whose session is gone (called by waiters, at most every RECLAIM_S).

        Two ways a session goes: Streamlit keeps a closed or reloaded tab's session for a reconnection
        that never comes, so its state is never garbage; the holder's `connected` check says so, and
        once it has been away for ABANDON_S with no job running, its weights are restored
        (WorkingCopy.abandon). A running job is left to finish, as for a private copy: a laptop that
        sleeps through a long prune must not lose it to a waiter.
        A session Streamlit did drop gives the weights back when its WorkingCopy is collected, but its
        state sits in reference cycles and the frozen model makes full collections rare: so collect."""
        now = time.monotonic()
        if self.holder is None or now - self._reclaimed < RECLAIM_S:
            return
        self._reclaimed = now
        self._check_holder(now)
        gc.collect()

    def _check_holder(self, now: float) -> None:
        """Abandon the holder's WorkingCopy once it has been disconnected for ABANDON_S (its own
        function: a reference to it held while collecting would keep a dropped session alive)."""
        work = self._holder_copy() if self._holder_copy is not None else None
        if work is None or work.owner != self.holder or work.abandoned:
            return
        away = self._away.seconds(work.connected(), now)
        if away >= ABANDON_S and (work.job is None or work.job.done):
            work.abandon(f"{work.owner} was disconnected for {away:.0f} s while it held the "
                         "shared model, pruned in place: its weights were restored for the others")

    def _may_go(self, ticket: object, exclusive: bool) -> bool:
        if self.holder is not None:
            return False
        if exclusive:
            return self._readers == 0 and self._queue[0][0] is ticket
        for t, excl, _ in self._queue:
            if t is ticket:
                return True
            if excl:
                return False
        return False

    def waiting_message(self, position: int) -> str:
        if self.holder is not None:
            return f"waiting for {self.until} (position {position} in the queue)"
        return f"waiting for {self._readers} reader(s) of the dense weights to finish (position {position})"

    def _enter(self, exclusive: bool, who: str, job: Job | None, blocking: bool = True, until: str = "") -> bool:
        ticket = object()
        with self._cond:
            self._queue.append((ticket, exclusive, who))
            try:
                while not self._may_go(ticket, exclusive):
                    if not blocking:
                        return False
                    if job is not None:
                        position = next(i for i, q in enumerate(self._queue) if q[0] is ticket) + 1
                        job.report(self.waiting_message(position))
                        job.check()  # a cancelled waiter leaves the queue (JobCancelled)
                    self.reclaim()
                    self._cond.wait(WAIT_POLL_S)
                if exclusive:
                    self.holder, self.until = who, until
                else:
                    self._readers += 1
                return True
            finally:
                self._queue = [q for q in self._queue if q[0] is not ticket]
                self._cond.notify_all()

    @contextlib.contextmanager
    def reading(self, who: str = "a reader", job: Job | None = None, blocking: bool = True) -> Iterator[bool]:
        """A read of the dense weights around a `with` body, which gets whether the read started: it
        waits (reporting the queue position to `job`, which may be cancelled meanwhile) while a lease
        is held or queued, or with blocking=False starts no read and gets False instead of waiting."""
        started = self._enter(False, who, job, blocking)
        try:
            yield started
        finally:
            if started:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()

    def lease(self, who: str, until: str, job: Job | None = None, copy: WorkingCopy | None = None) -> None:
        """Wait for exclusive use of the weights (see `reading` for the waiting), for `who`;
        `until` tells the waiters what they wait for; `copy`: the session's WorkingCopy that leases
        them, which `reclaim` asks whether its session is still there."""
        self._enter(True, who, job, until=until)
        self._holder_copy, self._away = (weakref.ref(copy) if copy is not None else None), Absence()

    def release(self, who: str) -> None:
        with self._cond:
            if self.holder != who:
                raise RuntimeError(f"{who} does not hold the model (held by {self.holder})")
            self.holder, self._holder_copy = None, None
            self._cond.notify_all()

    def queue(self) -> list[str]:
        """Who waits, oldest first."""
        with self._cond:
            return [who for _, _, who in self._queue]


class WorkingCopy:
    """The weights one session prunes: a private deep copy of the shared model, or the shared model
    itself under an exclusive lease of its `gate` (module docstring; `choose` decides).

    `restore()` undoes a prune: a private copy gets the prunable weights back from the shared model;
    a lease copies the host snapshot of the original values back and releases the lease. `version`
    is bumped on every change of the weights (caches key on it); `label` says what the weights are
    ("dense" or a short description of the last prune). `connected`: whether the owner's session is
    still there (ModelGate.reclaim; None: always).
    """

    def __init__(self, key: Any = None, gate: ModelGate | None = None, owner: str = "a session",
                 connected: Callable[[], bool] | None = None):
        self.key = key
        self.gate = gate if gate is not None else ModelGate()
        self.owner = owner  # how other sessions' queue messages name this session
        self.connected = connected if connected is not None else lambda: True
        self.abandoned = ""  # why the weights were given back while the owner was away (see abandon), or ""
        self.model = None  # the private copy, or the shared model while leased
        self.dense = None  # where restore() copies from: a view of the shared model, or the host snapshot
        self.leased = False
        self.label = "dense"
        self.version = 0
        self.allocation = None  # the Allocation the copy was last pruned with
        self.pruner: str | None = None  # and the pruner (PRUNERS key)
        self.run_id: int | None = None  # the run store's record of that prune (zero-shot scores join it)
        self.job: Job | None = None  # the running or last prune/eval job of the owner
        self.lock = threading.Lock()  # one job at a time may change the weights

    @property
    def pruned(self) -> bool:
        return self.model is not None and self.label != "dense"

    @property
    def pruning(self) -> bool:
        """Whether a prune job is changing these weights now (a copy pruned before too)."""
        return self.job is not None and self.job.name == "prune" and not self.job.done

    def describe(self) -> str:
        """The "Your weights" line."""
        if self.pruning:
            return "being pruned (dense again if the prune fails or is cancelled)"
        if not self.pruned:
            return "dense (shared model)"
        if self.leased:
            return "pruned in place — " + self.label + " (the shared model is yours until you restore it)"
        return "pruned copy — " + self.label

    def make_copy(self, shared_model: nn.Module, need: MemoryEstimate, job: Job | None = None,
                  blocking: bool = True) -> bool:
        """Make the private copy (reading the shared model through the gate) when the model's device
        has room for it plus the prune's working memory; False when it has not (or, with
        blocking=False, when the gate would make it wait). True at once when the copy exists."""
        if self.model is not None and not self.leased:
            return True
        copied = _private_copy(shared_model, need, self.gate, self.owner, job, blocking)
        if copied is None:
            return False
        self.model, self.dense, self.leased = copied, DenseSnapshot.view(shared_model), False
        return True

    def lease(self, shared_model: nn.Module, job: Job | None = None) -> nn.Module:
        """Wait for the shared model's lease, then keep the original prunable weights on the host.
        A session that goes away while leasing (its tab closed: Streamlit drops its state) gives the
        dense weights back when this object is collected, so the others do not wait forever."""
        self.gate.lease(self.owner, f"{self.owner}'s pruned weights to be restored", job, copy=self)
        self.abandoned = ""
        try:
            self.dense = DenseSnapshot.take(shared_model)
        except BaseException:
            self.gate.release(self.owner)
            raise
        self.model, self.leased = shared_model, True
        self._abandoned = weakref.finalize(self, _give_back, self.dense, shared_model, self.gate, self.owner)
        self._abandoned.atexit = False
        return shared_model

    def prepare(self, shared_model: nn.Module, need: MemoryEstimate) -> None:
        """Make the private copy in a background thread now, when it fits, so a later prune does not
        wait for it (a copy takes seconds on a CPU). Not while another session leases the shared
        model: it would wait in the gate holding `lock`, where no Cancel of this session's jobs reaches."""
        def run() -> None:
            with self.lock:
                if self.model is None:
                    self.make_copy(shared_model, need, blocking=False)

        room = _room(module_device(shared_model), need.weights + need.working)
        if self.model is None and not self.lock.locked() and room:
            threading.Thread(target=run, name="working-copy", daemon=True).start()

    def restore(self, job: Job | None = None) -> None:
        """Back to the dense weights, bit for bit. A lease is released; a private copy reads the shared
        model through the gate (from a page, with no `job`: dropped instead when the shared model is
        leased by another session right now, so the button never blocks)."""
        if self.leased:
            self._abandoned.detach()
            self.dense.restore(self.model)
            self.model = self.dense = None
            self.leased, self.label, self.allocation, self.pruner, self.run_id = False, "dense", None, None, None
            self.version += 1
            self.gate.release(self.owner)
        elif self.pruned:
            with self.gate.reading(self.owner, job, blocking=job is not None) as started:
                if started:
                    self.dense.restore(self.model)
            if not started:
                self.drop()
                return
            self.label, self.allocation, self.pruner, self.run_id = "dense", None, None, None
            self.version += 1

    def abandon(self, why: str = "") -> None:
        """Cancel the owner's job, then free its weights (restoring a lease) once the job has let go of
        them: in a thread, as the caller may be a waiter inside the gate. `why` is kept in `abandoned`
        for the owner to read should it come back."""
        self.abandoned = why or "abandoned"
        if self.job is not None:
            self.job.cancel()

        def run() -> None:
            with self.lock:
                self.drop()

        threading.Thread(target=run, name="drop-weights", daemon=True).start()

    def drop(self) -> None:
        """Free the copy's memory (restoring a lease first); the owner then reads the shared model."""
        if self.leased:
            self.restore()
        self.model = self.dense = self.allocation = self.pruner = self.run_id = None
        self.label = "dense"
        self.version += 1


def _give_back(dense: DenseSnapshot, shared_model: nn.Module, gate: ModelGate, owner: str) -> None:
    """Restore and release a lease whose WorkingCopy was collected without restoring it."""
    dense.restore(shared_model)
    gate.release(owner)


_reserved: dict[str, int] = {}  # device -> bytes of copies being made now (not yet seen as used)
_reserved_lock = threading.Lock()


def _room(device: torch.device, nbytes: int) -> bool:
    return nbytes + _reserved.get(str(device), 0) <= available_memory_bytes(device)


def _private_copy(shared_model: nn.Module, need: MemoryEstimate, gate: ModelGate, who: str,
                  job: Job | None, blocking: bool = True) -> nn.Module | None:
    """A deep copy of `shared_model` (read through `gate`), or None when its device has no room for
    the copy plus `need.working` (or, with blocking=False, when the gate would make it wait). The room
    is reserved while copying, so two sessions never both take the last of it."""
    dev = str(module_device(shared_model))
    nbytes = need.weights + need.working
    with _reserved_lock:
        if not _room(torch.device(dev), nbytes):
            return None
        _reserved[dev] = _reserved.get(dev, 0) + nbytes
    try:
        with gate.reading(who, job, blocking) as started:
            return copy.deepcopy(shared_model) if started else None
    finally:
        with _reserved_lock:
            _reserved[dev] -= nbytes


def prune_need(model: nn.Module, settings: RunSettings) -> MemoryEstimate:
    """What pruning `model` with `settings` needs (analysis.loading.memory_estimate)."""
    dev = module_device(model)
    return memory_estimate(model, next(model.parameters()).dtype, settings.calibration.n_samples,
                           settings.calibration.seqlen, default_batch_size(dev), settings.evaluation.seqlen)


def prune_device(model: nn.Module) -> torch.device:
    """Where each block is pruned: a GPU when the model sits in host memory and one is visible (only
    the current block goes there: how a model larger than the GPU is pruned), else where it lives."""
    dev = module_device(model)
    return torch.device("cuda") if dev.type == "cpu" and torch.cuda.is_available() else dev


def lease_problem(model: nn.Module, need: MemoryEstimate) -> str | None:
    """Why even a prune in place does not fit (no room on the host for the original values of the
    prunable matrices, or on the device for the working memory), or None."""
    dev = module_device(model)
    if offloaded(model):
        return OFFLOADED
    host = need.prunable + (need.working if dev.type == "cpu" else 0)
    if host <= available_memory_bytes("cpu") and (dev.type == "cpu" or need.working <= available_memory_bytes(dev)):
        return None
    return (f"Not enough memory to prune: there is no room for a private copy, and a prune in place "
            f"needs {format_bytes(need.prunable)} of host memory for the original values of the pruned "
            f"matrices and {format_bytes(need.working)} on {dev} for calibration activations and "
            f"Hessians, but only {format_bytes(available_memory_bytes('cpu'))} (host) / "
            f"{format_bytes(available_memory_bytes(dev))} ({dev}) are free. Use fewer or shorter "
            f"calibration samples, or free memory.")


def evaluate_job(job: Job, model: nn.Module, windows, lo: float = 0.0, hi: float = 1.0,
                 after_first=None, batch_size: int | None = None) -> PplUpdate | None:
    """Stream running perplexity over `windows` into job.emit (one PplUpdate per forward pass of
    `batch_size` windows: one on a CPU by default), with progress from `lo` to `hi`; returns the last
    PplUpdate (None if stopped before the first pass). `after_first`: called once after the first pass
    (e.g. to start a job that would compete for CPU)."""
    last = None
    for u in perplexity_stream(model, windows, stop=job.stop, batch_size=batch_size):
        first, last = last is None, u
        job.emit(u)
        if first and after_first is not None:
            after_first()
        job.report(f"perplexity: window {u.windows_done}/{u.windows_total}, ppl {u.ppl:.2f}",
                   lo + (hi - lo) * u.windows_done / max(u.windows_total, 1))
    return last


def outlier_ratios_job(job: Job, shared_model: nn.Module, calib, owl_threshold: float, gate: ModelGate,
                       need: MemoryEstimate) -> dict[int, float]:
    """OWL outlier ratios of a shared model. Collecting activations registers forward hooks and
    intercepts the first block's inputs, which would disturb every other session running the shared
    model at the same time: so it runs on a throw-away copy when one fits, else on the shared model
    itself under an exclusive lease of `gate` (others wait meanwhile)."""
    job.report("copying the model for the activation walk", 0.0)
    model = _private_copy(shared_model, need, gate, "the OWL outlier measurement", job)
    if model is not None:
        try:
            return collect_outlier_ratios(model, calib, owl_threshold, progress=job.report)
        finally:
            del model
    gate.lease("the OWL outlier measurement", "the OWL outlier measurement to finish", job)
    try:
        return collect_outlier_ratios(shared_model, calib, owl_threshold, progress=job.report)
    finally:
        gate.release("the OWL outlier measurement")


def search_job(job: Job, shared_model: nn.Module, gate: ModelGate, who: str, tokenizer, bos: bool,
               settings: AllocationSettings, pruner: str, calibration: CalibrationSettings, eval_source: str,
               model_name: str = "", metrics=None, start: Allocation | None = None, farms_metrics=None,
               outlier_ratios=None, connected: Callable[[], bool] | None = None) -> Allocation:
    """The allocation search (`settings.method == "auto"`) for a dashboard session. It writes candidate
    weights into the model it searches, so it works on a throw-away copy of the shared model, read
    through `gate` (waiting while a session has it pruned in place); with no room for that copy it is a
    clear error. `start`: the user's curve, the search's only start (None: the presets). `metrics`,
    `farms_metrics`, `outlier_ratios`: the dense spectra, FARMS spectra and OWL ratios when known (None:
    the search measures what it needs). Each improvement is emitted as {"per_block", "fitness", "step",
    "objective"}. `connected`: whether the tab that started it is still open (the dashboard counts a reload's
    session as the tab's); once it has been away for ABANDON_S (a closed tab) the search is cancelled, as no one
    would see its result."""
    stop = job.stop if connected is None else _cancel_when_gone(job, connected)
    job.report("copying the model", 0.0)
    need = prune_need(shared_model, RunSettings(allocation=settings, calibration=calibration))
    model = _private_copy(shared_model, need, gate, who, job)
    if model is None:
        dev = module_device(shared_model)
        raise AllocationError(f"The search needs a private copy of the model (it writes candidate weights into it): "
                              f"{format_bytes(need.weights + need.working)} on {dev}, "
                              f"where {format_bytes(available_memory_bytes(dev))} are free. "
                              "Free memory, or run it from the command line (python -m analysis allocate --allocation "
                              "auto), which searches on the model it loads.")
    calib = calibration_batch(tokenizer, calibration, eval_source, bos)
    held_out, then = search_windows(tokenizer, settings, calibration, bos)

    def on_best(per_block, fit, step) -> None:
        job.emit({"per_block": per_block, "fitness": fit, "step": step, "objective": settings.search_objective})

    def progress(message: str, fraction: float) -> None:
        if job.latest() is None:  # no best so far to return yet: a cancel ends the spectra, OWL or statistics at once
            job.check()
        job.report(message, fraction)
    return build_allocation(settings, model, calib=calib, metrics=metrics, farms_metrics=farms_metrics,
                            outlier_ratios=outlier_ratios, model_name=model_name, custom=start, prune_method=pruner,
                            progress=progress, stop=stop, fitness_windows=held_out, then_windows=then,
                            on_best=on_best)


def _cancel_when_gone(job: Job, connected: Callable[[], bool]) -> Callable[[], bool]:
    """A stop flag: `job.stop`, which it sets (cancelling the job) once `connected()` has said False for
    ABANDON_S without a break."""
    away = Absence()

    def stop() -> bool:
        if away.seconds(connected(), time.monotonic()) >= ABANDON_S:
            job.cancel()
        return job.stop.is_set()
    return stop


def evaluate_weights_job(job: Job, work: WorkingCopy, shared_model: nn.Module, windows) -> PplUpdate | None:
    """`evaluate_job` on the session's weights: its pruned copy or lease, else the shared model read
    through the gate (waiting while another session has it pruned in place)."""
    with work.lock:
        if work.model is not None:
            return evaluate_job(job, work.model, windows)
    with work.gate.reading(work.owner, job):
        return evaluate_job(job, shared_model, windows)


def zeroshot_weights_job(job: Job, work: WorkingCopy, shared_model: nn.Module, tokenizer, tasks,
                         limit: int | None = None, bos: bool = False) -> ZeroShotResult:
    """Zero-shot scores (analysis.zeroshot.evaluate) of the session's weights, read as `evaluate_weights_job`
    reads them; a cancelled run raises JobCancelled."""
    def score(model: nn.Module) -> ZeroShotResult:
        result = zeroshot_evaluate(model, tokenizer, tasks, limit=limit, bos=bos, progress=job.report, stop=job.stop)
        if result.stopped:
            raise JobCancelled()
        return result

    with work.lock:
        if work.model is not None:
            return score(work.model)
    with work.gate.reading(work.owner, job):
        return score(shared_model)


def _result_of(job: Job, what: str, owner: Job):
    """Wait for a shared input job while `owner` may be cancelled; its result, or its error raised."""
    job.start_once()
    while not job.wait(timeout=0.25):
        owner.check()
    if job.status != DONE:
        raise PruneError(f"{what} failed: {job.error or job.status}")
    return job.result


def prune_and_evaluate(job: Job, work: WorkingCopy, shared_model: nn.Module, tokenizer, settings: RunSettings,
                       model_name: str = "", bos: bool = False, store=None, dense_job: Job | None = None,
                       metrics=None, owl_job: Job | None = None, custom: Allocation | None = None,
                       model_title: str | None = None) -> dict:
    """Prune `work`'s weights block by block (a private copy, or the shared model leased when no
    copy fits: see the module docstring), then stream their perplexity as it is measured.

    Inputs shared with the other pages: `metrics` (the spectra an alphapruning/farms allocation uses),
    `owl_job` (the shared OWL outlier-ratio job for these calibration settings: the Allocation page's
    OWL preset uses the same one), `custom` (the curve drawn on the Allocation page).
    Progress: job.progress goes 0 -> 0.7 over the blocks, then 0.7 -> 1 over the windows; every
    forward pass (`evaluate_job`) emits a PplUpdate. Cancelling restores the dense weights. A finished run is added to
    `store` (an analysis.store.RunStore) when given, with the dense perplexity of `dense_job` (the
    shared baseline on the same windows; started after the first pruned window if nobody started it
    yet, so it does not slow down the first live value on a small CPU). Returns the run record.
    """
    s = settings.check()
    timer = Timer()
    with work.lock:  # first: the shared jobs waited for below may need this session's lease back
        job.report("restoring dense weights", 0.0)
        work.restore(job)
    outliers = None
    if s.allocation.method == "owl" and s.prune.nm is None and owl_job is not None:
        job.report("waiting for the OWL outlier ratios", 0.0)
        outliers = _result_of(owl_job, "OWL outlier ratios", job)
    need = prune_need(shared_model, s)
    with work.lock:
        with timer("copy"):
            job.report("copying the shared model (first prune of this session)", 0.0)
            if not work.make_copy(shared_model, need, job):
                if problem := lease_problem(shared_model, need):
                    raise PruneError(problem)
                if dense_job is not None:  # it reads the dense shared weights: before they are pruned
                    job.report("dense baseline first: the shared model is about to be pruned in place", 0.0)
                    _result_of(dense_job, "the dense baseline", job)
                job.report("no room for a private copy: waiting to prune the shared model in place", 0.0)
                work.lease(shared_model, job)
            model = work.model
        try:  # until pruned: any failure or cancel puts the dense weights back (and ends a lease)
            check_finite(model)
            job.report("tokenizing calibration and evaluation text", 0.02)
            with timer("data"):
                data = prepare_data(tokenizer, s.calibration, s.evaluation, bos, s.needs_calibration())
            with timer("allocation"):
                alloc = build_allocation(s.allocation, model, nm=s.prune.nm, calib=data.calib, metrics=metrics,
                                         outlier_ratios=outliers, custom=custom, model_name=model_name,
                                         progress=lambda m, f: job.report(f"allocation: {m}", 0.03 + 0.1 * f))
            with timer("prune"):
                report = prune(model, alloc.per_layer, method=s.prune.method, calib=data.calib, nm=s.prune.nm,
                               progress=lambda m, f: job.report(m, 0.13 + 0.57 * f), stop=job.stop,
                               device=prune_device(model), rowwise=s.prune.rowwise)
            work.version += 1
            if report.stopped or job.cancelled:
                raise JobCancelled()
        except BaseException:
            work.label = "partly pruned"
            work.restore()
            raise
        rowwise = f" + {s.prune.rowwise}" if s.prune.rowwise else ""  # e.g. "wanda + trim 70% (owl)"
        work.label = f"{s.prune.method}{rowwise} {report.overall:.0%} ({s.prune.nm or alloc.method})"  # N:M: none
        work.allocation, work.pruner = alloc, s.prune.method
        job.report(f"pruned to {report.overall:.1%} in {report.seconds:.1f} s; evaluating", 0.7)
        with timer("pruned_eval"):
            last = evaluate_job(job, model, data.windows, 0.7, 1.0,
                                after_first=dense_job.start_once if dense_job else None,
                                batch_size=s.evaluation.batch_size)
    complete = last is not None and last.windows_done == last.windows_total
    dense = None
    if dense_job is not None and complete:
        dense_job.start_once()
        dense_job.wait(timeout=600)
        dense = dense_job.result if dense_job.status == DONE else None
    device, dtype = module_device_dtype(shared_model)  # where the weights live; each block is pruned on `pruned_on`
    config = record_config(s, alloc, data.info, model_name, model_title=model_title, device=device, dtype=dtype,
                           pruned_on=str(prune_device(shared_model)), origin="dashboard")
    warned = allocation_warnings(alloc)  # the page shows the record's warnings
    record = make_record(config, alloc.to_dict(), report, dense, None if last is None else last.ppl, timer.seconds,
                         complete=complete, **({"warnings": warned} if warned else {}))
    if store is not None and complete:
        record["id"] = work.run_id = store.add(record)
    return record
