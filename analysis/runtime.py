"""Conventions every engine module shares: the version, the cache folder, devices, progress callbacks and stop
flags.

A progress callback is called as `progress(message, fraction)` with fraction in [0, 1]. A stop flag
is a `threading.Event` or a no-argument callable; long loops check it between units of work (blocks,
windows) and return early when it is set.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from analysis.errors import AlphascopeError

VERSION = "0.1.0"  # alphascope's, in every run record (analysis.__version__)

ProgressFn = Callable[[str, float], None]
StopFlag = threading.Event | Callable[[], bool] | None


class ModelLoadError(AlphascopeError, RuntimeError):
    """A model could not be resolved or loaded, or runs on a device this machine lacks; the message is meant for
    the user as is."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto": CUDA when available, else CPU. ModelLoadError for a device this machine does not have."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"Unknown device '{device}'; use auto, cpu, cuda or cuda:<index>.") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was requested but no CUDA device is available; use device 'cpu'.")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ModelLoadError(f"There is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return d


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
