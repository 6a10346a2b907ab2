"""Power-law fits of the tail of an eigenvalue spectrum (ESD), vectorized over xmin candidates.

Model: the tail λ >= xmin follows p(λ) ∝ λ^(-alpha). For a given xmin the maximum-likelihood (Hill)
estimate over the n tail values is

    alpha = 1 + n / sum_i log(λ_i / xmin)

and the fit quality is the Kolmogorov–Smirnov distance between the empirical tail CDF, taken as
k/n for the k-th smallest tail value (k = 0..n-1), and the fitted CDF 1 - (λ/xmin)^(1-alpha)
(Clauset, Shalizi & Newman, "Power-law distributions in empirical data", 2009). A candidate with
alpha <= 1 is no valid power law and gets KS distance 1.

How xmin is chosen (`fit`, the name every front end uses: `analyze(fit=...)`, `--fit`):
  - "peak": HT-SR's guard against "fingers" (a few outlying top eigenvalues that give a huge alpha).
    Histogram log10 of the positive eigenvalues into 100 equal bins over their range; the peak is
    the left edge of the fullest bin. Candidates are the eigenvalues in [0.95·peak, 1.5·peak); the
    one with the smallest KS distance wins. This is the "xmin_peak" rule of weightwatcher
    (Martin & Mahoney) as used by AlphaPruning (Lu et al., NeurIPS 2024). Their code writes the
    lower end as log10(0.95·peak), which in practice removes it; we keep the stated 0.95·peak
    (on SmolLM2-135M the two agree within 0.05 for 97% of matrices).
  - "median": xmin is the median positive eigenvalue (AlphaPruning's "xmin_mid"); no search.
  - "scan": the smallest KS distance over all candidates whose tail keeps >= `min_tail` values
    (Clauset et al.). With min_tail=2 this is weightwatcher's default fit, to round-off. A spectrum of more
    than SCAN_MAX candidates (FARMS's pooled windows: 500K eigenvalues for Gemma-3's embedding) is scanned
    at SCAN_MAX evenly spaced ranks: the KS scan costs candidates x eigenvalues.

Eigenvalues at or below `positive_threshold(eigs)` count as zero (rank deficiency, round-off).
Degenerate input never raises: the result's `status` says what went wrong and alpha is NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from analysis.errors import AlphascopeError

XMIN_RULES = ("peak", "median", "scan")
MIN_POSITIVE = 5  # fewer positive eigenvalues than this: no meaningful tail fit
MIN_TAIL = 10  # "scan": smallest tail it may choose (tiny tails give huge, noisy alphas)
SCAN_MAX = 4096  # "scan": most candidates it tries (a 4096-wide matrix's ESD is scanned in full)
PEAK_BINS = 100
PEAK_WINDOW = (0.95, 1.5)  # xmin candidates for "peak", as multiples of the histogram peak
ABS_ZERO = 1e-5  # weightwatcher/AlphaPruning count eigenvalues <= 1e-5 as zero ...
REL_ZERO = 1e-7  # ... we also scale that with λmax so tiny-norm matrices still get a fit
_CHUNK = 1 << 22  # KS matrix elements per chunk (~32 MiB in float64)


@dataclass
class PowerLawFit:
    """alpha: fitted exponent (NaN unless status == "ok"); xmin: start of the tail (eigenvalue units);
    ks_distance: KS distance of the chosen fit, in [0, 1]; n_tail: eigenvalues >= xmin."""

    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int
    status: str = "ok"

    @classmethod
    def failed(cls, status: str) -> PowerLawFit:
        return cls(math.nan, math.nan, math.nan, 0, status)

    @property
    def alpha_stderr(self) -> float:
        """Standard error of alpha from the tail's size alone, (alpha - 1) / sqrt(n_tail) (the maximum-likelihood
        estimator's, Clauset, Shalizi & Newman 2009): a fit on a few eigenvalues is a noisy one. NaN if failed."""
        return (self.alpha - 1) / math.sqrt(self.n_tail) if self.status == "ok" and self.n_tail > 0 else math.nan


def positive_threshold(eigs: np.ndarray) -> float:
    """Eigenvalues at or below this are treated as zero: min(1e-5, 1e-7·λmax)."""
    lam_max = float(np.max(eigs)) if len(eigs) else 0.0
    return min(ABS_ZERO, REL_ZERO * lam_max)


def positive_eigs(eigs) -> np.ndarray:
    """Sorted (ascending) float64 eigenvalues above `positive_threshold`."""
    x = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    if len(x) == 0:
        return x
    return x[x > positive_threshold(x)]


def check_eigs(eigs) -> str:
    """"ok", or why no fit is possible: "empty", "non-finite", "all zero", "too few eigenvalues"."""
    x = np.asarray(eigs, dtype=np.float64).ravel()
    if len(x) == 0:
        return "empty"
    if not np.isfinite(x).all():
        return "non-finite"
    if np.max(x) <= 0:
        return "all zero"
    if len(positive_eigs(x)) < MIN_POSITIVE:
        return "too few eigenvalues"
    return "ok"


# ---------------------------------------------------------------------------------------------
# vectorized Hill estimate and KS distance for many xmin candidates


