"""Synthetic random matrices for the Learn page (numpy only, no streamlit).

Each generator returns an (n x m) float64 matrix with n >= m (rows = the long side, so the
normalized ESD of (1/n) WᵀW is comparable with the Marchenko–Pastur law of aspect ratio Q = n/m).

- gaussian: i.i.d. N(0, 1) entries. Its ESD fills the Marchenko–Pastur bulk
  [(1 - 1/√Q)², (1 + 1/√Q)²] and has no power-law tail: an alpha fitted to the bulk's edge means little
  (3–5 with the peak rule, 8–10 with scan, at N = 600 and Q = 2–8).
- heavy_tailed: i.i.d. symmetric entries with tail index mu, P(|x| > t) ~ t^-mu (Student-t with mu
  degrees of freedom, or a Pareto magnitude with a random sign). The smaller mu, the heavier the ESD
  tail and the smaller the fitted alpha (Martin & Mahoney, "Implicit self-regularization in deep
  neural networks", JMLR 2021, relate the two).
- spiked: Gaussian noise plus `rank` orthogonal rank-one signals of a given strength: eigenvalues
  separate from the bulk once the strength passes the BBP threshold Q^(-1/4) (Baik, Ben Arous &
  Péché, 2005), like the few large eigenvalues of trained layers.
"""
from __future__ import annotations

import numpy as np

KINDS = ("gaussian", "heavy_tailed", "spiked")


def shape_for(n: int, aspect: float) -> tuple[int, int]:
    """(rows, cols) with rows = n and cols = n / aspect (at least 2)."""
    if n < 2 or aspect < 1:
        raise ValueError(f"need n >= 2 and aspect ratio >= 1, got n={n}, aspect={aspect}")
    return int(n), max(2, int(round(n / aspect)))


def gaussian(n: int, aspect: float = 1.0, seed: int = 0) -> np.ndarray:
    rows, cols = shape_for(n, aspect)
    return np.random.default_rng(seed).standard_normal((rows, cols))


def heavy_tailed(n: int, aspect: float = 1.0, mu: float = 2.0, family: str = "student_t", seed: int = 0) -> np.ndarray:
    """Entries with tail index `mu` > 0 (family "student_t" or "pareto")."""
    if mu <= 0:
        raise ValueError(f"tail index mu must be > 0, got {mu}")
    rows, cols = shape_for(n, aspect)
    rng = np.random.default_rng(seed)
    if family == "student_t":
        return rng.standard_t(mu, size=(rows, cols))
    if family == "pareto":
        return rng.choice([-1.0, 1.0], size=(rows, cols)) * (rng.pareto(mu, size=(rows, cols)) + 1.0)
    raise ValueError(f"unknown family {family!r}; use 'student_t' or 'pareto'")


def spiked(n: int, aspect: float = 1.0, strength: float = 2.0, rank: int = 1, seed: int = 0) -> np.ndarray:
    """N(0, 1) noise + sqrt(n) * strength * sum_k u_k v_kᵀ with orthonormal u_k, v_k.

    With this scaling, (1/n)WᵀW gains eigenvalues near (1 + s²)(Q^-1 + s²)/s² (s = strength) once
    s exceeds Q^(-1/4); below that the spikes stay hidden in the bulk.
    """
    rows, cols = shape_for(n, aspect)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((rows, cols))
    k = max(1, min(int(rank), cols))
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return noise + np.sqrt(rows) * float(strength) * (u @ v.T)


def make(kind: str, n: int, aspect: float = 1.0, seed: int = 0, **kw) -> np.ndarray:
    if kind == "gaussian":
        return gaussian(n, aspect, seed)
    if kind == "heavy_tailed":
        return heavy_tailed(n, aspect, kw.get("mu", 2.0), kw.get("family", "student_t"), seed)
    if kind == "spiked":
        return spiked(n, aspect, kw.get("strength", 2.0), kw.get("rank", 1), seed)
    raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
