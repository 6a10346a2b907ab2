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

A ratio may also be a tensor of one ratio per output row (row-wise allocation, e.g. TRIM below);
each row then loses round(ratio_r * in) weights.

TRIM (Beck et al., 2025, "TRIM: Achieving Extreme Sparsity with Targeted Row-wise Iterative
Metric-driven Pruning"): row sparsities start at the matrix's ratio and are moved for a few
iterations by the per-row cosine similarity between the dense and the pruned outputs on the
calibration tokens (rows that keep their output well are pruned more), clipped to [0, MAX] and
re-centred so the matrix keeps its ratio; the iterate with the smallest relative output error is
kept (the plain per-row pruning is iterate 0, so TRIM never reconstructs worse on the calibration
tokens). Both measures need only the Gram matrix G = XᵀX of the layer's inputs:
<Y_r, Y'_r> = w_r G w'_rᵀ, so no activations are kept.

N:M (e.g. 2:4, 4:8): in every group of M consecutive input weights of a row, the M-N lowest-scoring
are removed, so the sparsity is (M-N)/M whatever ratio was asked for.

`PRUNERS` maps each method name to a `Pruner`: the keys are the method list every front end shows.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from analysis.errors import AlphascopeError


class PruneError(AlphascopeError, ValueError):
    """A pruning request that cannot be carried out as given (a pattern, ratio or method); the message says why."""


NM = tuple[int, int]


def parse_nm(nm) -> NM | None:
    """None, "", "2:4" or (2, 4) -> (n, m) with 0 < n < m; None means unstructured."""
    if nm is None or nm == "":
        return None
    if isinstance(nm, str):
        try:
            n, m = (int(x) for x in nm.split(":"))
        except ValueError as e:
            raise PruneError(f"N:M must look like '2:4', got '{nm}'") from e
    else:
        n, m = (int(x) for x in nm)
    if not 0 < n < m:
        raise PruneError(f"N:M needs 0 < N < M, got {n}:{m}")
    return n, m


def nm_sparsity(nm: NM) -> float:
    """The share of a matrix an N:M pattern prunes: (M-N)/M (2:4 -> 0.5)."""
    return (nm[1] - nm[0]) / nm[1]


def check_nm_ratios(ratios: dict[str, float], nm: NM) -> None:
    """PruneError unless every ratio is the pattern's (M-N)/M or 0 (a matrix kept dense): an N:M mask
    removes exactly that share, whatever ratio is asked for."""
    want = nm_sparsity(nm)
    odd = [k for k, v in ratios.items() if float(v) > 0 and not math.isclose(float(v), want)]
    if odd:
        raise PruneError(f"an N:M pattern {nm[0]}:{nm[1]} prunes a matrix to {want:g} (or 0 to keep it dense); "
                         f"{len(odd)} ratio(s) differ, e.g. '{odd[0]}' asks {float(ratios[odd[0]]):g}")


# --------------------------------------------------------------------------------------------
# masks (True = remove)


Ratio = float | torch.Tensor  # one ratio for the whole matrix, or one per output row (shape (rows,))


def row_prune_count(ratio: Ratio, cols: int):
    """Weights removed per row: round(ratio * cols), halves rounded up (an int, or a long tensor of
    one count per row when `ratio` is a per-row tensor)."""
    if isinstance(ratio, torch.Tensor):
        return torch.floor(ratio.double() * cols + 0.5).long()
    return int(math.floor(ratio * cols + 0.5))


def unstructured_mask(scores: torch.Tensor, ratio: Ratio) -> torch.Tensor:
    """Remove the round(ratio * cols) lowest scores of every row (ratio: a float or one per row)."""
    return lowest_k_mask(scores, row_prune_count(ratio, scores.shape[1]))


def lowest_k_mask(scores: torch.Tensor, k) -> torch.Tensor:
    """Remove the k lowest scores along the last dimension; k: an int, or a long tensor of one count
    per row (shape scores.shape[:-1]).

    Equal scores go to the lower index first (as a stable sort orders them, unlike topk), so CPU and
    GPU remove the same weights: dequantized 4-bit checkpoints have many exactly equal magnitudes.
    NaN scores rank above all others, as in a sort."""
    if isinstance(k, torch.Tensor):  # per-row counts: remove the entries whose rank is below k
        mask = torch.zeros_like(scores, dtype=torch.bool)
        order = torch.sort(scores, dim=-1, stable=True).indices
        ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
        return mask.scatter_(-1, order, ranks < k.to(scores.device).unsqueeze(-1))
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    # a selection, not a sort (half the time): everything below the k-th lowest score goes, and of the
    # scores equal to it, the lowest indices until k are gone
    kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    nan, nan_kth = scores.isnan(), kth.isnan()
    below = (scores < kth) | (nan_kth & ~nan)
    tied = (scores == kth) | (nan_kth & nan)
    return below | (tied & (tied.cumsum(-1) <= k - below.sum(-1, keepdim=True)))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the m-n lowest scores in every group of m consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise PruneError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={m}")
    return lowest_k_mask(scores.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


def select_mask(scores: torch.Tensor, ratio: Ratio, nm: NM | None) -> torch.Tensor:
    return nm_mask(scores, *nm) if nm else unstructured_mask(scores, ratio)


# --------------------------------------------------------------------------------------------
# pruners on one (out, in) float matrix; they return the pruned matrix


def magnitude_mask(w: torch.Tensor, ratio: Ratio, nm: NM | None = None) -> torch.Tensor:
    return select_mask(w.abs(), ratio, nm)


def prune_magnitude(w: torch.Tensor, ratio: Ratio, nm: NM | None = None) -> torch.Tensor:
    return w.masked_fill(magnitude_mask(w, ratio, nm), 0.0)


def wanda_scores(w: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (col_norms: L2 norm of each input feature over the calibration tokens)."""
    return w.abs() * col_norms.reshape(1, -1).to(w)


def wanda_mask(w: torch.Tensor, col_norms: torch.Tensor, ratio: Ratio, nm: NM | None = None) -> torch.Tensor:
    return select_mask(wanda_scores(w, col_norms), ratio, nm)


def prune_wanda(w: torch.Tensor, col_norms: torch.Tensor, ratio: Ratio,
                nm: NM | None = None) -> torch.Tensor:
    return w.masked_fill(wanda_mask(w, col_norms, ratio, nm), 0.0)


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


def _block_prune_counts(ratio: Ratio, cols: int, blocksize: int) -> list:
    """Per-row removals for each column block; they add up to round(ratio * cols) exactly (ints, or
    per-row count tensors for per-row ratios)."""
    edges = list(range(0, cols, blocksize)) + [cols]
    cum = [row_prune_count(ratio, e) for e in edges]
    return [b - a for a, b in zip(cum[:-1], cum[1:])]


SPARSEGPT_BLOCK = 128  # input columns SparseGPT prunes and updates at a time; an N:M group must not straddle two


def prune_sparsegpt(w: torch.Tensor, hessian: torch.Tensor, ratio: Ratio, nm: NM | None = None,
                    blocksize: int = SPARSEGPT_BLOCK, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT on one matrix (out, in) with the input Hessian (in, in); returns the pruned matrix.

    Works on the transpose (in, out) so that each input column is a contiguous row (fast updates)."""
    rows, cols = w.shape
    if nm and blocksize % nm[1]:
        raise PruneError(f"blocksize {blocksize} must be a multiple of M={nm[1]}")
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
# TRIM: row-wise ratios refined from the layer's output reconstruction

ROWWISE = ("trim",)  # row-wise refinements on top of any allocation (None: every row gets the matrix's ratio)


def check_rowwise(rowwise: str | None, nm) -> None:
    """ValueError unless `rowwise` is None or one of ROWWISE, and is not combined with N:M."""
    if rowwise is None:
        return
    if rowwise not in ROWWISE:
        raise PruneError(f"rowwise must be one of {', '.join(ROWWISE)} or none, got {rowwise!r}")
    if parse_nm(nm):
        raise PruneError("row-wise sparsity does not apply to N:M patterns (every row is (M-N)/M sparse)")


def output_quality(w: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-row cosine similarity between dense and pruned outputs (Y = X Wᵀ) over the tokens whose
    Gram matrix is `gram` (in, in), and the relative output error ||Y - Y'||² / ||Y||²."""
    g = gram.float()
    w, pruned = w.float(), pruned.float()
    wg, pg = w @ g, pruned @ g
    dense_sq = (wg * w).sum(1)
    pruned_sq = (pg * pruned).sum(1)
    cross = (wg * pruned).sum(1)
    cos = cross / (dense_sq * pruned_sq).clamp_min(1e-30).sqrt()
    err = (dense_sq - 2 * cross + pruned_sq).sum() / dense_sq.sum().clamp_min(1e-30)
    return cos, float(err)


def recentre_counts(ratios: torch.Tensor, ratio: float, cols: int, max_ratio: float) -> torch.Tensor:
    """Per-row removal counts near ratios * cols, each in [0, floor(max_ratio * cols)], adding up
    to rows * round(ratio * cols): the matrix's sparsity is exactly the uniform rows' sparsity."""
    rows = ratios.numel()
    total = rows * row_prune_count(ratio, cols)
    hi = int(math.floor(max_ratio * cols))
    r = ratios.double()
    for _ in range(50):  # clip, then shift the mean back; converges in a few rounds
        r = r.clamp(0.0, hi / cols)
        gap = total / cols - float(r.sum())
        if abs(gap) < 1e-9:
            break
        r = r + gap / rows
    exact = (r * cols).clamp(0, hi)
    counts = exact.floor().long()
    short = total - int(counts.sum())  # largest remainders get the missing weights
    if short > 0:
        room = counts < hi
        frac = torch.where(room, exact - counts, torch.full_like(exact, -1.0))
        counts[torch.sort(frac, descending=True, stable=True).indices[:short]] += 1
    elif short < 0:
        frac = torch.where(counts > 0, exact - counts, torch.full_like(exact, 2.0))
        counts[torch.sort(frac, stable=True).indices[:-short]] -= 1
    return counts


def prune_trim(w: torch.Tensor, ratio: float, prune_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               gram: torch.Tensor, iterations: int = 4, step: float = 0.05,
               max_ratio: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """TRIM on one (out, in) matrix: `prune_rows(w, row_ratios)` is the pruner with per-row ratios,
    `gram` = XᵀX of the layer's calibration inputs. Each iteration moves every row's ratio by
    step * (cos_r - mean cos) / max|cos - mean cos| (a row whose output is kept best gains up to
    `step` sparsity); returns (pruned matrix, row ratios) of the iterate with the smallest relative
    output error."""
    rows, cols = w.shape
    ratios = recentre_counts(torch.full((rows,), float(ratio)), ratio, cols, max_ratio).double() / cols
    best = prune_rows(w, ratios)
    cos, best_err = output_quality(w, best, gram)
    best_ratios = ratios
    for _ in range(iterations):
        d = (cos - cos.mean()).double().cpu()
        spread = float(d.abs().max())
        if spread <= 0 or not math.isfinite(spread):
            break
        ratios = recentre_counts(ratios + step * d / spread, ratio, cols, max_ratio).double() / cols
        pruned = prune_rows(w, ratios)
        cos, err = output_quality(w, pruned, gram)
        if err < best_err:
            best, best_err, best_ratios = pruned, err, ratios
    return best, best_ratios


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Pruner:
    """A pruning method. `statistic` names the calibration statistic it needs: None (weights only),
    "col_norms" (||X_j||_2 per input column) or "hessian" (2/T XᵀX); `apply(w, ratio, nm, stat)`
    returns the pruned matrix (ratio: a float, or a per-row tensor when nm is None); `summary` is one
    line for menus and help texts; `mask(w, ratio, nm, stat)`, for a pruner that only removes weights,
    the entries `apply` zeroes (None for one that updates the weights it keeps)."""

    name: str
    statistic: str | None
    apply: Callable[[torch.Tensor, float, NM | None, torch.Tensor | None], torch.Tensor]
    summary: str
    mask: Callable[[torch.Tensor, float, NM | None, torch.Tensor | None], torch.Tensor] | None = None


PRUNERS: dict[str, Pruner] = {p.name: p for p in (
    Pruner("wanda", "col_norms", lambda w, r, nm, stat: prune_wanda(w, stat, r, nm),
           "|W|·‖X‖ per output row (Sun et al. 2023)", lambda w, r, nm, stat: wanda_mask(w, stat, r, nm)),
    Pruner("magnitude", None, lambda w, r, nm, stat: prune_magnitude(w, r, nm),
           "|W| per output row, no calibration data", lambda w, r, nm, stat: magnitude_mask(w, r, nm)),
    Pruner("sparsegpt", "hessian", lambda w, r, nm, stat: prune_sparsegpt(w, stat, r, nm),
           "second-order reconstruction (Frantar & Alistarh 2023)"),
)}


def get_pruner(method: str) -> Pruner:
    """The registered pruner named `method`; ValueError listing the choices otherwise."""
    if method not in PRUNERS:
        raise PruneError(f"Unknown pruning method '{method}'; choose one of {', '.join(PRUNERS)}.")
    return PRUNERS[method]
