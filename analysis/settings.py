"""Settings: one frozen object per concern. Their defaults are the project's defaults: the CLI's
options and the dashboard's widgets read them from here, so a preset a user looks at and the run
that applies it use the same values. `check()` validates a setting before anything expensive
(model loading, spectra) and raises `SettingsError` naming the first bad value; `check_model(preview)`
validates what needs the model's tokenizer and config (context length, text lengths, matrix widths,
an allocation file's matrix names) before its weights load (analysis.loading.load_model's `check`).

Calibration defaults to 16 sequences of 256 tokens from the embedded corpus everywhere (CLI, Prune
page, OWL preset): enough tokens for stable Wanda/SparseGPT/OWL statistics on the packaged models and
still interactive on a CPU. Evaluation defaults differ on purpose and by name: the CLI's
`EvaluationSettings()` is the papers' benchmark (all of WikiText-2 test), the dashboard's
`QUICK_EVALUATION` the first 16 windows of the embedded corpus's evaluation half, so a live curve
finishes in seconds on a CPU and needs no data outside the packages.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from analysis.allocation import MAX_RATIO, Allocation, check_granularity, check_metric, check_sparsity, check_spread
from analysis.data import (
    ENCODING,
    calibration_batches,
    calibration_text,
    check_encoding,
    eval_windows,
    evaluation_text,
    held_out_split,
    is_split,
    load_text,
    readable_tokens,
    same_text,
    spread_windows,
    text_source_problem,
)
from analysis.errors import AlphascopeError
from analysis.layers import find_layers, layer_table, prunable_layers
from analysis.loading import DEVICE_MAP_AUTO, DTYPES, ModelLoadError, ModelPreview, pick_device
from analysis.powerlaw import MIN_TAIL, check_fit
from analysis.pruners import PRUNERS, SPARSEGPT_BLOCK, check_rowwise, parse_nm

# allocation methods a run can name; "auto" a search (analysis.search), "custom" a drawn curve, "file" an
# allocation JSON
ALLOCATION_METHODS = ("uniform", "alphapruning", "farms", "owl", "auto", "custom", "file")
SPECTRA_METHODS = ("alphapruning", "farms")  # allocations computed from the dense model's spectra
# what the "auto" search minimises on calibration text: the pruned model's NLL, or its KL from the dense model
SEARCH_OBJECTIVES = ("nll", "kl")
# tokens per sequence the search confirms candidates on (at most the calibration seqlen; also the
# length of its held-out windows)
SEARCH_SEQLEN = 128
# sparsity one mutation of the search moves from a block to another (search_step's default), and the
# largest step allowed: beyond it a single move reshapes the curve more than any preset differs from uniform
SEARCH_STEP = 0.025
SEARCH_STEP_MAX = 0.2
# what the search varies (search_space): one ratio per block, or also one offset per matrix kind (k_proj,
# down_proj, ...) shared by every block, each block keeping its ratio (analysis.search, "Search space")
SEARCH_SPACES = ("block", "block+kind")
# what the search prunes for real (search_verify): nothing (it trusts its stitched proxy), its starts and
# its result (the best start after a real prune is the parent, and a result that is worse after a real
# prune than that start is dropped for it), or also every candidate its proxy confirms. "starts" is the
# default: the proxy alone ended worse than uniform (Gemma-3, SparseGPT 50%) where "starts" did not, for a
# few prunes more (bench/results/quality_*.json, README "Allocation search")
VERIFY_MODES = ("none", "starts", "all")
# a search that prunes for real on a search text scores its real prunes on this many times the
# held-out windows its proxy confirms on: the real prunes decide, so they get the most tokens
VERIFY_SAMPLES = 4
# how far the budget of a search's start file (search_from) may be from the target sparsity
SEARCH_FROM_TOLERANCE = 0.005
# a search's second stage (search_then_steps) scores on this many times its first stage's held-out windows, and
# draws its moves with the search seed + THEN_SEED, so it does not replay the first stage's
THEN_SAMPLES = 2
THEN_SEED = 100


def search_seqlen(calibration_seqlen: int) -> int:
    """Tokens per held-out window of a search run with this calibration seqlen."""
    return min(SEARCH_SEQLEN, calibration_seqlen)


def search_samples(n_samples: int, verify: str, requested: int | None = None) -> int:
    """Held-out windows of a search run with n_samples calibration sequences: `requested`
    (AllocationSettings.search_samples) when given, else n_samples, VERIFY_SAMPLES times as many when it
    prunes for real (verify "starts" or "all": its real prunes are scored on all of them)."""
    if requested is not None:
        return requested
    return n_samples * (1 if verify == "none" else VERIFY_SAMPLES)


def then_samples(first: int, requested: int | None = None) -> int:
    """Held-out windows of a search's second stage whose first stage scored on `first`: `requested`
    (AllocationSettings.search_then_samples) when given, else THEN_SAMPLES times `first`."""
    return first * THEN_SAMPLES if requested is None else requested


class SettingsError(AlphascopeError, ValueError):
    """A setting the user can fix; the message names it, and `field` ("calibration.seqlen", ...) says
    which one, so a front end can point at its own control (the CLI names the option)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _checked(field_name: str, check, *args, note: str = ""):
    """Run a lower-level validator (or loader) and return what it returns; its error (followed by `note`) becomes
    a SettingsError for `field_name`."""
    try:
        return check(*args)
    except ValueError as e:
        raise SettingsError(f"{e}{note}", field_name) from None


