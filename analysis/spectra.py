"""Eigenvalue spectra (ESDs) of weight matrices and their heavy-tail metrics.

Convention (as in weightwatcher and AlphaPruning): the ESD of a matrix W (rows x cols) is the set of
eigenvalues of WᵀW, i.e. the min(rows, cols) squared singular values of W, unnormalized unless
`normalize=True` (then divided by N = max(rows, cols), the long side, as weightwatcher does and as
the Marchenko–Pastur law's (1/N)·WᵀW assumes). The zero eigenvalues
WᵀW has beyond min(rows, cols) are not listed.

How: each matrix is oriented so the short side comes first (W or Wᵀ) and its Gram matrix
(short x short) is diagonalized. On a GPU, `torch.linalg.eigvalsh` (cuSOLVER) on batches of equal
shape; on a CPU, NumPy's `eigvalsh` one matrix per task over single-threaded worker threads, largest
first (NumPy's LAPACK was the faster of the two on CPU and releases the GIL; a multi-threaded LAPACK
inside one small eigensolve spin-waits for its siblings on a busy machine). The power-law fits are
spread over the same workers. The previous thread settings are restored afterwards.

Precision (`GRAM_DTYPE`) is float64: a float32 Gram's absolute error (~1e-7·λmax) wrecks the smallest
eigenvalues, which moves the log-histogram peak the default "peak" fit starts from and changes alphas
by up to 1.5 on the default model. In float64 the eigenvalues match the squared singular values of
W in float64 (relative 3e-6, the tail 1e-14). Measurements: bench/results/spectra_*.json.

Streamed (`analyze_checkpoint`): the same ESDs and fits read from a safetensors checkpoint folder
matrix by matrix, the float64 Gram accumulated from slices in the stored dtype (bf16/fp32 values
are exact in float64), so the model never sits in memory; results are cached on disk by the
checkpoint's fingerprint. Measurements: bench/results/scale_*.json.

Heavy-Tailed Self-Regularization (HT-SR) metrics after Martin & Mahoney (JMLR 2021); layerwise
alpha for pruning after AlphaPruning (Lu et al., NeurIPS 2024); FARMS (Fixed-Aspect-Ratio Matrix
Subsampling) after "Eigenspectrum analysis of neural networks without aspect ratio bias" (Hu et al., 2025).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from threadpoolctl import ThreadpoolController
from torch import nn
from transformers import AutoConfig

from analysis.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from analysis.errors import and_more
from analysis.export import stored_compressed
from analysis.layers import LayerRef, NoBlocksError, blocks_beyond, find_blocks, find_layers, skeleton
from analysis.loading import CONFIG_FIX, checkpoint_path, pick_device
from analysis.powerlaw import MIN_TAIL, XMIN_RULES, PowerLawFit, check_eigs, check_fit, fit_power_law
from analysis.runtime import ProgressFn, cache_dir

GRAM_DTYPE = torch.float64
BATCH_ELEMENTS = 1 << 25  # matrix elements per batched Gram product (~256 MiB in float64)

COLUMNS = [
    "name", "block", "kind", "group", "rows", "cols", "params", "prunable", "alpha", "xmin",
    "ks_distance", "n_tail", "lambda_max", "alpha_hat", "stable_rank", "log_norm", "spectral_entropy",
    "status",
]


@dataclass
class SpectraResult:
    """metrics: one row per matrix (columns `COLUMNS`); esds: name -> ascending eigenvalues (float64,
    for FARMS the pooled eigenvalues of all windows); fit / farms / normalize / min_tail: the settings used
    (min_tail: the scan fit's). `table()`: the metrics with how far to trust each α, and the settings."""

    metrics: pd.DataFrame
    esds: dict[str, np.ndarray] = field(repr=False)
    fit: str = "peak"
    farms: bool = False
    normalize: bool = False
    device: str = "cpu"
    cached: bool = False  # read from the disk cache of streamed spectra (analyze_checkpoint), not computed
    min_tail: int = MIN_TAIL

    def __post_init__(self):
        self.metrics.attrs["farms"] = self.farms  # allocate checks that farms/alphapruning get their own kind
        self.metrics.attrs["fit"] = self.fit  # and records the xmin rule the alphas were fitted with

    def mp_ratio(self, rows: int, cols: int) -> float:
        """The aspect ratio of the random matrix a (rows, cols) matrix's spectrum is compared with: its own
        (long / short side), or 1 for FARMS, whose windows are square."""
        return 1.0 if self.farms else max(rows, cols) / min(rows, cols)

    def table(self) -> pd.DataFrame:
        """`metrics` plus, per matrix, `beyond_mp` (its eigenvalues beyond the Marchenko–Pastur edge,
        `beyond_mp_edge`: only where there are some does α read a learned tail) and `alpha_stderr` (the Hill
        estimate's standard error, (α − 1)/√n_tail: a tail of a few eigenvalues gives a large one), and the
        settings that produced them (fit, min_tail, farms, normalize): what the CLI and the Spectra page write."""
        ok = self.metrics["status"] == "ok"
        beyond = [beyond_mp_edge(self.esds[r.name], self.mp_ratio(r.rows, r.cols)) if fitted else pd.NA
                  for r, fitted in zip(self.metrics.itertuples(), ok)]
        stderr = ((self.metrics["alpha"] - 1) / np.sqrt(self.metrics["n_tail"].where(ok))).where(ok)
        return self.metrics.assign(beyond_mp=pd.array(beyond, dtype="Int64"), alpha_stderr=stderr, fit=self.fit,
                                   min_tail=self.min_tail, farms=self.farms, normalize=self.normalize)

    def save_esds(self, file) -> None:
        """Every matrix's eigenvalues (`esds`) as one NumPy .npz, an array per matrix name; `file`: a path or a
        binary file object (what the CLI's --esds and the Spectra page's download write)."""
        np.savez_compressed(file, **self.esds)


# ---------------------------------------------------------------------------------------------
# eigenvalues


def short_side_first(w: torch.Tensor) -> torch.Tensor:
    """W or Wᵀ, whichever has no more rows than columns (its Gram W Wᵀ is the small one)."""
    return w if w.shape[-2] <= w.shape[-1] else w.transpose(-2, -1)


def batched_eigs(ws: torch.Tensor) -> np.ndarray:
    """Ascending eigenvalues of W Wᵀ for a batch (B, m, n) with m <= n, in `GRAM_DTYPE`, as NumPy.

    CPU tensors go through NumPy (see the module docstring), others through torch on their device."""
    if ws.device.type == "cpu":
        a = ws.detach().to(GRAM_DTYPE).numpy()
        gram = np.stack([x @ x.T for x in a])  # x @ x.T: NumPy uses the symmetric rank-k update
        ev = np.linalg.eigvalsh(gram)
    else:
        w64 = ws.detach().to(GRAM_DTYPE)
        ev = torch.linalg.eigvalsh(w64 @ w64.transpose(-2, -1)).cpu().numpy()
    return np.clip(ev, 0, None)  # round-off can make zero eigenvalues negative


def _on_fresh_thread(fn):
    """Call fn() on a new thread and return its result. OpenBLAS (NumPy 2.4's, 0.3.31) ignored a
    thread-count change made from a thread that had run BLAS calls itself, so the BLAS limit is set
    and restored from a thread that never has."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


class _SingleThreaded:
    """Reference-counted single-threading of torch and NumPy's BLAS: the first `analyze` on CPU saves
    the settings, the last one to finish restores them, so concurrent analyses (app threads) never
    leave them at 1."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.saved = 1
        self.blas = None  # threadpoolctl's handle on the BLAS limit, restored by the last user

    def enter(self) -> int:
        with self.lock:
            if self.users == 0:
                # before torch goes to 1 thread, and undone before torch is restored: threadpoolctl's
                # restore also resets OpenMP (torch's threads) to what it saw when limiting
                self.blas = _on_fresh_thread(lambda: ThreadpoolController().limit(limits=1, user_api="blas"))
                self.saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self.users += 1
            return self.saved

    def exit(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                _on_fresh_thread(self.blas.restore_original_limits)
                torch.set_num_threads(self.saved)


_SINGLE_THREADED = _SingleThreaded()


@contextmanager
def cpu_workers(device: torch.device):
    """Yield how many single-threaded workers to use: on CPU torch's thread count, with torch set
    to 1 thread meanwhile (restored on exit); elsewhere 1 (the GPU parallelizes a batch itself)."""
    if device.type != "cpu":
        yield 1
        return
    n = _SINGLE_THREADED.enter()
    try:
        yield n
    finally:
        _SINGLE_THREADED.exit()


def _non_finite(w: torch.Tensor) -> np.ndarray:
    return np.full(min(w.shape), math.nan)


def esd(w: torch.Tensor, normalize: bool = False) -> np.ndarray:
    """Eigenvalues of WᵀW (the squared singular values of W), ascending, float64.

    w: a 2-D tensor (rows x cols), on any device. normalize: divide by N = max(rows, cols).
    Non-finite weights give an array of NaNs (callers check `np.isfinite`).
    """
    if w.dim() != 2:
        raise ValueError(f"esd expects a 2-D matrix, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        return _non_finite(w)
    with torch.no_grad():
        ev = batched_eigs(short_side_first(w.detach())[None])[0]
    return ev / max(w.shape) if normalize else ev


def farms_windows(w: torch.Tensor) -> torch.Tensor:
    """FARMS submatrices of W: square m x m windows, m = min(rows, cols), sliding along the long
    side with stride m/2 (the last window is flush with the end). Returns (k, m, m); a square W
    gives itself."""
    w = short_side_first(w)
    m, n = w.shape
    stride = max(1, m // 2)
    starts = list(range(0, n - m + 1, stride))
    if starts[-1] != n - m:
        starts.append(n - m)
    return torch.stack([w[:, s:s + m] for s in starts])


def farms_esd(w: torch.Tensor, normalize: bool = False) -> np.ndarray:
    """Pooled (concatenated, sorted) eigenvalues of all FARMS windows of W: the average of the
    windows' empirical spectral distributions. normalize divides by the window's side m.
    Non-finite weights give an array of NaNs."""
    if not torch.isfinite(w).all():
        return _non_finite(w)
    with torch.no_grad():
        win = farms_windows(w.detach())
        ev = np.sort(batched_eigs(win).ravel())
    return ev / win.shape[-1] if normalize else ev


def farms_spectrum(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(`farms_esd`, `esd`) of W, unnormalized: FARMS fits the pooled windows' spectrum, and the norm
    metrics (lambda_max, stable rank, log norm, entropy) are the whole matrix's, as without FARMS (the
    windows overlap, so the pooled spectrum counts most entries twice)."""
    if w.shape[0] == w.shape[1]:  # a square matrix is its own single window: one eigensolve
        ev = esd(w)
        return ev, ev
    return farms_esd(w), esd(w)


# ---------------------------------------------------------------------------------------------
# metrics of one spectrum


def spectral_entropy(eigs: np.ndarray) -> float:
    """Normalized Shannon entropy of p_i = λ_i / Σλ (λ = squared singular values) over the listed
    eigenvalues, divided by log(count): 1 for a flat spectrum (all singular values equal), near 0
    when one direction dominates. Same quantity as weightwatcher's "entropy" column."""
    x = np.asarray(eigs, dtype=np.float64)
    total = x.sum()
    if len(x) < 2 or not total > 0:
        return math.nan
    p = x[x > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(x)))


def spectrum_metrics(eigs: np.ndarray, fit: PowerLawFit) -> dict:
    """Norm-type metrics of a matrix's ESD `eigs` plus a power-law fit (of that ESD, or with FARMS of
    its pooled windows'), as one metrics row's numbers.

    lambda_max: largest eigenvalue; alpha_hat = alpha·log10(lambda_max); stable_rank = Σλ/λmax;
    log_norm = log10 Σλ = log10 ||W||_F²; spectral_entropy: see `spectral_entropy`.
    """
    finite = len(eigs) > 0 and np.isfinite(eigs).all()
    lam_max = float(eigs.max()) if finite else math.nan
    total = float(eigs.sum()) if finite else math.nan
    positive = finite and lam_max > 0
    return {
        "alpha": fit.alpha,
        "xmin": fit.xmin,
        "ks_distance": fit.ks_distance,
        "n_tail": fit.n_tail,
        "lambda_max": lam_max,
        "alpha_hat": fit.alpha * math.log10(lam_max) if positive else math.nan,
        "stable_rank": total / lam_max if positive else math.nan,
        "log_norm": math.log10(total) if positive else math.nan,
        "spectral_entropy": spectral_entropy(eigs) if finite else math.nan,
        "status": fit.status,
    }


# ---------------------------------------------------------------------------------------------
# many matrices


def _layer_row(ref: LayerRef) -> dict:
    return {"name": ref.name, "block": ref.block, "kind": ref.kind, "group": ref.group, "rows": ref.rows,
            "cols": ref.cols, "params": ref.params, "prunable": ref.prunable}


def _resolve_layers(model_or_layers, include_outside: bool) -> list[LayerRef]:
    if isinstance(model_or_layers, nn.Module):
        if find_blocks(model_or_layers) is None:
            raise NoBlocksError(f"found no decoder blocks in this {type(model_or_layers).__name__} (analyze reads a "
                             "causal LM's blocks; for other matrices pass a list of LayerRef, or use esd and "
                             "analysis.powerlaw.fit_power_law on one)")
        return find_layers(model_or_layers, include_outside=include_outside)
    layers = list(model_or_layers)
    if not all(isinstance(r, LayerRef) for r in layers):
        raise TypeError("analyze expects an nn.Module or a list of LayerRef")
    return layers


def _group_key(ref: LayerRef, farms: bool) -> tuple[int, int]:
    """Matrices that can share one batched eigvalsh: same oriented shape (or same FARMS window)."""
    m, n = sorted((ref.rows, ref.cols))
    return (m, m) if farms else (m, n)


def _group_eigs(weights: list[torch.Tensor], farms: bool) -> list[np.ndarray]:
    """Unnormalized ESDs of equal-shape matrices, computed in batches that bound memory (with FARMS,
    `farms_spectrum` pairs)."""
    if farms:
        return [farms_spectrum(w) for w in weights]
    m, n = short_side_first(weights[0]).shape
    per_batch = max(1, BATCH_ELEMENTS // (m * n))
    out: list[np.ndarray] = []
    with torch.no_grad():
        for s in range(0, len(weights), per_batch):
            ws = torch.stack([short_side_first(w) for w in weights[s:s + per_batch]])
            out.extend(batched_eigs(ws))
    return out


def analyze(
    model_or_layers,
    fit: str = "peak",
    farms: bool = False,
    normalize: bool = False,
    include_outside: bool = False,
    device=None,
    progress: ProgressFn | None = None,
    min_tail: int = MIN_TAIL,
) -> SpectraResult:
    """ESD and heavy-tail metrics of every weight matrix.

    model_or_layers: an nn.Module (its matrices from `find_layers`) or a list of LayerRef.
    fit: xmin rule, "peak" | "median" | "scan" (see analysis.powerlaw).
    farms: fit the pooled ESD of fixed-aspect-ratio windows instead of the whole matrix.
    normalize: divide eigenvalues by N (the long side; for FARMS the window side).
    include_outside: with a module, also the embedding and lm_head (listed as not prunable).
    device: where the eigenvalues are computed (default: where the weights live).
    progress: called as progress(message, fraction) as matrices (CPU) or shape groups (GPU) finish.
    min_tail: smallest tail the "scan" rule may choose (2 reproduces weightwatcher's default fit).
    Matrices with NaN/inf weights get status NON_FINITE and NaN metrics.
    """
    check_fit(fit, min_tail)
    layers = _resolve_layers(model_or_layers, include_outside)
    dev = pick_device(device) if device not in (None, "", "auto") else None
    used = dev or (layers[0].weight().device if layers else torch.device("cpu"))
    with cpu_workers(used) as workers:
        if workers > 1:  # CPU: one task per matrix does its ESD and its fit
            def spectrum(ref):
                return (farms_spectrum if farms else esd)(_weight(ref, dev))
            done = dict(_pooled(layers, spectrum, farms, normalize, fit, min_tail, workers, progress))
        else:  # GPU (or a single CPU thread): batched ESDs of equal shapes, then the fits
            done = _batched(layers, dev, farms, normalize, fit, min_tail, progress)
    rows = [_layer_row(ref) | done[ref.name][1] for ref in layers]
    esds = {ref.name: done[ref.name][0] for ref in layers}
    return SpectraResult(pd.DataFrame(rows, columns=COLUMNS), esds, fit, farms, normalize, str(used),
                         min_tail=min_tail)


def _weight(ref: LayerRef, dev) -> torch.Tensor:
    w = ref.weight().detach()
    return w.to(dev) if dev is not None else w


def _scaled(ev: np.ndarray, ref: LayerRef, farms: bool, normalize: bool) -> np.ndarray:
    return ev / ((min(ref.rows, ref.cols) if farms else max(ref.rows, ref.cols)) if normalize else 1)


def _pooled(layers, spectrum, farms, normalize, fit, min_tail, workers, progress):
    """Yield (name, (esd, metrics)) from one single-threaded task per matrix over `workers` threads,
    the most expensive first, so a big matrix (an embedding: its Gram costs as much as dozens of
    block matrices) never runs alone at the end while the other threads idle.
    spectrum(ref): the matrix's unnormalized ESD (in memory: `esd` of its weight), with FARMS the pair
    (pooled windows' ESD, the matrix's ESD) of `farms_spectrum`."""
    def task(ref):
        ev, whole = spectrum(ref) if farms else (spectrum(ref), None)
        ev = _scaled(ev, ref, farms, normalize)
        whole = ev if whole is None else _scaled(whole, ref, False, normalize)
        return ev, _fit_row(ev, whole, fit, NON_FINITE if np.isnan(ev).all() else None, min_tail)

    cost = {r.name: min(r.rows, r.cols) ** 2 * max(r.rows, r.cols) for r in layers}  # the Gram matrix's products
    ordered = sorted(layers, key=lambda r: cost[r.name], reverse=True)
    total, done = sum(cost.values()) or 1, 0
    progress and progress(f"Spectra: 0/{len(ordered)} matrices", 0.0)
    pool = ThreadPoolExecutor(workers)
    try:
        # as they finish, the fraction by cost: in order, the first (largest) would hold back every later count
        futures = {pool.submit(task, ref): ref for ref in ordered}
        for i, future in enumerate(as_completed(futures)):
            ref = futures[future]
            done += cost[ref.name]
            progress and progress(f"Spectra: {i + 1}/{len(ordered)} matrices", done / total)
            yield ref.name, future.result()
    finally:  # a progress callback that raises (a cancelled job) leaves the matrices not started undone
        pool.shutdown(wait=True, cancel_futures=True)


def _batched(layers, dev, farms, normalize, fit, min_tail, progress) -> dict:
    """{name: (esd, metrics)}: one batched eigvalsh per group of equal shapes (what a GPU wants),
    then the fits, spread over CPU threads (small vectorized torch/NumPy work per matrix)."""
    esds: dict[str, np.ndarray] = {}
    wholes: dict[str, np.ndarray] = {}  # with FARMS, each matrix's own ESD (for its norm metrics)
    status: dict[str, str] = {}
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for ref in layers:
        w = _weight(ref, dev)
        if torch.isfinite(w).all():  # one NaN would spoil its whole batch
            groups[_group_key(ref, farms)].append((ref, w))
        else:
            esds[ref.name], status[ref.name] = _non_finite(w), NON_FINITE
    for g, (key, items) in enumerate(groups.items()):
        progress and progress(f"Spectra of {len(items)} matrices of shape {key[0]}x{key[1]}", g / len(groups))
        for (ref, _), ev in zip(items, _group_eigs([w for _, w in items], farms)):
            ev, whole = ev if farms else (ev, None)
            esds[ref.name] = _scaled(ev, ref, farms, normalize)
            if whole is not None:
                wholes[ref.name] = _scaled(whole, ref, False, normalize)
    progress and progress("Fitting power laws", 1.0)
    with cpu_workers(torch.device("cpu")) as workers, ThreadPoolExecutor(workers) as pool:
        fits = pool.map(lambda ref: _fit_row(esds[ref.name], wholes.get(ref.name, esds[ref.name]), fit,
                                             status.get(ref.name), min_tail), layers)
        return {ref.name: (esds[ref.name], f) for ref, f in zip(layers, fits)}


def _fit_row(eigs: np.ndarray, whole: np.ndarray, fit: str, known_status: str | None, min_tail: int) -> dict:
    """The metrics row of a matrix: `eigs` fitted (FARMS: the pooled windows'), `whole` its own ESD. A matrix
    too small to fit gets no FARMS fit either (its many 1x1 windows would pool to enough eigenvalues)."""
    if known_status is None and whole is not eigs and (own := check_eigs(whole)) != "ok":
        known_status = own
    if known_status is not None:
        return spectrum_metrics(whole, PowerLawFit.failed(known_status))
    return spectrum_metrics(whole, fit_power_law(eigs, fit, min_tail=min_tail))


# ---------------------------------------------------------------------------------------------
# streamed from a checkpoint folder, with a disk cache

CHUNK_ELEMENTS = 1 << 22  # entries per streamed slice: 32 MiB in float64
# bump when the cached files' layout or the metrics' meaning changes (2: fused MoE experts listed; 3: normalize
# divides by the long side; 4: FARMS's norm metrics are the whole matrix's; 5: shared experts' kinds)
CACHE_VERSION = 5


NON_FINITE = "non-finite weights"  # the status of a matrix with NaN or inf weights


class NotStreamable(CheckpointError):
    """A checkpoint whose spectra need the loaded model (`analyze`): some expert matrices are stored where this
    module does not find them (GPT-OSS's MXFP4 blocks, which transformers dequantizes when it loads them), its
    matrices are stored compressed, or its config.json is one the model load will explain."""


# an expert matrix's checkpoint key: (the block's prefix, e.g. "model.layers.3"; expert; leaf name)
_EXPERT_KEY = re.compile(r"^(.*?\.\d+)\..*\bexperts\.(\d+)\.(\w+)\.weight$")
# the leaf names an expert matrix of each kind may have in a checkpoint: its own, or Mixtral's (and MiniMax's)
# w1 / w3 / w2, stored under `block_sparse_moe`, which transformers renames and fuses when it loads them
_EXPERT_LEAVES = {"gate_proj": ("gate_proj", "w1"), "up_proj": ("up_proj", "w3"), "down_proj": ("down_proj", "w2")}


def _fused_key(ref: LayerRef) -> str:
    """The name of the fused 3-D parameter an expert matrix is a slice of."""
    return f"{ref.name.rsplit('.', 2)[0]}.{ref.expert[0]}"


def _sources(ckpt: Checkpoint, refs: list[LayerRef]) -> dict[str, tuple[str, int | None]]:
    """Where the checkpoint holds each matrix (refs with their modules): (key, None) for a whole tensor, (key, e)
    for expert e of a fused tensor. A matrix is "<name>.weight"; an expert matrix may also be the same expert's
    matrix of the same shape under another path in the same block (Mixtral's), or a slice of its fused parameter
    stored with the loaded model's shape (Llama 4's, GPT-OSS's in bf16); a router may be too (Mixtral's)."""
    experts = defaultdict(list)
    for key in ckpt.tensors:
        if m := _EXPERT_KEY.match(key):
            experts[m.groups()].append(key)
    sources: dict[str, tuple[str, int | None]] = {}
    for r in refs:
        if r.name + ".weight" in ckpt.tensors:
            sources[r.name] = (r.name + ".weight", None)
        elif r.expert is not None:
            block, e, kind = _EXPERT_KEY.match(r.name + ".weight").groups()
            same = [k for leaf in _EXPERT_LEAVES.get(kind, (kind,)) for k in experts.get((block, e, leaf), [])
                    if ckpt.tensors[k].shape == (r.rows, r.cols)]
            fused = _fused_key(r)
            if len(same) == 1:
                sources[r.name] = (same[0], None)
            elif fused in ckpt.tensors and ckpt.tensors[fused].shape == tuple(getattr(r.module, r.expert[0]).shape):
                sources[r.name] = (fused, r.expert[1])
        elif not r.prunable and (block := re.match(rf"(.*\.{r.block})\.", r.name)):
            # a router under the family's own path in the same block (Mixtral's block_sparse_moe.gate)
            same = [k for k, t in ckpt.tensors.items() if k.startswith(block.group(0)) and
                    k.endswith(f".{r.kind}.weight") and t.shape == (r.rows, r.cols)]
            if len(same) == 1:
                sources[r.name] = (same[0], None)
    return sources


def _checkpoint_matrices(ckpt: Checkpoint, include_outside: bool) -> tuple[list[LayerRef], dict]:
    """`checkpoint_layers`, and where the checkpoint holds each (`_sources`)."""
    try:
        # never the repository's own code (transformers would ask on stdin): the model load asks for the opt-in
        config = AutoConfig.from_pretrained(ckpt.folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:  # the model load says what is wrong with it
        raise NotStreamable(f"{ckpt.folder}: config.json cannot be read") from e
    if stored_compressed(config):
        raise NotStreamable(f"{ckpt.folder}: its matrices are stored compressed; load the model to analyse them.")
    model = skeleton(config)
    refs = find_layers(model, include_outside=include_outside)
    sources = _sources(ckpt, refs)
    absent = [r for r in refs if r.name not in sources]
    missing = [r.name for r in absent]
    if absent and all(r.expert is not None for r in absent):
        raise NotStreamable(f"{ckpt.folder}: its experts are stored in another form than the loaded model's "
                            f"(no tensor {missing[0]}.weight); load the model to analyse them.")
    if missing:
        raise CheckpointError(f"{ckpt.folder}: no tensor {missing[0]}.weight for the model's module {missing[0]}"
                              + and_more(missing) + ".")
    for r in refs:
        key, expert = sources[r.name]
        shape = (r.cols, r.rows) if r.transposed else (r.rows, r.cols)
        if expert is None and tuple(ckpt.tensors[key].shape) != shape:
            raise CheckpointError(f"{ckpt.folder} does not match its config.json: {key} is stored as "
                                  f"{tuple(ckpt.tensors[key].shape)} but the config makes it {shape}; {CONFIG_FIX}.")
    if extra := blocks_beyond(ckpt.tensors, model):
        raise CheckpointError(f"{ckpt.folder} holds blocks its config.json does not have: {extra[0]}{and_more(extra)} "
                              f"would be left out; {CONFIG_FIX}.")
    return [replace(r, module=None) for r in refs], sources


def checkpoint_layers(ckpt: Checkpoint, include_outside: bool = False) -> list[LayerRef]:
    """The matrices `find_layers` would list for the loaded model (same names, blocks, kinds, order,
    tied lm_head left out), found on a weightless meta-device instance built from config.json, each
    checked to be in the checkpoint (`_sources`). The refs have no module."""
    return _checkpoint_matrices(ckpt, include_outside)[0]


def _stored_matrix(ckpt: Checkpoint, key: str, ref: LayerRef, expert: int | None, device=None) -> torch.Tensor:
    """The matrix `ref` as the checkpoint stores it (tensor `key`, or expert `expert` of the fused 3-D tensor
    `key`), whole, in its stored dtype: what FARMS's windows are cut from."""
    w = ckpt.tensor(key) if expert is None else ref.expert_view(ckpt.entry(key, expert))
    return w.to(device or "cpu")


def streamed_esd(ckpt: Checkpoint, key: str, device=None, elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """Unnormalized ESD of the checkpoint's 2-D tensor `key`, ascending, float64, like `esd` of the
    loaded matrix, without holding it whole in float64.

    The short-side Gram matrix is accumulated in `GRAM_DTYPE` over slices along the long side, read
    in the stored dtype from the memory-mapped shard: G = Σ XᵢᵀXᵢ over row blocks of a tall matrix,
    Σ XᵢXᵢᵀ over column blocks of a wide one (orientation does not change the ESD). device: where the
    products run (None: CPU, via NumPy). elements: entries per slice (in float64 a slice takes
    8·elements bytes)."""
    dev = torch.device(device) if device not in (None, "", "auto") else torch.device("cpu")
    rows, cols = ckpt.tensors[key].shape
    tall = rows >= cols
    gram = None
    with torch.no_grad():
        for chunk in ckpt.chunks(key, elements):
            if not torch.isfinite(chunk).all():
                return np.full(min(rows, cols), math.nan)
            if dev.type == "cpu":
                x = chunk.to(GRAM_DTYPE).numpy()
                part = x.T @ x if tall else x @ x.T  # NumPy's symmetric rank-k update, as in batched_eigs
            else:
                x = chunk.to(dev, GRAM_DTYPE)
                part = x.T @ x if tall else x @ x.T
            gram = part if gram is None else gram + part
        ev = np.linalg.eigvalsh(gram) if dev.type == "cpu" else torch.linalg.eigvalsh(gram).cpu().numpy()
    return np.clip(ev, 0, None)


def _cache_folder(ckpt: Checkpoint, settings: dict) -> Path:
    key = json.dumps({"version": CACHE_VERSION, "weights": ckpt.fingerprint()} | settings, sort_keys=True)
    return cache_dir() / "spectra" / hashlib.sha256(key.encode()).hexdigest()[:32]


def _read_cached(folder: Path, fit: str, farms: bool, normalize: bool, min_tail: int) -> SpectraResult | None:
    try:
        metrics = pd.read_parquet(folder / "metrics.parquet")
        with np.load(folder / "esds.npz") as z:
            esds = {name: z[name] for name in metrics["name"]}
        device = json.loads((folder / "meta.json").read_text())["device"]
    except (OSError, KeyError, ValueError):  # absent, or unreadable: recompute (and rewrite)
        return None
    return SpectraResult(metrics, esds, fit, farms, normalize, device, cached=True, min_tail=min_tail)


def _cached_spectra(ckpt: Checkpoint, settings: dict) -> SpectraResult | None:
    """A cached result of the same spectra (ESDs) under another fit rule or tail length, if any."""
    for fit in XMIN_RULES:
        for min_tail in dict.fromkeys((settings["min_tail"], MIN_TAIL)):
            other = settings | {"fit": fit, "min_tail": min_tail}
            if other != settings and (hit := _read_cached(_cache_folder(ckpt, other), fit, settings["farms"],
                                                          settings["normalize"], min_tail)) is not None:
                return hit
    return None


def refit(result: SpectraResult, fit: str, min_tail: int = MIN_TAIL) -> SpectraResult:
    """`result` with its power laws fitted again by another xmin rule: the same ESDs, so only the fit columns
    (alpha, xmin, ks_distance, n_tail, alpha_hat) and a fit's status change; a status that no rule can
    change (non-finite weights, too few eigenvalues, ...) stays."""
    check_fit(fit, min_tail)
    metrics = result.metrics.copy()
    for i, row in metrics.iterrows():
        if row["status"] not in ("ok", "fit failed"):
            continue
        f = fit_power_law(result.esds[row["name"]], fit, min_tail=min_tail)
        lam = row["lambda_max"]
        metrics.loc[i, ["alpha", "xmin", "ks_distance", "n_tail", "alpha_hat", "status"]] = [
            f.alpha, f.xmin, f.ks_distance, f.n_tail, f.alpha * math.log10(lam) if lam > 0 else math.nan, f.status]
    return replace(result, metrics=metrics, fit=fit, cached=False, min_tail=min_tail)


def _write_cached(folder: Path, result: SpectraResult) -> None:
    """Written to a fresh folder, then renamed into place: a reader never sees half a result."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + "."))
    result.metrics.to_parquet(tmp / "metrics.parquet", index=False)
    np.savez(tmp / "esds.npz", **result.esds)
    (tmp / "meta.json").write_text(json.dumps({"device": result.device}))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote the same result meanwhile
        shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_folder(source) -> Path:
    if Path(source).expanduser().exists():
        return Path(source).expanduser()
    found = checkpoint_path(str(source))
    if found is None:
        raise CheckpointError(f"{source}: not on this machine (no folder, and not in the local Hugging Face cache); "
                              "load it with loading.load_model and use analyze(loaded.model).")
    return found


def analyze_checkpoint(
    folder,
    fit: str = "peak",
    farms: bool = False,
    normalize: bool = False,
    include_outside: bool = False,
    device=None,
    progress: ProgressFn | None = None,
    min_tail: int = MIN_TAIL,
    cache: bool = True,
) -> SpectraResult:
    """`analyze` of the model in a safetensors checkpoint without loading it: the same rows, one matrix
    at a time streamed from the shards (see `streamed_esd`), then the same fits.

    folder: a checkpoint folder, or a model source whose weights are on this machine ("default",
    "gemma3", a Hugging Face id in the local HF cache; see `loading.checkpoint_path`).

    device: where the Gram products and eigensolves run (None/"auto": CUDA when available, else CPU,
    as many single-threaded workers as torch has threads). cache: read/write the result under
    cache_dir()/spectra, keyed by the checkpoint's fingerprint (`Checkpoint.fingerprint`) and the
    settings; a result read from there has `cached=True`. Raises CheckpointError for a bad folder.
    """
    check_fit(fit, min_tail)
    ckpt = open_checkpoint(_checkpoint_folder(folder))
    settings = {"fit": fit, "farms": bool(farms), "normalize": bool(normalize),
                "include_outside": bool(include_outside), "min_tail": min_tail}
    where = _cache_folder(ckpt, settings)
    if cache and (hit := _read_cached(where, fit, farms, normalize, min_tail)) is not None:
        progress and progress("Spectra read from the cache", 1.0)
        return hit
    if cache and (other := _cached_spectra(ckpt, settings)) is not None:
        progress and progress(f"Spectra read from the cache, fitted with '{fit}'", 1.0)
        result = refit(other, fit, min_tail)
        _write_cached(where, result)
        return result
    layers, sources = _checkpoint_matrices(ckpt, include_outside)
    used = pick_device(device)

    def spectrum(ref):
        key, expert = sources[ref.name]
        if farms:  # the windows are cut from the whole matrix
            return farms_spectrum(_stored_matrix(ckpt, key, ref, expert, used))
        return streamed_esd(ckpt, key, used) if expert is None else esd(_stored_matrix(ckpt, key, ref, expert, used))

    with cpu_workers(used) as workers:
        done = dict(_pooled(layers, spectrum, farms, normalize, fit, min_tail, workers, progress))
    rows = [_layer_row(ref) | done[ref.name][1] for ref in layers]
    result = SpectraResult(pd.DataFrame(rows, columns=COLUMNS), {ref.name: done[ref.name][0] for ref in layers},
                           fit, farms, normalize, str(used), min_tail=min_tail)
    if cache:
        _write_cached(where, result)
    return result


# ---------------------------------------------------------------------------------------------
# Marchenko–Pastur


def mp_bounds(ratio: float, sigma2: float = 1.0) -> tuple[float, float]:
    """Support [lo, hi] of the Marchenko–Pastur density (see `mp_density`)."""
    q = max(ratio, 1.0 / ratio)
    return sigma2 * (1 - q ** -0.5) ** 2, sigma2 * (1 + q ** -0.5) ** 2


def beyond_mp_edge(eigs: np.ndarray, ratio: float, sigma2: float | None = None) -> int:
    """How many eigenvalues lie beyond 1.05x the Marchenko–Pastur edge of a random matrix of the same aspect
    `ratio` and noise level `sigma2` (default: the mean eigenvalue, which a tail inflates, so the count is
    conservative): a tail HT-SR can read. A random matrix has none, whatever α a fit gives its bulk."""
    x = np.asarray(eigs, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return 0
    _, hi = mp_bounds(ratio, float(x.mean()) if sigma2 is None else sigma2)
    return int((x > 1.05 * hi).sum())


def mp_density(x, ratio: float, sigma2: float = 1.0) -> np.ndarray:
    """Marchenko–Pastur density of the min(N, M) nonzero eigenvalues of (1/N)·WᵀW for W (N x M) with
    i.i.d. entries of variance sigma2.

    ratio: Q = N/M, the long side over the short side; a value below 1 is read as its inverse.
    The density lives on `mp_bounds(ratio, sigma2)` and integrates to 1.
    For the unnormalized ESD (this module's default) of a matrix with entry variance s², pass
    sigma2 = N·s², N being the long side. Returns 0 outside the support.
    """
    q = max(ratio, 1.0 / ratio)
    x = np.asarray(x, dtype=np.float64)
    lo, hi = mp_bounds(q, sigma2)
    inside = (x > lo) & (x < hi)
    dens = np.zeros_like(x)
    xi = x[inside]
    dens[inside] = q / (2 * math.pi * sigma2 * xi) * np.sqrt((hi - xi) * (xi - lo))
    return dens


def mp_curve(eigs: np.ndarray, ratio: float, log: bool = True, points: int = 400,
             sigma2: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, density) of the Marchenko–Pastur law a random matrix of the same shape and the same mean
    eigenvalue would follow (the mean eigenvalue equals sigma2 for either scaling of the ESD): the
    overlay that shows how far a spectrum is from noise. x spans the support, log-spaced if `log`.
    sigma2: the noise level where it is known (a synthetic matrix), instead of the mean eigenvalue,
    which outliers inflate."""
    if sigma2 is None:
        finite = np.asarray(eigs, dtype=np.float64)
        sigma2 = float(finite[np.isfinite(finite)].mean())
    lo, hi = mp_bounds(ratio, sigma2)
    x = np.geomspace(max(lo, hi * 1e-6), hi, points) if log else np.linspace(lo, hi, points)
    return x, mp_density(x, ratio, sigma2)


# ---------------------------------------------------------------------------------------------
# reading alpha

ALPHA_BANDS = (2.0, 6.0)  # HT-SR's reading: below over-trained, inside well trained, above under-trained


def alpha_summary(table: pd.DataFrame) -> dict:
    """The reading of a spectra table's (SpectraResult.table()) prunable matrices whose fit is "ok" (`fitted` of
    them): their mean alpha, how many lie below, inside and above ALPHA_BANDS, and how many have a tail beyond the
    Marchenko–Pastur edge (`beyond_mp`), where alone alpha reads learned structure."""
    ok = table[(table["status"] == "ok") & table["prunable"]]
    low, high = ALPHA_BANDS
    return {"fitted": len(ok), "mean_alpha": float(ok["alpha"].mean()) if len(ok) else math.nan,
            "below": int((ok["alpha"] < low).sum()), "inside": int(ok["alpha"].between(low, high).sum()),
            "above": int((ok["alpha"] > high).sum()), "with_tail": int((ok["beyond_mp"] > 0).sum())}


def shuffled_esd(ref: LayerRef, farms: bool = False, normalize: bool = False, seed: int = 0) -> np.ndarray:
    """ESD of the matrix with its entries randomly permuted: the same entry distribution with no
    learned correlations left (what the layer's spectrum would be without structure)."""
    w = ref.weight().detach()
    gen = torch.Generator().manual_seed(seed)
    shuffled = w.flatten()[torch.randperm(w.numel(), generator=gen).to(w.device)].view_as(w)
    return farms_esd(shuffled, normalize) if farms else esd(shuffled, normalize)


__all__ = ["ALPHA_BANDS", "COLUMNS", "NotStreamable", "SpectraResult", "alpha_summary", "analyze", "analyze_checkpoint",
           "checkpoint_layers", "esd", "farms_esd", "farms_spectrum", "farms_windows", "mp_bounds", "mp_curve",
           "mp_density", "shuffled_esd", "spectral_entropy", "streamed_esd"]
