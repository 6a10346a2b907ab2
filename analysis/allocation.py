"""Layerwise sparsity allocation: turn per-matrix metrics into a pruning ratio for every matrix.

Conventions
-----------
- A *ratio* (sparsity) is the fraction of a matrix's weights set to zero, in [0, 1).
- The *budget* of an allocation is the parameter-weighted mean ratio over the prunable matrices:
  ``sum(params_i * ratio_i) / sum(params_i)``. Every method here hits the target budget exactly
  (to ~1e-9) after keeping each ratio inside ``[0, MAX_RATIO]``; see :func:`exact_budget`.
- ``metrics`` is a pandas DataFrame with one row per weight matrix, as produced by
  ``analysis.spectra.analyze(...).metrics``. Used columns: ``name`` (module name), ``block`` (decoder
  block index), ``params`` (number of weights), ``prunable`` (bool; rows with False are ignored),
  the metric column (e.g. ``alpha``), and optionally ``status`` ("ok" or a reason the fit failed).

Methods
-------
- ``uniform``: every prunable matrix gets the target.
- ``alphapruning`` (Lu et al., "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for
  Improved Layer-wise Pruning of Large Language Models", NeurIPS 2024): average the metric per block
  (or keep it per matrix), map it linearly onto ``[S(1-eps), S(1+eps)]`` so that the block with the
  largest alpha (the least well-trained one) gets the most sparsity, then scale all ratios by one
  constant so the budget equals S.
- ``farms``: the same mapping on alphas measured with FARMS (the caller computes the metrics with
  ``analyze(..., farms=True)``); only the recorded method name differs.
- ``owl`` (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
  LLMs to High Sparsity", 2023): blocks with a larger fraction of outlier activations get lower
  sparsity; the outlier ratios are mapped linearly onto ``[S+lambda, S-lambda]`` and shifted so the
  budget equals S.
- ``custom``: a curve through control points (depth in [0, 1], sparsity), interpolated linearly over
  blocks: the straight segments the Allocation page's editor draws are the ratios applied.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.errors import AlphascopeError

MAX_RATIO = 0.99  # never prune a whole matrix: keep at least 1% of its weights
FORMAT = "alphascope-allocation"
FORMAT_VERSION = 1
METHODS = ("uniform", "alphapruning", "farms", "owl", "custom")
SAVED_METHODS = (*METHODS, "auto")  # what a file's method may be: "auto" is a search's result (analysis.search)
GRANULARITIES = ("block", "layer")

# Direction of each metric: +1 means "a higher value marks a less well-trained matrix, prune it more".
# In HT-SR theory a well-trained matrix has a heavy-tailed spectrum: small power-law exponent alpha
# (and alpha_hat = alpha * log10 lambda_max), a few dominant eigenvalues so a small stable rank
# ||W||_F^2 / ||W||_2^2, and a low spectral entropy. A matrix close to random initialisation has the
# opposite, so every metric below points the same way. log_norm (log10 of the squared Frobenius norm)
# and lambda_max follow WeightWatcher's "smaller is better" reading of norm-based capacity metrics.
METRIC_DIRECTION: dict[str, int] = {
    "alpha": +1,
    "alpha_hat": +1,
    "stable_rank": +1,
    "spectral_entropy": +1,
    "log_norm": +1,
    "lambda_max": +1,
}

FIT_METRICS = ("alpha", "alpha_hat")  # the metrics a power-law fit (and so FARMS) changes


class AllocationError(AlphascopeError, ValueError):
    """Bad input to an allocation function or a malformed allocation JSON; the message names the problem."""


# --------------------------------------------------------------------------------------------
# the result


@dataclass
class Allocation:
    """A layerwise sparsity allocation.

    model: model source it was computed for ("" if unknown). sparsity: the target budget.
    method: uniform | alphapruning | farms | owl | custom. params: hyperparameters used (epsilon,
    metric, granularity, owl_lambda, points, ...) and ``warnings`` (list of str) if any.
    per_block: ratio per decoder block index (for granularity "layer": the parameter-weighted mean
    of that block's matrices). per_layer: module name -> ratio, the ratios the pruner applies.
    achieved: parameter-weighted mean ratio over per_layer (equals sparsity unless drawn by hand).
    """

    model: str
    sparsity: float
    method: str
    params: dict = field(default_factory=dict)
    per_block: list[float] = field(default_factory=list)
    per_layer: dict[str, float] = field(default_factory=dict)
    achieved: float = 0.0

    @property
    def warnings(self) -> list[str]:
        return list(self.params.get("warnings", []))

    @property
    def pruner(self) -> str | None:
        """The pruner this allocation was searched with (a search's params) or pruned with (a run record's), None
        where its params do not say."""
        run = self.params.get("run") if isinstance(self.params.get("run"), dict) else {}
        pruner = run.get("pruner", self.params.get("pruner"))
        return pruner if isinstance(pruner, str) else None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"format": FORMAT, "version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> Allocation:
        """Validate and build; raises AllocationError naming the first problem found."""
        return _allocation_from_dict(d)

    def save(self, path: str | Path) -> Path:
        """Write the versioned JSON to `path`, a file (its folders are made); AllocationError when it cannot be."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise AllocationError(f"{path} is a folder: give the allocation a file name, e.g. {path / 'alloc.json'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        except OSError as e:
            raise AllocationError(f"{path}: cannot write it ({e.strerror or e})") from None
        return path

    def check_names(self, names, fixed=()) -> None:
        """Raise AllocationError unless this allocation gives a ratio to exactly the prunable matrices
        `names` of the model it is applied to (one made for another model names others); `fixed`: the model's
        matrices that are not pruned (MoE routers, embeddings), named as such when the allocation lists one."""
        names, have = set(names), set(self.per_layer)
        unknown, missing = sorted(have - names), sorted(names - have)
        if routed := sorted(set(unknown) & set(fixed)):
            more = f" and the {len(routed) - 1} others" if len(routed) > 1 else ""
            raise AllocationError(f"'{routed[0]}' is a matrix of this model that is never pruned (MoE routers, the "
                                  "embedding and lm_head stay dense), so the allocation cannot give it a ratio; drop "
                                  f"it{more} from per_layer")
        if unknown or missing:
            example = f"'{unknown[0]}' is not one of its matrices" if unknown else f"no ratio for '{missing[0]}'"
            raise AllocationError(f"the allocation does not fit this model: {len(unknown)} of its {len(have)} names "
                                  f"are not prunable matrices of the model and {len(missing)} of the model's "
                                  f"{len(names)} prunable matrices are missing (e.g. {example}); was it made for "
                                  "another model?")

    def check_blocks(self, metrics: pd.DataFrame) -> None:
        """Raise AllocationError unless per_block holds, for each block of the model of `metrics` (a layer table),
        the weighted mean of its matrices' per_layer ratios, as every allocation made here does (a search anchors
        on per_block: a hand-edited file may disagree with what it prunes)."""
        df = prunable_rows(metrics)
        means = _per_block_from_layers(df, df["name"].map(self.per_layer).fillna(0.0).to_numpy(float))
        if len(self.per_block) != len(means):
            raise AllocationError(f"per_block has {len(self.per_block)} ratios, the model has {len(means)} blocks")
        for b, (stated, mean) in enumerate(zip(self.per_block, means)):
            if abs(mean - stated) > 1e-6:
                raise AllocationError(f"per_block[{b}] is {stated:.6f} but its matrices' ratios in per_layer "
                                      f"average {mean:.6f} (edited by hand?)")

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        path = Path(path)
        if path.is_dir():  # a folder written by --save-model keeps its allocation beside the weights
            inside = path / "allocation.json"
            raise AllocationError(f"{path} is a folder; give {inside}, the allocation it was pruned with"
                                  if inside.is_file() else f"{path} is a folder, not an allocation JSON")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise AllocationError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise AllocationError(f"{path}: not an allocation JSON (not UTF-8 text)") from None
        except OSError as e:
            raise AllocationError(f"{path}: cannot read it ({e.strerror or e})") from None
        try:
            return cls.from_dict(d)
        except AllocationError as e:
            raise AllocationError(f"{path}: {e}") from None


_REQUIRED = ("sparsity", "method", "per_block", "per_layer")
_KEYS = ("format", "version", *(f.name for f in fields(Allocation)))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_ratio(x, where: str) -> float:
    if not _is_number(x):
        raise AllocationError(f"{where} must be a finite number, got {x!r}")
    if not 0.0 <= x <= MAX_RATIO:  # what every pruner accepts
        raise AllocationError(f"{where} = {x} is outside [0, {MAX_RATIO}] (a matrix keeps at least 1% of its weights)")
    return float(x)


def _allocation_from_dict(d) -> Allocation:
    if not isinstance(d, dict):
        raise AllocationError(f"allocation must be a JSON object, got {type(d).__name__}")
    if "per_layer" not in d and isinstance(d.get("config"), dict) and isinstance(d.get("allocation"), dict):
        config = d["config"]
        d = d["allocation"]  # a run record (prune --out, runs --show): the allocation its run pruned with
        if isinstance(d.get("params", {}), dict) and isinstance(config.get("method"), str):
            # how that run pruned with it, which the allocation alone does not say (allocation_caveats)
            d = {**d, "params": {**d.get("params", {}), "run": {"pruner": config["method"],
                                                               "rowwise": config.get("rowwise")}}}
    if "format" in d and d["format"] != FORMAT:
        raise AllocationError(f"format is {d['format']!r}, expected {FORMAT!r}")
    version = d.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise AllocationError(f"version must be an integer, got {version!r}")
    if version < 1:
        raise AllocationError(f"version must be 1 or more, got {version}")
    if version > FORMAT_VERSION:
        raise AllocationError(f"unsupported version {version} (this build reads up to {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise AllocationError(f"missing key(s): {', '.join(missing)}")
    unknown = [str(k) for k in d if k not in _KEYS]  # a misspelt key would otherwise be dropped unread
    if unknown:
        raise AllocationError(f"unknown key(s): {', '.join(unknown)} (an allocation has {', '.join(_KEYS)})")
    model = d.get("model", "")
    if not isinstance(model, str):
        raise AllocationError(f"model must be a string, got {model!r}")
    method = d["method"]
    if method not in SAVED_METHODS:  # it names the allocation in messages, records and recipes
        raise AllocationError(f"method must be one of {', '.join(SAVED_METHODS)} (how the ratios were made; a file "
                              f"written by hand: custom), got {method!r}")
    params = d.get("params", {})
    if not isinstance(params, dict):
        raise AllocationError(f"params must be an object, got {type(params).__name__}")
    if params.get("nm") is not None and not (isinstance(params["nm"], str) and re.fullmatch(r"\d+:\d+", params["nm"])):
        raise AllocationError(f"params.nm must be an N:M pattern such as '2:4', got {params['nm']!r}")
    sparsity = _check_ratio(d["sparsity"], "sparsity")
    per_block = d["per_block"]
    if not isinstance(per_block, list):
        raise AllocationError(f"per_block must be a list, got {type(per_block).__name__}")
    per_block = [_check_ratio(x, f"per_block[{i}]") for i, x in enumerate(per_block)]
    per_layer = d["per_layer"]
    if not isinstance(per_layer, dict):
        raise AllocationError(f"per_layer must be an object {{module name: ratio}}, got {type(per_layer).__name__}")
    if not per_layer:
        raise AllocationError("per_layer is empty")
    per_layer = {str(k): _check_ratio(v, f"per_layer[{k!r}]") for k, v in per_layer.items()}
    achieved = d.get("achieved")
    if achieved is None:
        achieved = float(np.mean(list(per_layer.values())))  # no sizes in the file: unweighted
    achieved = _check_ratio(achieved, "achieved")
    return Allocation(model, sparsity, method, params, per_block, per_layer, achieved)


# --------------------------------------------------------------------------------------------
# exact budget


def budget(ratios, params) -> float:
    """Parameter-weighted mean of `ratios` (the fraction of all weights that is pruned)."""
    r = np.asarray(ratios, dtype=np.float64)
    p = np.asarray(params, dtype=np.float64)
    return float(np.sum(p * r) / np.sum(p))


def check_sparsity(sparsity, lo: float = 0.0, hi: float = MAX_RATIO, name: str = "sparsity") -> float:
    """`sparsity` as a float, after checking it is a finite number in [lo, hi]; AllocationError naming `name`."""
    if not _is_number(sparsity) and not isinstance(sparsity, np.floating):
        raise AllocationError(f"{name} must be a finite number, got {sparsity!r}")
    s = float(sparsity)
    if not math.isfinite(s):
        raise AllocationError(f"{name} must be a finite number, got {sparsity!r}")
    if not lo <= s <= hi:
        raise AllocationError(f"{name} = {s:g} is outside [{lo:g}, {hi:g}]")
    return s


def _solve_monotone(g, target: float, a: float, b: float) -> float:
    """Bisection for g(t) = target with g non-decreasing and continuous on [a, b], g(a) <= target <= g(b)."""
    for _ in range(200):
        m = 0.5 * (a + b)
        if m in (a, b):
            break
        if g(m) < target:
            a = m
        else:
            b = m
    return 0.5 * (a + b)


def _polish(p: np.ndarray, target_mass: float, lo: float, hi: float, apply, t: float):
    """Bisection leaves ~1e-16 relative error in t: keep the clipped ratios at t and shift the free ones by one
    constant, so their mass makes the budget exact."""
    x = apply(t)
    free = (x > lo) & (x < hi)
    if not free.any():
        return x
    fixed_mass = float(np.sum(p[~free] * x[~free]))
    need = target_mass - fixed_mass
    y = x.copy()
    # on the free set x = f(r, t) is affine in t; shift it so the free mass is exactly `need`
    delta = (need - float(np.sum(p[free] * x[free]))) / float(np.sum(p[free]))
    y[free] = np.clip(x[free] + delta, lo, hi)
    return y


def exact_budget(ratios, params, sparsity, lo: float = 0.0, hi: float = MAX_RATIO, *,
                 mode: str = "scale") -> np.ndarray:
    """Adjust `ratios` so that sum(params * r) / sum(params) == sparsity with every r in [lo, hi].

    mode="scale" (AlphaPruning's rule) multiplies every ratio by one constant c; mode="shift" (OWL's
    rule) adds one constant t. Ratios pushed past a bound are clipped there and the mass they lose
    is redistributed to the others by solving for c (or t) on the clipped function, which is
    monotone in c, so the order of the ratios is kept (ties may appear only at lo or hi). When no
    clipping is needed the result is exactly ``ratios * sparsity * sum(params) / sum(params * ratios)``.
    If scaling cannot reach the target (ratios that are 0 stay 0), shifting is used instead.

    Returns float64 ratios; raises AllocationError on bad input.
    """
    r = np.asarray(ratios, dtype=np.float64).ravel()
    p = np.asarray(params, dtype=np.float64).ravel()
    if r.shape != p.shape or r.size == 0:
        raise AllocationError(f"ratios and params must be non-empty and the same length ({r.size} vs {p.size})")
    if not np.all(np.isfinite(r)):
        raise AllocationError("ratios contain NaN or infinite values")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise AllocationError("params must be finite, non-negative and not all zero")
    if not (0.0 <= lo < hi <= 1.0):
        raise AllocationError(f"bounds must satisfy 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    if mode not in ("scale", "shift"):
        raise AllocationError(f"mode must be 'scale' or 'shift', got {mode!r}")
    s = check_sparsity(sparsity, lo, hi)
    mass = s * p.sum()

    if mode == "scale":
        out = _scale_to_budget(r, p, mass, lo, hi)
        if out is not None:
            return out
    return _shift_to_budget(r, p, mass, lo, hi)


def _scale_to_budget(r, p, mass, lo, hi):
    if r.max() <= 0:
        return None
    # scaling is invariant to the unit; work in [.., 1] and treat ratios below 1e-12 of the largest as 0
    # so that the scale factor stays finite (a ratio of 1e-300 would need c = 1e300)
    r = r / r.max()
    r = np.where(np.abs(r) < 1e-12, 0.0, r)
    weighted = float(np.sum(p * r))
    if weighted > 0:
        x = (mass / weighted) * r
        if np.all((x >= lo) & (x <= hi)):
            return x  # the common case: one exact multiplication, as in the paper
    pos = r > 0
    if not pos.any():
        return None
    apply = lambda c: np.clip(c * r, lo, hi)  # noqa: E731
    if float(np.sum(p * apply(hi / r[pos].min()))) < mass - 1e-12 * p.sum():
        return None  # zero ratios stay at lo: scaling alone cannot reach the target
    c = _solve_monotone(lambda c: float(np.sum(p * apply(c))), mass, 0.0, hi / r[pos].min())
    return _polish(p, mass, lo, hi, apply, c)


def _shift_to_budget(r, p, mass, lo, hi):
    apply = lambda t: np.clip(r + t, lo, hi)  # noqa: E731
    a, b = lo - r.max(), hi - r.min()
    t = _solve_monotone(lambda t: float(np.sum(p * apply(t))), mass, a, b)
    return _polish(p, mass, lo, hi, apply, t)


# --------------------------------------------------------------------------------------------
# metrics handling


def check_metric(metric: str, method: str = "alphapruning") -> int:
    """The direction of `metric` (METRIC_DIRECTION), after checking the allocation `method` can use it: farms
    changes only the power-law fit, so it needs a metric of the fit. AllocationError otherwise."""
    if metric not in METRIC_DIRECTION:
        raise AllocationError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_DIRECTION)}")
    if method == "farms" and metric not in FIT_METRICS:
        raise AllocationError(f"farms changes only the power-law fit, which metric {metric!r} does not use: it would "
                              f"be alphapruning's allocation; use alphapruning, or metric {' or '.join(FIT_METRICS)}")
    return METRIC_DIRECTION[metric]


def check_granularity(granularity: str) -> str:
    """`granularity`, after checking it is one of GRANULARITIES; AllocationError otherwise."""
    if granularity not in GRANULARITIES:
        raise AllocationError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    return granularity


def prunable_rows(metrics: pd.DataFrame, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """The prunable rows of a metrics table, with the columns checked; a fresh index 0..n-1."""
    if not isinstance(metrics, pd.DataFrame):
        raise AllocationError(f"metrics must be a pandas DataFrame, got {type(metrics).__name__}")
    need = ("name", "block", "params", *columns)
    missing = [c for c in need if c not in metrics.columns]
    if missing:
        raise AllocationError(f"metrics table lacks column(s): {', '.join(missing)}")
    df = metrics
    if "prunable" in df.columns:
        df = df[df["prunable"].astype(bool)]
    df = df.reset_index(drop=True)
    if df.empty:
        raise AllocationError("metrics table has no prunable matrices")
    if (df["block"] < 0).any():
        raise AllocationError("a prunable matrix has no block index (block < 0)")
    if df["name"].duplicated().any():
        raise AllocationError(f"duplicate matrix name {df['name'][df['name'].duplicated()].iloc[0]!r}")
    if not (np.isfinite(df["params"].astype(float)) & (df["params"] > 0)).all():
        raise AllocationError("params must be positive for every prunable matrix")
    return df


def _valid_values(df: pd.DataFrame, metric: str, warnings: list[str]) -> np.ndarray:
    """Metric values, with failed fits (NaN/inf or status != ok) replaced by the mean of the valid ones."""
    v = pd.to_numeric(df[metric], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(v)
    if "status" in df.columns:
        bad |= df["status"].astype(str).to_numpy() != "ok"
    if bad.all():
        raise AllocationError(f"no valid {metric} value in the metrics table (every fit failed)")
    if bad.any():
        fill = float(v[~bad].mean())
        names = df["name"][bad].tolist()
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.append(f"{metric} unavailable for {len(names)} matrix(es) ({shown}); used the mean {fill:.4g}")
        v = np.where(bad, fill, v)
    return v


def block_table(metrics: pd.DataFrame, metric: str = "alpha") -> pd.DataFrame:
    """Per-block summary for bar charts: block, params (prunable weights), metric_mean (plain mean of
    the valid per-matrix values, NaN if none), n_matrices (prunable matrices in the block)."""
    df = prunable_rows(metrics, (metric,))
    v = pd.to_numeric(df[metric], errors="coerce")
    if "status" in df.columns:
        v = v.where(df["status"].astype(str) == "ok")
    df = df.assign(_m=v.where(np.isfinite(v)))
    g = df.groupby("block", sort=True)
    return pd.DataFrame({
        "block": g.size().index.astype(int),
        "params": g["params"].sum().to_numpy(dtype=np.int64),
        "metric_mean": g["_m"].mean().to_numpy(dtype=np.float64),
        "n_matrices": g.size().to_numpy(dtype=np.int64),
    })


def _linear_map(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map values linearly so min -> low and max -> high; all equal -> the midpoint."""
    vmin, vmax = float(values.min()), float(values.max())
    if vmax - vmin <= 1e-12 * max(1.0, abs(vmax)):
        return np.full(values.shape, 0.5 * (low + high))
    return low + (high - low) * (values - vmin) / (vmax - vmin)


def _n_blocks(df: pd.DataFrame) -> int:
    return int(df["block"].max()) + 1


def _per_block_from_layers(df: pd.DataFrame, ratios: np.ndarray) -> list[float]:
    """Parameter-weighted mean ratio of each block (0.0 for a block without prunable matrices)."""
    out = [0.0] * _n_blocks(df)
    tmp = pd.DataFrame({"block": df["block"].to_numpy(), "w": df["params"].to_numpy(float), "r": ratios})
    tmp["wr"] = tmp["w"] * tmp["r"]
    g = tmp.groupby("block").agg(w=("w", "sum"), wr=("wr", "sum"), lo=("r", "min"), hi=("r", "max"))
    for b, row in g.iterrows():
        # rounding can put the mean of equal ratios a hair outside them (0.99 -> 0.9900000000000001)
        out[int(b)] = float(np.clip(row["wr"] / row["w"], row["lo"], row["hi"]))
    return out


def _finish(df, ratios, sparsity, method, params, model) -> Allocation:
    ratios = np.asarray(ratios, dtype=np.float64)
    capped = ratios >= MAX_RATIO - 1e-9
    rescaled = method != "uniform" and (method != "custom" or params.get("normalize"))
    if rescaled and capped.any() and not capped.all():  # the budget rescale pushed them there, not the user
        blocks = sorted({int(b) for b in df["block"].to_numpy()[capped]})
        params = {**params, "warnings": [*params.get("warnings", []), (
            f"{int(capped.sum())} of {len(ratios)} matrices (block{'s' if len(blocks) > 1 else ''} "
            f"{', '.join(map(str, blocks))}) reached the {MAX_RATIO:.0%} cap: the budget is kept by pruning the "
            "others more, so the shape is flattened there (a smaller spread or target avoids it)")]}
    per_layer = {str(n): float(r) for n, r in zip(df["name"], ratios)}
    achieved = budget(ratios, df["params"].to_numpy(float))
    return Allocation(model, float(sparsity), method, params, _per_block_from_layers(df, ratios), per_layer, achieved)


# --------------------------------------------------------------------------------------------
# methods


def allocate(
    metrics: pd.DataFrame,
    sparsity: float,
    method: str = "alphapruning",
    epsilon: float = 0.3,
    metric: str = "alpha",
    granularity: str = "block",
    outlier_ratios: dict[int, float] | None = None,
    owl_lambda: float = 0.08,
    model: str = "",
) -> Allocation:
    """Layerwise sparsity for the prunable matrices of `metrics` with budget exactly `sparsity`.

    sparsity: target fraction of pruned weights, in [0, 0.99]. epsilon: AlphaPruning's spread, in
    [0, 1): ratios start in [S(1-eps), S(1+eps)]. metric: column used by alphapruning/farms (see
    METRIC_DIRECTION). granularity: "block" (one ratio per decoder block, from the block's mean
    metric, as in the paper) or "layer" (one ratio per matrix). outlier_ratios: for owl, block index ->
    fraction of outlier activations (any non-negative scale; only the relative values matter).
    owl_lambda: OWL's half-range, in [0, 1). farms needs the metrics of FARMS spectra (analyze(..., farms=True)),
    alphapruning those of whole matrices. Raises AllocationError on bad input.
    """
    if method not in METHODS or method == "custom":
        raise AllocationError(f"unknown method {method!r}; choose uniform, alphapruning, farms or owl "
                              "(custom curves: custom_allocation)")
    s = check_sparsity(sparsity)
    check_granularity(granularity)
    if method == "uniform":
        df = prunable_rows(metrics)
        return _finish(df, np.full(len(df), s), s, method, {}, model)
    if method == "owl":
        return _owl(metrics, s, outlier_ratios, owl_lambda, model)
    pooled = getattr(metrics, "attrs", {}).get("farms")  # set by analysis.spectra; unknown for a hand-built table
    if pooled is not None and pooled != (method == "farms"):
        raise AllocationError(f"{method} needs the metrics of {'FARMS' if method == 'farms' else 'whole-matrix'} "
                              f"spectra (analyze(..., farms={method == 'farms'})); these are "
                              f"{'FARMS' if pooled else 'whole-matrix'} spectra")
    return _alphapruning(metrics, s, method, epsilon, metric, granularity, model)


def check_spread(x, name: str) -> float:
    """`x` as a float, after checking it is a spread in [0, 1) (AlphaPruning's ε, OWL's λ); AllocationError naming
    `name`."""
    if not _is_number(x) and not isinstance(x, np.floating):
        raise AllocationError(f"{name} must be a finite number, got {x!r}")
    x = float(x)
    if not (math.isfinite(x) and 0.0 <= x < 1.0):
        raise AllocationError(f"{name} = {x:g} is outside [0, 1)")
    return x


def alphapruning_ratios(values: np.ndarray, sparsity: float, epsilon: float) -> np.ndarray:
    """The paper's linear map before budgeting: min metric -> S(1-eps), max metric -> S(1+eps)."""
    return _linear_map(np.asarray(values, dtype=np.float64), sparsity * (1 - epsilon), sparsity * (1 + epsilon))


def _alphapruning(metrics, s, method, epsilon, metric, granularity, model) -> Allocation:
    eps = check_spread(epsilon, "epsilon")
    direction = check_metric(metric, method)
    df = prunable_rows(metrics, (metric,))
    warnings: list[str] = []
    v = direction * _valid_values(df, metric, warnings)
    p = df["params"].to_numpy(float)
    if granularity == "block":
        # the block's score is the plain mean of its matrices' metric, as in the paper
        block_mean = pd.Series(v).groupby(df["block"].to_numpy()).mean()
        v = block_mean.reindex(df["block"].to_numpy()).to_numpy()
    ratios = exact_budget(alphapruning_ratios(v, s, eps), p, s, mode="scale")
    params = {"epsilon": eps, "metric": metric, "granularity": granularity}
    if "fit" in metrics.attrs:  # metrics from analyze (a hand-built table does not say)
        params["fit"] = metrics.attrs["fit"]
    if warnings:
        params["warnings"] = warnings
    return _finish(df, ratios, s, method, params, model)


def _owl(metrics, s, outlier_ratios, owl_lambda, model) -> Allocation:
    lam = check_spread(owl_lambda, "owl_lambda")
    df = prunable_rows(metrics)
    if not outlier_ratios:
        raise AllocationError("method 'owl' needs outlier_ratios {block: fraction of outliers}")
    d = {}
    for k, v in dict(outlier_ratios).items():
        if not (_is_number(v) or isinstance(v, np.floating)) or not math.isfinite(float(v)) or float(v) < 0:
            raise AllocationError(f"outlier ratio of block {k!r} must be a finite number >= 0, got {v!r}")
        d[int(k)] = float(v)
    missing = sorted(set(df["block"].astype(int)) - set(d))
    if missing:
        raise AllocationError(f"outlier_ratios lacks block(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    dv = np.array([d[int(b)] for b in df["block"]])
    # more outliers -> lower sparsity: the block with the most outliers gets S - lambda
    start = _linear_map(dv, s + lam, s - lam)
    ratios = exact_budget(start, df["params"].to_numpy(float), s, mode="shift")
    params = {"owl_lambda": lam, "outlier_ratios": {str(k): d[k] for k in sorted(d)}}
    return _finish(df, ratios, s, "owl", params, model)


# --------------------------------------------------------------------------------------------
# custom curve


def _clean_points(points, warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sort, clip to the chart ([0,1] x [0, MAX_RATIO]) with a warning, and average duplicate depths."""
    try:
        arr = np.asarray([(float(d), float(s)) for d, s in points], dtype=np.float64)
    except (TypeError, ValueError):
        raise AllocationError("points must be a list of (depth, sparsity) number pairs") from None
    if arr.size == 0:
        raise AllocationError("a custom curve needs at least one control point")
    if not np.all(np.isfinite(arr)):
        raise AllocationError("control points contain NaN or infinite values")
    depth, sp = arr[:, 0], arr[:, 1]
    if np.any((depth < 0) | (depth > 1)):
        warnings.append("control point depth outside [0, 1] clipped to the chart")
        depth = np.clip(depth, 0.0, 1.0)
    if np.any((sp < 0) | (sp > MAX_RATIO)):
        warnings.append(f"control point sparsity outside [0, {MAX_RATIO}] clipped to the chart")
        sp = np.clip(sp, 0.0, MAX_RATIO)
    uniq, inv = np.unique(depth, return_inverse=True)
    if uniq.size < depth.size:
        warnings.append("control points at the same depth were averaged")
    mean_sp = np.bincount(inv, weights=sp) / np.bincount(inv)
    return uniq, mean_sp


def curve_values(points, depths) -> np.ndarray:
    """Evaluate the custom curve through `points` at `depths` (clamped to the end points outside
    their range), clipped to [0, MAX_RATIO]: straight segments between control points, as the editor draws them."""
    x, y = _clean_points(points, [])
    return np.clip(np.interp(np.asarray(depths, dtype=np.float64), x, y), 0.0, MAX_RATIO)


def block_depths(n_blocks: int) -> np.ndarray:
    """Relative depth of each block: b / (n_blocks - 1), 0 for a single block."""
    return np.arange(n_blocks) / (n_blocks - 1) if n_blocks > 1 else np.zeros(1)


def control_points(per_block, k: int | None = None) -> list[list[float]]:
    """A per-block allocation as [depth, sparsity] control points of a custom curve: every block, or
    `k` blocks evenly spread over depth (first and last included)."""
    n = len(per_block)
    idx = range(n) if k is None else np.unique(np.round(np.linspace(0, n - 1, max(2, int(k)))).astype(int))
    d = block_depths(n)
    return [[float(d[i]), float(per_block[i])] for i in idx]


def block_offsets(alloc: Allocation, metrics: pd.DataFrame) -> dict[str, float]:
    """Each prunable matrix's ratio in `alloc` minus its block's ratio (`alloc.per_block`, the parameter-weighted
    mean), for the matrices of `metrics` that `alloc` names: the per-matrix detail (AlphaPruning per layer, a
    search's kind offsets) that a curve of per-block control points averages away and `custom_allocation(...,
    offsets=...)` puts back. Empty when every matrix has its block's ratio (or `alloc` names none of them)."""
    df = prunable_rows(metrics)
    df = df[df["name"].isin(alloc.per_layer.keys()) & (df["block"] < len(alloc.per_block))]
    offsets = {str(n): alloc.per_layer[n] - alloc.per_block[int(b)] for n, b in zip(df["name"], df["block"])}
    return offsets if any(abs(v) > 1e-9 for v in offsets.values()) else {}


def curve_of(alloc: Allocation, metrics: pd.DataFrame, targets=None
             ) -> tuple[list[list[float]], dict[str, float], list[str], float | None]:
    """The custom curve that redraws `alloc` on the model of `metrics`: (control points, offsets, notes, target).
    A curve saved with its points comes back with them and its offsets; any other allocation gives one point
    per block and each matrix's offset from its block's ratio (block_offsets). target: the budget to normalize
    the curve to, for a curve saved "normalized to target" (its points are as drawn, its ratios rescaled);
    None: apply the curve as drawn. `targets` (the budgets a front end can set; None: any) that lack the file's
    own budget make such a file come back as its ratios, drawn. An allocation for another model (other blocks,
    or matrices this one lacks) keeps only its curve (depth compares across models, matrix names do not), with
    a note saying so. Notes also say when the file gives only some matrices their ratios (the others take
    their block's), when its ratios are not those of its own curve, and when points were clipped to the chart."""
    df = prunable_rows(metrics)
    pts, offsets, notes = alloc.params.get("points"), alloc.params.get("offsets") or {}, []
    unknown, blocks = sorted(set(alloc.per_layer) - set(df["name"])), _n_blocks(df)
    same_model = not unknown and len(alloc.per_block) == blocks
    target = alloc.sparsity if pts and alloc.params.get("normalize") else None
    if not same_model:
        offsets, pts = {}, pts or control_points(alloc.per_block)
        lacks = f", names {len(unknown)} matrices this one lacks (e.g. '{unknown[0]}')" if unknown else ""
        notes.append(f"The allocation was made for another model ({len(alloc.per_block)} blocks{lacks}; this one "
                     f"has {blocks}): its curve over depth is used, without its per-matrix ratios.")
    if target is not None and targets is not None and not any(math.isclose(target, t) for t in targets):
        target, pts = None, pts if not same_model else None
        loaded_as = "its ratios, drawn" if same_model else "drawn"
        notes.append(f"The curve was saved normalized to {alloc.sparsity:.2%}, which is not a target here: it is "
                     f"loaded as {loaded_as}.")
    if not pts:
        pts, offsets = control_points(alloc.per_block), block_offsets(alloc, metrics)
    check = custom_allocation(pts, metrics, sparsity=target, normalize=target is not None, offsets=offsets)
    if len(check.params["points"]) < 2:
        raise AllocationError("a curve on the chart needs at least two control points (at different depths)")
    if same_model:
        given = df["name"][df["name"].isin(alloc.per_layer.keys())]
        if 0 < len(given) < len(df):
            notes.append(f"The file gives {len(given)} of this model's {len(df)} matrices their ratios: the others "
                         "take their block's.")
        gap = max(abs(check.per_layer[n] - alloc.per_layer[n]) for n in given)
        if gap > 5e-4:
            notes.append(f"The file's ratios are not those of its own curve (up to {gap:.3f} apart): the curve is "
                         "what is loaded (its ratios as they are: --allocation FILE on the command line).")
    notes += check.warnings
    return check.params["points"], {str(k): float(v) for k, v in offsets.items()}, notes, target


def within_block_spread(offsets: dict[str, float], metrics: pd.DataFrame) -> float:
    """The largest difference between two matrices' `offsets` (block_offsets; a matrix without one: 0) inside
    one block: 0 for none."""
    if not offsets:
        return 0.0
    df = prunable_rows(metrics)
    values = df["name"].map(offsets).fillna(0.0).groupby(df["block"])
    return float((values.max() - values.min()).max())


def kind_offsets(offsets: dict[str, float], metrics: pd.DataFrame) -> dict[str, float]:
    """Each matrix kind's mean offset (block_offsets) over the prunable matrices of that kind, in order of first
    appearance: 0 for a kind without offsets."""
    df = prunable_rows(metrics, ("kind",))
    values = df["name"].map(offsets).fillna(0.0)
    return {str(k): float(v) for k, v in values.groupby(df["kind"], sort=False).mean().items()}


def set_kind_offset(offsets: dict[str, float], metrics: pd.DataFrame, kind: str, value: float) -> dict[str, float]:
    """`offsets` with every matrix of `kind` moved by the same amount so that the kind's mean offset is `value`:
    the differences between its blocks are kept. Offsets that become 0 are left out."""
    df = prunable_rows(metrics, ("kind",))
    names = df.loc[df["kind"] == kind, "name"]
    if names.empty:
        raise AllocationError(f"this model prunes no matrix of kind '{kind}'")
    if not math.isfinite(value):
        raise AllocationError(f"an offset must be a finite number, got {value}")
    shift = value - kind_offsets(offsets, metrics)[kind]
    moved = {**offsets, **{str(n): offsets.get(n, 0.0) + shift for n in names}}
    return {n: v for n, v in moved.items() if abs(v) > 1e-12}


def custom_allocation(points, metrics: pd.DataFrame, sparsity: float | None = None, normalize: bool = True,
                      model: str = "", offsets: dict[str, float] | None = None) -> Allocation:
    """Ratios from a hand-drawn curve: control points (depth in [0, 1], sparsity in [0, 0.99]);
    block b of n sits at depth b / (n - 1). `offsets` (matrix name -> ratio, from block_offsets) are added
    to the curve's value at each matrix's block, clipped to [0, 0.99], so a curve taken from a per-matrix
    allocation reproduces it (its offsets average to zero in each block, which keeps the curve's value as the
    block's mean; offsets edited by hand need not, and then move it). normalize=True scales the ratios so the
    budget equals `sparsity` (required then); normalize=False applies them as drawn and `achieved` is the
    budget they imply (`sparsity` then records the target if given, else the implied budget)."""
    warnings: list[str] = []
    x, y = _clean_points(points, warnings)
    df = prunable_rows(metrics)
    per_block = curve_values(list(zip(x, y)), block_depths(_n_blocks(df)))
    ratios = per_block[df["block"].to_numpy(int)]
    if offsets:
        if not isinstance(offsets, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                    for v in offsets.values()):
            raise AllocationError("offsets must map matrix names to finite numbers")
        if (far := [k for k, v in offsets.items() if abs(v) > MAX_RATIO]):
            raise AllocationError(f"offset {offsets[far[0]]:g} of '{far[0]}' is outside ±{MAX_RATIO} (an offset is "
                                  "the difference of two ratios)")
        unknown = sorted(set(offsets) - set(df["name"]))
        if unknown:
            raise AllocationError(f"offsets for {len(unknown)} matrices this model does not prune (e.g. "
                                  f"'{unknown[0]}'); were they made for another model?")
        shifted = ratios + df["name"].map(offsets).fillna(0.0).to_numpy(float)
        ratios = np.clip(shifted, 0.0, MAX_RATIO)
        if (ratios != shifted).any():
            warnings.append(f"{int((ratios != shifted).sum())} matrices' ratios with their offsets were clipped "
                            f"to [0, {MAX_RATIO}]")
    p = df["params"].to_numpy(float)
    if normalize:
        if sparsity is None:
            raise AllocationError("normalize=True needs a target sparsity")
        s = check_sparsity(sparsity)
        if s > 0 and not (ratios > 0).any():  # exact_budget then shifts: every matrix gets the target
            warnings.append(f"the curve prunes nothing, so it has no shape to scale to the target: every matrix "
                            f"gets {s:.1%}")
        ratios = exact_budget(ratios, p, s, mode="scale")
    else:
        s = budget(ratios, p) if sparsity is None else check_sparsity(sparsity)
    params = {"points": [[float(a), float(b)] for a, b in zip(x, y)], "normalize": bool(normalize)}
    if offsets:
        params["offsets"] = {str(k): float(v) for k, v in offsets.items()}
    if warnings:
        params["warnings"] = warnings
    return _finish(df, ratios, s, "custom", params, model)


def parse_points(text: str) -> list[tuple[float, float]]:
    """Parse "0:0.5,0.5:0.7,1:0.8" into [(0.0, 0.5), (0.5, 0.7), (1.0, 0.8)]."""
    pts = []
    for item in filter(None, (t.strip() for t in str(text).split(","))):
        parts = item.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            pts.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise AllocationError(f"bad control point {item!r}; write depth:sparsity, e.g. 0.5:0.7") from None
        depth, sparsity = pts[-1]
        if not 0.0 <= depth <= 1.0:  # typed points are refused; only a drawn curve is clipped to the chart
            raise AllocationError(f"control point {item!r}: depth {depth:g} is outside [0, 1]")
        if not 0.0 <= sparsity <= MAX_RATIO:
            raise AllocationError(f"control point {item!r}: sparsity {sparsity:g} is outside [0, {MAX_RATIO}] "
                                  "(a matrix keeps at least 1% of its weights)")
    if not pts:
        raise AllocationError("no control points given; write e.g. 0:0.5,1:0.8")
    return pts
