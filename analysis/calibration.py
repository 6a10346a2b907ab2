"""Calibration: the one block walker that feeds calibration tokens through the decoder block by
block, and the input statistics gathered on the way.

The calibration batch enters block 0; each block's linear layers are observed with forward hooks
while the block runs; a caller may then change the block's weights (prune it), and the block's
outputs are recomputed with the new weights to become the next block's inputs, so later blocks see
the errors of earlier ones. Only the current block sits on the compute device. Memory there, for n
calibration samples of L tokens and hidden size d: the block's weights + 2·n·L·d activations
(inputs and outputs) + the block's forward intermediates + the statistics (one float per input column,
or a cols x cols float32 Hessian per distinct input of the block: q/k/v share one, gate/up share one).

Fused MoE experts (analysis.layers) are observed with one hook on their module: each expert's gate and
up projections see the tokens the router sent it, its down projection act(gate)·up of those tokens.
The hook recomputes the experts' output from what it gathered and refuses a module whose output differs
(experts that compute something else), so the statistics are those of the real forward.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from analysis.errors import AlphascopeError
from analysis.layers import (
    ExpertsLayout,
    LayerRef,
    NoBlocksError,
    find_blocks,
    fused_experts,
    layers_by_block,
    module_device,
    token_ids_problem,
)
from analysis.runtime import ProgressFn, StopFlag, pick_device, should_stop


class InputStats:
    """Running statistics of a linear layer's inputs X (tokens x cols), accumulated in float32."""

    def __init__(self, cols: int, hessian: bool, device: torch.device):
        self.sq = torch.zeros(cols, dtype=torch.float32, device=device)  # sum_t x_tj^2
        self.xtx = torch.zeros(cols, cols, dtype=torch.float32, device=device) if hessian else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sq += (x * x).sum(dim=0)
        if self.xtx is not None:
            self.xtx += x.t() @ x
        self.tokens += x.shape[0]

    def col_norms(self) -> torch.Tensor:
        """||X_j||_2 over all tokens seen."""
        return self.sq.sqrt()

    def hessian(self) -> torch.Tensor:
        """H = 2/T * X^T X (T tokens)."""
        return self.xtx * (2.0 / max(self.tokens, 1))


def _stats_hook(stats: dict[str, InputStats], name: str, seen: dict):
    """Forward hook adding the layer's input to stats[name]. Layers fed the very same tensor
    (q/k/v, gate/up) share one InputStats instead of recomputing it: `seen` maps a tensor's
    address to (first layer, tensor), holding the tensor so the address cannot be reused."""
    def hook(_module, inputs, _output):
        x = inputs[0]
        key = (x.data_ptr(), tuple(x.shape), x._version)
        if key in seen:
            stats[name] = stats[seen[key][0]]
            return
        seen[key] = (name, x)
        stats[name].add(x)
    return hook


class CalibrationError(AlphascopeError, ValueError):
    """Calibration data that is not a non-empty (n_samples, seqlen) tensor of token ids."""


class ExpertsError(AlphascopeError, ValueError):
    """Fused experts whose forward this module cannot reproduce, so it cannot gather their inputs."""


_EXPERT_ARGS = ("hidden_states", "top_k_index", "top_k_weights")
_EXPERT_TOLERANCE = 5e-2  # relative error of the rebuilt output that still counts as the same: bf16 sums round
# (by about 2^-9 each), a misread layout (gate and up swapped, another activation) errs by O(1)
_EXPERT_CHECK_TOKENS = 1024  # tokens the check rebuilds (all would cost a float32 copy of the block's activations)


def _block_stats(refs: list[LayerRef], hessian: bool, device: torch.device) -> dict[str, InputStats]:
    """One InputStats per matrix; an expert's gate and up projections, slices of one parameter, share one
    (the same tokens)."""
    stats: dict[str, InputStats] = {}
    shared: dict[tuple, InputStats] = {}
    for r in refs:
        if r.input_key not in shared:
            shared[r.input_key] = InputStats(r.cols, hessian, device)
        stats[r.name] = shared[r.input_key]
    return stats


