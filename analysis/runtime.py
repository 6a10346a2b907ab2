"""Conventions every engine module shares: the cache folder, progress callbacks and stop flags.

A progress callback is called as `progress(message, fraction)` with fraction in [0, 1]. A stop flag
is a `threading.Event` or a no-argument callable; long loops check it between units of work (blocks,
windows) and return early when it is set.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

ProgressFn = Callable[[str, float], None]
StopFlag = threading.Event | Callable[[], bool] | None


def cache_dir() -> Path:
    """Where converted models, uploaded texts and the run store live: $ALPHASCOPE_CACHE, else
    ~/.cache/alphascope."""
    return Path(os.environ.get("ALPHASCOPE_CACHE", Path.home() / ".cache" / "alphascope"))


def should_stop(stop: StopFlag) -> bool:
    """True when `stop` (a threading.Event or a no-argument callable) asks to stop."""
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())
