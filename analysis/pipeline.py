"""The pipeline: settings -> data -> allocation -> prune -> evaluation -> run record.

The CLI, the dashboard's jobs and the benchmarks call these steps, so one setting means the same
thing everywhere. `run` chains them for a loaded model (the CLI and sweeps); the dashboard calls the
steps one by one around its private working copy (analysis.session).

A run record is a JSON-able dict (`make_record`): config (the flat summary the run store indexes,
plus `settings`, the full RunSettings), the allocation, the achieved sparsity per matrix and overall,
dense and pruned perplexity, seconds per phase, and library versions.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from torch import nn

from analysis.allocation import Allocation, AllocationError, allocate, budget, custom_allocation
from analysis.checkpoint import folder_fingerprint
from analysis.data import (
    calibration_batches,
    calibration_text,
    eval_windows,
    evaluation_text,
    file_sha256,
    ids_sha256,
    is_split,
    load_text,
    read_file,
    same_text,
    spread,
    text_digest,
    tokenize,
)
from analysis.evaluation import PplUpdate, perplexity
from analysis.layers import layer_table, prunable_layers, zero_fraction
from analysis.loading import (
    DEVICE_MAP_AUTO,
    OFFLOADED,
    LoadedModel,
    ModelLoadError,
    model_identity,
    offloaded,
    package_version,
    resolve_source,
)
from analysis.owl import collect_outlier_ratios
from analysis.pruners import PruneError, nm_sparsity, parse_nm
from analysis.pruning import PruneReport, check_finite, prune, prune_warnings
from analysis.runtime import VERSION, ProgressFn, StopFlag, should_stop
from analysis.search import OnBest, gone_on, reuse_caveats, search_allocation
from analysis.settings import (
    SPECTRA_METHODS,
    THEN_SEED,
    VERIFY_SAMPLES,
    AllocationSettings,
    CalibrationSettings,
    EvaluationSettings,
    PruneSettings,
    RunSettings,
    SpectraSettings,
    search_samples,
    search_seqlen,
    then_samples,
)
from analysis.spectra import NotStreamable, analyze, analyze_checkpoint
from analysis.store import now_iso, to_json

# --------------------------------------------------------------------------------------------
# data


@dataclass
class RunData:
    """calib: (n_samples, seqlen) token ids (None for a run that reads no calibration text); windows:
    (n_windows, seqlen) token ids; info: what the record says about them."""

    calib: torch.Tensor | None
    windows: torch.Tensor
    info: dict


def calibration_batch(tokenizer, calibration: CalibrationSettings, evaluation_source: str | None = None,
                      bos: bool = False) -> torch.Tensor:
    """The calibration batch of a run whose evaluation text is `evaluation_source` (the two are kept
    disjoint, see analysis.data.calibration_text)."""
    text = calibration_text(calibration.source, evaluation_source, calibration.encoding)
    return calibration_batches(tokenizer, text, n_samples=calibration.n_samples, seqlen=calibration.seqlen,
                               seed=calibration.seed, bos=bos)


def evaluation_windows(tokenizer, evaluation: EvaluationSettings, calibration_source: str | None = None,
                       bos: bool = False) -> torch.Tensor:
    """The evaluation windows of a run that calibrates on `calibration_source`."""
    text = evaluation_text(evaluation.source, calibration_source, evaluation.encoding)
    return eval_windows(tokenizer, text, seqlen=evaluation.seqlen, bos=bos, max_windows=evaluation.max_windows)


def search_windows(tokenizer, allocation: AllocationSettings, calibration: CalibrationSettings,
                   bos: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The held-out windows an "auto" search with a search text scores candidates on, as long as the
    ones it confirms on (settings.search_seqlen) and spread over the whole text: (its first stage's,
    settings.search_samples of them; its second stage's, settings.then_samples of them, None without a
    second stage). (None, None) when it scores on the calibration text. The text is tokenized once."""
    if allocation.method != "auto" or allocation.search_text is None:
        return None, None
    windows = eval_windows(tokenizer, load_text(allocation.search_text), search_seqlen(calibration.seqlen), bos,
                           label="The search text")
    count = search_samples(calibration.n_samples, allocation.search_verify, allocation.search_samples)
    then = spread(windows, then_samples(count, allocation.search_then_samples)) if allocation.search_then_steps \
        else None
    return spread(windows, count), then


