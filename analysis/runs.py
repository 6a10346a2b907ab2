"""Pruning runs: the record of one experiment, and an embedded SQLite store of them.

A run record is a JSON-able dict (see `make_record`): config (model, method, allocation settings,
calibration and evaluation data, seed), the allocation itself, achieved sparsity per matrix and
overall, dense and pruned perplexity, timings in seconds, and library versions.

`RunStore` appends records to SQLite in WAL mode, one transaction per run: a crash or an error
while writing a run rolls that run back and leaves every earlier run intact.
"""
from __future__ import annotations

import json
import math
import platform
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis.models import cache_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    model TEXT,
    method TEXT,
    allocation_method TEXT,
    sparsity REAL CHECK (sparsity IS NULL OR typeof(sparsity) IN ('real', 'integer')),
    nm TEXT,
    dense_ppl REAL,
    pruned_ppl REAL,
    record_json TEXT NOT NULL
)
"""
COLUMNS = ("id", "created", "model", "method", "allocation_method", "sparsity", "nm", "dense_ppl", "pruned_ppl")


def default_db_path() -> Path:
    return cache_dir() / "runs.sqlite"


def _finite_or_none(x):
    """SQLite and JSON have no inf/nan; a diverged perplexity is stored as NULL (the record says 'inf')."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class RunStore:
    """Runs in a SQLite file (default `cache_dir()/runs.sqlite`)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def add(self, record: dict) -> int:
        """Append one run record; returns its id. All or nothing: on any error nothing is stored."""
        row = _row(record)
        conn = self._connect()
        try:
            with conn:  # one transaction: commit on success, roll back on any exception
                cur = conn.execute(
                    "INSERT INTO runs (created, model, method, allocation_method, sparsity, nm, dense_ppl, "
                    "pruned_ppl, record_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                return int(cur.lastrowid)
        finally:
            conn.close()

    def all(self) -> pd.DataFrame:
        """One row per run (without the full record), oldest first."""
        conn = self._connect()
        try:
            return pd.read_sql_query(f"SELECT {', '.join(COLUMNS)} FROM runs ORDER BY id", conn)
        finally:
            conn.close()

    def get(self, run_id: int) -> dict:
        """The full record of run `run_id` (with its id); KeyError if there is none."""
        conn = self._connect()
        try:
            found = conn.execute("SELECT record_json FROM runs WHERE id = ?", (int(run_id),)).fetchone()
        finally:
            conn.close()
        if found is None:
            raise KeyError(f"no run with id {run_id} in {self.path}")
        return {"id": int(run_id), **json.loads(found[0])}

    def __len__(self) -> int:
        conn = self._connect()
        try:
            return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
        finally:
            conn.close()


def _row(record: dict) -> tuple:
    cfg = record.get("config", {})
    nm = cfg.get("nm")
    return (
        record.get("created") or now_iso(),
        cfg.get("model"),
        cfg.get("method"),
        cfg.get("allocation"),
        cfg.get("sparsity"),
        ":".join(str(x) for x in nm) if nm else None,
        _finite_or_none(record.get("dense_ppl")),
        _finite_or_none(record.get("pruned_ppl")),
        json.dumps(record, default=_json_default, allow_nan=True),
    )


def _json_default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def make_record(config: dict, allocation: dict | None, report, dense_ppl: float | None, pruned_ppl: float | None,
                timings: dict[str, float], **extra) -> dict:
    """A run record. `report`: a PruneReport (or its dict); `timings`: seconds per phase."""
    rep = report.to_dict() if hasattr(report, "to_dict") else dict(report or {})
    return {
        "created": now_iso(),
        "config": dict(config),
        "allocation": allocation,
        "achieved": {"overall": rep.get("overall"), "per_layer": rep.get("per_layer", {})},
        "stopped": rep.get("stopped", False),
        "dense_ppl": dense_ppl,
        "pruned_ppl": pruned_ppl,
        "timings_s": {k: round(float(v), 3) for k, v in timings.items()},
        "versions": library_versions(),
        **extra,
    }


def write_record(record: dict, path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return path


class Timer:
    """Wall-clock seconds per named phase: `with timer("prune"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._name = None
        self._t0 = 0.0

    def __call__(self, name: str) -> "Timer":
        self._name = name
        return self

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._t0


# --------------------------------------------------------------------------------------------
# building blocks of a run, shared by the CLI, the dashboard and the benchmark

ALLOCATIONS = ("uniform", "alphapruning", "farms", "owl")


def prepare_data(tokenizer, calib: str = "default", eval_source: str = "wikitext2:test", n_samples: int = 16,
                 seqlen: int = 256, eval_seqlen: int = 512, max_windows: int | None = None, seed: int = 0,
                 bos: bool = False):
    """(calibration batch (n, seqlen), evaluation windows (m, eval_seqlen), description dict).

    Calibration and evaluation text are disjoint: the same source for both is split in halves."""
    from analysis.data import calib_and_eval_texts, calibration_batches, eval_windows  # noqa: PLC0415

    calib_text, eval_text = calib_and_eval_texts(calib, eval_source)
    batch = calibration_batches(tokenizer, calib_text, n_samples=n_samples, seqlen=seqlen, seed=seed, bos=bos)
    windows = eval_windows(tokenizer, eval_text, seqlen=eval_seqlen, bos=bos, max_windows=max_windows)
    info = {"calib": calib, "n_samples": n_samples, "seqlen": seqlen, "eval": eval_source,
            "eval_seqlen": eval_seqlen, "eval_windows": int(windows.shape[0]),
            "eval_tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "bos": bos,
            "split": str(calib).strip() == str(eval_source).strip()}
    return batch, windows, info


def build_allocation(model, allocation: str, sparsity: float, calib=None, epsilon: float = 0.3,
                     metric: str = "alpha", granularity: str = "block", owl_lambda: float = 0.08,
                     owl_threshold: float = 5.0, model_name: str = "", metrics=None, outlier_ratios=None,
                     progress=None):
    """An Allocation by method name (uniform | alphapruning | farms | owl) or from a JSON file path.

    `metrics` (spectra of the dense model) and `outlier_ratios` may be passed in to reuse them
    across runs; otherwise they are computed here (owl needs `calib`)."""
    from analysis.allocation import Allocation, allocate  # noqa: PLC0415

    if allocation not in ALLOCATIONS:
        path = Path(allocation).expanduser()
        if not path.is_file():
            raise ValueError(f"--allocation must be one of {', '.join(ALLOCATIONS)} or an allocation JSON file; "
                             f"'{allocation}' is neither.")
        return Allocation.load(path)
    if metrics is None:
        metrics = dense_metrics(model, farms=allocation == "farms", progress=progress)
    if allocation == "owl" and outlier_ratios is None:
        if calib is None:
            raise ValueError("owl needs calibration data for its outlier ratios.")
        from analysis.pruning import collect_outlier_ratios  # noqa: PLC0415

        outlier_ratios = collect_outlier_ratios(model, calib, threshold_m=owl_threshold, progress=progress)
    alloc = allocate(metrics, sparsity, method=allocation, epsilon=epsilon, metric=metric, granularity=granularity,
                     outlier_ratios=outlier_ratios, owl_lambda=owl_lambda, model=model_name)
    if allocation == "owl":
        alloc.params["owl_threshold"] = owl_threshold
    return alloc


def nm_allocation(model, nm: tuple[int, int], model_name: str = ""):
    """The allocation an N:M run records: N:M fixes every matrix at (M-N)/M, so there is no
    layerwise choice to make."""
    from analysis.allocation import allocate  # noqa: PLC0415
    from analysis.models import layer_table  # noqa: PLC0415

    return allocate(layer_table(model), (nm[1] - nm[0]) / nm[1], method="uniform", model=model_name)


def dense_metrics(model, farms: bool = False, progress=None):
    """Per-matrix spectral metrics of the model as it is now (call it before pruning)."""
    from analysis.spectra import analyze  # noqa: PLC0415

    return analyze(model, farms=farms, progress=progress).metrics