def _expert_linear(module: nn.Module, layout: ExpertsLayout, param: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """x through expert e's whole matrix in `param` (all its rows, as stored), with its bias if it has one."""
    w = getattr(module, param)[e]
    bias = getattr(module, f"{param}_bias")[e] if layout.bias else None
    return F.linear(x, w.t() if layout.transposed else w, bias)


def _expert_inner(module: nn.Module, layout: ExpertsLayout, h: torch.Tensor) -> torch.Tensor:
    """The input of an expert's down projection from the output of its first parameter: the module's own
    gate (`_apply_gate`, GPT-OSS's clamped, interleaved one among them) or act(gate)·up, act(up) without a gate."""
    if not layout.gated:
        return module.act_fn(h)
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _experts_hook(stats: dict[str, InputStats], names: dict[int, dict[str, str]], layout: ExpertsLayout):
    """Forward hook of a fused-experts module: adds expert e's routed tokens to the statistic of its first
    parameter's slices (names[e][layout.first]: gate and up, or up) and the inner activations of them to its
    down_proj's (names[e]["down_proj"]), then checks that those rebuild the module's output."""
    def gather(module, e: int, xe: torch.Tensor) -> torch.Tensor:
        inner = _expert_inner(module, layout, _expert_linear(module, layout, layout.first, e, xe))
        stats[names[e][layout.first]].add(xe)
        stats[names[e]["down_proj"]].add(inner)
        return inner

    def top_k(module, x, index, weights, output) -> tuple[float, float]:
        """Tokens (T, H) with the experts each chose and their weights: the output is their weighted sum."""
        x = x.reshape(-1, x.shape[-1])
        index, weights = index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)
        checked = min(x.shape[0], _EXPERT_CHECK_TOKENS)
        rebuilt = torch.zeros(checked, x.shape[1], dtype=torch.float32, device=x.device)
        for e in names:
            tok, pos = torch.where(index == e)
            if len(tok) == 0:
                continue
            inner = gather(module, e, x[tok])
            first = tok < checked
            y = _expert_linear(module, layout, "down_proj", e, inner[first]) * weights[tok[first], pos[first], None]
            rebuilt.index_add_(0, tok[first], y.float())
        out = output.reshape(x.shape)[:checked].float()
        return float((rebuilt - out).norm()), float(out.norm())

    def pre_routed(module, x, output) -> tuple[float, float]:
        """(E·T, H): expert e's rows are the e-th T of them, each token scaled by its router score, zero where
        the router did not choose e; the output has the same rows."""
        rows = x.reshape(layout.experts, -1, x.shape[-1])
        outs = output.reshape(rows.shape)
        err = norm = 0.0
        first = slice(0, _EXPERT_CHECK_TOKENS // len(names) + 1)  # the check's share of each expert's tokens
        for e in names:
            tok = rows[e].ne(0).any(-1).nonzero().squeeze(-1)
            if len(tok) == 0:
                continue
            inner = gather(module, e, rows[e, tok])
            y, out = _expert_linear(module, layout, "down_proj", e, inner[first]).float(), outs[e, tok[first]].float()
            err, norm = err + float(((y - out) ** 2).sum()), norm + float((out ** 2).sum())
        return err ** 0.5, norm ** 0.5

    def hook(module, args, kwargs, output):
        given = dict(zip(_EXPERT_ARGS, args)) | kwargs
        x, index, weights = (given.get(k) for k in _EXPERT_ARGS)
        if x is None or not layout.pre_routed and (index is None or weights is None):
            raise ExpertsError(f"{type(module).__name__} is not called with (hidden_states, top_k_index, "
                               "top_k_weights): its experts' inputs cannot be gathered; use the magnitude pruner")
        err, norm = pre_routed(module, x, output) if layout.pre_routed else top_k(module, x, index, weights, output)
        if err > _EXPERT_TOLERANCE * max(norm, 1e-12):
            raise ExpertsError(f"{type(module).__name__}'s experts do not compute down(act(gate) * up) from their "
                               "parameters as this tool reads them, so their inputs cannot be gathered; use the "
                               "magnitude pruner")
    return hook


def _add_hooks(refs: list[LayerRef], stats: dict[str, InputStats], seen: dict) -> list:
    """Forward hooks filling `stats` while the block runs: one per linear layer, one per experts module."""
    handles = [r.module.register_forward_hook(_stats_hook(stats, r.name, seen)) for r in refs if r.expert is None]
    experts: dict[int, tuple[nn.Module, dict[int, dict[str, str]]]] = {}
    for r in refs:
        if r.expert is not None:  # per expert, a matrix name for each parameter (gate and up share a statistic)
            param, e = r.expert[:2]
            experts.setdefault(id(r.module), (r.module, {}))[1].setdefault(e, {})[param] = r.name
    for module, names in experts.values():
        handles.append(module.register_forward_hook(_experts_hook(stats, names, fused_experts(module)),
                                                    with_kwargs=True))
    return handles


class _Captured(Exception):
    """Raised by the last recording block to end the capture forward early."""


@dataclass
class BlockCall:
    """How the model called one block: extra positional args and keyword args (masks, rotary
    position embeddings, position ids, ...), reused to run the block on the calibration batch."""

    args: tuple
    kwargs: dict
    hidden_by_keyword: bool = False


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs))
    kw = dict(kwargs)
    return kw.pop("hidden_states"), BlockCall((), kw, hidden_by_keyword=True)


