"""Allocation search ("auto"): an evolutionary search over per-block sparsity with the budget fixed,
in the spirit of EvoPress (Sieberling et al., 2024, "EvoPress: Towards Optimal Dynamic Model
Compression via Evolutionary Search").

Search space. Around the parent start, whose per-block ratios are r_b: block b gets the ratio
r_b + k_b * step (k_b an integer offset, 0 at the start); every matrix of a block gets its block's
ratio. Blocks with the same number of prunable weights form a group (in the decoder-only models here:
all blocks), and a move takes one step of sparsity from one block and gives it to another block of its
group, so sum_b params_b * ratio_b stays the start's budget exactly at every step (the offsets of each
group add up to zero). The grid is anchored on the start's own ratios, not on multiples of the step:
rounding a start to such a grid moves each block by up to step / 2, which cost OWL 0.09 nats of
held-out NLL after a real prune (Gemma-3, SparseGPT 70%), more than most of the search's moves gain.
With `space` "block+kind", every matrix kind found in every block the same number of times (once, or once per
MoE expert) with one size (q_proj, ..., down_proj, experts.down_proj) also gets an offset, the same in every
block, added to its block's ratio: a kind move takes one step from the kind with fewer weights per block and
the same number of weights from (or to) another kind, so every block
keeps its ratio and the budget stays exact (in a model with few key/value heads, such as Gemma-3 with one, the
small k_proj and v_proj serve every head, and how much to prune them is not its block's question alone).

Fitness (`objective`). Per predicted token in nats: "nll", the pruned model's next-token NLL; or "kl",
KL(dense || pruned) between the dense and the pruned model's next-token distributions (EvoPress's
choice: it asks the pruned model to behave like the dense one, not to fit the text; the dense
log-probabilities are computed once and kept in float16 on the CPU). Measured on the calibration text,
or on a held-out text (`fitness_windows`, e.g. the valid split of the user's domain: the search then
does not fit the calibration sample the pruner's statistics come from). A few short windows (the first
`screen_samples` sequences cut to `screen_seqlen` tokens) to screen offspring, every sequence cut to
`confirm_seqlen` tokens to confirm (or `confirm_samples` of them, spread over the set: with `verify`
"starts" or "all" the real prunes are scored on every sequence); the parent is replaced only
when an offspring is better on the confirmation tokens, so the result is never worse (on that
fitness) than the best start.

Cheap candidates. The dense model's input statistics are gathered once (one calibration walk), each
block is pruned at a level the first time a candidate needs it, with those dense statistics, and the
result is cached (a mask for pruners that only remove weights, the updated weights for SparseGPT);
a candidate is then assembled by writing cached block weights into the model, only for the blocks
that differ from the candidate before. As in EvoPress, blocks are pruned from dense inputs here,
while the final pruning (analysis.pruning.prune) feeds each block the outputs of the pruned blocks
before it, so the search ranks allocations on a close proxy of the final model.

Verification (`verify`: "none", "starts" or "all"). The stitched proxy can misrank allocations where a
block's pruning depends much on its inputs (SparseGPT's reconstruction at 70% on Gemma-3 ranks OWL last
stitched, first after a real prune). With "starts" or "all", every start is pruned for real (block by
block, each block fed the outputs of the pruned blocks before it, as analysis.pruning.prune does) at its
own ratios and scored on every scored sequence; the best of them is the parent, and the cached levels
are re-anchored on it (`BlockLevels.anchor`: each block pruned from the statistics of its inputs in that
real prune), so the proxy is exact at the parent and close around it. With "starts" the proxy search
then runs from there, and its result is pruned for real once at the end: it is kept only if it beats
that start after the real prune (else the start is returned), so on the search's text the result is
never worse than the best start after a real prune, for one prune per start plus one. That decision is
made on tokens no candidate was selected on when the windows have them: the tokens after the first
`confirm_seqlen` of each window (each predicted with the window before it as context), when there are at
least as many (the calibration windows, 256 tokens by default). The search's moves are chosen on the
first `confirm_seqlen` tokens, so its result's gain there is the best of many tries and overstates the
gain on other text (measured: bench/SEARCH.md, "Decided on tokens it did not select on"). With "all" every
offspring the proxy confirms is pruned for real too: it replaces the parent only if it is better after
that real prune (and becomes the anchor), so every step of the history is a real improvement. Cost: one
full prune per start and per confirmed offspring (a repeated candidate is not pruned again); the levels
of the blocks before the first block that changed are kept. A real prune's block walk ends with the pruned
model's final hidden states on the calibration windows: when the fitness is measured there, only the model's
norm and head run to score it (`calibration.replaying`, checked against a forward on the first prune), and
all its scored tokens (the first `confirm_seqlen` and the later ones) come from that one pass. Memory: while
a candidate is pruned for real, the parent's anchor (statistics and cached levels) is kept to go back to,
so up to two sets of per-block statistics are held.

Starts: the given allocations (uniform, OWL, AlphaPruning, FARMS, ... computed by the caller), each scored at
its own per-block ratios; a start the search does not improve on is returned unchanged (its per-layer
ratios too). Deterministic for a seed.
"""
from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.allocation import MAX_RATIO, Allocation, AllocationError, budget
from analysis.calibration import InputStats, replaying, walk_blocks
from analysis.evaluation import token_nll
from analysis.jobs import JobCancelled
from analysis.layers import LayerRef, find_blocks, layers_by_block, module_device, module_device_dtype
from analysis.loading import hessian_bytes
from analysis.pruners import get_pruner
from analysis.pruning import DenseSnapshot, layer_pruner
from analysis.runtime import ProgressFn, StopFlag, should_stop
from analysis.settings import (
    SEARCH_OBJECTIVES,
    SEARCH_SEQLEN,
    SEARCH_SPACES,
    SEARCH_STEP,
    VERIFY_MODES,
    AllocationSettings,
    PruneSettings,
    search_samples,
)

