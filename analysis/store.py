"""The run store: pruning run records (JSON-able dicts, see analysis.pipeline.make_record) in an
embedded SQLite file.

Records are appended in WAL mode, one transaction per run: a crash or an error while writing a run
rolls that run back and leaves every earlier run intact. A file that is not a run store, or one another
process keeps locked, raises StoreError (a message for the user; the file is left as it is).
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from analysis.errors import AlphascopeError
from analysis.runtime import cache_dir

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


class StoreError(AlphascopeError, RuntimeError):
    """The run store cannot be opened or written (not a SQLite file, locked, unwritable folder)."""


RUNS_DB_ENV = "ALPHASCOPE_RUNS_DB"


def default_db_path() -> Path:
    """$ALPHASCOPE_RUNS_DB if set (for the command line and the dashboard alike), else runs.sqlite in the
    cache folder."""
    return Path(os.environ[RUNS_DB_ENV]).expanduser() if os.environ.get(RUNS_DB_ENV) else cache_dir() / "runs.sqlite"


def _finite_or_none(x):
    """SQLite and JSON have no inf/nan; a diverged perplexity is stored as NULL (the record says 'inf')."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class RunStore:
    """Runs in a SQLite file (default `cache_dir()/runs.sqlite`). `timeout`: seconds to wait for
    another process's write lock before StoreError. Opening checks the file (StoreError if it is not
    a run store), so a front end can refuse before a run rather than lose the run after it."""

    def __init__(self, path: str | Path | None = None, timeout: float = 30.0):
        self.path = Path(path).expanduser() if path else default_db_path()
        self.timeout = timeout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"Run store {self.path}: cannot create its folder ({e.strerror or e}).") from None
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(SCHEMA)
            conn.execute(f"SELECT {', '.join(COLUMNS)}, record_json FROM runs LIMIT 0")  # a runs table of ours

    @contextmanager
    def _connect(self):
        """A connection, closed afterwards; SQLite's errors other than a record's CHECK become StoreError."""
        conn = None
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout)
            yield conn
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as e:
            raise StoreError(_store_problem(self.path, e, self.timeout)) from None
        finally:
            if conn is not None:
                conn.close()

    def check_writable(self) -> RunStore:
        """StoreError now, not after a run, when another process keeps the store locked for writing (waits
        `timeout` for it, as add would)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.rollback()
        return self

    def add(self, record: dict) -> int:
        """Append one run record; returns its id. All or nothing: on any error nothing is stored."""
        row = _row(record)
        with self._connect() as conn, conn:  # one transaction: commit on success, roll back on any exception
            cur = conn.execute(
                "INSERT INTO runs (created, model, method, allocation_method, sparsity, nm, dense_ppl, "
                "pruned_ppl, record_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            return int(cur.lastrowid)

    def update(self, run_id: int, changes: dict) -> None:
        """Set top-level keys of run `run_id`'s record (e.g. "zeroshot", measured after the run was
        stored) and count the change in its "revision"; KeyError if there is no such run. The table's
        columns are not among them."""
        with self._connect() as conn, conn:
            found = conn.execute("SELECT record_json FROM runs WHERE id = ?", (int(run_id),)).fetchone()
            if found is None:
                raise KeyError(f"no run with id {run_id} in {self.path}")
            old = json.loads(found[0])
            record = {**old, **changes, "revision": old.get("revision", 0) + 1}
            conn.execute("UPDATE runs SET record_json = ? WHERE id = ?", (to_json(record), int(run_id)))

    def revisions(self) -> dict[int, int]:
        """Each run's revision (0 until `update` changes it): a reader that keeps records by id knows which went
        stale, without reading them."""
        with self._connect() as conn:
            rows = conn.execute("SELECT id, COALESCE(json_extract(record_json, '$.revision'), 0) FROM runs")
            return {int(i): int(r) for i, r in rows}

    def delete(self, run_ids) -> list[int]:
        """Delete the runs `run_ids`, all or none: KeyError naming those not in the store, and nothing deleted.
        Returns the ids deleted. Ids are never given to another run (a sweep that resumes runs a deleted
        configuration again)."""
        ids = sorted({int(i) for i in run_ids})
        with self._connect() as conn, conn:
            held = {int(i) for (i,) in conn.execute(
                f"SELECT id FROM runs WHERE id IN ({', '.join('?' * len(ids))})", ids)}
            if missing := [i for i in ids if i not in held]:
                raise KeyError(f"no run with id {', '.join(map(str, missing))} in {self.path}")
            conn.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in ids])
        return ids

    def all(self) -> pd.DataFrame:
        """One row per run (without the full record), oldest first."""
        with self._connect() as conn:
            return pd.read_sql_query(f"SELECT {', '.join(COLUMNS)} FROM runs ORDER BY id", conn)

    def get(self, run_id: int) -> dict:
        """The full record of run `run_id` (with its id); KeyError if there is none."""
        with self._connect() as conn:
            found = conn.execute("SELECT record_json FROM runs WHERE id = ?", (int(run_id),)).fetchone()
        if found is None:
            raise KeyError(f"no run with id {run_id} in {self.path}")
        return {"id": int(run_id), **json.loads(found[0])}

    def __len__(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


def _store_problem(path: Path, e: sqlite3.DatabaseError, timeout: float) -> str:
    msg = str(e)
    if "locked" in msg or "busy" in msg:
        return f"Run store {path} is locked by another process (waited {timeout:g} s); try again when it is done."
    if "not a database" in msg or "malformed" in msg or "no such" in msg or "no column" in msg:
        return (f"{path} is not a run store ({msg}); move it aside or choose another file "
                "(--db, or $ALPHASCOPE_RUNS_DB).")
    return f"Run store {path}: {msg}."


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
        to_json(record),
    )


def to_json(record: dict, indent: int | None = None) -> str:
    """A record as JSON; numpy/torch scalars, paths, tuples and objects with to_dict() are converted."""
    return json.dumps(record, default=_json_default, allow_nan=True, indent=indent)


def eval_label(config: dict) -> str | None:
    """What a run's perplexities were measured on: the evaluation text, how many windows of how many
    tokens, and whether only the half not used for calibration. Perplexities compare only between runs
    with the same label (a run recorded without the window counts is labelled by its text alone)."""
    source = config.get("eval")
    if source is None or config.get("eval_windows") is None:
        return source
    half = ", from the half of the text not used for calibration" if config.get("split") else ""
    n = config["eval_windows"]
    return f"{source} ({n} window{'' if n == 1 else 's'} of {config.get('eval_seqlen')} tokens{half})"


def achieved_overall(record: dict) -> float | None:
    """The share of zeros a run left in the prunable matrices, weighted by their sizes (None if not recorded)."""
    return (record.get("achieved") or {}).get("overall")


def run_summary(record: dict) -> dict:
    """What the Compare page shows of a run beyond the table's columns: achieved overall sparsity,
    the per-block allocation, the evaluation (`eval_label`), AlphaPruning's / FARMS' ε and OWL's λ (None where
    the allocation reads none), and the calibration text (its full source) and seed (None where the run read
    no calibration text)."""
    alloc, config = record.get("allocation") or {}, record.get("config") or {}
    stored = (config.get("settings") or {}).get("allocation") or {}
    owl = config.get("allocation_source") == "owl" and not config.get("nm")
    calibrated = bool(config.get("n_samples"))
    return {"achieved": achieved_overall(record), "per_block": alloc.get("per_block") or [],
            "eval": eval_label(config), "epsilon": config.get("epsilon"),
            "owl_lambda": stored.get("owl_lambda") if owl else None,
            "calibration": config.get("calib") if calibrated else None, "seed": config.get("seed")}


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
    """The current UTC time, ISO 8601 to the second (a record's `created`)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