@contextmanager
def _forwards(blocks: nn.ModuleList, make: Callable[[int], Callable]) -> Iterator[None]:
    """Within it, block i's forward is make(i). A forward set on the block itself (accelerate's hooks wrap
    it so) is put back afterwards."""
    own = [blk.__dict__.get("forward") for blk in blocks]
    for i, blk in enumerate(blocks):
        blk.forward = make(i)
    try:
        yield
    finally:
        for blk, forward in zip(blocks, own):
            if forward is None:
                del blk.forward
            else:
                blk.forward = forward


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList,
                         calib: torch.Tensor) -> tuple[torch.Tensor, list[BlockCall]]:
    """Hidden states entering block 0 for the calibration batch, and each block's call arguments.

    Every block's forward is swapped for a recorder that stores its arguments and passes the hidden
    states through unchanged, so one cheap forward (embeddings only) yields per-block masks and
    position embeddings (they differ per block in models with sliding-window layers, e.g. Gemma 3).
    If a model cannot run with pass-through blocks, later blocks reuse block 0's arguments.
    """
    calls: list[BlockCall | None] = [None] * len(blocks)
    first: dict[str, torch.Tensor] = {}

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden, call = _split_hidden(args, kwargs)
            calls[i] = call
            if i == 0:
                first["x"] = hidden.detach()
            if i == len(blocks) - 1:
                raise _Captured
            return hidden
        return forward

    try:
        with _forwards(blocks, recorder), torch.no_grad():
            model(input_ids=calib.to(module_device(model)), use_cache=False)
    except _Captured:
        pass
    except Exception:  # noqa: BLE001 (a model that cannot pass hidden states through: see docstring)
        if calls[0] is None:
            raise
    if "x" not in first:
        raise RuntimeError("The calibration forward never reached the first decoder block.")
    return first["x"], [c if c is not None else calls[0] for c in calls]