OnBest = Callable[[list[float], float, int], None]  # (per-block ratios, confirmed fitness, step)
# the level cache holds at most this many prunes' worth of every prunable matrix (least recently used dropped
# beyond: pruned again when needed); unbounded, it grew with every ratio a block visited
LEVEL_SETS = 4.0
REAL_PRUNE_UNITS = 4  # a real prune's time in generations, for the progress's fraction (roughly: both vary)


@dataclass(frozen=True)
class Grid:
    """The search space around a start: block b's ratio is base[b] + k[b] * step, with the offset k[b]
    within [lo[b], hi[b]] so that the ratio stays within [0, MAX_RATIO]. Each matrix keeps the start's
    difference from its block's ratio (`within`: a curve's per-matrix offsets, a per-matrix allocation).
    With `kinds` (the "block+kind" space), the state k has one more entry per kind, in steps: every matrix
    of that kind gets k[n_blocks + i] * step added to its block's ratio (see `per_layer`)."""

    base: tuple[float, ...]  # the start's per-block ratios
    step: float
    groups: tuple[tuple[int, ...], ...]  # blocks with equal prunable weights
    params: tuple[int, ...]  # prunable weights per block
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    layers: tuple[tuple[str, int, int], ...] = ()  # per matrix: (name, block, index in kinds or -1)
    kinds: tuple[str, ...] = ()  # the matrix kinds with an offset
    kind_params: tuple[int, ...] = ()  # weights of each kind in one block
    within: tuple[float, ...] = ()  # per matrix of `layers`: the start's ratio minus its block's (0 when not given)

    @classmethod
    def around(cls, per_block: list[float], params: list[int], step: float = SEARCH_STEP,
               layers: list[tuple[str, int, str, int]] | None = None, by_kind: bool = False,
               per_layer: dict[str, float] | None = None) -> Grid:
        """`layers`: (name, block, kind, weights) of every matrix, for `per_layer`; `by_kind` (the "block+kind"
        space): the kinds found in every block the same number of times (once, or once per MoE expert), with
        the same size everywhere, get offsets (at least two such). `per_layer`: the start's ratio of each matrix,
        when they differ within a block (`per_block` is then their parameter-weighted mean, as an Allocation's)."""
        by_size: dict[int, list[int]] = {}
        for b, p in enumerate(params):
            if p > 0:
                by_size.setdefault(p, []).append(b)
        base = tuple(float(r) if p else 0.0 for r, p in zip(per_block, params))
        lo = tuple(-int(math.floor(r / step + 1e-9)) for r in base)
        hi = tuple(int(math.floor((MAX_RATIO - r) / step + 1e-9)) for r in base)
        blocks = [b for b, p in enumerate(params) if p > 0]
        layers = layers or []
        per_block = {kind: Counter(b for _, b, k, _ in layers if k == kind)
                     for kind in dict.fromkeys(kind for _, _, kind, _ in layers)} if by_kind else {}
        kinds = [kind for kind, count in per_block.items()
                 if sorted(count) == blocks and len(set(count.values())) == 1
                 and len({n for _, _, k, n in layers if k == kind}) == 1]
        kinds = kinds if len(kinds) > 1 else []
        index = {kind: i for i, kind in enumerate(kinds)}
        rows = tuple((name, b, index.get(kind, -1)) for name, b, kind, _ in layers)
        # a kind's weights in one block: its matrices there (MoE: one per expert) x their size
        sizes = tuple(per_block[kind][blocks[0]] * next(n for _, _, k, n in layers if k == kind) for kind in kinds)
        within = tuple(per_layer[name] - base[b] for name, b, _, _ in layers) if per_layer else ()
        return cls(base, step, tuple(tuple(g) for g in by_size.values()), tuple(params), lo, hi, rows,
                   tuple(kinds), sizes, within if any(abs(d) > 1e-12 for d in within) else ())

    def ratios(self, k: np.ndarray) -> list[float]:
        """Per block: its ratio (with kinds, the weighted mean of its matrices' ratios, which kinds do not move)."""
        return [min(max(r + int(o) * self.step, 0.0), MAX_RATIO) if p else 0.0
                for r, o, p in zip(self.base, k, self.params)]

    def per_layer(self, k: np.ndarray) -> dict[str, float]:
        """Per matrix of `layers`, by name: its block's ratio plus its difference from it in the start and its
        kind's offset (0 for a kind without one)."""
        per_block, n = self.ratios(k), len(self.base)
        within = self.within or (0.0,) * len(self.layers)
        return {name: per_block[b] + d + (float(k[n + i]) * self.step if i >= 0 else 0.0)
                for (name, b, i), d in zip(self.layers, within)}

    def valid(self, k: np.ndarray) -> bool:
        """Every matrix's ratio within [0, MAX_RATIO] (the block bounds alone ensure it when all the matrices of a
        block share its ratio)."""
        return not (self.kinds or self.within) or all(-1e-9 <= r <= MAX_RATIO + 1e-9
                                                      for r in self.per_layer(k).values())

    def budget(self, k: np.ndarray) -> float:
        return budget(self.ratios(k), self.params)

    def offsets(self, k: np.ndarray) -> dict[str, float]:
        """Each kind's offset (a sparsity) in state k."""
        n = len(self.base)
        return {kind: float(k[n + i]) * self.step for i, kind in enumerate(self.kinds)}


