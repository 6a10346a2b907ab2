"""Sweeps: many prune runs over a grid of settings, in this process or as Ray tasks.

A `SweepGrid` crosses pruners x allocations (named methods, "auto" the allocation search, custom curves
given as points, allocation JSON files) x sparsities x epsilon (alphapruning, farms) or OWL lambda x
calibration seeds (an "auto" configuration's search takes its calibration seed); `expand()`
turns it into RunSettings and each one runs through analysis.pipeline.run, so a sweep's run is the
run `python -m analysis prune` makes with the same options. Every finished run goes into the run store
with its config key (`config_key`: a hash of its settings and the model it loads); a sweep skips the
keys already stored, so an interrupted sweep resumes where it stopped.

What no configuration changes is measured once per sweep on the dense model (`measure_dense`): its
spectra (alphapruning, farms, and the AlphaPruning and FARMS starts of "auto") and its perplexity on the
evaluation windows. So a search runs where its
configuration runs: in this process, or as a Ray task (on a cluster, one GPU per search).

Workers load the model themselves from its source, once per worker process (`worker_model`, a
module-level cache that Ray keeps between the tasks a worker process runs), and restore the dense
weights from a snapshot before each run: a model never travels between processes. On Ray, each
configuration is one task (one GPU when the cluster has one, else `cpus_per_worker` cores), retried
once when it fails or its worker dies; Ray does the scheduling.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from analysis.allocation import MAX_RATIO, Allocation, AllocationError, check_spread, parse_points
from analysis.data import source_identity, text_file
from analysis.errors import AlphascopeError
from analysis.evaluation import perplexity_stream
from analysis.loading import (
    LoadedModel,
    ModelLoadError,
    load_model,
    model_identity,
    preview_model,
    streamable_folder,
)
from analysis.pipeline import content_identity, dense_spectra, evaluation_windows, run, spectra_used
from analysis.pruners import PRUNERS, ROWWISE, check_rowwise
from analysis.pruning import DenseSnapshot
from analysis.runtime import ProgressFn, StopFlag, should_stop
from analysis.settings import (
    ALLOCATION_METHODS,
    SPECTRA_METHODS,
    AllocationSettings,
    CalibrationSettings,
    ModelSettings,
    PruneSettings,
    RunSettings,
    SettingsError,
    SpectraSettings,
    check_positive_int,
)
from analysis.store import RunStore, achieved_overall, eval_label

NAMED_ALLOCATIONS = ALLOCATION_METHODS[:5]  # uniform, alphapruning, farms, owl, auto
DONE, SKIPPED, FAILED, CANCELLED = "done", "skipped", "failed", "cancelled"
DELETED = "deleted"  # a table's status for a run that was stored, then deleted from the run store
ADDRESS_TIMEOUT_S = 3.0  # how long `check_address` waits for a cluster to answer
# A file path: while that file exists, the next configuration to start deletes it and kills its own
# worker process (the retry tests arm one crash this way).
FAULT_FILE_ENV = "ALPHASCOPE_SWEEP_FAULT"
PACKAGE_DIR = Path(__file__).resolve().parent  # shipped to Ray workers (runtime_env py_modules)
# One sweep at a time in a process: in-process sweeps share `_WORKER`'s model (one restores the dense
# weights while another prunes them), and a Ray sweep that started Ray shuts it down under the next one.
_SWEEPING = threading.Lock()


class SweepBusy(AlphascopeError, RuntimeError):
    """Another sweep is running in this process (the dashboard: started by another session or tab)."""


# --------------------------------------------------------------------------------------------
# the grid


def split_items(text: str, field_name: str) -> tuple[str, ...]:
    """'a, b,' -> ('a', 'b'): one trailing comma is allowed, an empty item between commas ('0.5,,0.6',
    a value deleted by mistake) is a SettingsError for `field_name`; an empty text is an empty tuple
    (the grid's to refuse)."""
    parts = [t.strip() for t in str(text).split(",")]
    if parts[-1] == "":
        parts.pop()
    if "" in parts:
        raise SettingsError(f"{text!r} has an empty item between two commas", field_name)
    return tuple(parts)


def parse_values(text: str, kind: type, field_name: str) -> tuple:
    """'0.5, 0.6' -> (0.5, 0.6) with kind=float; a value that is not a `kind`, or an empty item, is a
    SettingsError for `field_name`."""
    out = []
    for item in split_items(text, field_name):
        try:
            out.append(kind(item))
        except ValueError:
            raise SettingsError(f"{item!r} is not {'an integer' if kind is int else 'a number'}", field_name) from None
    return tuple(out)


def _axis_check(field_name: str, check: Callable, *args) -> None:
    try:
        check(*args)
    except ValueError as e:
        raise SettingsError(str(e), field_name) from None


@dataclass(frozen=True)
class SweepGrid:
    """The axes of a sweep, and `base`: every other setting (model, calibration source and size,
    evaluation, metric, granularity, fit, OWL threshold), shared by all its runs.

    allocations: named methods (uniform, alphapruning, farms, owl, auto) or allocation JSON paths (a file
    fixes its own sparsity, so the sparsity axis does not apply to it); curves: custom curves, each
    (depth, sparsity) control points normalized to every sparsity of the grid; epsilons apply to
    alphapruning/farms, owl_lambdas to owl; rowwise: None (per-matrix ratios) and/or row-wise refinements
    (analysis.pruners.ROWWISE, e.g. "trim"); seeds: calibration sampling seeds (and, for auto, search
    seeds; its other settings, steps and objective, come from base.allocation)."""

    base: RunSettings = field(default_factory=RunSettings)
    methods: tuple[str, ...] = (PruneSettings.method,)
    allocations: tuple[str, ...] = (AllocationSettings.method,)
    curves: tuple[tuple[tuple[float, float], ...], ...] = ()
    sparsities: tuple[float, ...] = (AllocationSettings.sparsity,)
    epsilons: tuple[float, ...] = (AllocationSettings.epsilon,)
    owl_lambdas: tuple[float, ...] = (AllocationSettings.owl_lambda,)
    rowwise: tuple[str | None, ...] = (PruneSettings.rowwise,)
    seeds: tuple[int, ...] = (CalibrationSettings.seed,)

    def check(self) -> SweepGrid:
        """Every axis value, then every expanded configuration; raises SettingsError (field
        "sweep.<axis>" for an axis) before anything is loaded."""
        named = {"methods": "pruners", "owl_lambdas": "owl lambdas",
                 "rowwise": f"row-wise choice (none, {', '.join(ROWWISE)})"}
        for name in ("methods", "sparsities", "epsilons", "owl_lambdas", "rowwise", "seeds"):
            if not getattr(self, name):
                raise SettingsError(f"no {named.get(name, name)} given: the grid is empty", f"sweep.{name}")
        if not self.allocations and not self.curves:
            raise SettingsError("no allocations given: the grid is empty", "sweep.allocations")
        for m in self.methods:
            if m not in PRUNERS:
                raise SettingsError(f"unknown pruner {m!r}; choose from {', '.join(PRUNERS)}", "sweep.methods")
        for a in self.allocations:
            if a == "custom":
                raise SettingsError("give custom curves as control points (--curve 0:0.5,1:0.8)", "sweep.allocations")
            if a not in NAMED_ALLOCATIONS and not Path(a).expanduser().is_file():
                raise SettingsError(f"{a!r} is neither one of {', '.join(NAMED_ALLOCATIONS)} nor an allocation "
                                    "JSON file", "sweep.allocations")
        for s in self.sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s <= MAX_RATIO:
                raise SettingsError(f"sparsity {s} is outside (0, {MAX_RATIO}]", "sweep.sparsities")
        for e in self.epsilons:
            _axis_check("sweep.epsilons", check_spread, e, "epsilon")
        for lam in self.owl_lambdas:
            _axis_check("sweep.owl_lambdas", check_spread, lam, "owl_lambda")
        for r in self.rowwise:
            _axis_check("sweep.rowwise", check_rowwise, r, None)
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise SettingsError(f"seed must be an integer >= 0, got {seed!r}", "sweep.seeds")
        for settings in self.expand():
            settings.check()
        return self

    def expand(self) -> list[RunSettings]:
        """One RunSettings per distinct configuration, pruner-major, seeds innermost. Only `auto` keeps the base's
        search settings: the others' have the defaults, so changing the search re-runs no other configuration.
        A configuration that reads no calibration text runs with the first seed only."""
        base = self.base.allocation
        no_search = {f.name: f.default for f in fields(AllocationSettings) if f.name.startswith("search_")}
        allocations = [replace(base, method=a) if a == "auto" else
                       replace(base, method=a, **no_search) if a in NAMED_ALLOCATIONS else
                       replace(base, method="file", file=a, **no_search) for a in self.allocations]
        allocations += [replace(base, method="custom", points=tuple(map(tuple, c)), as_drawn=False, **no_search)
                        for c in self.curves]
        out = []
        for prune in (replace(self.base.prune, method=m, rowwise=r) for m in self.methods for r in self.rowwise):
            for alloc in allocations:
                for sparsity in self.sparsities if alloc.method != "file" else (alloc.sparsity,):
                    for variant in self._variants(replace(alloc, sparsity=sparsity)):
                        for seed in self.seeds:
                            s = replace(self.base, allocation=replace(variant, search_seed=seed)
                                        if variant.method == "auto" else variant, prune=prune,
                                        calibration=replace(self.base.calibration, seed=seed))
                            # a run that reads no calibration text (magnitude, no OWL, no search) is one run for
                            # every seed: the others would repeat it
                            out.append(s if s.needs_calibration() else
                                       replace(s, calibration=replace(s.calibration, seed=self.seeds[0])))
        return list(dict.fromkeys(out))  # a value listed twice is one configuration

    def _variants(self, alloc: AllocationSettings) -> list[AllocationSettings]:
        if alloc.method in SPECTRA_METHODS:
            return [replace(alloc, epsilon=e) for e in self.epsilons]
        if alloc.method == "owl":
            return [replace(alloc, owl_lambda=lam) for lam in self.owl_lambdas]
        return [alloc]


def grid_from_text(base: RunSettings, *, methods: str, allocations: str, sparsities: str, epsilons: str,
                   owl_lambdas: str, seeds: str, curves: tuple[str, ...] = (), rowwise: str = "none") -> SweepGrid:
    """A checked grid from comma-separated lists (the CLI's options, the Compare page's fields); each
    curve is 'depth:sparsity,...' control points; rowwise: 'none' and/or row-wise refinements, e.g. 'none,trim'."""
    try:
        points = tuple(tuple(parse_points(c)) for c in curves if c.strip())
    except ValueError as e:
        raise SettingsError(str(e), "sweep.curves") from None
    return SweepGrid(base, methods=split_items(methods, "sweep.methods"),
                     allocations=split_items(allocations, "sweep.allocations"), curves=points,
                     sparsities=parse_values(sparsities, float, "sweep.sparsities"),
                     epsilons=parse_values(epsilons, float, "sweep.epsilons"),
                     owl_lambdas=parse_values(owl_lambdas, float, "sweep.owl_lambdas"),
                     rowwise=tuple(None if t == "none" else t for t in split_items(rowwise, "sweep.rowwise")),
                     seeds=parse_values(seeds, int, "sweep.seeds")).check()


LABEL_POINTS = 4  # a custom curve of up to this many points is named by them


def allocation_label(a: AllocationSettings) -> str:
    """How a sweep names an allocation: 'alphapruning ε=0.3', 'owl λ=0.08', 'custom 0:0.5,1:0.8' (a curve of
    more than LABEL_POINTS points: 'custom, 30 points #1a2b3c', short enough for a legend, another curve another
    digest), the file's name, 'uniform'; 'auto', followed by the search settings that differ from the defaults,
    e.g. 'auto kl, block+kind, verify all, 16 generations, on valid.txt', so that different searches
    are different lines of the sweep plot."""
    if a.method in SPECTRA_METHODS:
        return f"{a.method} ε={a.epsilon:g}"
    if a.method == "owl":
        return f"owl λ={a.owl_lambda:g}"
    if a.method == "custom":
        points = ",".join(f"{d:g}:{s:g}" for d, s in a.points or ())
        if len(a.points or ()) <= LABEL_POINTS:
            return f"custom {points}"
        return f"custom, {len(a.points)} points #{hashlib.sha256(points.encode()).hexdigest()[:6]}"
    if a.method == "file":
        return Path(a.file or "").name
    if a.method == "auto":
        return " ".join(["auto", ", ".join(_search_differences(a))]).strip()
    return a.method


def _search_differences(a: AllocationSettings) -> list[str]:
    d = AllocationSettings()
    return [text for differs, text in (
        (a.search_objective != d.search_objective, a.search_objective),
        (a.search_space != d.search_space, a.search_space),
        (a.search_verify != d.search_verify, f"verify {a.search_verify}"),
        (a.search_steps != d.search_steps, f"{a.search_steps} generations"),
        (a.search_step != d.search_step, f"step {a.search_step:g}"),
        (a.search_text is not None, f"on {Path(a.search_text or '').name or a.search_text}"),
        (a.search_samples is not None, f"{a.search_samples} windows"),
        (a.search_then_steps > 0, f"then {a.search_then_steps} generations"
                                  + (f" on {a.search_then_samples} windows" if a.search_then_samples else "")),
    ) if differs]


def line_label(s: RunSettings) -> str:
    """How a sweep names a line of its plot: the allocation's label (an N:M run's pattern, which takes no
    allocation), then e.g. ' + trim' for row-wise ratios."""
    if s.prune.nm:
        return s.prune.nm
    return allocation_label(s.allocation) + (f" + {s.prune.rowwise}" if s.prune.rowwise else "")


def config_label(s: RunSettings) -> str:
    return f"{s.prune.method} + {line_label(s)} at {_target(s):g}, seed {s.calibration.seed}"


def config_key(settings: RunSettings, content: dict | None = None) -> str:
    """Stable id of a configuration: a hash of its settings, the folder (or hub id) its model loads
    from, and what its files hold (`content`, by default `content_identity` now). Equal keys give equal
    runs. Paths count by what they name: `my.txt`, `./my.txt` and `$PWD/my.txt` (or a model folder with
    and without its trailing slash) are one configuration. Device, dtype and batch size count as given:
    "auto" is one setting whatever it resolves to on the machine that runs it."""
    d = settings.to_dict()
    d["model"]["source"] = None  # the model counts by its `model_identity` below
    for section, name in (("calibration", "source"), ("evaluation", "source"), ("allocation", "search_text"),
                          ("allocation", "file"), ("allocation", "search_from")):  # "file" counts by its bytes too
        if d[section][name] is not None:
            d[section][name] = source_identity(d[section][name])
    ident = {"settings": d, "model": model_identity(settings.model.source),
             "content": content_identity(settings) if content is None else content}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


# the HTTP/2 client connection preface and an empty SETTINGS frame: a gRPC server answers with its own SETTINGS
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4  # the frame type byte of a SETTINGS frame (RFC 9113, section 6.5)


def _answers_grpc(conn: socket.socket) -> bool:
    """Whether the server on `conn` answers the HTTP/2 client preface with a SETTINGS frame, as every gRPC
    server does (Ray's GCS and its Ray Client server among them); a web server, or a proxy with nothing behind
    it, does not. (Ray with TLS, RAY_USE_TLS, is not probed: its gRPC is encrypted.)"""
    try:
        conn.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 9:  # a frame header: length (3), type, flags, stream id (4)
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:
        return False
    return head[3] == _H2_SETTINGS


def check_address(address: str | None, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse a Ray address nothing answers at (host:port or ray://host:port) within `timeout`
    seconds, or where what answers is no gRPC server (a Ray cluster's GCS and Ray Client servers are), before a
    sweep starts: Ray would try to connect for ever. None (a local Ray) and "auto" are not checked."""
    if not address or address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise SettingsError(f"{address!r} is not a Ray address (host:port or ray://host:port)", "sweep.address")
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise SettingsError(f"cannot reach a Ray cluster at {address} ({e.strerror or e})", "sweep.address") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true") and not _answers_grpc(conn):
            raise SettingsError(f"what answers at {address} is not a Ray cluster (no gRPC server); give the address "
                                "`ray start --head` prints (host:6379 by default) or its Ray Client address "
                                "(ray://host:10001)", "sweep.address")


# --------------------------------------------------------------------------------------------
# one worker process


_WORKER: dict = {"loads": 0}  # this process's model: settings, loaded, dense snapshot; loads so far


def worker_model(model: ModelSettings) -> tuple[LoadedModel, DenseSnapshot]:
    """This process's copy of the model and a snapshot of its dense weights, loaded from the source
    on first use and kept for the next configurations (one model at a time)."""
    if _WORKER.get("settings") != model:
        release_worker_model()  # the previous model goes before another loads
        loaded = load_model(model.source, device=model.device, dtype=model.dtype,
                            trust_remote_code=model.trust_remote_code)
        _WORKER.update(settings=model, loaded=loaded, dense=DenseSnapshot.take(loaded.model),
                       loads=_WORKER["loads"] + 1)
    return _WORKER["loaded"], _WORKER["dense"]


def release_worker_model() -> None:
    """Drop this process's model and its dense snapshot: an in-process sweep's, once it ends (the
    dashboard's process lives on, and would hold them beside its own shared model)."""
    for k in ("settings", "loaded", "dense"):
        _WORKER.pop(k, None)


def worker_info() -> dict:
    """Which process ran a configuration and how many models it has loaded so far."""
    return {"pid": os.getpid(), "loads": _WORKER["loads"]}


@dataclass
class DenseReference:
    """What a sweep measures once on the dense model: metrics per SpectraSettings (for alphapruning
    and farms) and the dense perplexity on the sweep's evaluation windows."""

    metrics: dict[SpectraSettings, pd.DataFrame]
    ppl: float


def measure_dense(configs: list[RunSettings], progress: ProgressFn | None = None,
                  stop: StopFlag = None, ppl: float | None = None) -> DenseReference | None:
    """The dense reference of a sweep's configurations (they share model, calibration source and
    evaluation settings, as every configuration of one grid does); None when `stop` ended it. `progress`
    names each step, at fraction 0 of the sweep. `ppl`: the dense perplexity where it is known (a resumed
    sweep's stored runs measured it on the same windows), not measured again."""
    say = progress or (lambda message, fraction: None)
    first = configs[0]
    say("dense reference: loading the model", 0.0)
    loaded, dense = worker_model(first.model)
    dense.restore(loaded.model)
    metrics = {}
    folder = streamable_folder(first.model.source, first.model.trust_remote_code)  # spectra streamed and cached
    for sp in {sp for c in configs for sp in spectra_used(c.allocation, c.prune.nm).values()}:
        if should_stop(stop):
            return None
        say(f"dense reference: {'FARMS ' if sp.farms else ''}spectra", 0.0)
        metrics[sp] = dense_spectra(loaded.model, sp, checkpoint=folder, device=loaded.info.device)
    if ppl is not None:
        return DenseReference(metrics, ppl)
    windows = evaluation_windows(loaded.tokenizer, first.evaluation, first.calibration.source,
                                 loaded.info.bos_per_window)
    last = None
    for last in perplexity_stream(loaded.model, windows, stop=stop, batch_size=first.evaluation.batch_size):
        say(f"dense reference: perplexity, {last.windows_done}/{last.windows_total} windows", 0.0)
    if last is None or last.windows_done < last.windows_total:
        return None
    return DenseReference(metrics, last.ppl)


def run_config(settings: RunSettings, dense: DenseReference, *, progress: ProgressFn | None = None,
               stop: StopFlag = None) -> dict:
    """One configuration on this process's model: analysis.pipeline.run from the dense weights, with
    the sweep's dense reference. Returns the run record (record["stopped"] when `stop` cut it short)."""
    _fault_once()
    loaded, snapshot = worker_model(settings.model)
    snapshot.restore(loaded.model)
    given = {arg: dense.metrics[sp] for arg, sp in spectra_used(settings.allocation, settings.prune.nm).items()}
    return run(loaded, settings, progress=progress, stop=stop, dense_ppl=dense.ppl, origin="sweep", **given).record


def _fault_once() -> None:
    trigger = os.environ.get(FAULT_FILE_ENV)
    if trigger:
        try:
            Path(trigger).unlink()
        except FileNotFoundError:
            return
        os._exit(1)


# --------------------------------------------------------------------------------------------
# a whole sweep


@dataclass
class Outcome:
    """What became of one configuration. status: done (stored as run `run_id`), skipped (already in
    the store as `run_id`), failed (`error`, after `attempts` tries), cancelled. worker: pid and
    model loads of the process that ran it."""

    key: str
    settings: RunSettings
    status: str
    run_id: int | None = None
    dense_ppl: float | None = None
    pruned_ppl: float | None = None
    achieved: float | None = None
    attempts: int = 0
    error: str | None = None
    worker: dict | None = None


def finished_keys(store: RunStore) -> dict[str, int]:
    """Config key -> run id of every sweep run in the store. The key is recomputed from the run's stored
    settings, read with today's defaults for any setting added since it ran, so a version that adds a
    setting does not run a stored sweep again, and from the content it ran on (stored with it; a run
    stored before that was kept counts as made on today's files); the stored key where the settings no
    longer read (or the model folder is gone)."""
    out = {}
    for run_id in store.all()["id"]:
        record = store.get(int(run_id))
        key = (record.get("sweep") or {}).get("key")
        if not key:
            continue
        try:
            key = config_key(RunSettings.from_dict(record["config"]["settings"]), record["sweep"].get("content"))
        except (KeyError, TypeError, OSError, SettingsError, ModelLoadError):
            pass
        out[key] = int(run_id)
    return out


def setup_label(s: RunSettings, used_dtype: str | None = None) -> str:
    """What a sweep's runs share besides the grid's axes: the calibration text and batch, and the spectra, OWL
    and dtype settings where they are not the defaults. Runs of another setup are another line of the plot,
    not more seeds of the same one. `used_dtype`: the dtype the run ran in (its record's), which names it
    where known, so that "auto" and the float32 it picked on a CPU are one setup (float32 is not named)."""
    c, a, d = s.calibration, s.allocation, AllocationSettings()
    dtype, usual = ((used_dtype.removeprefix("torch."), "float32") if used_dtype else
                    (s.model.dtype, ModelSettings.dtype))
    text = Path(c.source).name if text_file(c.source) else c.source
    return ", ".join([f"calib {text} {c.n_samples}×{c.seqlen}"] + [
        f"{name} {value}" for name, value, default in (
            ("metric", a.metric, d.metric), ("fit", a.fit, d.fit), ("granularity", a.granularity, d.granularity),
            ("OWL M", a.owl_threshold, d.owl_threshold), ("dtype", dtype, usual))
        if value != default])


def run_line(record: dict) -> dict | None:
    """How a stored run is named in a plot, from its settings: `line`, its pruner and line_label (so runs of
    another ε, λ, curve or TRIM are another line), and `setup`, its setup_label. None for a record without
    readable settings (made by hand, or by an older version)."""
    try:
        s = RunSettings.from_dict(record["config"]["settings"])
    except (KeyError, TypeError, ValueError):  # (SettingsError is a ValueError)
        return None
    return {"line": f"{s.prune.method} + {line_label(s)}", "setup": setup_label(s, record["config"].get("dtype"))}


def sweep_row(record: dict) -> dict | None:
    """A stored sweep run as one row of the Compare page's sweep plot (None for other runs)."""
    if not record.get("sweep"):
        return None
    s = RunSettings.from_dict(record["config"]["settings"])
    return {"id": record.get("id"), "model": record["config"].get("model"), "method": s.prune.method,
            "allocation": line_label(s), "setup": setup_label(s, record["config"].get("dtype")),
            "sparsity": record["config"].get("sparsity", s.allocation.sparsity),
            "achieved": achieved_overall(record), "seed": s.calibration.seed,
            "eval": eval_label(record["config"]), "dense_ppl": record.get("dense_ppl"),
            "pruned_ppl": record.get("pruned_ppl")}


def _target(settings: RunSettings) -> float:
    """A configuration's target sparsity: an allocation file's own (its settings keep the grid's default)."""
    if settings.allocation.method != "file":
        return settings.allocation.sparsity
    try:
        return Allocation.load(Path(settings.allocation.file).expanduser()).sparsity
    except AllocationError:  # its configuration failed on it, and says why
        return float("nan")


def outcome_table(outcomes: list[Outcome], stored=None) -> pd.DataFrame:
    """One row per configuration: what the CLI prints at the end of a sweep and the page shows. With `stored`
    (the ids now in the run store), a run deleted since the sweep stored it has the status "deleted"."""
    columns = ["method", "allocation", "sparsity", "seed", "status", "run", "dense_ppl", "pruned_ppl", "achieved",
               "attempts", "error"]
    gone = set() if stored is None else {o.run_id for o in outcomes if o.run_id is not None} - set(stored)
    return pd.DataFrame([[o.settings.prune.method, line_label(o.settings), _target(o.settings),
                          o.settings.calibration.seed, DELETED if o.run_id in gone else o.status, o.run_id,
                          o.dense_ppl, o.pruned_ppl, o.achieved, o.attempts, o.error] for o in outcomes],
                        columns=columns).astype({"run": "Int64"})  # run ids, None where a configuration failed


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


RAY_CLIENT_TRIES = 3


def start_ray(workers: int, cpus_per_worker: int = 1, address: str | None = None) -> None:
    """Connect to the cluster at `address`, or start a local Ray with workers x cpus_per_worker CPUs;
    either way the workers import this package from here (runtime_env py_modules)."""
    import ray  # noqa: PLC0415 (optional, and slow to import: only sweeps on Ray need it)

    # a Ray Client server forks a server for each driver, and that fork dies now and then (ray-project/ray
    # issue 63202, about 7% of connections): a ray:// connection is tried again
    tries = RAY_CLIENT_TRIES if address and address.startswith("ray://") else 1
    try:
        for attempt in range(1, tries + 1):
            try:
                # "local": a new Ray of our own even where `ray start` left a cluster (or its address file) here
                # no progress bars in the workers: Ray forwards each redraw as an empty "(_ray_task pid=...)" line
                ray.init(address=address or "local", num_cpus=None if address else workers * cpus_per_worker,
                         runtime_env={"py_modules": [str(PACKAGE_DIR)], "env_vars": {"TQDM_DISABLE": "1"}},
                         include_dashboard=False, logging_level="warning")
                break
            except ConnectionAbortedError:  # Ray Client's "Initialization failure from server"
                if attempt == tries:
                    raise
                ray.shutdown()
    except Exception as e:  # something answers at the address, but not a Ray that lets us in
        if not address:
            raise
        # Ray turns token authentication on for clusters it starts, but a driver given an explicit
        # address only sends a token when told to, and then fails with a generic timeout
        hint = ("; a cluster with token authentication needs RAY_AUTH_MODE=token here and its token "
                "(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)"
                if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" else "")
        raise SettingsError(f"cannot connect to a Ray cluster at {address} ({_one_line(e)}){hint}",
                            "sweep.address") from None


def check_workers(workers: int, cpus_per_worker: int) -> None:
    """SettingsError unless both are integers >= 1."""
    check_positive_int(workers, "sweep.workers")
    check_positive_int(cpus_per_worker, "sweep.cpus_per_worker")


def check_models(configs: list[RunSettings]) -> None:
    """What the configurations ask of their model (a loadable model, texts that give a window, an N:M pattern
    that divides its widths, a search text), on its tokenizer and config: one SettingsError (or ModelLoadError)
    before any weights load, instead of the same failure in every configuration. An allocation file that does
    not fit fails its own configurations only (the others run)."""
    previews = {}
    for s in configs:
        key = (s.model.source, s.model.trust_remote_code)
        if key not in previews:
            previews[key] = preview_model(*key)
        checked = s if s.allocation.method != "file" else replace(s, allocation=AllocationSettings())
        checked.check_model(previews[key])


def _stored_outcome(key: str, settings: RunSettings, store: RunStore, run_id: int) -> Outcome:
    record = store.get(run_id)
    return Outcome(key, settings, SKIPPED, run_id=run_id, dense_ppl=record.get("dense_ppl"),
                   pruned_ppl=record.get("pruned_ppl"), achieved=achieved_overall(record),
                   attempts=(record.get("sweep") or {}).get("attempts", 0))


def run_sweep(grid: SweepGrid, store: RunStore, *, workers: int = 1, address: str | None = None,
              cpus_per_worker: int = 1, progress: ProgressFn | None = None, detail: bool = False,
              stop: StopFlag = None, on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run every configuration of `grid` not yet in `store` and store each finished run as it
    arrives. In this process with workers=1 and no address (or without Ray), else as Ray tasks
    (on the Ray already initialized, else one started here and shut down at the end).

    `progress` hears each configuration start ("2/12 <label>: running") and end; with `detail`, in this process,
    also each one's own steps (its blocks, its search) in between, for a bar that shows the latest line.
    Returns one Outcome per distinct configuration, in grid order. `stop` (or Ctrl-C) cancels what
    has not finished: Ray tasks are cancelled, a run in progress here stops between blocks; runs
    finished before stay stored. KeyboardInterrupt is re-raised after that. SweepBusy when another
    sweep runs in this process (they would share one model copy)."""
    check_workers(workers, cpus_per_worker)
    configs = grid.check().expand()
    check_address(address)
    use_ray = (workers > 1 or address is not None) and ray_available()
    if address is not None and not use_ray:
        raise SettingsError("a Ray address needs Ray installed (pip install ray)", "sweep.address")
    by_key: dict[str, RunSettings] = {}
    contents: dict[str, dict] = {}
    for s in configs:
        content = content_identity(s)
        key = config_key(s, content)
        by_key.setdefault(key, s)
        contents.setdefault(key, content)
    stored = finished_keys(store)
    outcomes = {k: _stored_outcome(k, s, store, stored[k]) for k, s in by_key.items() if k in stored}
    pending = [(k, s) for k, s in by_key.items() if k not in stored]
    if address is None:  # a cluster's workers may read a model or texts this machine does not have
        check_models([s for _, s in pending])

    def finish(key: str, settings: RunSettings, status: str, record: dict | None = None, attempts: int = 0,
               error: str | None = None, worker: dict | None = None) -> None:
        o = Outcome(key, settings, status, attempts=attempts, error=error, worker=worker)
        if record is not None:
            record["sweep"] = {"key": key, "attempts": attempts, "content": contents[key]}
            o.run_id = store.add(record)
            o.dense_ppl, o.pruned_ppl = record.get("dense_ppl"), record.get("pruned_ppl")
            o.achieved = achieved_overall(record)
        outcomes[key] = o
        on_outcome and on_outcome(o)
        if progress:
            ended = sum(x.status not in (SKIPPED, CANCELLED) for x in outcomes.values())
            ppl = f": perplexity {o.pruned_ppl:.3f} (run {o.run_id})" if o.pruned_ppl is not None else ""
            retried = f", {attempts} attempts" if attempts > 1 else ""
            progress(f"cancelled after {ended} of {len(pending)} configurations (the finished ones are stored)"
                     if status == CANCELLED else f"{ended}/{len(pending)} {config_label(settings)} {status}{ppl}"
                     f"{retried}" + (f": {error}" if error else ""), ended / len(pending))

    if progress and stored:
        progress(f"{len(outcomes)} of {len(by_key)} configurations already in the store: skipped", 0.0)
    # the stored runs of this grid measured the dense perplexity the pending ones would: a resume reuses it
    known = next((o.dense_ppl for o in outcomes.values() if o.dense_ppl is not None), None)
    if pending:
        if not _SWEEPING.acquire(blocking=False):
            raise SweepBusy("another sweep is running in this process; wait for it to end or cancel it")
        try:
            if use_ray:
                _run_on_ray(pending, finish, workers=workers, address=address, cpus_per_worker=cpus_per_worker,
                            stop=stop, progress=progress, dense_ppl=known)
            else:
                _run_here(pending, finish, progress=progress, detail=detail, stop=stop, dense_ppl=known)
        finally:
            release_worker_model()  # an in-process sweep's model (the driver of a Ray sweep loaded none)
            _SWEEPING.release()
    return [outcomes[k] for k in by_key]


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e  # a Ray task error wraps the task's own exception
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")


def _run_here(pending: list, finish: Callable, *, progress: ProgressFn | None = None, detail: bool = False,
               stop: StopFlag, dense_ppl: float | None = None) -> None:
    """The sweep in this process: the same steps as a Ray task, one configuration after the other,
    each tried twice at most."""
    dense = None
    for i, (key, settings) in enumerate(pending):
        n = len(pending)
        label = f"{i + 1}/{n} {config_label(settings)}"
        within = _within(progress, label, i, n) if progress and detail else None
        error = None
        for attempt in (1, 2):
            try:
                dense = dense or measure_dense([s for _, s in pending], progress, stop, dense_ppl)
                if dense is None or should_stop(stop):
                    for k, s in pending[i:]:
                        finish(k, s, CANCELLED)
                    return
                progress and progress(f"{label}: running" + (" again" if attempt > 1 else ""), i / n)
                record = run_config(settings, dense, progress=within, stop=stop)
            except Exception as e:  # noqa: BLE001 (reported in the outcome; the sweep goes on)
                error = _one_line(e)
                if _bad_input(e):
                    finish(key, settings, FAILED, attempts=attempt, error=error)
                    break
                continue
            if record.get("stopped"):
                finish(key, settings, CANCELLED, attempts=attempt)
            else:
                finish(key, settings, DONE, record, attempts=attempt, worker=worker_info())
            break
        else:
            finish(key, settings, FAILED, attempts=2, error=error)


def _within(progress: ProgressFn, label: str, i: int, n: int) -> ProgressFn:
    """The progress of the i-th of n configurations (`label`), as its share of the sweep's."""
    return lambda message, fraction: progress(f"{label}: {message}", (i + fraction) / n)


class _Attempts:
    """A Ray actor counting the attempts at each configuration (Ray retries a task without telling
    the caller)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def start(self, key: str) -> int:
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]

    def get(self, key: str) -> int:
        return self.counts.get(key, 0)


def _ray_task(settings: RunSettings, key: str, dense: DenseReference, attempts) -> tuple[dict, dict]:
    import ray  # noqa: PLC0415 (optional, and slow to import: only sweeps on Ray need it)

    ray.get(attempts.start.remote(key))
    try:
        return run_config(settings, dense), worker_info()
    except Exception as e:
        if _bad_input(e):  # returned, not raised: Ray would retry it
            return {"bad_input": _one_line(e)}, worker_info()
        raise


def _bad_input(e: Exception) -> bool:
    """An error of the configuration itself (alphascope's ValueErrors: an allocation file for another model, NaN
    weights), which a retry would only repeat; a crash or the environment (a store locked, a hub away) may pass."""
    return isinstance(e, AlphascopeError) and isinstance(e, ValueError)


def _run_on_ray(pending: list, finish: Callable, *, workers: int, address: str | None, cpus_per_worker: int,
                stop: StopFlag, progress: ProgressFn | None = None, dense_ppl: float | None = None) -> None:
    import ray  # noqa: PLC0415 (optional, and slow to import: only sweeps on Ray need it)

    say = progress or (lambda message, fraction: None)
    own = not ray.is_initialized()
    if own:
        say(f"connecting to Ray at {address}" if address else f"starting a local Ray ({workers} workers)", 0.0)
        start_ray(workers, cpus_per_worker, address)
    try:
        # one GPU per task where there are GPUs; max_calls=0 keeps a GPU worker (and its model) alive
        resources = ({"num_gpus": 1, "max_calls": 0} if ray.cluster_resources().get("GPU", 0) >= 1
                     else {"num_cpus": cpus_per_worker})
        retry = {"max_retries": 1, "retry_exceptions": True}
        attempts = ray.remote(_Attempts).options(num_cpus=0).remote()
        dense = ray.remote(measure_dense).options(**resources, **retry).remote([s for _, s in pending],
                                                                                ppl=dense_ppl)
        task = ray.remote(_ray_task).options(**resources, **retry)
        refs = {task.remote(s, k, dense, attempts): (k, s) for k, s in pending}
        say(f"on Ray: the dense reference, then {len(refs)} configurations (each loads the model)", 0.0)
        try:
            while refs:
                if should_stop(stop):
                    raise _Stopped
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.25)
                for ref in ready:
                    key, settings = refs.pop(ref)
                    tries = ray.get(attempts.get.remote(key))
                    try:
                        record, worker = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        finish(key, settings, FAILED, attempts=tries, error=_one_line(e))
                    else:
                        if "bad_input" in record:
                            finish(key, settings, FAILED, attempts=tries, error=record["bad_input"])
                        else:
                            finish(key, settings, DONE, record, attempts=tries, worker=worker)
        except (KeyboardInterrupt, _Stopped):
            for ref in [*refs, dense]:
                ray.cancel(ref, force=True)
            for key, settings in refs.values():
                finish(key, settings, CANCELLED)
            if not should_stop(stop):
                raise
    finally:
        if own:
            ray.shutdown()


class _Stopped(Exception):
    """The stop flag was set while Ray tasks were running."""


__all__ = ["CANCELLED", "DONE", "FAILED", "FAULT_FILE_ENV", "NAMED_ALLOCATIONS", "SKIPPED", "DenseReference",
           "Outcome", "SweepGrid", "allocation_label", "check_address", "check_models", "check_workers", "config_key",
           "config_label", "line_label", "finished_keys", "grid_from_text", "measure_dense", "outcome_table",
           "parse_values", "ray_available", "release_worker_model", "run_config", "run_line", "run_sweep",
           "split_items", "start_ray", "sweep_row", "worker_info", "worker_model"]