def _halves_note(source: str, other: str | None) -> str:
    """What a length error adds when one text both calibrates and evaluates (`is_split`)."""
    return (" (The text is cut in two: its first half calibrates, its second half evaluates.)"
            if is_split(source, other) else "")


def _allocation_file(path: str | None, field_name: str, what: str) -> Allocation:
    """The allocation JSON a setting names; a SettingsError for `field_name` if it is missing or broken."""
    if not path or not Path(path).expanduser().is_file():
        raise SettingsError(f"{what} '{path}' does not exist", field_name)
    try:
        return Allocation.load(Path(path).expanduser())
    except ValueError as e:
        raise SettingsError(str(e), field_name) from None


def check_positive_int(value, name: str, minimum: int = 1) -> None:
    """SettingsError for `name` (its last part in the message) unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"{name.split('.')[-1]} must be an integer >= {minimum}, got {value!r}", name)


def _source(source: str, encoding: str, name: str, label: str) -> None:
    _checked(name.split(".")[0] + ".encoding", check_encoding, encoding)
    if problem := text_source_problem(source, encoding):
        raise SettingsError(f"{label}: {problem}", name)


def _fits_context(seqlen: int, preview: ModelPreview, name: str) -> None:
    context = preview.context
    if context is not None and seqlen > context:
        raise SettingsError(f"{name.split('.')[-1]} = {seqlen} tokens is longer than the context of "
                            f"'{preview.source}' (max_position_embeddings = {context})", name)


@dataclass(frozen=True)
class ModelSettings:
    """source: 'default', 'gemma3', a folder or a Hugging Face id; device: auto | cpu | cuda[:i];
    dtype: auto | float32 | bfloat16 | float16; trust_remote_code stays off unless asked for."""

    source: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def check(self) -> ModelSettings:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise SettingsError(f"dtype must be auto, {', '.join(DTYPES)}, got {self.dtype!r}", "model.dtype")
        try:
            pick_device(None if self.device == DEVICE_MAP_AUTO else self.device)
        except ModelLoadError as e:
            raise SettingsError(str(e), "model.device") from None
        return self


@dataclass(frozen=True)
class SpectraSettings:
    """fit: xmin rule of the power-law fit (analysis.powerlaw); farms: pooled fixed-aspect-ratio
    windows; normalize: eigenvalues divided by N, the long side of the matrix (of a window with FARMS);
    include_outside: embedding and lm_head too; min_tail: the fewest eigenvalues the "scan" rule's tail
    may keep (read by scan only; 2 is weightwatcher's default fit)."""

    fit: str = "peak"
    farms: bool = False
    normalize: bool = False
    include_outside: bool = False
    min_tail: int = MIN_TAIL

    def check(self) -> SpectraSettings:
        _checked("spectra.fit", check_fit, self.fit)
        _checked("spectra.min_tail", check_fit, self.fit, self.min_tail)
        return self


@dataclass(frozen=True)
class CalibrationSettings:
    """source: text source (analysis.data.load_text), `encoding` if it is a file; n_samples sequences
    of seqlen tokens, drawn with `seed`."""

    source: str = "default"
    n_samples: int = 16
    seqlen: int = 256
    seed: int = 0
    encoding: str = ENCODING

    def check(self) -> CalibrationSettings:
        check_positive_int(self.n_samples, "calibration.n_samples")
        check_positive_int(self.seqlen, "calibration.seqlen", 2)
        check_positive_int(self.seed, "calibration.seed", 0)
        _source(self.source, self.encoding, "calibration.source", "calibration text")
        return self

    def check_model(self, preview: ModelPreview, evaluation_source: str | None = None) -> None:
        """seqlen fits the model's context and the text (as cut for a run evaluating on
        `evaluation_source`) gives one window with its tokenizer (tokens are cached for the run)."""
        _fits_context(self.seqlen, preview, "calibration.seqlen")
        text = _checked("calibration.source", calibration_text, self.source, evaluation_source, self.encoding)
        _checked("calibration.source", readable_tokens, preview.tokenizer, text, "The calibration text")
        _checked("calibration.seqlen", calibration_batches, preview.tokenizer, text, 1, self.seqlen, 0,
                 preview.bos_per_window, note=_halves_note(self.source, evaluation_source))


@dataclass(frozen=True)
class EvaluationSettings:
    """source: text source; consecutive windows of seqlen tokens, the first max_windows of them
    (None: all); batch_size windows per forward pass (None: 1 on CPU, 8 on a GPU)."""

    source: str = "wikitext2:test"
    seqlen: int = 512
    max_windows: int | None = None
    batch_size: int | None = None
    encoding: str = ENCODING

    def check(self) -> EvaluationSettings:
        check_positive_int(self.seqlen, "evaluation.seqlen", 2)
        for name in ("max_windows", "batch_size"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), f"evaluation.{name}")
        _source(self.source, self.encoding, "evaluation.source", "evaluation text")
        return self

    def check_model(self, preview: ModelPreview, calibration_source: str | None = None) -> None:
        """seqlen fits the model's context and the text gives at least one window."""
        _fits_context(self.seqlen, preview, "evaluation.seqlen")
        text = _checked("evaluation.source", evaluation_text, self.source, calibration_source, self.encoding)
        _checked("evaluation.source", readable_tokens, preview.tokenizer, text, "The evaluation text")
        _checked("evaluation.seqlen", eval_windows, preview.tokenizer, text, self.seqlen, preview.bos_per_window, 1,
                 note=_halves_note(self.source, calibration_source))