def mutate(k: np.ndarray, grid: Grid, rng: np.random.Generator, max_moves: int = 3) -> np.ndarray:
    """A copy of `k` with 1..max_moves moves, each taking one step from a block and giving it to
    another block of the same group (within the bounds), so the budget does not change. With kinds, a move
    is a kind move with probability kinds / (kinds + blocks): one kind gives one step (a kind with bigger
    matrices: as many weights) to another, so every block keeps its ratio; a move that would take a matrix
    outside [0, MAX_RATIO] is not made."""
    k = k.copy()
    groups = [g for g in grid.groups if len(g) > 1]
    if not groups and not grid.kinds:
        return k
    sizes = np.asarray([len(g) for g in groups], dtype=np.float64)
    share = len(grid.kinds) / (len(grid.kinds) + sizes.sum())
    for _ in range(int(rng.integers(1, max_moves + 1))):
        if grid.kinds and (not groups or rng.random() < share):
            _kind_move(k, grid, rng)
            continue
        g = groups[int(rng.choice(len(groups), p=sizes / sizes.sum()))]
        up = [b for b in g if k[b] < grid.hi[b]]
        down = [b for b in g if k[b] > grid.lo[b]]
        if not up or not down:
            continue
        i = up[int(rng.integers(len(up)))]
        rest = [b for b in down if b != i]
        if not rest:
            continue
        j = rest[int(rng.integers(len(rest)))]
        k[i] += 1
        k[j] -= 1
        if not grid.valid(k):
            k[i] -= 1
            k[j] += 1
    return k


def _kind_move(k: np.ndarray, grid: Grid, rng: np.random.Generator) -> None:
    """Kind i up, kind j down, by the same number of weights in every block: the kind with fewer weights
    per block moves one step, the other step * (their ratio); undone if a matrix would leave the bounds."""
    i, j = (int(x) for x in rng.choice(len(grid.kinds), size=2, replace=False))
    small = min(grid.kind_params[i], grid.kind_params[j])
    di, dj = small / grid.kind_params[i], small / grid.kind_params[j]
    n = len(grid.base)
    k[n + i] += di
    k[n + j] -= dj
    if not grid.valid(k):
        k[n + i] -= di
        k[n + j] += dj


class BlockLevels:
    """Each block's matrices pruned at given ratios, from the dense weights and the input statistics
    of an anchor allocation, computed on first use, cached and written into the model on demand.

    The first anchor is the dense model (every block's statistics from dense inputs: EvoPress's
    proxy). `anchor(per_layer)` re-gathers them with the model pruned at `per_layer`, block by block
    as analysis.pruning.prune does, so the model is then exactly that real prune, and candidates near
    it are assembled from blocks pruned with nearly the inputs a real prune would feed them."""

    def __init__(self, model: nn.Module, calib: torch.Tensor, method: str,
                 progress: ProgressFn | None = None, device: str | torch.device | None = None,
                 level_sets: float = LEVEL_SETS):
        self.model, self.calib, self.device, self.method = model, calib, device, method
        self.pruner = get_pruner(method)
        self.refs: dict[int, list[LayerRef]] = layers_by_block(model)
        self.dense = DenseSnapshot.take(model)
        self.stats: dict[str, InputStats] = {}
        # (block, matrix, ratio) -> that matrix pruned: per matrix, so a move that changes some matrices of a
        # block (a kind move) prunes only those; in order of use, within `budget` bytes (a mask is 1 byte per
        # weight, SparseGPT's updated weights the dense dtype's)
        self.cache: OrderedDict[tuple[int, str, float], torch.Tensor] = OrderedDict()
        one = sum(w.numel() * (1 if self.pruner.mask else w.element_size()) for w in self.dense.weights.values())
        self.budget, self.cached = int(level_sets * one), 0
        self.applied: dict[str, float] = {}  # per matrix; absent: dense
        self.stop: StopFlag = None  # while set, `apply` raises JobCancelled between blocks once it asks to stop
        self.anchored: dict[str, float] = {}  # the anchor's ratios ({}: dense)
        if self.pruner.statistic:
            def keep(_b: int, _refs, stats: dict[str, InputStats]) -> bool:
                self.stats.update(stats)
                return False
            walk_blocks(model, calib, keep, hessian=self.pruner.statistic == "hessian", device=device,
                        progress=progress, label="search statistics: block")

    def _key(self, b: int, per_layer: dict[str, float]) -> tuple[float, ...]:
        # rounded: the same ratio reached by other moves hits the cache
        return tuple(round(float(per_layer.get(r.name, 0.0)), 12) for r in self.refs[b])

    def _level(self, b: int, ref: LayerRef, ratio: float) -> torch.Tensor:
        key = (b, ref.name, ratio)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        w = self.dense.weights[ref.name].float()
        pruner, stat = layer_pruner(self.method, self.stats.get(ref.name))
        w = w.to(stat.device) if stat is not None else w
        # pruners that only remove weights are kept as masks (1 byte per weight)
        level = pruner.mask(w, ratio, None, stat).cpu() if pruner.mask \
            else pruner.apply(w, ratio, None, stat).to("cpu", self.dense.weights[ref.name].dtype)
        self.cache[key] = level
        self.cached += level.nbytes
        while self.cached > self.budget and len(self.cache) > 1:
            self.cached -= self.cache.popitem(last=False)[1].nbytes
        return level

    def _keep(self, cache: dict) -> None:
        """Hold these levels (in their order of use), counted against the budget."""
        self.cache = OrderedDict(cache)
        self.cached = sum(v.nbytes for v in self.cache.values())

    def _write(self, b: int, key: tuple[float, ...]) -> None:
        """Block b's matrices at these ratios (only those that differ from what the model holds)."""
        with torch.no_grad():
            for ref, ratio in zip(self.refs[b], key):
                if self.applied.get(ref.name) != ratio:
                    new, dense = self._level(b, ref, ratio), self.dense.weights[ref.name]
                    ref.weight().copy_(dense.masked_fill(new, 0.0) if new.dtype == torch.bool else new)
                    self.applied[ref.name] = ratio

    def apply(self, per_layer: dict[str, float]) -> None:
        """Write the candidate with these per-matrix ratios into the model (only matrices that changed)."""
        for b in self.refs:
            if should_stop(self.stop):  # a first candidate's levels (SparseGPT's, a large model's) take minutes
                raise JobCancelled("stopped before the search had a best allocation")
            self._write(b, self._key(b, per_layer))

    def anchor(self, per_layer: dict[str, float], stop: StopFlag = None, progress: ProgressFn | None = None,
               label: str = "block", on_output: Callable[[torch.Tensor], None] | None = None) -> bool:
        """Prune the model for real at `per_layer` and make it the anchor: each block's statistics are
        gathered from the outputs of the pruned blocks before it and its levels are pruned from them.
        Levels of the blocks up to the first whose ratios change are kept (their inputs do not change).
        `progress` sees "{label} b/n" after each block; `on_output` gets the pruned model's final hidden
        states on the calibration batch (see walk_blocks; not for a pruner without statistics, whose walk
        runs no data). False if `stop` ended it (the levels are then mixed: `load` a saved state)."""
        changed = [b for b in self.refs if self._key(b, per_layer) != self._key(b, self.anchored)]
        first = min(changed, default=max(self.refs) + 1)
        self._keep({k: v for k, v in self.cache.items() if k[0] <= first})
        self.restore()

        def on_block(b: int, _refs, stats: dict[str, InputStats]) -> bool:
            self.stats.update(stats)
            if b in self.refs:
                self._write(b, self._key(b, per_layer))
            return True
        done = walk_blocks(self.model, self.calib if self.pruner.statistic else None, on_block,
                           hessian=self.pruner.statistic == "hessian", device=self.device, stop=stop,
                           progress=progress, label=label, on_output=on_output)
        self.anchored = dict(per_layer)
        return done == len(find_blocks(self.model)[1])

    def save(self) -> tuple:
        """The anchor, statistics and levels (references, not copies: the levels it holds stay in memory beside
        the budget until it is dropped), for `load`."""
        return self.anchored, dict(self.stats), OrderedDict(self.cache)

    def load(self, state: tuple) -> None:
        anchored, stats, cache = state
        self.anchored, self.stats = anchored, dict(stats)
        self._keep(cache)
        self.applied = {}  # the model holds other weights now

    def restore(self) -> None:
        self.dense.restore(self.model)
        self.applied = {}