@contextmanager
def replaying(blocks: nn.ModuleList, final: torch.Tensor) -> Iterator[None]:
    """Within it, a forward of the model does not run its decoder blocks: each passes its input through
    and the last one returns `final`, the last block's outputs for the batch being run (e.g. a block
    walk's, see `walk_blocks`' on_output), so the forward costs the embedding, the final norm and the head.
    A model whose blocks cannot be passed through (see `capture_block_inputs`) raises or returns other logits:
    check the result against a real forward once."""
    def passing(i: int):
        def forward(*args, **kwargs):
            hidden, _ = _split_hidden(args, kwargs)
            return final.to(hidden.device, hidden.dtype) if i == len(blocks) - 1 else hidden
        return forward

    with _forwards(blocks, passing):
        yield


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    if call.hidden_by_keyword:
        out = block(*call.args, hidden_states=hidden, **call.kwargs)
    else:
        out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _call_to(call: BlockCall, device: torch.device) -> BlockCall:
    return BlockCall(_to_device(call.args, device), _to_device(call.kwargs, device), call.hidden_by_keyword)


BlockFn = Callable[[int, list[LayerRef], dict[str, InputStats]], bool]


def walk_blocks(model: nn.Module, calib: torch.Tensor | None, on_block: BlockFn, hessian: bool = False,
                device: str | torch.device | None = None, progress: ProgressFn | None = None,
                stop: StopFlag = None, label: str = "block",
                on_output: Callable[[torch.Tensor], None] | None = None) -> int:
    """Run the calibration batch block by block, gathering input statistics of every prunable
    matrix; `on_block(b, refs, stats)` may change the block's weights and returns True if it did
    (then the block's outputs are recomputed before feeding the next block). Returns the number of
    blocks done (fewer than all when `stop` was set). `on_output`, when given and the whole batch went
    through, is called with the last block's outputs (n, seqlen, hidden size), computed with the weights
    on_block left: the model's final hidden states on `calib` before its norm and head.

    calib=None visits the blocks without running them (`stats` is empty): for pruners that need no data.
    `device`: where each block runs (default: where the model is). A block on another device is
    moved there for its turn and back afterwards.
    """
    found = find_blocks(model)
    if found is None:
        raise NoBlocksError("The model has no decoder blocks (no nn.ModuleList) to walk through.")
    blocks = found[1]
    if calib is not None and (calib.dim() != 2 or calib.shape[0] == 0):
        raise CalibrationError("Calibration data must be a non-empty (n_samples, seqlen) tensor of token ids "
                               f"(data.calibration_batches makes one), got shape {tuple(calib.shape)}.")
    if calib is not None and (problem := token_ids_problem(calib, model)):
        raise CalibrationError(f"Calibration data: {problem}.")
    dev = pick_device(device) if device is not None else module_device(model)
    refs_by_block = layers_by_block(model)
    n = len(blocks)
    if calib is None:
        for b in range(n):
            if should_stop(stop):
                return b
            on_block(b, refs_by_block.get(b, []), {})
            if progress:
                progress(f"{label} {b + 1}/{n}", (b + 1) / n)
        return n
    hidden, calls = capture_block_inputs(model, blocks, calib)
    hidden = hidden.to(dev)
    for b, block in enumerate(blocks):
        if should_stop(stop):
            return b
        block_home = module_device(block)
        block.to(dev)
        call = _call_to(calls[b], dev)
        refs = refs_by_block.get(b, [])
        stats = _block_stats(refs, hessian, dev)
        seen: dict = {}
        handles = _add_hooks(refs, stats, seen)
        try:
            with torch.no_grad():
                out = run_block(block, hidden, call)
        finally:
            for h in handles:
                h.remove()
            seen.clear()
        if on_block(b, refs, stats) and (b < n - 1 or on_output):  # else the last block's outputs feed nothing
            with torch.no_grad():
                out = run_block(block, hidden, call)
        hidden = out
        del stats
        block.to(block_home)
        if progress:
            progress(f"{label} {b + 1}/{n}", (b + 1) / n)
    if on_output:
        on_output(hidden)
    return n