def hill_alphas(log_x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """MLE alpha for each candidate index in `cand`, tail = log_x[i:], from suffix sums (no loop).

    log_x: log of the ascending positive eigenvalues (float64). Returns inf where the tail sum is 0
    (all tail values equal xmin).
    """
    n = log_x.shape[0]
    suffix = torch.flip(torch.cumsum(torch.flip(log_x, [0]), 0), [0])  # suffix[i] = sum_{j>=i} log x_j
    n_tail = (n - cand).to(log_x.dtype)
    s = suffix[cand] - n_tail * log_x[cand]
    return torch.where(s > 0, 1 + n_tail / s.clamp_min(1e-300), torch.full_like(s, math.inf))


def ks_distances(log_x: torch.Tensor, cand: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """KS distance of each candidate's fit: max_k |1 - (x_{i+k}/x_i)^(1-alpha) - k/n_i| over its tail.

    Builds a (candidates x eigenvalues) matrix, in chunks of candidates to bound memory.
    """
    n = log_x.shape[0]
    j = torch.arange(n, device=log_x.device)
    out = torch.ones(len(cand), dtype=log_x.dtype, device=log_x.device)
    step = max(1, _CHUNK // max(n, 1))
    for s in range(0, len(cand), step):
        c, a = cand[s:s + step], alphas[s:s + step]
        k = (j[None, :] - c[:, None]).to(log_x.dtype)  # position inside the tail
        n_tail = (n - c).to(log_x.dtype)[:, None]
        diff = log_x[None, :] - log_x[c][:, None]  # log(x_j / xmin)
        fitted = 1 - torch.exp((1 - a[:, None]) * diff)
        gap = torch.where(k >= 0, (fitted - k / n_tail).abs(), torch.zeros_like(diff))
        d = gap.max(dim=1).values
        valid = (a > 1) & torch.isfinite(a)
        out[s:s + step] = torch.where(valid, d, torch.ones_like(d))
    return out


# ---------------------------------------------------------------------------------------------
# xmin rules


def histogram_peak(x: np.ndarray, bins: int = PEAK_BINS) -> float:
    """Left edge (eigenvalue units) of the fullest of `bins` equal bins over log10 of x (x > 0)."""
    counts, edges = np.histogram(np.log10(x), bins=bins)
    return float(10 ** edges[int(np.argmax(counts))])


def peak_candidates(x: np.ndarray) -> np.ndarray:
    """Indices of the "peak" rule's xmin candidates (never the largest eigenvalue)."""
    peak = histogram_peak(x)
    lo, hi = PEAK_WINDOW[0] * peak, PEAK_WINDOW[1] * peak
    idx = np.nonzero((x >= lo) & (x < hi))[0]
    idx = idx[idx < len(x) - 1]
    return idx if len(idx) else np.array([int(np.searchsorted(x, peak).clip(0, len(x) - 2))])


def scan_candidates(x: np.ndarray, min_tail: int = MIN_TAIL) -> np.ndarray:
    """Every eigenvalue that leaves at least `min_tail` values in the tail (at least 2); SCAN_MAX evenly
    spaced ones of a longer spectrum."""
    last = len(x) - max(2, min(min_tail, len(x) // 2))
    if last + 1 <= SCAN_MAX:
        return np.arange(0, last + 1)
    return np.unique(np.linspace(0, last, SCAN_MAX).round().astype(np.int64))


def best_of(x: np.ndarray, cand: np.ndarray, device=None) -> PowerLawFit:
    """Fit every candidate xmin at once and keep the smallest KS distance (first one on ties)."""
    log_x = torch.as_tensor(np.log(x), dtype=torch.float64, device=device)
    c = torch.as_tensor(cand, dtype=torch.long, device=device)
    alphas = hill_alphas(log_x, c)
    ds = ks_distances(log_x, c, alphas)
    i = int(torch.argmin(ds))
    alpha, d = float(alphas[i]), float(ds[i])
    if not math.isfinite(alpha) or alpha <= 1:
        return PowerLawFit(math.nan, float(x[cand[i]]), math.nan, len(x) - int(cand[i]), "fit failed")
    return PowerLawFit(alpha, float(x[cand[i]]), d, len(x) - int(cand[i]))


class FitError(AlphascopeError, ValueError):
    """An unknown fit rule or a bad min_tail."""


def check_fit(fit: str, min_tail: int = MIN_TAIL) -> None:
    """FitError unless `fit` is one of XMIN_RULES and `min_tail` an integer >= 2, given (not MIN_TAIL) only to the
    scan rule, the one that reads it."""
    if fit not in XMIN_RULES:
        raise FitError(f"Unknown fit '{fit}'; choose one of {', '.join(XMIN_RULES)}.")
    if isinstance(min_tail, bool) or not isinstance(min_tail, int) or min_tail < 2:
        raise FitError(f"min_tail must be an integer >= 2 (a tail of fewer eigenvalues has no slope), got {min_tail!r}")
    if fit != "scan" and min_tail != MIN_TAIL:
        raise FitError(f"min_tail is read by the scan fit only, and the fit is {fit}: leave it at {MIN_TAIL}")


def fit_power_law(eigs, fit: str = "peak", min_tail: int = MIN_TAIL, device=None) -> PowerLawFit:
    """Fit a power law to the tail of an eigenvalue spectrum.

    eigs: eigenvalues (any order; zeros and round-off below `positive_threshold` are dropped).
    fit: the xmin rule, "peak" | "median" | "scan" (see the module docstring).
    min_tail: smallest tail the "scan" rule may pick.
    Never raises on degenerate spectra: returns NaN alpha with a status such as "all zero".
    """
    check_fit(fit, min_tail)
    status = check_eigs(eigs)
    if status != "ok":
        return PowerLawFit.failed(status)
    x = positive_eigs(eigs)
    if fit == "median":
        cand = np.array([len(x) // 2])
    elif fit == "peak":
        cand = peak_candidates(x)
    else:
        cand = scan_candidates(x, min_tail)
    return best_of(x, cand, device)