QUICK_EVALUATION = EvaluationSettings(source="default", max_windows=16)


@dataclass(frozen=True)
class AllocationSettings:
    """method: one of ALLOCATION_METHODS; sparsity: the budget, fraction of prunable weights removed;
    epsilon: AlphaPruning's spread; metric / granularity / fit: how spectra become scores; owl_lambda
    and owl_threshold: OWL's half-range and outlier multiple M; points / as_drawn: a custom curve
    ((depth, sparsity) pairs); file: an allocation JSON (method "file"); search_steps / search_seed /
    search_objective: generations, seed and fitness ("nll" or "kl") of the "auto" search (analysis.search);
    search_step: the sparsity (a fraction, in (0, SEARCH_STEP_MAX]) one of its mutations moves between two blocks;
    search_space: one of SEARCH_SPACES, "block" (one ratio per block) or "block+kind" (also one offset per matrix
    kind, the same in every block, that moves sparsity between the kinds inside each block);
    search_text: a text source (as for calibration.source) the search's fitness is measured on, held out
    from the calibration sample (e.g. the valid split of the user's domain; never the evaluation text);
    None: the calibration text; search_samples: how many windows of search_text the search scores on (its real
    prunes on all of them: more text tells a real improvement from noise better, and scores each real prune
    slower); None: the default of the function search_samples; search_verify: one of VERIFY_MODES, what the
    search prunes for real ("starts": the starts and the result; "all": also every candidate it confirms,
    keeping only real improvements; analysis.search, `verify`); search_from: an allocation JSON the search
    starts from instead of uniform / OWL / AlphaPruning / FARMS (a previous search's result, to go on
    from it, or a saved curve to refine); it must prune `sparsity` (within SEARCH_FROM_TOLERANCE), the budget
    the search keeps; search_then_steps: generations of a second stage that goes on from the first stage's result
    (0: none), scored on search_then_samples windows of search_text (None: the function then_samples' default,
    twice the first stage's), with search seed + THEN_SEED: EvoPress's selection on more tokens as the search
    narrows, in two stages (the first finds a good parent cheaply, the second tells smaller real improvements
    from noise on more text)."""

    method: str = "alphapruning"
    sparsity: float = 0.5
    epsilon: float = 0.3
    metric: str = "alpha"
    granularity: str = "block"
    fit: str = "peak"
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    points: tuple[tuple[float, float], ...] | None = None
    as_drawn: bool = False
    file: str | None = None
    search_steps: int = 40
    search_seed: int = 0
    search_step: float = SEARCH_STEP
    search_space: str = "block"
    search_objective: str = "nll"
    search_text: str | None = None
    search_samples: int | None = None
    search_verify: str = "starts"
    search_from: str | None = None
    search_then_steps: int = 0
    search_then_samples: int | None = None

    def check(self) -> AllocationSettings:
        if self.method not in ALLOCATION_METHODS:
            raise SettingsError(f"allocation must be one of {', '.join(ALLOCATION_METHODS[:-1])} or an "
                                f"allocation JSON file (method='file', file=path), got {self.method!r}",
                                "allocation.method")
        if self.method == "file":
            _allocation_file(self.file, "allocation.file", "allocation file")
            return self
        if not self.as_drawn:
            _checked("allocation.sparsity", check_sparsity, self.sparsity)
        if self.method == "auto" and self.sparsity == 0:
            raise SettingsError("an allocation search needs a sparsity above 0: at 0 every allocation is the "
                                "dense model", "allocation.sparsity")
        _checked("allocation.epsilon", check_spread, self.epsilon, "epsilon")
        _checked("allocation.metric", check_metric, self.metric, self.method)
        _checked("allocation.granularity", check_granularity, self.granularity)
        _checked("allocation.owl_lambda", check_spread, self.owl_lambda, "owl_lambda")
        _checked("allocation.fit", check_fit, self.fit)
        if not self.owl_threshold > 0:
            raise SettingsError(f"owl_threshold must be > 0, got {self.owl_threshold}", "allocation.owl_threshold")
        check_positive_int(self.search_steps, "allocation.search_steps", 0)
        check_positive_int(self.search_seed, "allocation.search_seed", 0)
        if not (isinstance(self.search_step, int | float) and 0 < self.search_step <= SEARCH_STEP_MAX):
            raise SettingsError(f"search_step must be a sparsity in (0, {SEARCH_STEP_MAX}], got {self.search_step!r}",
                                "allocation.search_step")
        if self.search_space not in SEARCH_SPACES:
            raise SettingsError(f"search_space must be one of {', '.join(SEARCH_SPACES)}, got {self.search_space!r}",
                                "allocation.search_space")
        if self.search_objective not in SEARCH_OBJECTIVES:
            raise SettingsError(f"search_objective must be one of {', '.join(SEARCH_OBJECTIVES)}, got "
                                f"{self.search_objective!r}", "allocation.search_objective")
        if self.search_text is not None:
            _source(self.search_text, ENCODING, "allocation.search_text", "search text")
        if self.search_samples is not None:
            check_positive_int(self.search_samples, "allocation.search_samples")
            if self.search_text is None:
                raise SettingsError("search_samples counts windows of a held-out search text: give search_text too "
                                    "(e.g. wikitext2:valid)", "allocation.search_samples")
        check_positive_int(self.search_then_steps, "allocation.search_then_steps", 0)
        if self.search_then_steps and self.search_text is None:
            raise SettingsError("the search's second stage scores on more of a held-out search text: give "
                                "search_text too (e.g. wikitext2:valid)", "allocation.search_then_steps")
        if self.search_then_samples is not None:
            check_positive_int(self.search_then_samples, "allocation.search_then_samples")
            if self.search_text is None:
                raise SettingsError("search_then_samples counts windows of a held-out search text: give search_text "
                                    "too (e.g. wikitext2:valid)", "allocation.search_then_samples")
            if not self.search_then_steps:
                raise SettingsError("search_then_samples sets the windows of the search's second stage: give its "
                                    "generations too (search_then_steps)", "allocation.search_then_samples")
        if self.search_verify not in VERIFY_MODES:
            raise SettingsError(f"search_verify must be one of {', '.join(VERIFY_MODES)}, got {self.search_verify!r}",
                                "allocation.search_verify")
        if self.search_from is not None:
            self._check_search_from()
        if self.method == "custom" and not self.points:
            raise SettingsError("a custom allocation needs control points, e.g. 0:0.5,0.5:0.7,1:0.8",
                                "allocation.points")
        return self

    def _check_search_from(self) -> None:
        if self.method != "auto":
            raise SettingsError("search_from is the start of an allocation search: it needs allocation auto",
                                "allocation.search_from")
        start = _allocation_file(self.search_from, "allocation.search_from", "search start file")
        if abs(start.achieved - self.sparsity) > SEARCH_FROM_TOLERANCE:
            raise SettingsError(f"{Path(self.search_from).name} prunes {start.achieved:.2%} of the weights, the "
                                f"target sparsity is {self.sparsity:.2%}: the search keeps its start's budget, so "
                                "give the start's sparsity", "allocation.search_from")

    def check_search_text(self, evaluation_source: str) -> None:
        """The search never scores candidates on the evaluation text."""
        if self.method == "auto" and same_text(self.search_text, evaluation_source):
            raise SettingsError(f"the search text must not be the evaluation text ({self.search_text}): the search "
                                "would fit the text it is judged on; use a held-out text, e.g. a valid split",
                                "allocation.search_text")

    def suggested_search_text(self, evaluation_source: str) -> str | None:
        """For an "auto" search scored on the calibration text: the validation split of the evaluation
        source when it names a test split (analysis.data.held_out_split), else None. Scored on the served
        domain's held-out text the search did better than on the calibration text in most measured cells
        (README, "Allocation search"); it stays a suggestion, so a run's result never depends on which
        evaluation text was named."""
        if self.method != "auto" or self.search_text is not None:
            return None
        return held_out_split(evaluation_source)

    def check_model(self, preview: ModelPreview, calibration_seqlen: int = SEARCH_SEQLEN) -> None:
        """An allocation file names exactly the model's prunable matrices; a search text gives a window
        (of the search's length with this calibration seqlen)."""
        files = {"allocation.file": self.file if self.method == "file" else None,
                 "allocation.search_from": self.search_from if self.method == "auto" else None}
        model = preview.skeleton() if any(files.values()) else None
        for field_name, path in files.items():
            if path is not None:
                alloc = Allocation.load(Path(path).expanduser())
                layers = find_layers(model)
                _checked(field_name, alloc.check_names, [r.name for r in layers if r.prunable],
                         [r.name for r in layers if not r.prunable])
                if field_name == "allocation.search_from":  # the search starts from its per_block
                    _checked(field_name, alloc.check_blocks, layer_table(model))
        if self.method == "auto" and self.search_text is not None:
            _checked("allocation.search_text", lambda: spread_windows(
                preview.tokenizer, load_text(self.search_text), search_seqlen(calibration_seqlen), 1,
                preview.bos_per_window))

    @property
    def spectra(self) -> SpectraSettings:
        """The spectra an alphapruning/farms allocation is computed from."""
        return SpectraSettings(fit=self.fit, farms=self.method == "farms")


