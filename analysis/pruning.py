"""Pruning a model in place: each prunable matrix loses the fraction of weights its allocation asks
for, with a registered pruner (analysis.pruners), block by block through the calibration walker
(analysis.calibration). A `DenseSnapshot` undoes it without reloading.

Row-wise refinement (`rowwise="trim"`, analysis.pruners.prune_trim) spreads each matrix's ratio
unevenly over its output rows from the layer's output reconstruction; it needs the Gram matrix XᵀX of
every layer's inputs, which the walker gathers like SparseGPT's Hessian (cols x cols float32 per
distinct input of the current block), so memory stays bounded whatever the number of tokens.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from analysis.allocation import MAX_RATIO, Allocation
from analysis.calibration import InputStats, walk_blocks
from analysis.layers import LayerRef, find_blocks, prunable_layers
from analysis.pruners import (
    NM,
    PruneError,
    Pruner,
    check_nm_ratios,
    check_rowwise,
    get_pruner,
    parse_nm,
    prune_trim,
)
from analysis.runtime import ProgressFn, StopFlag


@dataclass
class PruneReport:
    """What a prune call did. Sparsities are fractions of zero weights in [0, 1]."""

    method: str
    nm: NM | None
    per_layer: dict[str, float]  # achieved sparsity of every prunable matrix (module name -> fraction)
    overall: float  # parameter-weighted over all prunable matrices
    seconds: float
    requested: dict[str, float] = field(default_factory=dict)
    blocks_done: int = 0
    stopped: bool = False  # stopped early: the model is partly pruned, restore it from a DenseSnapshot
    rowwise: str | None = None
    # matrices that saw no calibration token (MoE experts the router never chose), pruned by magnitude instead
    by_magnitude: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["nm"] = list(self.nm) if self.nm else None
        return d


def _check_ratios(per_layer: dict[str, float], refs: list[LayerRef]) -> None:
    if not isinstance(per_layer, dict):
        raise PruneError(f"per_layer must be {{matrix name: ratio}}, an Allocation or one ratio, got "
                         f"{type(per_layer).__name__}")
    names = {r.name for r in refs}
    unknown = [k for k in per_layer if k not in names]
    if unknown:
        raise PruneError(f"{len(unknown)} names in the allocation are not prunable matrices of this model "
                         f"(e.g. '{unknown[0]}'); was the allocation made for another model?")
    bad = {k: v for k, v in per_layer.items() if not (0.0 <= float(v) <= MAX_RATIO)}
    if bad:
        k, v = next(iter(bad.items()))
        raise PruneError(f"Sparsity ratios must be in [0, {MAX_RATIO}]; '{k}' has {v}")


def layer_pruner(method: str, stats: InputStats | None) -> tuple[Pruner, torch.Tensor | None]:
    """The registered pruner `method` and its statistic from `stats`. A matrix that saw no calibration
    token (an expert the router never chose) has an all-zero statistic: it is pruned by magnitude."""
    pruner = get_pruner(method)
    if not pruner.statistic:
        return pruner, None
    if stats.tokens == 0:
        return get_pruner("magnitude"), None
    return pruner, getattr(stats, pruner.statistic)()


def non_finite(model: nn.Module) -> str | None:
    """The name of the first prunable matrix with NaN or inf weights, or None."""
    return next((ref.name for ref in prunable_layers(model) if not torch.isfinite(ref.weight()).all()), None)


def check_finite(model: nn.Module) -> None:
    """PruneError naming the first prunable matrix with NaN or inf weights, which no pruner can rank:
    a run checks before it evaluates or prunes anything (`prune_layer` checks each matrix again)."""
    if (name := non_finite(model)) is not None:
        raise PruneError(f"'{name}' has non-finite weights (NaN or inf), which no pruner can rank; nothing "
                         "was pruned (the Spectra page and `spectra` flag such matrices)")


def prune_layer(ref: LayerRef, ratio: float, method: str, stats: InputStats | None, nm: NM | None = None,
                rowwise: str | None = None) -> str:
    """Prune one matrix in place with the registered pruner `method`; rowwise="trim" refines the
    per-row ratios (needs `stats` with the Gram matrix, i.e. gathered with hessian=True). Returns the
    name of the pruner used: "magnitude" for a matrix that saw no calibration token (`layer_pruner`)."""
    pruner, stat = layer_pruner(method, stats)
    w = ref.weight().detach().float()
    if not torch.isfinite(w).all():  # magnitude would keep NaNs, SparseGPT would fail in a Cholesky
        raise PruneError(f"'{ref.name}' has non-finite weights (NaN or inf), which no pruner can rank; the matrices "
                         "before it are pruned already (the Spectra page and `spectra` flag such matrices)")
    if rowwise == "trim" and stats.tokens:
        new, _ = prune_trim(w, ratio, lambda m, rows: pruner.apply(m, rows, None, stat), stats.xtx,
                            max_ratio=MAX_RATIO)
    else:
        new = pruner.apply(w, ratio, nm, stat)
    with torch.no_grad():
        ref.weight().copy_(new.to(ref.weight().dtype))
    return pruner.name


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((w == 0).sum()) / w.numel()


def gathers_gram(method: str, rowwise: str | None = None) -> bool:
    """Whether pruning with `method` (and `rowwise`) gathers each input's Gram matrix XᵀX, cols x cols
    (SparseGPT's Hessian, TRIM's output measures) rather than column norms or nothing."""
    return get_pruner(method).statistic == "hessian" or rowwise is not None


def prune(model: nn.Module, per_layer: dict[str, float] | Allocation | float, method: str = "wanda",
          calib: torch.Tensor | None = None,
          nm=None, progress: ProgressFn | None = None, stop: StopFlag = None,
          device: str | torch.device | None = None, rowwise: str | None = None) -> PruneReport:
    """Prune `model` in place: matrix `name` loses the fraction `per_layer[name]` of its weights
    (names not given are left dense); `per_layer` may also be an Allocation (its per_layer) or one
    number for every prunable matrix. `calib`: (n, seqlen) token ids, needed by pruners that use a
    calibration statistic and by row-wise refinement. `nm`: "2:4", (2, 4) or None (unstructured); with
    N:M every ratio is (M-N)/M or 0.
    `rowwise`: None or "trim" (see the module docstring). `device`: where each block is
    pruned (default: where it lives). `stop` is checked between blocks; when it stops the run, the
    model is partly pruned (report.stopped): restore it with DenseSnapshot.restore.
    """
    t0 = time.perf_counter()
    pruner = get_pruner(method)
    nm = parse_nm(nm)
    refs = prunable_layers(model)
    if isinstance(per_layer, Allocation):
        per_layer = per_layer.per_layer
    elif isinstance(per_layer, (int, float)) and not isinstance(per_layer, bool):
        per_layer = {r.name: float(per_layer) for r in refs}
    _check_ratios(per_layer, refs)
    todo = {k: float(v) for k, v in per_layer.items() if float(v) > 0}
    if nm is not None:
        check_nm_ratios(todo, nm)
    check_rowwise(rowwise, nm)
    if (pruner.statistic or rowwise) and calib is None:
        raise PruneError(f"{rowwise or method} needs calibration data (calib = token ids, shape (n, seqlen)).")

    by_magnitude: list[str] = []

    def on_block(b: int, block_refs: list[LayerRef], stats: dict[str, InputStats]) -> bool:
        changed = False
        for ref in block_refs:
            if ref.name in todo:
                if prune_layer(ref, todo[ref.name], method, stats.get(ref.name), nm, rowwise) != method:
                    by_magnitude.append(ref.name)
                changed = True
        return changed

    done = walk_blocks(model, calib if pruner.statistic or rowwise else None, on_block,
                       hessian=gathers_gram(method, rowwise), device=device,
                       progress=progress, stop=stop, label=f"{method}{'+' + rowwise if rowwise else ''}: block")
    n_blocks = len(find_blocks(model)[1])
    achieved = {r.name: sparsity_of(r.weight()) for r in refs}
    total = sum(r.params for r in refs)
    overall = sum(achieved[r.name] * r.params for r in refs) / total if total else 0.0
    return PruneReport(method, nm, achieved, overall, time.perf_counter() - t0, dict(per_layer),
                       blocks_done=done, stopped=done < n_blocks, rowwise=rowwise, by_magnitude=by_magnitude)


def prune_warnings(report: PruneReport | dict) -> list[str]:
    """What a user should know about a finished prune (one line each)."""
    rep = report.to_dict() if hasattr(report, "to_dict") else dict(report or {})
    if not (names := rep.get("by_magnitude")):
        return []
    return [f"{len(names)} matrices saw no calibration token (MoE experts the router never chose, e.g. {names[0]}) "
            f"and were pruned by magnitude instead of {rep.get('method')}: calibrate on more text"]


@dataclass
class DenseSnapshot:
    """CPU copy of every prunable matrix, to undo pruning without reloading from disk."""

    weights: dict[str, torch.Tensor]

    @classmethod
    def take(cls, model: nn.Module) -> DenseSnapshot:
        """A CPU copy of every prunable weight of `model`, in its dtype, to restore later (`restore`)."""
        return cls({r.name: r.weight().detach().to("cpu", copy=True).contiguous() for r in prunable_layers(model)})

    @classmethod
    def view(cls, model: nn.Module) -> DenseSnapshot:
        """The prunable weights of `model` itself, not copied: a restore source only while that
        model is never changed (e.g. a shared read-only model that pruned copies were made from)."""
        return cls({r.name: r.weight().detach() for r in prunable_layers(model)})

    def restore(self, model: nn.Module) -> None:
        refs = prunable_layers(model)
        missing = [r.name for r in refs if r.name not in self.weights]
        if missing or len(refs) != len(self.weights):
            raise PruneError("This snapshot was taken from a different model.")
        with torch.no_grad():
            for r in refs:
                r.weight().copy_(self.weights[r.name])