def confirm_samples(fitness_windows: torch.Tensor | None, verify: str, n_samples: int) -> int | None:
    """How many of the held-out windows (`search_windows`) of a search that prunes for real (verify
    "starts" or "all") its proxy confirms on: a VERIFY_SAMPLES-th of them, at most the n_samples calibration
    sequences (so more held-out windows make the real prunes' scores surer, not the proxy slower)."""
    if fitness_windows is None or verify == "none":
        return None
    return min(n_samples, max(1, fitness_windows.shape[0] // VERIFY_SAMPLES))


def prepare_data(tokenizer, calibration: CalibrationSettings, evaluation: EvaluationSettings,
                 bos: bool = False, calibrate: bool = True) -> RunData:
    """The run's token windows; calibrate=False (RunSettings.needs_calibration) leaves out the calibration
    batch. The evaluation windows are the same either way (its text's half when both name one text)."""
    calib = calibration_batch(tokenizer, calibration, evaluation.source, bos) if calibrate else None
    windows = evaluation_windows(tokenizer, evaluation, calibration.source, bos)
    # the calibration text is named either way (an evaluation on the same text is of its other half)
    info = {"calib": calibration.source, "n_samples": calibration.n_samples if calibrate else None,
            "seqlen": calibration.seqlen if calibrate else None, "eval": evaluation.source,
            "eval_seqlen": evaluation.seqlen, "eval_windows": int(windows.shape[0]),
            "eval_tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "bos": bos,
            "split": is_split(evaluation.source, calibration.source),  # evaluated on one half of its text
            "calib_ids_sha256": None if calib is None else ids_sha256(calib), "eval_ids_sha256": ids_sha256(windows)}
    return RunData(calib, windows, info)


# --------------------------------------------------------------------------------------------
# allocation


def dense_spectra(model: nn.Module | None, spectra: SpectraSettings, progress: ProgressFn | None = None,
                  checkpoint: Path | None = None, device: str | None = None) -> pd.DataFrame:
    """Per-matrix spectral metrics of the dense model (call it before pruning). With `checkpoint`, the
    safetensors folder the model's weights are as stored (loading.streamable_folder; the model unchanged since
    it loaded, in any dtype): its matrices are streamed from the shards on `device` (a model's device, or
    DEVICE_MAP_AUTO for weights accelerate spread: then a GPU where there is one) and the result is cached on
    disk by their content (analysis.spectra.analyze_checkpoint: the same rows; a second run reads them at once),
    and `model` may be None. Otherwise, or for a checkpoint that cannot be streamed, of `model` in memory."""
    kwargs = dict(fit=spectra.fit, farms=spectra.farms, normalize=spectra.normalize,
                  include_outside=spectra.include_outside, progress=progress)
    if checkpoint is not None:
        try:
            return analyze_checkpoint(checkpoint, device=None if device == DEVICE_MAP_AUTO else device,
                                      **kwargs).metrics
        except NotStreamable:
            if model is None:
                raise
    return analyze(model, **kwargs).metrics


AUTO_EPSILONS = (0.1, 0.2, 0.3)  # AlphaPruning and FARMS spread the search starts from


def start_epsilons(epsilon: float) -> tuple[float, ...]:
    """The ε the AlphaPruning and FARMS starts of a search use: AUTO_EPSILONS and the settings' own ε
    (e.g. one the user chose on a valid split), ascending; ε = 0 would repeat the uniform start. ε is
    rounded to 6 decimals, so a slider's 0.30000000000000004 is the 0.3 start, not a second one."""
    return tuple(sorted(set(AUTO_EPSILONS) | ({round(epsilon, 6)} if epsilon > 0 else set())))


def spectra_used(settings: AllocationSettings, nm: str | None = None) -> dict[str, SpectraSettings]:
    """The dense spectra build_allocation computes an allocation from, by the name of its argument that
    takes them: an alphapruning/farms allocation its own; an "auto" search those of its AlphaPruning and
    FARMS starts (none with a start file, or with an N:M pattern, whose allocation is uniform)."""
    if nm:
        return {}
    if settings.method in SPECTRA_METHODS:
        return {"metrics": settings.spectra}
    if settings.method == "auto" and settings.search_from is None:
        return {"metrics": settings.spectra, "farms_metrics": replace(settings, method="farms").spectra}
    return {}


def search_starts(settings: AllocationSettings, model: nn.Module, calib: torch.Tensor,
                  metrics: pd.DataFrame | None = None, outlier_ratios: dict[int, float] | None = None,
                  model_name: str = "", progress: ProgressFn | None = None,
                  custom: Allocation | None = None, farms_metrics: pd.DataFrame | None = None) -> dict[str, Allocation]:
    """The allocations the "auto" search starts from, at settings.sparsity: uniform, OWL (outliers on
    `calib`), and AlphaPruning and FARMS at each of start_epsilons(settings.epsilon) (AlphaPruning from
    `metrics`, spectra with settings.spectra; FARMS from `farms_metrics`, its pooled spectra with
    settings.fit); instead, only `custom` (a curve drawn on the Allocation page) or the file
    settings.search_from, when given. What is not passed in is computed here from `model`, which must
    then be dense. settings.method is not read: these are the starts of an "auto" search whatever
    method the settings name."""
    if custom is not None:
        return {"your curve": custom}
    if settings.search_from is not None:
        path = Path(settings.search_from).expanduser()
        return {path.name: Allocation.load(path)}
    base = {"uniform": replace(settings, method="uniform"), "owl": replace(settings, method="owl")}
    epsilons = start_epsilons(settings.epsilon)
    base |= {f"{m} eps={e:g}": replace(settings, method=m, epsilon=e) for m in SPECTRA_METHODS for e in epsilons}
    used = spectra_used(replace(settings, method="auto"))
    if metrics is None:
        metrics = dense_spectra(model, used["metrics"], progress)
    if farms_metrics is None:
        farms_metrics = dense_spectra(model, used["farms_metrics"], progress)
    spectra = {"alphapruning": metrics, "farms": farms_metrics}
    if outlier_ratios is None:
        outlier_ratios = collect_outlier_ratios(model, calib, owl_threshold=settings.owl_threshold, progress=progress)
    return {name: build_allocation(s, model, calib=calib, metrics=spectra.get(s.method), outlier_ratios=outlier_ratios,
                                   model_name=model_name) for name, s in base.items()}


def search_in_stages(settings: AllocationSettings, model: nn.Module, calib: torch.Tensor,
                     starts: dict[str, Allocation], prune_method: str, fitness_windows: torch.Tensor | None,
                     then_windows: torch.Tensor | None = None, model_name: str = "",
                     progress: ProgressFn | None = None, stop: StopFlag = None,
                     on_best: OnBest | None = None) -> Allocation:
    """The "auto" search of `settings` from `starts`, scored on `fitness_windows` (None: the calibration text);
    with settings.search_then_steps, a second stage goes on from its result: that many more generations, with
    search seed + THEN_SEED, scored on `then_windows` (more held-out text: smaller real improvements stand out
    from the windows' noise), exactly as `--search-from` the first stage's JSON would. Progress and `on_best`
    count the two stages as one run, each stage's share of the bar its generations' (the statistics each stage
    gathers before its first generation hold the bar where the stage starts); a stop ends the search with the
    best so far."""
    total = settings.search_steps + settings.search_then_steps

    def stage(stage_starts: dict[str, Allocation], steps: int, seed: int, windows: torch.Tensor | None,
              done: int, label: str) -> Allocation:
        def show(message: str, f: float) -> None:
            at = done + (f * steps if message.startswith("search:") else 0)
            progress(message.replace("search", label, 1), at / total if total else f)

        best = on_best and (lambda ratios, fit, step: on_best(ratios, fit, done + step))
        return search_allocation(model, calib, stage_starts, prune_method=prune_method, steps=steps,
                                 step=settings.search_step, space=settings.search_space, seed=seed,
                                 objective=settings.search_objective, fitness_windows=windows,
                                 verify=settings.search_verify,
                                 confirm_samples=confirm_samples(windows, settings.search_verify, calib.shape[0]),
                                 model_name=model_name, progress=progress and show, stop=stop, on_best=best)

    first = stage(starts, settings.search_steps, settings.search_seed, fitness_windows, 0, "search")
    if settings.search_then_steps and not should_stop(stop):
        then = stage({"stage 1": first}, settings.search_then_steps, settings.search_seed + THEN_SEED,
                     then_windows if then_windows is not None else fitness_windows, settings.search_steps,
                     "search, stage 2")
        first = gone_on(first, then)
    # what the search was scored on, so that a run evaluated on that very text is told (allocation_caveats)
    first.params["search_text"] = {"source": settings.search_text, "sha256": text_digest(settings.search_text)} \
        if settings.search_text else None
    return first


def build_allocation(settings: AllocationSettings, model: nn.Module, *, nm=None, calib: torch.Tensor | None = None,
                     metrics: pd.DataFrame | None = None, outlier_ratios: dict[int, float] | None = None,
                     custom: Allocation | None = None, model_name: str = "", prune_method: str = PruneSettings.method,
                     progress: ProgressFn | None = None, stop: StopFlag = None,
                     on_best: OnBest | None = None, fitness_windows: torch.Tensor | None = None,
                     farms_metrics: pd.DataFrame | None = None, then_windows: torch.Tensor | None = None) -> Allocation:
    """The Allocation of a run. Inputs computed elsewhere may be passed in to reuse them (and must
    come from the same dense model): `metrics` (spectra with settings.spectra, for alphapruning/farms
    and the search's starts), `farms_metrics` (FARMS's pooled spectra with settings.fit, for the search's
    FARMS starts), `outlier_ratios` (OWL, measured on `calib`), `custom` (a curve drawn on
    the Allocation page; with "auto", the search's only start). Otherwise they are computed here from
    `model`, which must then be dense; OWL hooks its modules. "auto" searches with `prune_method` on
    `calib`, scored on `fitness_windows` when given (the first of `search_windows`; analysis.search; `stop`
    ends it early with the best so far, `on_best` sees every improvement), and with settings.search_then_steps
    goes on from its result on `then_windows` (the second of `search_windows`; see `search_in_stages`). With
    an N:M pattern every matrix is (M-N)/M sparse, so the allocation is uniform at that value."""
    pattern = parse_nm(nm)
    if pattern is not None:
        alloc = allocate(layer_table(model), nm_sparsity(pattern), "uniform", model=model_name)
        alloc.params["nm"] = f"{pattern[0]}:{pattern[1]}"  # so an export of it is an N:M recipe
        return alloc
    method = settings.method
    if method == "file":
        return Allocation.load(settings.file)
    if method == "auto":
        if calib is None:
            raise AllocationError("auto needs calibration data: the search scores candidates on it.")
        starts = search_starts(settings, model, calib, metrics, outlier_ratios, model_name, progress, custom,
                               farms_metrics)
        return search_in_stages(settings, model, calib, starts, prune_method, fitness_windows, then_windows,
                                model_name, progress, stop, on_best)
    if method == "custom":
        if custom is not None:
            return custom
        return custom_allocation(settings.points, layer_table(model),
                                 sparsity=None if settings.as_drawn else settings.sparsity,
                                 normalize=not settings.as_drawn, model=model_name)
    if method in SPECTRA_METHODS:
        metrics = dense_spectra(model, settings.spectra, progress) if metrics is None else metrics
    else:
        metrics = layer_table(model)
    if method == "owl" and outlier_ratios is None:
        if calib is None:
            raise AllocationError("owl needs calibration data for its outlier ratios.")
        outlier_ratios = collect_outlier_ratios(model, calib, owl_threshold=settings.owl_threshold, progress=progress)
    alloc = allocate(metrics, settings.sparsity, method=method, epsilon=settings.epsilon, metric=settings.metric,
                     granularity=settings.granularity, outlier_ratios=outlier_ratios, owl_lambda=settings.owl_lambda,
                     model=model_name)
    if method in SPECTRA_METHODS:
        alloc.params["fit"] = settings.fit
    if method == "owl":
        alloc.params["owl_threshold"] = settings.owl_threshold
    return alloc


# of the prunable weights: above it a model was pruned before. 4-bit weights keep a zero level (the packaged
# SmolLM2: 0.03%, Gemma-3's Q4_K_M: 4.5%), and pruning leaves far more
PRIOR_ZEROS = 0.1


def run_caveats(settings: RunSettings, loaded: LoadedModel) -> list[str]:
    """Warnings for a run, before it prunes `loaded.model`: weights that are sparse already (pruned before:
    the run's "dense" perplexity and spectra are theirs), a search's saved allocation reused (allocation
    method "file"): analysis.search.reuse_caveats, and a calibration batch of more tokens than its text has. A
    model placed by accelerate (device_map) is not read for its zeros."""
    out = []
    if not loaded.info.device_map and (zeros := zero_fraction(loaded.model)) > PRIOR_ZEROS:
        out.append(f"{zeros:.1%} of the prunable weights are zero already (pruned before? restore it with "
                   "DenseSnapshot, or load it again): the run's dense perplexity and spectra are of these weights")
    if settings.allocation.method == "file" and parse_nm(settings.prune.nm) is None:
        out += allocation_caveats(Allocation.load(settings.allocation.file), settings.prune.method, loaded,
                                  settings.prune.rowwise, settings.evaluation.source)
    if settings.needs_calibration():
        c = settings.calibration
        have = len(tokenize(loaded.tokenizer, calibration_text(c.source, settings.evaluation.source, c.encoding)))
        if c.n_samples * c.seqlen > have:  # (tokenized once: the run's calibration batch reuses the tokens)
            out.append(f"calibration asks for {c.n_samples} x {c.seqlen} = {c.n_samples * c.seqlen} tokens of a text "
                       f"of {have}: its windows overlap, so fewer distinct tokens calibrate than asked for (give a "
                       "longer text, or fewer samples)")
    return out


def allocation_warnings(alloc: Allocation) -> list[str]:
    """An allocation's own warnings (a failed fit's fallback, ratios clipped at the cap) as a run record's."""
    return [f"allocation: {w}" for w in alloc.warnings]


def calibration_params(calibration: CalibrationSettings) -> dict:
    """What an allocation measured on calibration text (OWL's outlier ratios, a search) keeps of it: its settings
    (the text and the batch drawn from it), with the sha256 of the text's file."""
    return {**asdict(calibration), "sha256": text_digest(calibration.source)}


def _read_on(params: dict, key: str, eval_source: str | None, digest: str | None) -> str | None:
    """The text params[key] (a calibration_params or a search's search_text) names when it is `eval_source` (by
    name or by bytes, `digest`: eval_source's sha256), else None. (A hand-made file's params may hold anything.)"""
    read = params.get(key) if isinstance(params.get(key), dict) else {}
    if read and eval_source and (same_text(read.get("source"), eval_source)
                                 or (digest is not None and read.get("sha256") == digest)):
        return read.get("source")
    return None


def allocation_caveats(alloc: Allocation, method: str, loaded: LoadedModel, rowwise: str | None = None,
                       eval_source: str | None = None) -> list[str]:
    """Why a saved allocation, pruned onto `loaded` with `method` (and `rowwise`) and evaluated on `eval_source`,
    may not do what it says or did where it was made: its ratios prune another share of this model's weights than
    it says (its `sparsity`; a curve applied as drawn, its `achieved`: a file edited by hand), it names another
    model (whose matrix names this one shares), it is a run record's whose run pruned otherwise, its search was
    scored on the evaluation text or measured on it (`allocate`'s OWL ratios and searches read the whole
    calibration text), or its search's caveats (reuse_caveats). Call it once the allocation's names are checked
    against the model (check_names)."""
    out = []
    run = alloc.params["run"] if isinstance(alloc.params.get("run"), dict) else {}
    digest = text_digest(eval_source) if eval_source else None  # the bytes it was scored on, as then
    if scored := _read_on(alloc.params, "search_text", eval_source, digest):
        out.append(f"this allocation's search was scored on {scored}, the text this run is evaluated "
                   "on: its perplexity here is not a held-out measure (evaluate on another text)")
    elif calibrated := _read_on(alloc.params, "calibration", eval_source, digest):
        what = "OWL ratios were" if alloc.method == "owl" else "search was"
        out.append(f"this allocation's {what} measured on {calibrated}, the text this run is evaluated on, all of "
                   "it: its perplexity here is not a held-out measure (allocate on another text, or let prune "
                   "compute the allocation: it calibrates on the half it does not evaluate)")
    if run and (run.get("pruner") != method or run.get("rowwise") != rowwise):
        how = " with row-wise TRIM" if run.get("rowwise") else ""
        now = " with row-wise TRIM" if rowwise else ""
        out.append(f"this allocation is a run record's, whose run pruned with {run['pruner']}{how}; pruned here with "
                   f"{method}{now}, the result is not that run's (prune --rerun FILE repeats the run)")
    out += stated_caveats(alloc, loaded.model)
    if alloc.model and _identity(alloc.model) != _identity(loaded.info.source):
        out.append(f"this allocation was made for {alloc.model}, not {loaded.info.source}: its ratios were chosen "
                   "for that model's layers (only its matrix names fit this one)")
    return out + reuse_caveats(alloc.params, method, loaded.model)


def stated_caveats(alloc: Allocation, model: nn.Module) -> list[str]:
    """Where what a saved allocation states is not what its ratios prune on `model` (its shapes are all that is read:
    a skeleton will do): its `sparsity` (a curve applied as drawn: its `achieved`) or `achieved`, and a `per_block` that
    is not its blocks' weighted means of per_layer. A file edited by hand; what prunes is per_layer."""
    out = []
    refs = [r for r in prunable_layers(model) if r.name in alloc.per_layer]
    implied = budget([alloc.per_layer[r.name] for r in refs], [r.params for r in refs])
    as_drawn = alloc.method == "custom" and alloc.params.get("normalize") is False  # its target is not its budget
    if max(abs(implied - alloc.achieved), 0 if as_drawn else abs(implied - alloc.sparsity)) > 5e-4:
        out.append(f"the allocation says sparsity {alloc.sparsity:.2%} (achieved {alloc.achieved:.2%}), but on this "
                   f"model its ratios prune {implied:.2%} of the weights (edited by hand?); what prunes is its "
                   "per_layer ratios")
    try:
        alloc.check_blocks(layer_table(model))
    except AllocationError as e:
        out.append(f"{e}; what prunes is its per_layer ratios")
    return out


def _identity(source: str) -> str:
    try:
        return model_identity(source)
    except ModelLoadError:  # a source no longer loadable here (a folder gone): as written
        return source.strip()


# --------------------------------------------------------------------------------------------
# records


class Timer:
    """Wall-clock seconds per named phase: `with timer("prune"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._name = None
        self._t0 = 0.0

    def __call__(self, name: str) -> Timer:
        self._name = name
        return self

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._t0


def library_versions() -> dict[str, str]:
    return {"alphascope": VERSION, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__}


def content_identity(settings: RunSettings) -> dict:
    """What the files a configuration reads hold now: its model folder's `folder_fingerprint` (a packaged model's
    package and version; None for a hub id) and the sha256 of each text or allocation file it names. Every run record
    keeps it (`--rerun` says what changed since) and a sweep keys its runs by it, so that a run made before
    the weights, a text or a file were written over is not taken for the same configuration now."""
    path, _, packaged = resolve_source(settings.model.source)
    a = settings.allocation
    named = {"calibration.source": read_file(settings.calibration.source),
             "evaluation.source": read_file(settings.evaluation.source),
             "allocation.search_text": a.search_text and read_file(a.search_text),
             "allocation.file": a.file and Path(a.file).expanduser(),
             "allocation.search_from": a.search_from and Path(a.search_from).expanduser()}
    files = {role: file_sha256(p) for role, p in named.items() if p and p.is_file()}
    # a packaged model's weights are its package's, a hub id's its revision's (and may not be here yet)
    if packaged is not None:
        weights = f"{packaged.package} {package_version(packaged.key)}"
    else:
        weights = folder_fingerprint(path) if Path(path).expanduser().is_dir() else None
    return {"weights": weights, "files": files}


def changed_since(record: dict, settings: RunSettings, ran: dict | None = None) -> list[str]:
    """Why a rerun of `record` with `settings` may not give its numbers: the model folder's files or a file the
    run reads (by the record's `content`, the same path only) written over since, other token ids read than the
    record's (an hf: dataset changed in its cache, another tokenizer: by `ran`, the rerun's own record config),
    another device or dtype than the record's ("auto" may pick another here), or other library versions.
    One line each; none for what an older record did not keep."""
    config = record.get("config") or {}
    then, now = config.get("content") or {}, content_identity(settings)
    out, rewritten = [], set()
    if then.get("weights") and now["weights"] and then["weights"] != now["weights"]:
        packaged = resolve_source(settings.model.source)[2] is not None
        out.append(f"the model is {now['weights']} here, the record ran on {then['weights']}" if packaged
                   else "the model folder's files changed since the record ran")
    for role, digest in (then.get("files") or {}).items():
        section, name = role.split(".")
        path = (config.get("settings") or {}).get(section, {}).get(name)
        if role in now["files"] and now["files"][role] != digest and path == getattr(getattr(settings, section), name):
            out.append(f"{path} ({role}) holds other bytes than when the record ran")
            rewritten.add(role)
    for text, role, what in (("calib", "calibration.source", "calibration batch"),
                             ("eval", "evaluation.source", "evaluation windows")):
        then_ids, now_ids = config.get(f"{text}_ids_sha256"), (ran or {}).get(f"{text}_ids_sha256")
        if then_ids and now_ids and then_ids != now_ids and role not in rewritten:
            out.append(f"the {what} of {config.get(text)} hold other token ids than the record's (its text or the "
                       "tokenizer changed)")
    # by device type: "cuda" and "cuda:0" are one device to a record (an index says which GPU, not what computes)
    where = [(str(c.get("device") or "").split(":")[0], c.get("dtype")) for c in (config, ran or {})]
    if ran is not None and all(where[0]) and where[0] != where[1]:
        out.append(f"the record ran on {where[0][0]} in {where[0][1]}, this run on {where[1][0]} in {where[1][1]} "
                   "(--device and --dtype choose)")
    here = library_versions()
    if other := [f"{k} {v} (here {here[k]})" for k, v in (record.get("versions") or {}).items()
                 if k in here and here[k] != v]:
        out.append(f"the record ran with {', '.join(other)}")
    return out


def record_config(settings: RunSettings, alloc: Allocation, data_info: dict, model_name: str = "",
                  **model_info) -> dict:
    """The record's config: the flat summary the run store and the Compare page read, and `settings`."""
    nm = parse_nm(settings.prune.nm)
    from_file = settings.allocation.method == "file"
    source = settings.allocation.file if from_file else settings.allocation.method
    return {"model": model_name or settings.model.source, **model_info, "method": settings.prune.method,
            "rowwise": settings.prune.rowwise,
            "allocation": alloc.method if nm is None else "n:m", "allocation_source": source,
            "sparsity": alloc.sparsity, "nm": list(nm) if nm else None,
            # a file's allocation has its own ε (or none), and uniform, owl, custom and N:M read none: the settings'
            # default would misreport them
            "epsilon": alloc.params.get("epsilon") if from_file else settings.allocation.epsilon
            if nm is None and settings.allocation.method in (*SPECTRA_METHODS, "auto") else None,
            **data_info, "seed": settings.calibration.seed if settings.needs_calibration() else None,
            # SparseGPT's CPU linear algebra rounds differently on another thread count (~1e-6 relative)
            "torch_threads": torch.get_num_threads(), "settings": settings.to_dict(),
            "content": content_identity(settings)}


def make_record(config: dict, allocation: dict | None, report, dense_ppl: float | None, pruned_ppl: float | None,
                timings: dict[str, float], **extra) -> dict:
    """A run record. `report`: a PruneReport (or its dict); `timings`: seconds per phase."""
    rep = report.to_dict() if hasattr(report, "to_dict") else dict(report or {})
    if warned := prune_warnings(rep):
        extra["warnings"] = [*extra.get("warnings", []), *warned]
    return {
        "created": now_iso(),
        "config": dict(config),
        "allocation": allocation,
        "achieved": {"overall": rep.get("overall"), "per_layer": rep.get("per_layer", {})},
        "stopped": rep.get("stopped", False),
        "dense_ppl": dense_ppl,
        "pruned_ppl": pruned_ppl,
        "timings_s": {k: round(float(v), 3) for k, v in timings.items()},
        "versions": library_versions(),
        **extra,
    }


def write_record(record: dict, path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(record, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# a whole run


@dataclass
class RunResult:
    record: dict
    allocation: Allocation
    report: PruneReport


def run(loaded: LoadedModel, settings: RunSettings, *, progress: ProgressFn | None = None,
        on_ppl: Callable[[str, PplUpdate], None] | None = None, on_caveat: Callable[[str], None] | None = None,
        stop: StopFlag = None, timer: Timer | None = None, metrics: pd.DataFrame | None = None,
        farms_metrics: pd.DataFrame | None = None, dense_ppl: float | None = None, origin: str = "library",
        checkpoint: Path | None = None) -> RunResult:
    """Allocate, measure the dense perplexity, prune `loaded.model` in place and measure it again.
    `on_ppl(label, update)` sees every running perplexity ("dense", then "pruned"); `on_caveat(text)` each of
    the run's warnings (run_caveats, also kept in the record) as soon as they are known. `stop` ends a search
    early (with its best so far) and the prune between two blocks: the record then says "stopped", and the partly
    pruned model is not evaluated (its pruned_ppl is None; restore it from a DenseSnapshot). A sweep passes
    what it measured once on the same dense model: `metrics` and `farms_metrics` (spectra, as
    build_allocation takes them) and `dense_ppl` (on this run's evaluation windows); the dense
    evaluation is then skipped. `checkpoint`: the safetensors folder `loaded` came from, its weights unchanged
    since (loading.streamable_folder): the spectra not passed in are streamed from it and cached (dense_spectra).
    The settings are checked against the model (settings.check_model) first. The
    record names the model that ran: `loaded`'s source, whatever settings.model.source says (a script's
    RunSettings() without a model would otherwise record the default model, and a rerun load that one).
    `origin` names the front end in the record ("cli", "sweep"; the dashboard records through analysis.session)."""
    settings.check()
    if model_identity(settings.model.source) != model_identity(loaded.info.source):
        settings = replace(settings, model=replace(settings.model, source=loaded.info.source))
    settings.check_model(loaded.preview())
    if offloaded(loaded.model):  # the walker reads every weight it prunes, and those sit on disk
        raise PruneError(OFFLOADED)
    if not loaded.info.device_map:  # (weights accelerate placed: prune_layer checks each matrix)
        check_finite(loaded.model)  # before the dense evaluation, which a NaN would spend in vain
    caveats = run_caveats(settings, loaded)  # before anything prunes, which may take hours
    if on_caveat:
        for caveat in caveats:
            on_caveat(caveat)
    timer = timer or Timer()
    model, info = loaded.model, loaded.info
    with timer("data"):
        data = prepare_data(loaded.tokenizer, settings.calibration, settings.evaluation, info.bos_per_window,
                            settings.needs_calibration())
    with timer("allocation"):
        held_out, then = search_windows(loaded.tokenizer, settings.allocation, settings.calibration,
                                        info.bos_per_window)
        if checkpoint is not None and metrics is None and farms_metrics is None:
            streamed = {arg: dense_spectra(model, sp, progress, checkpoint, info.device)
                        for arg, sp in spectra_used(settings.allocation, settings.prune.nm).items()}
            metrics, farms_metrics = streamed.get("metrics"), streamed.get("farms_metrics")
        alloc = build_allocation(settings.allocation, model, nm=settings.prune.nm, calib=data.calib,
                                 metrics=metrics, farms_metrics=farms_metrics, model_name=info.source,
                                 prune_method=settings.prune.method, progress=progress, stop=stop,
                                 fitness_windows=held_out, then_windows=then)
    for warning in allocation_warnings(alloc):  # said before the prune
        caveats.append(warning)
        on_caveat and on_caveat(warning)

    def evaluate(label: str) -> float:
        show = (lambda u: on_ppl(label, u)) if on_ppl else None
        return perplexity(model, data.windows, on_update=show, batch_size=settings.evaluation.batch_size)

    dense = dense_ppl
    if dense is None:
        with timer("dense_eval"):
            dense = evaluate("dense")
    with timer("prune"):
        report = prune(model, alloc.per_layer, method=settings.prune.method, calib=data.calib, nm=settings.prune.nm,
                       progress=progress, stop=stop, rowwise=settings.prune.rowwise)
    pruned = None  # a prune `stop` cut short (record["stopped"]) is partly done: nothing to evaluate
    if not report.stopped:
        with timer("pruned_eval"):
            pruned = evaluate("pruned")
    # each block is pruned where it lives (the dashboard's prune may move it to a GPU: session.prune_device)
    config = record_config(settings, alloc, data.info, info.source, model_title=info.title, device=info.device,
                           dtype=info.dtype, pruned_on=info.device, origin=origin)
    record = make_record(config, alloc.to_dict(), report, dense, pruned, timer.seconds,
                         **({"warnings": caveats} if caveats else {}))
    return RunResult(record, alloc, report)