@dataclass(frozen=True)
class PruneSettings:
    """method: a key of analysis.pruners.PRUNERS; nm: "2:4"-style N:M pattern or None (unstructured);
    rowwise: None or one of analysis.pruners.ROWWISE ("trim": per-row ratios, unstructured only)."""

    method: str = "wanda"
    nm: str | None = None
    rowwise: str | None = None

    def check(self) -> PruneSettings:
        if self.method not in PRUNERS:
            raise SettingsError(f"method must be one of {', '.join(PRUNERS)}, got {self.method!r}", "prune.method")
        pattern = _checked("prune.nm", parse_nm, self.nm)
        if self.method == "sparsegpt" and pattern and SPARSEGPT_BLOCK % pattern[1]:
            raise SettingsError(f"SparseGPT prunes {SPARSEGPT_BLOCK} input columns at a time, so an N:M pattern's M "
                                f"must divide {SPARSEGPT_BLOCK} (2:4, 4:8, ...); {self.nm} does not", "prune.nm")
        _checked("prune.rowwise", check_rowwise, self.rowwise, self.nm)
        return self

    def check_model(self, preview: ModelPreview) -> None:
        """With N:M, every prunable matrix's width (input features) is a multiple of M."""
        pattern = parse_nm(self.nm)
        if pattern is None:
            return
        m = pattern[1]
        odd = [r for r in prunable_layers(preview.skeleton()) if r.cols % m]
        if odd:
            raise SettingsError(f"N:M {self.nm} needs matrix widths divisible by {m}; {len(odd)} matrices of "
                                f"'{preview.source}' are not (e.g. {odd[0].name}, width {odd[0].cols})", "prune.nm")


