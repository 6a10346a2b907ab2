"""OWL's layerwise outlier ratios (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity (OWL): A
Missing Secret Sauce for Pruning LLMs to High Sparsity"), measured with the calibration walker."""
from __future__ import annotations

import torch
from torch import nn

from analysis.allocation import AllocationError
from analysis.calibration import InputStats, walk_blocks
from analysis.layers import LayerRef
from analysis.pruners import wanda_scores
from analysis.runtime import ProgressFn


def collect_outlier_ratios(model: nn.Module, calib: torch.Tensor, owl_threshold: float = 5.0,
                           progress: ProgressFn | None = None,
                           device: str | torch.device | None = None) -> dict[int, float]:
    """Layerwise outlier ratio of OWL (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity").

    For every prunable matrix, A = |W_ij| * ||X_j||_2 (the Wanda score, on the dense model); an entry
    is an outlier when A_ij > owl_threshold * mean(A) (the paper's M). A block's ratio is the fraction (in [0, 1], not
    percent) of outlier entries over all its matrices (so matrices weigh by their parameter count),
    but for matrices that saw no calibration token (MoE experts the router never chose): they have no
    scores, and counting them as free of outliers would dilute their block's ratio.
    """
    if owl_threshold <= 0:
        raise AllocationError(f"owl_threshold must be > 0, got {owl_threshold}")
    ratios: dict[int, float] = {}

    def on_block(b: int, refs: list[LayerRef], stats: dict[str, InputStats]) -> bool:
        count, total = 0, 0
        for ref in refs:
            if stats[ref.name].tokens == 0:
                continue
            a = wanda_scores(ref.weight().detach().float(), stats[ref.name].col_norms())
            count += int((a > owl_threshold * a.mean()).sum())
            total += a.numel()
        ratios[b] = count / total if total else 0.0
        return False

    walk_blocks(model, calib, on_block, hessian=False, device=device, progress=progress, label="outliers: block")
    return ratios