def search_memory(model: nn.Module, settings: AllocationSettings, method: str, param_bytes: int, n_samples: int,
                  seqlen: int) -> int:
    """Bytes the allocation search holds beyond what pruning `model` (its shapes: a meta-device skeleton will do)
    with `method` needs, for a calibration batch of n_samples x seqlen tokens: the dense values of the prunable
    matrices (param_bytes each), the level cache (LEVEL_SETS prunes' worth), SparseGPT's Hessians of every matrix
    (a prune holds one block's), and the "kl" objective's dense log-probabilities (float16); a search that prunes
    for real (verify) keeps a second set of levels and statistics, its parent's, to go back to."""
    refs = layers_by_block(model)
    params = sum(r.params for block in refs.values() for r in block)
    pruner = get_pruner(method)
    held = 1 if settings.search_verify == "none" else 2
    levels = held * LEVEL_SETS * params * (1 if pruner.mask else param_bytes)
    hessians = held * sum(hessian_bytes(model)) if pruner.statistic == "hessian" else 0
    windows = search_samples(n_samples, settings.search_verify, settings.search_samples) \
        if settings.search_text is not None else n_samples
    vocab = model.get_input_embeddings().num_embeddings
    reference = windows * seqlen * vocab * 2 if settings.search_objective == "kl" else 0
    return int(params * param_bytes + levels + hessians + reference)


def log_probs(model: nn.Module, windows: torch.Tensor, batch: int = 4, from_token: int = 1) -> torch.Tensor:
    """Next-token log-probabilities (n, L-from_token, vocab) of `model` on `windows` (n, L) for the tokens at
    positions from_token..L-1, float16 on the CPU: the dense reference of the "kl" objective."""
    dev = module_device(model)
    parts = []
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            logits = model(input_ids=windows[i: i + batch].to(dev), use_cache=False).logits[:, from_token - 1:-1]
            logits = logits.float()
            parts.append(F.log_softmax(logits, dim=-1).to("cpu", torch.float16))
    return torch.cat(parts)


def token_losses(model: nn.Module, windows: torch.Tensor, batch: int = 4, reference: torch.Tensor | None = None,
                 from_token: int = 1, final: torch.Tensor | None = None) -> torch.Tensor:
    """Per window of `windows` (n, L) and predicted token at positions from_token..L-1 (each predicted with all
    the window before it), shape (n, L-from_token), float64 nats of `model`: the next-token NLL, or, given
    `reference` (`log_probs` of the dense model on the same windows and positions), KL(dense || model).
    `final`: the last decoder block's outputs on `windows` (n, L, hidden size), e.g. a block walk's: only the
    model's norm and head run (see calibration.replaying)."""
    dev = module_device(model)
    blocks = find_blocks(model)[1] if final is not None else None
    out = []
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            w = windows[i: i + batch].to(dev)
            with replaying(blocks, final[i: i + batch]) if final is not None else nullcontext():
                if reference is None:
                    per_token = token_nll(model, w)[:, from_token - 1:]
                else:
                    logits = model(input_ids=w, use_cache=False).logits[:, from_token - 1:-1].float()
                    ref = reference[i: i + batch].to(logits.device).float()
                    per_token = (ref.exp() * (ref - F.log_softmax(logits, dim=-1))).sum(-1)
            out.append(per_token.double().cpu())
    return torch.cat(out)


