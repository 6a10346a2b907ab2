"""Layerwise pruning of a causal LM: magnitude, Wanda and SparseGPT, unstructured or N:M.

Pruners (each sets weights of one (out, in) matrix to zero, given a sparsity ratio):
  - magnitude: score |W_ij|.
  - wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"): score
    |W_ij| * ||X_j||_2, where ||X_j|| is the L2 norm of input feature j over all calibration tokens.
  - sparsegpt (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot"): Hessian H = 2/T * sum_t x_t x_t^T of the layer's inputs, 1% dampening
    (of the mean diagonal), upper Cholesky factor of H^-1, columns processed in blocks of 128; in each
    block the mask is chosen adaptively from the current (already compensated) weights by
    w^2 / [H^-1]_jj^2, and each pruned column's error is spread onto the columns not yet processed
    (optimal brain surgeon update).

Selection granularity (why the achieved sparsity is exact): unstructured selection is per output
row for all three pruners: each row of an (out, in) matrix loses exactly k = round(ratio * in)
weights (Wanda compares within rows by design; for magnitude per-row selection is a documented
choice; for SparseGPT the k of a row is spread over the column blocks by cumulative rounding,
k_b = round(ratio * end_b) - round(ratio * start_b)). So every matrix's achieved sparsity equals its
requested ratio to within half a weight per row (plus weights that were zero already).

N:M (e.g. 2:4, 4:8): in every group of M consecutive input weights of a row, the M-N lowest-scoring
are removed. The sparsity is then fixed at (M-N)/M for every pruned matrix; per-layer ratios do not
apply (a matrix is pruned when its ratio is > 0, whatever the value). Reports show what was achieved.

Calibration (wanda, sparsegpt, OWL outlier ratios) runs block by block: the calibration batch
enters block 0, each block's linear layers are observed with forward hooks while the block runs,
the block is pruned, and its outputs are recomputed with the pruned weights to become the next
block's inputs (errors of earlier blocks are seen by later ones). Only the current block sits on the
compute device. Memory on that device, for n calibration samples of L tokens and hidden size d:
the block's weights + 2 * n*L*d activations (inputs and outputs) + the block's forward intermediates
+ statistics: one float per input column (wanda) or a cols x cols float32 Hessian per distinct input
of the block (sparsegpt; q/k/v share one, gate/up share one; SmolLM2-135M: 3 * 576^2 + 1536^2
floats, ~13 MB). With the defaults (16 x 256 tokens) and SmolLM2-135M this is well under 100 MB
beside the model.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from analysis.evaluation import StopFlag, should_stop
from analysis.models import LayerRef, ProgressFn, find_blocks, prunable_layers

METHODS = ("magnitude", "wanda", "sparsegpt")
MAX_RATIO = 0.99  # a matrix keeps at least 1% of its weights


@dataclass
class PruneReport:
    """What a prune call did. Sparsities are fractions of zero weights in [0, 1]."""

    method: str
    nm: tuple[int, int] | None
    per_layer: dict[str, float]  # achieved sparsity of every prunable matrix (module name -> fraction)
    overall: float  # parameter-weighted over all prunable matrices
    seconds: float
    requested: dict[str, float] = field(default_factory=dict)
    blocks_done: int = 0
    stopped: bool = False  # stopped early: the model is partly pruned, restore it from a DenseSnapshot

    def to_dict(self) -> dict:
        d = asdict(self)
        d["nm"] = list(self.nm) if self.nm else None
        return d


# --------------------------------------------------------------------------------------------
# masks (True = remove)


def row_prune_count(ratio: float, cols: int) -> int:
    """Weights removed per row: round(ratio * cols), halves rounded up."""
    return int(math.floor(ratio * cols + 0.5))


def unstructured_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove the round(ratio * cols) lowest scores of every row."""
    return lowest_k_mask(scores, row_prune_count(ratio, scores.shape[1]))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Remove the k lowest scores along the last dimension.

    Equal scores go to the lower index first (a stable sort, unlike topk), so CPU and GPU remove
    the same weights: dequantized 4-bit checkpoints have many exactly equal magnitudes."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, idx, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the m-n lowest scores in every group of m consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={m}")
    return lowest_k_mask(scores.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


def select_mask(scores: torch.Tensor, ratio: float, nm: tuple[int, int] | None) -> torch.Tensor:
    return nm_mask(scores, *nm) if nm else unstructured_mask(scores, ratio)


# --------------------------------------------------------------------------------------------
# pruners on one (out, in) float matrix; they return the pruned matrix


def prune_magnitude(w: torch.Tensor, ratio: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    return w.masked_fill(select_mask(w.abs(), ratio, nm), 0.0)


def wanda_scores(w: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (col_norms: L2 norm of each input feature over the calibration tokens)."""
    return w.abs() * col_norms.reshape(1, -1).to(w)


def prune_wanda(w: torch.Tensor, col_norms: torch.Tensor, ratio: float,
                nm: tuple[int, int] | None = None) -> torch.Tensor:
    return w.masked_fill(select_mask(wanda_scores(w, col_norms), ratio, nm), 0.0)


def _inverse_hessian_factor(h: torch.Tensor, w: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1 (so H^-1 = U^T U). Zero-input columns ("dead")
    get H_jj = 1 and their weights are zeroed in place, as they never affect the output."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lower = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True)


def _block_prune_counts(ratio: float, cols: int, blocksize: int) -> list[int]:
    """Per-row removals for each column block; they add up to round(ratio * cols) exactly."""
    edges = list(range(0, cols, blocksize)) + [cols]
    cum = [row_prune_count(ratio, e) for e in edges]
    return [b - a for a, b in zip(cum[:-1], cum[1:])]


def prune_sparsegpt(w: torch.Tensor, hessian: torch.Tensor, ratio: float, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT on one matrix (out, in) with the input Hessian (in, in); returns the pruned matrix.

    Works on the transpose (in, out) so that each input column is a contiguous row (fast updates)."""
    rows, cols = w.shape
    if nm and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]}")
    wt = w.detach().t().float().contiguous()  # (in, out): wt[j] is input column j of W
    u = _inverse_hessian_factor(hessian.float(), wt.t(), percdamp)
    counts = _block_prune_counts(ratio, cols, blocksize)
    for bi, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        u_blk = u[i1:i2, i1:i2]
        wt_blk = wt[i1:i2]  # a view: updated in place
        err_blk = torch.zeros_like(wt_blk)
        diag = torch.diag(u_blk)
        if not nm:  # adaptive mask: chosen per block from the weights as compensated so far
            mask_t = lowest_k_mask((wt_blk ** 2 / diag.reshape(-1, 1) ** 2).t(), counts[bi]).t()
        for j in range(i2 - i1):
            if nm and j % nm[1] == 0:
                grp = wt_blk[j: j + nm[1]] ** 2 / diag[j: j + nm[1]].reshape(-1, 1) ** 2
                mask_t = torch.zeros_like(wt_blk, dtype=torch.bool)
                mask_t[j: j + nm[1]] = nm_mask(grp.t(), *nm).t()
            pruned = mask_t[j]
            err = torch.where(pruned, wt_blk[j], 0.0) / diag[j]
            # OBS update: move the removed weights' error onto this and the block's later columns
            wt_blk[j:].addr_(u_blk[j, j:], err, alpha=-1.0)
            wt_blk[j].masked_fill_(pruned, 0.0)  # exactly zero (the update leaves rounding residue)
            err_blk[j] = err
        if i2 < cols:
            wt[i2:].sub_(u[i1:i2, i2:].t() @ err_blk)
    return wt.t().contiguous()


# --------------------------------------------------------------------------------------------
# input statistics gathered with forward hooks


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


# --------------------------------------------------------------------------------------------
# walking the decoder blocks with calibration data


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

    for i, blk in enumerate(blocks):
        blk.forward = recorder(i)
    try:
        with torch.no_grad():
            model(input_ids=calib.to(_module_device(model)), use_cache=False)
    except _Captured:
        pass
    except Exception:  # noqa: BLE001 (a model that cannot pass hidden states through: see docstring)
        if calls[0] is None:
            raise
    finally:
        for blk in blocks:
            del blk.forward
    if "x" not in first:
        raise RuntimeError("The calibration forward never reached the first decoder block.")
    return first["x"], [c if c is not None else calls[0] for c in calls]


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    if call.hidden_by_keyword:
        out = block(*call.args, hidden_states=hidden, **call.kwargs)
    else:
        out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


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


def layers_by_block(model: nn.Module) -> dict[int, list[LayerRef]]:
    out: dict[int, list[LayerRef]] = {}
    for ref in prunable_layers(model):
        out.setdefault(ref.block, []).append(ref)
    return out


BlockFn = Callable[[int, list[LayerRef], dict[str, InputStats]], bool]


def walk_blocks(model: nn.Module, calib: torch.Tensor, on_block: BlockFn, hessian: bool = False,
                device: str | torch.device | None = None, progress: ProgressFn | None = None,
                stop: StopFlag = None, label: str = "block") -> int:
    """Run the calibration batch block by block, gathering input statistics of every prunable
    matrix; `on_block(b, refs, stats)` may change the block's weights and returns True if it did
    (then the block's outputs are recomputed before feeding the next block). Returns the number of
    blocks done (fewer than all when `stop` was set).

    `device`: where each block runs (default: where the model is). A block on another device is
    moved there for its turn and back afterwards.
    """
    found = find_blocks(model)
    if found is None:
        raise ValueError("The model has no decoder blocks (no nn.ModuleList) to walk through.")
    blocks = found[1]
    if calib is None or calib.dim() != 2 or calib.shape[0] == 0:
        raise ValueError("Calibration data must be a non-empty (n_samples, seqlen) tensor of token ids.")
    home = _module_device(model)
    dev = torch.device(device) if device is not None else home
    refs_by_block = layers_by_block(model)
    hidden, calls = capture_block_inputs(model, blocks, calib)
    hidden = hidden.to(dev)
    n = len(blocks)
    for b, block in enumerate(blocks):
        if should_stop(stop):
            return b
        block_home = _module_device(block)
        block.to(dev)
        call = _call_to(calls[b], dev)
        refs = refs_by_block.get(b, [])
        stats = {r.name: InputStats(r.cols, hessian, dev) for r in refs}
        seen: dict = {}
        handles = [r.module.register_forward_hook(_stats_hook(stats, r.name, seen)) for r in refs]
        try:
            with torch.no_grad():
                out = run_block(block, hidden, call)
        finally:
            for h in handles:
                h.remove()
            seen.clear()
        if on_block(b, refs, stats) and b < n - 1:  # the last block's outputs feed nothing
            with torch.no_grad():
                out = run_block(block, hidden, call)
        hidden = out
        del stats
        block.to(block_home)
        if progress:
            progress(f"{label} {b + 1}/{n}", (b + 1) / n)
    return n


# --------------------------------------------------------------------------------------------
# pruning a model


def parse_nm(nm) -> tuple[int, int] | None:
    """None, "2:4" or (2, 4) -> (n, m) with 0 < n < m."""
    if nm is None or nm == "":
        return None
    if isinstance(nm, str):
        try:
            n, m = (int(x) for x in nm.split(":"))
        except ValueError as e:
            raise ValueError(f"N:M must look like '2:4', got '{nm}'") from e
    else:
        n, m = (int(x) for x in nm)
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    return n, m


def _check_ratios(per_layer: dict[str, float], refs: list[LayerRef]) -> None:
    names = {r.name for r in refs}
    unknown = [k for k in per_layer if k not in names]
    if unknown:
        raise ValueError(f"{len(unknown)} names in the allocation are not prunable matrices of this model "
                         f"(e.g. '{unknown[0]}'); was the allocation made for another model?")
    bad = {k: v for k, v in per_layer.items() if not (0.0 <= float(v) <= MAX_RATIO)}
    if bad:
        k, v = next(iter(bad.items()))
        raise ValueError(f"Sparsity ratios must be in [0, {MAX_RATIO}]; '{k}' has {v}")


def prune_layer(ref: LayerRef, ratio: float, method: str, stats: InputStats | None,
                nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01) -> None:
    """Prune one matrix in place."""
    w = ref.weight().detach().float()
    if method == "magnitude":
        new = prune_magnitude(w, ratio, nm)
    elif method == "wanda":
        new = prune_wanda(w, stats.col_norms(), ratio, nm)
    else:
        new = prune_sparsegpt(w, stats.hessian(), ratio, nm, blocksize=blocksize, percdamp=percdamp)
    with torch.no_grad():
        ref.weight().copy_(new.to(ref.weight().dtype))


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((w == 0).sum()) / w.numel()


def prune(model: nn.Module, per_layer: dict[str, float], method: str = "wanda", calib: torch.Tensor | None = None,
          nm=None, progress: ProgressFn | None = None, stop: StopFlag = None,
          device: str | torch.device | None = None, blocksize: int = 128, percdamp: float = 0.01) -> PruneReport:
    """Prune `model` in place: matrix `name` loses the fraction `per_layer[name]` of its weights
    (names not given are left dense). `calib`: (n, seqlen) token ids, needed by wanda and sparsegpt.
    `nm`: "2:4", (2, 4) or None (unstructured). `stop` is checked between blocks; when it stops the
    run, the model is partly pruned (report.stopped): restore it with DenseSnapshot.restore.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"Unknown pruning method '{method}'; choose one of {', '.join(METHODS)}.")
    nm = parse_nm(nm)
    refs = prunable_layers(model)
    _check_ratios(per_layer, refs)
    todo = {k: float(v) for k, v in per_layer.items() if float(v) > 0}

    def on_block(b: int, block_refs: list[LayerRef], stats: dict[str, InputStats]) -> bool:
        changed = False
        for ref in block_refs:
            if ref.name in todo:
                prune_layer(ref, todo[ref.name], method, stats.get(ref.name), nm, blocksize, percdamp)
                changed = True
        return changed

    if method == "magnitude":
        done = _prune_without_data(model, on_block, progress, stop)
    else:
        if calib is None:
            raise ValueError(f"{method} needs calibration data (calib = token ids, shape (n, seqlen)).")
        done = walk_blocks(model, calib, on_block, hessian=(method == "sparsegpt"), device=device,
                           progress=progress, stop=stop, label=f"{method}: block")
    n_blocks = len(find_blocks(model)[1])
    achieved = {r.name: sparsity_of(r.weight()) for r in refs}
    total = sum(r.params for r in refs)
    overall = sum(achieved[r.name] * r.params for r in refs) / total if total else 0.0
    return PruneReport(method, nm, achieved, overall, time.perf_counter() - t0, dict(per_layer),
                       blocks_done=done, stopped=done < n_blocks)


def _prune_without_data(model: nn.Module, on_block: BlockFn, progress: ProgressFn | None, stop: StopFlag) -> int:
    by_block = layers_by_block(model)
    n = len(find_blocks(model)[1])
    for b in range(n):
        if should_stop(stop):
            return b
        on_block(b, by_block.get(b, []), {})
        if progress:
            progress(f"magnitude: block {b + 1}/{n}", (b + 1) / n)
    return n


# --------------------------------------------------------------------------------------------
# OWL outlier ratios


def collect_outlier_ratios(model: nn.Module, calib: torch.Tensor, threshold_m: float = 5.0,
                           progress: ProgressFn | None = None, device: str | torch.device | None = None) -> dict[int, float]:
    """Layerwise outlier ratio of OWL (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity").

    For every prunable matrix, A = |W_ij| * ||X_j||_2 (the Wanda score, on the dense model); an entry
    is an outlier when A_ij > threshold_m * mean(A). A block's ratio is the fraction (in [0, 1], not
    percent) of outlier entries over all its matrices (so matrices weigh by their parameter count).
    """
    if threshold_m <= 0:
        raise ValueError(f"threshold_m must be > 0, got {threshold_m}")
    ratios: dict[int, float] = {}

    def on_block(b: int, refs: list[LayerRef], stats: dict[str, InputStats]) -> bool:
        count, total = 0, 0
        for ref in refs:
            a = wanda_scores(ref.weight().detach().float(), stats[ref.name].col_norms())
            count += int((a > threshold_m * a.mean()).sum())
            total += a.numel()
        ratios[b] = count / total if total else 0.0
        return False

    walk_blocks(model, calib, on_block, hessian=False, device=device, progress=progress, label="outliers: block")
    return ratios


# --------------------------------------------------------------------------------------------
# dense snapshot and export


@dataclass
class DenseSnapshot:
    """CPU copy of every prunable matrix, to undo pruning without reloading from disk."""

    weights: dict[str, torch.Tensor]

    @classmethod
    def take(cls, model: nn.Module) -> "DenseSnapshot":
        return cls({r.name: r.weight().detach().to("cpu", copy=True).contiguous() for r in prunable_layers(model)})

    @classmethod
    def view(cls, model: nn.Module) -> "DenseSnapshot":
        """The prunable weights of `model` itself, not copied: a restore source only while that
        model is never changed (e.g. a shared read-only model that pruned copies were made from)."""
        return cls({r.name: r.weight().detach() for r in prunable_layers(model)})

    def restore(self, model: nn.Module) -> None:
        refs = prunable_layers(model)
        missing = [r.name for r in refs if r.name not in self.weights]
        if missing or len(refs) != len(self.weights):
            raise ValueError("This snapshot was taken from a different model.")
        with torch.no_grad():
            for r in refs:
                r.weight().copy_(self.weights[r.name])

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights.values())


def export(model: nn.Module, tokenizer, allocation, out_dir: str | Path) -> Path:
    """Save the (pruned) model as safetensors with its tokenizer, and the allocation as
    allocation.json beside them. `allocation`: an Allocation (anything with to_dict()) or a dict."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors is the default format
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    alloc = allocation.to_dict() if hasattr(allocation, "to_dict") else dict(allocation or {})
    (out / "allocation.json").write_text(json.dumps(alloc, indent=2))
    return out
