"""Pruners: pure tensor functions that zero weights of one (out, in) matrix, and their registry.

  - magnitude: score |W_ij|.
  - wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"): score
    |W_ij| * ||X_j||_2, where ||X_j|| is the L2 norm of input feature j over all calibration tokens.
  - sparsegpt (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot"): Hessian H = 2/T * sum_t x_t x_t^T of the layer's inputs, 1% dampening
    (of the mean diagonal), upper Cholesky factor of H^-1, columns processed in blocks of 128; in each
    block the mask is chosen adaptively from the current (already compensated) weights by
    w^2 / [H^-1]_jj^2, and each pruned column's error is spread onto the columns not yet processed
    (optimal brain surgeon update).

Selection is per output row for all three: each row of an (out, in) matrix loses exactly
k = round(ratio * in) weights (Wanda compares within rows by design; for magnitude it is a choice, so
no row loses far more than the others; SparseGPT spreads a row's k over its column blocks by
cumulative rounding, k_b = round(ratio * end_b) - round(ratio * start_b)). So every matrix's achieved
sparsity equals its requested ratio to within half a weight per row.

N:M (e.g. 2:4, 4:8): in every group of M consecutive input weights of a row, the M-N lowest-scoring
are removed, so the sparsity is (M-N)/M whatever ratio was asked for.

`PRUNERS` maps each method name to a `Pruner`: the keys are the method list every front end shows.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

NM = tuple[int, int]


def parse_nm(nm) -> NM | None:
    """None, "", "2:4" or (2, 4) -> (n, m) with 0 < n < m; None means unstructured."""
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


def select_mask(scores: torch.Tensor, ratio: float, nm: NM | None) -> torch.Tensor:
    return nm_mask(scores, *nm) if nm else unstructured_mask(scores, ratio)


# --------------------------------------------------------------------------------------------
# pruners on one (out, in) float matrix; they return the pruned matrix


def prune_magnitude(w: torch.Tensor, ratio: float, nm: NM | None = None) -> torch.Tensor:
    return w.masked_fill(select_mask(w.abs(), ratio, nm), 0.0)


def wanda_scores(w: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (col_norms: L2 norm of each input feature over the calibration tokens)."""
    return w.abs() * col_norms.reshape(1, -1).to(w)


def prune_wanda(w: torch.Tensor, col_norms: torch.Tensor, ratio: float,
                nm: NM | None = None) -> torch.Tensor:
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


def prune_sparsegpt(w: torch.Tensor, hessian: torch.Tensor, ratio: float, nm: NM | None = None,
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
# registry


@dataclass(frozen=True)
class Pruner:
    """A pruning method. `statistic` names the calibration statistic it needs: None (weights only),
    "col_norms" (||X_j||_2 per input column) or "hessian" (2/T XᵀX); `apply(w, ratio, nm, stat)`
    returns the pruned matrix; `summary` is one line for menus and help texts."""

    name: str
    statistic: str | None
    apply: Callable[[torch.Tensor, float, NM | None, torch.Tensor | None], torch.Tensor]
    summary: str


PRUNERS: dict[str, Pruner] = {p.name: p for p in (
    Pruner("wanda", "col_norms", lambda w, r, nm, stat: prune_wanda(w, stat, r, nm),
           "|W|·‖X‖ per output row (Sun et al. 2023)"),
    Pruner("magnitude", None, lambda w, r, nm, stat: prune_magnitude(w, r, nm),
           "|W| per output row, no calibration data"),
    Pruner("sparsegpt", "hessian", lambda w, r, nm, stat: prune_sparsegpt(w, stat, r, nm),
           "second-order reconstruction (Frantar & Alistarh 2023)"),
)}


def get_pruner(method: str) -> Pruner:
    """The registered pruner named `method`; ValueError listing the choices otherwise."""
    if method not in PRUNERS:
        raise ValueError(f"Unknown pruning method '{method}'; choose one of {', '.join(PRUNERS)}.")
    return PRUNERS[method]
