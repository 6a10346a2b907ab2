"""Perplexity over token windows, streamed window by window.

Convention: each window of L tokens is scored independently (no context carried over), predicting
tokens 2..L from the ones before them, so a window contributes L-1 tokens. Running perplexity is
exp(nll_sum / tokens) with the negative log-likelihood in nats, summed over all scored tokens.
When windows start with BOS (`eval_windows(bos=True)`), BOS is context only and never a target.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

StopFlag = threading.Event | Callable[[], bool] | None


@dataclass(frozen=True)
class PplUpdate:
    windows_done: int
    windows_total: int
    tokens: int  # predicted tokens scored so far
    nll_sum: float  # nats
    ppl: float  # exp(nll_sum / tokens)


def should_stop(stop: StopFlag) -> bool:
    """True when `stop` (a threading.Event or a no-argument callable) asks to stop."""
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def window_nll(model: nn.Module, window: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL in nats, number of predicted tokens) for one (1, L) window."""
    logits = model(input_ids=window, use_cache=False).logits
    pred = logits[:, :-1, :].float()
    target = window[:, 1:]
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll), int(target.numel())


def perplexity_stream(model: nn.Module, windows: torch.Tensor, device: str | torch.device | None = None,
                      stop: StopFlag = None) -> Iterator[PplUpdate]:
    """Yield a PplUpdate after every window of `windows` (n, L); stop early when `stop` is set.

    The model runs where its parameters are unless `device` says otherwise (then the inputs go
    there; the model is not moved).
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a non-empty (n, L>=2) tensor of token ids, got shape {tuple(windows.shape)}")
    dev = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    nll_sum, tokens, total = 0.0, 0, int(windows.shape[0])
    try:
        for i in range(total):
            if should_stop(stop):
                return
            nll, n = window_nll(model, windows[i: i + 1].to(dev))
            nll_sum += nll
            tokens += n
            yield PplUpdate(i + 1, total, tokens, nll_sum, _ppl(nll_sum, tokens))
    finally:
        model.train(was_training)


def _ppl(nll_sum: float, tokens: int) -> float:
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return math.inf


def perplexity(model: nn.Module, windows: torch.Tensor, device: str | torch.device | None = None,
               progress: Callable[[PplUpdate], None] | None = None) -> float:
    """Perplexity over all `windows`; `progress` is called with every PplUpdate."""
    last = None
    for last in perplexity_stream(model, windows, device=device):
        if progress is not None:
            progress(last)
    return last.ppl