@dataclass(frozen=True)
class ZeroShotSettings:
    """tasks: lm-eval task names ("cloze" is the local one, see analysis.zeroshot); limit: score only
    the first `limit` documents of each task (None: all); batch_size: sequences per forward pass
    (None: 16 on a CPU, 32 on a GPU). Whether a task can run here (known, data reachable) is checked
    by analysis.zeroshot.check_tasks, which needs lm-eval."""

    tasks: tuple[str, ...] = ("cloze",)
    limit: int | None = None
    batch_size: int | None = None

    def check(self) -> ZeroShotSettings:
        if not self.tasks or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise SettingsError(f"tasks must be one or more task names, got {self.tasks!r}", "zeroshot.tasks")
        for name in ("limit", "batch_size"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), f"zeroshot.{name}")
        return self


# the dashboard's: the first 100 documents of each task, a quick check (the CLI scores them all)
QUICK_ZEROSHOT = ZeroShotSettings(limit=100)


@dataclass(frozen=True)
class RunSettings:
    """Everything one prune-and-evaluate run needs besides the loaded model."""

    model: ModelSettings = field(default_factory=ModelSettings)
    allocation: AllocationSettings = field(default_factory=AllocationSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def check(self) -> RunSettings:
        self.model.check()
        self.prune.check()
        self.calibration.check()
        self.evaluation.check()
        if self.prune.nm is None:
            s = self.allocation.sparsity  # a run prunes: 0 is no run (an allocation alone may be at 0)
            if (self.allocation.method != "file" and isinstance(s, (int, float)) and not isinstance(s, bool)
                    and math.isfinite(s) and not 0.0 < s <= MAX_RATIO):
                raise SettingsError(f"sparsity must be in (0, {MAX_RATIO}], got {s:g}", "allocation.sparsity")
            self.allocation.check()
            if self.allocation.method == "file" and _allocation_file(
                    self.allocation.file, "allocation.file", "allocation file").achieved == 0:
                raise SettingsError(f"allocation file '{self.allocation.file}' prunes nothing (sparsity 0): a run "
                                    "needs a sparsity above 0", "allocation.file")
            self.allocation.check_search_text(self.evaluation.source)
        return self

    def needs_calibration(self) -> bool:
        """Whether the run reads calibration text: a pruner with a calibration statistic (Wanda, SparseGPT),
        row-wise TRIM, OWL's outlier ratios or the allocation search (magnitude with uniform does not)."""
        return (PRUNERS[self.prune.method].statistic is not None or self.prune.rowwise is not None
                or (self.prune.nm is None and self.allocation.method in ("owl", "auto")))

    def check_model(self, preview: ModelPreview) -> None:
        """The checks of `check_model` of each part (the allocation's only when no N:M pattern overrides it,
        the calibration's only when the run reads calibration text)."""
        self.prune.check_model(preview)
        if self.prune.nm is None:
            self.allocation.check_model(preview, self.calibration.seqlen)
        if self.needs_calibration():
            self.calibration.check_model(preview, self.evaluation.source)
        self.evaluation.check_model(preview, self.calibration.source)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunSettings:
        """The inverse of to_dict; unknown keys are refused with a message."""
        parts = {}
        for f in fields(cls):
            sub = dict(d.get(f.name) or {})
            default = f.default_factory()
            unknown = set(sub) - {g.name for g in fields(default)}
            if unknown:
                raise SettingsError(f"unknown {f.name} setting(s): {', '.join(sorted(unknown))}", f.name)
            if f.name == "allocation" and sub.get("points") is not None:
                sub["points"] = tuple(tuple(p) for p in sub["points"])
            if f.name == "allocation" and isinstance(sub.get("search_verify"), bool):  # stored before VERIFY_MODES
                sub["search_verify"] = "all" if sub["search_verify"] else "none"
            parts[f.name] = replace(default, **sub)
        return cls(**parts)


__all__ = ["ALLOCATION_METHODS", "QUICK_EVALUATION", "QUICK_ZEROSHOT", "SPECTRA_METHODS",
           "AllocationSettings", "CalibrationSettings", "EvaluationSettings", "ModelSettings", "PruneSettings",
           "RunSettings", "SettingsError", "SpectraSettings", "ZeroShotSettings"]
