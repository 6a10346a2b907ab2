"""Perplexity over token windows, streamed window by window.

Convention: each window of L tokens is scored independently (no context carried over), predicting
tokens 2..L from the ones before them, so a window contributes L-1 tokens. Running perplexity is
exp(nll_sum / tokens) with the negative log-likelihood in nats, summed over all scored tokens.
When windows start with BOS (`eval_windows(bos=True)`), BOS is context only and never a target.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from analysis.errors import AlphascopeError
from analysis.layers import module_device, token_ids_problem
from analysis.runtime import StopFlag, pick_device, should_stop


@dataclass(frozen=True)
class PplUpdate:
    windows_done: int
    windows_total: int
    tokens: int  # predicted tokens scored so far
    nll_sum: float  # nats
    ppl: float  # exp(nll_sum / tokens)


@torch.inference_mode()
def token_nll(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-token NLL (nats) of each predicted token of a (B, L) batch of windows: shape (B, L-1)."""
    logits = model(input_ids=window, use_cache=False).logits
    pred = logits[:, :-1, :].float()
    target = window[:, 1:].to(pred.device)  # (a model spread by device_map ends on its last device)
    # rows of (token, vocab): the classes contiguous, much faster on a CPU than the (B, vocab, L) layout
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape)


class EvaluationError(AlphascopeError, ValueError):
    """Windows that are not a non-empty (n, L>=2) tensor of token ids, or a batch size below 1."""


def window_nll(model: nn.Module, window: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL in nats, number of predicted tokens) for a (B, L) batch of windows."""
    nll = token_nll(model, window)
    return float(nll.sum()), int(nll.numel())


def default_batch_size(device: torch.device) -> int:
    """Windows per forward pass: 1 on CPU (batching gains nothing there and the live curve updates
    every window), 8 on a GPU (one window of a small model leaves a GPU mostly idle)."""
    return 1 if device.type == "cpu" else 8


def perplexity_stream(model: nn.Module, windows: torch.Tensor, device: str | torch.device | None = None,
                      stop: StopFlag = None, batch_size: int | None = None) -> Iterator[PplUpdate]:
    """Yield a PplUpdate after every batch of `batch_size` windows of `windows` (n, L); stop early
    when `stop` is set. Batching changes no result beyond float round-off: each window is scored on
    its own either way.

    The model runs where its parameters are unless `device` says otherwise (then the inputs go
    there; the model is not moved). A model spread by accelerate's device_map runs where it was
    placed: the inputs go to its first parameter's device (the CPU when that one is offloaded to disk),
    and accelerate's hooks move them on. batch_size: windows per forward pass (default: `default_batch_size`).
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise EvaluationError(f"windows must be a non-empty (n, L>=2) tensor of token ids (data.eval_windows makes "
                              f"one), got shape {tuple(windows.shape)}")
    if problem := token_ids_problem(windows, model):
        raise EvaluationError(f"windows: {problem}")
    dev = pick_device(device) if device is not None else module_device(model)
    if dev.type == "meta":  # offloaded by accelerate: its hooks load the weights for each forward
        dev = torch.device("cpu")
    step = default_batch_size(dev) if batch_size is None else int(batch_size)
    if step < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size}")
    was_training = model.training
    model.eval()
    nll_sum, tokens, total = 0.0, 0, int(windows.shape[0])
    try:
        for i in range(0, total, step):
            if should_stop(stop):
                return
            nll, n = window_nll(model, windows[i: i + step].to(dev))
            nll_sum += nll
            tokens += n
            yield PplUpdate(min(i + step, total), total, tokens, nll_sum, _ppl(nll_sum, tokens))
    finally:
        model.train(was_training)


def _ppl(nll_sum: float, tokens: int) -> float:
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return math.inf


def perplexity(model: nn.Module, windows: torch.Tensor, device: str | torch.device | None = None,
               on_update: Callable[[PplUpdate], None] | None = None, batch_size: int | None = None) -> float:
    """Perplexity over all `windows` (n, L) of token ids: exp(total next-token NLL in nats / number of
    predicted tokens), each window scored on its own (L-1 predictions; its first token is context only).
    `on_update` sees every PplUpdate (the running perplexity, not the (message, fraction) of a `progress`
    callback). Raises EvaluationError for windows that are not a non-empty (n, L>=2) tensor."""
    last = None
    for last in perplexity_stream(model, windows, device=device, batch_size=batch_size):
        if on_update is not None:
            on_update(last)
    return last.ppl