def window_losses(model: nn.Module, windows: torch.Tensor, batch: int = 4,
                  reference: torch.Tensor | None = None, from_token: int = 1,
                  final: torch.Tensor | None = None) -> np.ndarray:
    """Per window, the mean of `token_losses` (nats per predicted token)."""
    return token_losses(model, windows, batch, reference, from_token, final).mean(1).numpy()


def fitness(model: nn.Module, windows: torch.Tensor, batch: int = 4, reference: torch.Tensor | None = None) -> float:
    """Mean per predicted token (nats) over `windows` (see `window_losses`; the windows have equal lengths)."""
    return float(window_losses(model, windows, batch, reference).mean())


def paired_gain(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """(mean gain, its standard error) in nats/token from per-window losses of two allocations on the same
    windows: gain = mean(before - after), SE = std(before - after) / sqrt(n) (paired over windows; nan
    for a single window)."""
    d = np.asarray(before, dtype=np.float64) - np.asarray(after, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
    return float(d.mean()), se


def search_allocation(model: nn.Module, calib: torch.Tensor, starts: dict[str, Allocation],
                      prune_method: str = PruneSettings.method, steps: int = AllocationSettings.search_steps,
                      seed: int = AllocationSettings.search_seed, step: float = AllocationSettings.search_step,
                      space: str = AllocationSettings.search_space, offspring: int = 4,
                      screen_samples: int = 4, screen_seqlen: int = 128, confirm_seqlen: int = SEARCH_SEQLEN,
                      confirm_samples: int | None = None, objective: str = AllocationSettings.search_objective,
                      fitness_windows: torch.Tensor | None = None, verify: str = AllocationSettings.search_verify,
                      model_name: str = "",
                      progress: ProgressFn | None = None, stop: StopFlag = None,
                      on_best: OnBest | None = None) -> Allocation:
    """Search a per-block allocation at the budget of `starts` (name -> Allocation, all with the same
    sparsity, for this model) with pruner `prune_method`; `model` must be dense and is dense again on
    return. `steps` generations of `offspring` mutants each; `stop` ends the search early (the best
    so far is returned; while the first start is scored there is none, and it raises JobCancelled). The
    fitness is measured on `fitness_windows` (token ids (n, L)) when given, else on `calib`, which always
    gives the pruner's statistics. `verify` (one of VERIFY_MODES): "none",
    the proxy decides; "starts", the starts and the result are pruned for real, and the result is kept
    only if it beats the best start after the real prunes; "all", also every offspring the proxy confirms,
    and only a real improvement replaces the parent (see the module docstring). The defaults are the front ends'
    (AllocationSettings' search_* fields, PruneSettings.method). The result's params hold
    the search's settings, the starts' fitness, the history (one entry per improvement, its fitness the
    proxy's unless "all"), the real prunes' fitness (`verified`: start name, "step N" or "result" ->
    fitness), what was kept (`result`, `real_fitness`), the result's `gain` over the start it went on from
    (nats/token on the same windows: the confirmation windows, or the real prunes' when they decide, or with
    "starts" the tokens its decision was made on: `decided` holds both fitnesses there and `decision_tokens`
    their number, see the module docstring; `gain_se` its standard error paired over the `gain_windows`
    windows), its cost (seconds, forward passes, tokens, real prunes) and `device`, the type of device its real
    prunes ran on."""
    if not starts:
        raise AllocationError("the search needs at least one start allocation")
    sparsity = next(iter(starts.values())).sparsity
    if calib is None or calib.dim() != 2:
        raise AllocationError("the search needs calibration data (calib = token ids, shape (n, seqlen)).")
    if objective not in SEARCH_OBJECTIVES:
        raise AllocationError(f"objective must be one of {', '.join(SEARCH_OBJECTIVES)}, got {objective!r}")
    if verify not in VERIFY_MODES:
        raise AllocationError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    if space not in SEARCH_SPACES:
        raise AllocationError(f"space must be one of {', '.join(SEARCH_SPACES)}, got {space!r}")
    if fitness_windows is not None and (fitness_windows.dim() != 2 or fitness_windows.shape[1] < 2):
        raise AllocationError("fitness_windows must be token ids of shape (n, seqlen >= 2).")
    t0 = time.perf_counter()
    refs = layers_by_block(model)
    n_blocks = max(refs) + 1
    params = [sum(r.params for r in refs.get(b, [])) for b in range(n_blocks)]
    levels = BlockLevels(model, calib, prune_method, progress)
    scored = calib if fitness_windows is None else fitness_windows
    where = "calibration" if fitness_windows is None else "held-out"
    checked = scored[:, :confirm_seqlen]  # where a real prune is scored
    real_starts, real_steps = verify != "none", verify == "all"
    confirm = checked if confirm_samples is None else checked[_spread(checked.shape[0], confirm_samples)]
    screen = confirm[:screen_samples, :screen_seqlen]
    # "starts" decides whether its result beats its start on the tokens after `checked` in each window, which no
    # candidate was selected on, when there are at least as many (calibration windows of 2 x confirm_seqlen tokens)
    tail = verify == "starts" and scored.shape[1] >= 2 * confirm_seqlen
    whole = scored if tail else checked  # a real prune's windows, scored in one pass
    # a real prune's block walk ends with the pruned model's final hidden states on the calibration windows: when
    # those are the scored windows, only the norm and head run to score it (checked against a forward once)
    walked = fitness_windows is None and levels.pruner.statistic is not None
    replays: list[bool] = []
    cost = {"forward_passes": 0, "tokens": 0, "real_prunes": 0}
    # the model is still dense here: its log-probabilities are the KL objective's reference
    reference: dict[int, torch.Tensor] = {}
    if objective == "kl":
        if real_starts:
            reference[id(whole)] = log_probs(model, whole)
            reference[id(checked)] = reference[id(whole)][:, :confirm_seqlen - 1]  # the same positions
        for w in (screen, confirm):
            if id(w) not in reference:
                reference[id(w)] = log_probs(model, w)

    def losses(per_layer: dict[str, float], windows: torch.Tensor) -> np.ndarray:
        levels.apply(per_layer)
        cost["forward_passes"] += math.ceil(windows.shape[0] / 4)
        cost["tokens"] += int(windows.numel())
        return window_losses(model, windows, reference=reference.get(id(windows)))

    def real_token_losses(final: torch.Tensor | None) -> torch.Tensor:
        """Per-token fitness of the model as a real prune left it on `whole`, from `final` (the last block's
        outputs on the calibration windows) when replaying them through the head gives a forward's losses."""
        ref = reference.get(id(whole))
        final = None if final is None else final[:, :whole.shape[1]]
        if final is not None and not replays:
            cost["forward_passes"] += 1
            replays.append(_replays(model, whole[:4], final[:4], None if ref is None else ref[:4]))
        if final is not None and replays[0]:
            return token_losses(model, whole, reference=ref, final=final)
        cost["forward_passes"] += math.ceil(whole.shape[0] / 4)
        cost["tokens"] += int(whole.numel())
        return token_losses(model, whole, reference=ref)

    def score(per_layer: dict[str, float], windows: torch.Tensor) -> float:
        return float(losses(per_layer, windows).mean())

    real_fits: dict[tuple, np.ndarray] = {}
    real_tails: dict[tuple, np.ndarray] = {}  # with `tail`: per-window fitness on the tokens after `checked`

    def real(per_layer: dict[str, float], what: str, at: float, note: str = "") -> np.ndarray | None:
        """Per-window fitness on all the scored windows after a real prune at these ratios (every block
        fed by the pruned blocks before it, as the final prune does), which becomes the levels' anchor;
        the known fitness (and no prune) for ratios pruned before; None if stopped. Progress names
        `what` is pruned, block by block, at fraction `at` of the search, each line ending with `note`."""
        key = tuple(per_layer.items())
        if key not in real_fits:
            show = progress and (lambda message, _f: progress(message + note, at))
            final: list[torch.Tensor] = []
            if not levels.anchor(per_layer, stop, show, f"search: pruning {what} for real, block",
                                 on_output=final.append if walked else None):
                return None
            cost["real_prunes"] += 1
            x = real_token_losses(final[0] if final else None)
            real_fits[key] = x[:, :confirm_seqlen - 1].mean(1).numpy()
            if tail:
                real_tails[key] = x[:, confirm_seqlen - 1:].mean(1).numpy()
        return real_fits[key]

    def lead(scores: dict[str, float]) -> str:
        """The best start so far, for the progress while the starts are scored (there is no step yet)."""
        if not scores:
            return ""
        name = min(scores, key=scores.get)
        return f" (best so far: {name}, {where} {objective.upper()} {scores[name]:.4f})"

    # the progress's fraction, in units of a generation: a start's proxy score about one, a real prune about
    # REAL_PRUNE_UNITS (the starts took most of a search at 0% before)
    first_step = len(starts) * (1 + (REAL_PRUNE_UNITS if real_starts else 0))

    def fraction(units: float) -> float:
        return units / (first_step + steps)

    rng = np.random.default_rng(seed)
    try:
        start_scores: dict[str, float] = {}
        levels.stop = stop  # until a start is scored there is no best to return: a stop ends the search there
        for i, (name, alloc) in enumerate(starts.items()):
            if progress:
                progress(f"search: scoring the start {name} ({i + 1}/{len(starts)}){lead(start_scores)}", fraction(i))
            start_scores[name] = float(losses(alloc.per_layer, confirm).mean())
            levels.stop = None
        verified: dict[str, float] = {}
        real_losses: dict[str, np.ndarray] = {}
        best_state, best_fit = None, math.inf
        if real_starts:
            for j, (name, alloc) in enumerate(starts.items()):
                x = real(alloc.per_layer, f"the start {name}", fraction(len(starts) + j * REAL_PRUNE_UNITS),
                         lead(verified))
                if x is None:
                    break
                fit = float(x.mean())
                real_losses[name], verified[name] = x, fit
                if fit < best_fit:  # the first best start's anchor (a start seen before is not re-anchored)
                    best_state, best_fit = levels.save(), fit
        best_name = min(verified or start_scores, key=lambda n: verified.get(n, start_scores[n]))
        if best_state is not None:
            levels.load(best_state)
        layers = [(r.name, b, r.kind, r.params) for b, rs in refs.items() for r in rs]
        grid = Grid.around(starts[best_name].per_block, params, step, layers, by_kind=space == "block+kind",
                           per_layer=starts[best_name].per_layer)
        # kind offsets are fractions of a step: the kind with the bigger matrices moves less
        parent = np.zeros(n_blocks + len(grid.kinds), dtype=np.float64 if grid.kinds else np.int64)
        anchor_windows = losses(grid.per_layer(parent), confirm)  # the proxy's, on the anchor
        parent_confirm = float(anchor_windows.mean())
        parent_screen = score(grid.per_layer(parent), screen)
        real_parent = real_steps and best_name in real_losses  # not when stopped before any start's real prune
        parent_fit = verified[best_name] if real_parent else parent_confirm
        # what the gain is measured from: the real prunes' windows when they decide
        base_windows = parent_windows = real_losses[best_name] if real_parent else anchor_windows
        history = [_entry(grid, parent, 0, parent_fit)]
        if on_best:
            on_best(grid.ratios(parent), parent_fit, 0)
        done = 0
        for s in range(1, steps + 1):
            if should_stop(stop):
                break
            children = [mutate(parent, grid, rng) for _ in range(offspring)]
            screened = [score(grid.per_layer(c), screen) for c in children]
            i = int(np.argmin(screened))
            child = grid.per_layer(children[i])
            fit_windows = losses(child, confirm) if screened[i] < parent_screen else None
            confirmed = math.inf if fit_windows is None else float(fit_windows.mean())
            fit, better = confirmed, confirmed < parent_confirm
            if real_steps and better:  # a real prune decides, and re-anchors the levels
                saved = levels.save()
                fit_windows = real(child, f"the step {s} candidate", fraction(first_step + s))
                fit = None if fit_windows is None else float(fit_windows.mean())
                if fit is not None:
                    verified[f"step {s}"] = fit
                better = fit is not None and fit < parent_fit
                if better:  # the proxy's fitness on the new anchor
                    confirmed, screened[i] = score(child, confirm), score(child, screen)
                else:
                    levels.load(saved)
            if better:
                parent, parent_fit, parent_confirm, parent_screen = children[i], fit, confirmed, screened[i]
                parent_windows = fit_windows
                history.append(_entry(grid, parent, s, parent_fit))
                if on_best:
                    on_best(grid.ratios(parent), parent_fit, s)
            done = s
            if progress:
                progress(f"search: step {s}/{steps}, best {where} {objective.upper()} {parent_fit:.4f}",
                         fraction(first_step + s))
        chosen = "search" if len(history) > 1 else best_name
        decided: dict[str, float] = {}
        if verify == "starts" and chosen == "search" and not should_stop(stop):
            result = grid.per_layer(parent)
            found = real(result, "the search's result", 1.0)
            if found is not None:  # kept only if the real prune confirms it beats the start it went on from
                verified["result"] = float(found.mean())
                before, after = real_losses[best_name], found
                if tail:  # on the tokens no candidate was selected on
                    before, after = (real_tails[tuple(x.items())] for x in (starts[best_name].per_layer, result))
                    decided = {best_name: float(before.mean()), "result": float(after.mean())}
                base_windows = before
                if after.mean() < before.mean():
                    parent_windows = after
                else:
                    chosen, parent_windows = best_name, before
    finally:
        levels.restore()
    gain, gain_se = paired_gain(base_windows, parent_windows)
    ran_on = module_device_dtype(model)
    info = {
        "pruner": prune_method, "objective": objective, "step": step, "space": space, "steps": steps,
        "fitness": f"{where} {'NLL' if objective == 'nll' else 'KL(dense || pruned)'} (nats/token)",
        "steps_done": done, "seed": seed, "offspring": offspring, "screen_tokens": int(screen.numel()),
        "confirm_tokens": int(confirm.numel()),
        "real_prune_tokens": int(checked.numel()) if real_starts else 0, "start": best_name,
        "starts": start_scores, "best_fitness": parent_fit, "history": history,
        "verify": verify, "verified": verified, "result": chosen, "decided": decided,
        "decision_tokens": int(scored[:, confirm_seqlen:].numel()) if decided else 0,
        "real_fitness": parent_fit if real_parent else verified.get("result" if chosen == "search" else chosen),
        "gain": gain, "gain_se": gain_se, "gain_windows": int(len(base_windows)),
        "device": ran_on[0], "dtype": ran_on[1],  # where the real prunes ran (reuse_caveats)
        "seconds": round(time.perf_counter() - t0, 2), **cost}
    if chosen in starts:  # the start itself, at its own ratios
        a = starts[chosen]
        return Allocation(model_name, sparsity, "auto", info, list(a.per_block), dict(a.per_layer), a.achieved)
    return Allocation(model_name, sparsity, "auto", info, grid.ratios(parent), grid.per_layer(parent),
                      grid.budget(parent))


COST = ("seconds", "forward_passes", "tokens", "real_prunes")  # a search's cost fields in its params


def gone_on(first: Allocation, then: Allocation) -> Allocation:
    """`then`, a search that went on from `first` (a search's result, its only start), with the account of both
    stages: its params hold `first`'s as params["before"], and the cost of the two stages together."""
    info = {**then.params, "before": first.params}
    for k in COST:
        info[k] = round(first.params[k] + then.params[k], 2)
    return Allocation(then.model, then.sparsity, then.method, info, list(then.per_block), dict(then.per_layer),
                      then.achieved)


def describe(info: dict) -> list[str]:
    """A search's account for people, from its Allocation's params: the starts ranked, the one it went
    on from, what it gained over that start (with the paired standard error over windows, and a word
    when the gain is within two of them) and its cost; for a search in two stages (`gone_on`), each stage's."""
    def ranked(fits: dict[str, float]) -> str:
        return ", ".join(f"{n} {f:.4f}" for n, f in sorted(fits.items(), key=lambda kv: kv[1]))
    first = info.get("before", info)
    lines = [f"search fitness: {first['fitness']}", f"starts (proxy): {ranked(first['starts'])}"]
    real_starts = {n: f for n, f in first.get("verified", {}).items() if n in first["starts"]}
    if real_starts:
        lines.append(f"starts (real prunes): {ranked(real_starts)}")
    lines += _outcome(first)
    if first is not info:
        tokens = info["real_prune_tokens"] or info["confirm_tokens"]
        lines.append(f"then {info['steps']} more generations from that result, scored on {tokens} tokens "
                     f"(search seed {info['seed']}):")
        lines += _outcome(info)
    real = ""
    if info.get("real_prunes"):
        ran_on = " ".join(info[k] for k in ("device", "dtype") if info.get(k))  # none in files saved before
        real = f", {info['real_prunes']} real prunes" + (f" on {ran_on}" if ran_on else "")
    lines.append(f"cost: {info['seconds']:.0f} s, {info['forward_passes']} forward passes{real}")
    return lines


def _outcome(info: dict) -> list[str]:
    """What one search stage did from its start: its fitness before and after, the real prune that decided
    whether its result was kept, its gain and kind offsets."""
    improvements = len(info["history"]) - 1
    lines = [f"from {info['start']}: {info['history'][0]['fitness']:.4f} -> {info['best_fitness']:.4f} after "
             f"{info['steps_done']} generation{'' if info['steps_done'] == 1 else 's'} ({improvements} "
             f"improvement{'' if improvements == 1 else 's'}; kept: {info['result']})"]
    checked = info.get("verified", {}).get("result")
    if checked is not None:  # verify "starts": the result's real prune against the start's
        start_fit = info["verified"][info["start"]]
        verdict = "kept" if info["result"] == "search" else f"not better, so {info['start']} is kept"
        line = f"the search's result after a real prune: {checked:.4f} (the start {start_fit:.4f})"
        decided = info.get("decided")
        if decided:  # decided on the tokens no candidate was selected on
            line += (f"; on the {info['decision_tokens']} calibration tokens the search did not select on: "
                     f"{decided['result']:.4f} (the start {decided[info['start']]:.4f})")
        lines.append(f"{line}: {verdict}")
    if info.get("gain") is not None and info["result"] == "search":
        gain, se, n = info["gain"], info["gain_se"], info["gain_windows"]
        if se is None or not math.isfinite(se):  # one window has no spread to measure
            lines.append(f"gain {gain:.4f} nats/token on {n} window (no standard error: it may not carry over to "
                         "other text)")
        else:
            noise = "; within 2 SE of zero: it may not carry over to other text" if gain < 2 * se else ""
            lines.append(f"gain {gain:.4f} +/- {se:.4f} nats/token (paired SE over {n} windows){noise}")
    kinds = info["history"][-1].get("kinds")
    if kinds and info["result"] == "search":
        lines.append("kind offsets: " + ", ".join(f"{k} {v:+.3f}" for k, v in kinds.items()))
    return lines


def reuse_caveats(info: dict, method: str, model: nn.Module) -> list[str]:
    """Why a search's allocation (`info`: its Allocation's params), used to prune `model` with `method`, may not
    keep the improvement the search measured: its candidates were scored after another pruner, or its real
    SparseGPT prunes ran on another device or dtype (its masks change with round-off: README, the CPU vs GPU
    table of "Allocation search"). Empty for an allocation that is not a search's, or a search that kept one
    of its starts (in each stage). Allocations saved before the search recorded its dtype are compared on the
    device alone."""
    if "history" not in info or "search" not in (info.get("result"), info.get("before", {}).get("result")):
        return []
    if info["pruner"] != method:
        return [f"this allocation was searched with {info['pruner']}'s prunes; pruned with {method}, its "
                "improvement over the search's start may not carry over"]
    if method != "sparsegpt" or not info.get("real_prunes") or not info.get("device"):
        return []
    then = {k: info[k] for k in ("device", "dtype") if info.get(k)}
    now = dict(zip(("device", "dtype"), module_device_dtype(model)))
    if all(now[k] == v for k, v in then.items()):
        return []
    return [f"this allocation's search kept the candidates whose real SparseGPT prunes did best on "
            f"{' '.join(then.values())}; pruned on {' '.join(now[k] for k in then)}, SparseGPT's masks change with "
            "round-off and the improvement may not carry over: search where you prune"]


def _replays(model: nn.Module, windows: torch.Tensor, final: torch.Tensor, reference: torch.Tensor | None) -> bool:
    """Whether `final` (the last block's outputs on `windows`) replayed through the model's head gives the losses
    of the model's own forward (not for a model whose blocks cannot be passed through)."""
    try:
        head = token_losses(model, windows, reference=reference, final=final)
    except Exception:  # noqa: BLE001 (any failure means: score with forwards)
        return False
    return bool(torch.allclose(head, token_losses(model, windows, reference=reference), rtol=1e-3, atol=1e-3))


def _spread(n: int, m: int) -> list[int]:
    """m of the indices 0..n-1 spread evenly over them (all of them if m >= n)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(m, n)).round()})


def _entry(grid: Grid, k: np.ndarray, step: int, fit: float) -> dict:
    """A history entry: the step, its fitness, the per-block ratios and (with kinds) each kind's offset."""
    entry = {"step": step, "fitness": fit, "per_block": grid.ratios(k)}
    return {**entry, "kinds": grid.offsets(k)} if grid.kinds else entry
