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
from collections.abc import Callable
from typing import Any

from analysis.errors import AlphascopeError

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
      tag: what the job is for, as its starter tells it (e.g. the model it runs on), or None
    """

    def __init__(self, fn: Callable[[Job], Any], name: str = "job", max_updates: int = 10_000, tag: Any = None):
        self.fn = fn
        self.name = name
        self.tag = tag
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
            # ValueError and alphascope's own errors carry messages written for the user; others get their type
            user_facing = isinstance(e, (ValueError, AlphascopeError))
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
