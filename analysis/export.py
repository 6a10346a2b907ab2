"""Saving a pruned model, and its allocation in the layouts other pruning tools read.

Model folders (`export`)
------------------------
- ``"dense"`` (the default): ``save_pretrained`` (safetensors), zeros stored as zeros. Loads with
  transformers' ``from_pretrained`` and serves with vLLM like any checkpoint.
- ``"dense-ct"``: the dense folder plus compressed-tensors' sparsity metadata in config.json
  (``quantization_config.sparsity_config`` with format ``dense``: targets, ignore, sparsity_structure,
  global_sparsity), the folder llm-compressor writes for a sparse model saved uncompressed. Loads
  with transformers (compressed-tensors installed) to bit-identical weights; tools that read the
  metadata learn which matrices are sparse and how.
- ``"compressed"``: the compressed-tensors sparse layout, for disk and transfer. Every pruned matrix
  is stored as its non-zero values plus a bitmask (1 bit per weight, rows packed little-endian):
  all-2:4 models in the ``sparse-24-bitmask`` format (values as rows x cols/2, keys
  ``<module>.compressed``, ``.bitmask``, ``.shape``), others in ``sparse-bitmask`` (values flat, plus
  ``.row_offsets``); every other tensor is stored as is. config.json gets a ``quantization_config``
  (``quant_method: compressed-tensors``) whose ``sparsity_config`` (format, sparsity_structure,
  targets, ignore, global_sparsity) is made by compressed-tensors' own config classes. Not the
  default because nothing current decompresses it: compressed-tensors 0.19 keeps those configs and
  the bit packing (used here) but dropped its sparse compressors, transformers 5 then loads the
  pruned matrices as random weights (its load report lists them as MISSING), and vLLM dropped 2:4
  sparse checkpoints in 0.19.1. Load it back with `load_pruned` (bit-identical weights).
Both also hold the tokenizer and the allocation (allocation.json). A folder is written to a
hidden staging folder beside the destination and renamed into place only when complete, so a
failed write (a full disk, ...) leaves neither a partial folder nor a damaged older export.

Allocation files
----------------
- `recipe_yaml`: an llm-compressor (0.14) recipe whose SparseGPTModifier or WandaPruningModifier
  carries one sparsity per target matrix (``sparsity`` list aligned with ``targets``, in module
  order, which is the order llm-compressor matches targets in), and ``mask_structure`` ("0:0" for
  unstructured, "2:4", ...).
- `ratios_npy`: a float64 .npy vector, one ratio per prunable linear layer in module order: the
  ``ratios`` list AlphaPruning's pruning functions take (what its ``ww_sparsity`` returns), not the
  metric file ``ww_sparsity`` reads and maps itself.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import yaml
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from analysis.errors import AlphascopeError

FORMATS = ("dense", "dense-ct", "compressed")
DEFAULT_FORMAT = "dense"  # the one every current loader reads (see the module docstring)
RECIPE_PRUNERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}
DEFAULT_RECIPE_PRUNER = "sparsegpt"
WEIGHTS_FILE = "model.safetensors"
COMPRESSED_NOTE = ("transformers' from_pretrained does not decompress this layout: it loads the pruned matrices as "
                   "random weights. Load the folder with analysis.export.load_pruned, or as --model (any command) "
                   "or on the Model page")


class ExportError(AlphascopeError, ValueError):
    """A destination that cannot be written, or a write that failed; the message is one line."""


# --------------------------------------------------------------------------------------------
# destinations


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_folder(folder: Path, what: Path) -> None:
    """Raise ExportError unless a file can be created in `folder` (or the folder it would be made in).
    Tried for real, since permission bits say nothing for root or on read-only mounts."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise ExportError(f"cannot write {what}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".alphascope-probe-", dir=base)
    except OSError as e:
        raise ExportError(f"cannot write {what}: no file can be created in {base} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_destination(out_dir: str | Path, overwrite: bool = False, inputs: dict[str, Path] | None = None) -> Path:
    """The model folder `out_dir` as a Path, after checking it can be written: not an existing file,
    empty or absent unless `overwrite`, and then a model folder (config.json) whose replacement loses
    no other files; creatable; and holding none of `inputs` (what -> a file or folder the run reads, e.g.
    the loaded model's own folder). Raises ExportError. Cheap: call it before pruning."""
    out = Path(out_dir).expanduser()
    folder = out.resolve()
    for what, source in (inputs or {}).items():
        source = Path(source).expanduser().resolve()
        if source == folder or folder in source.parents:
            raise ExportError(f"{out_dir} holds what {what} reads ({source}), which saving would replace; save it "
                              "elsewhere")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is an existing file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty: choose another folder or allow overwriting it (--overwrite, or "
                              "Overwrite on the Prune page)")
        if not (out / "config.json").is_file():
            raise ExportError(f"{out} holds files but no saved model (config.json): overwriting replaces only a "
                              "model folder, so choose another folder")
    _check_writable_folder(out.parent, out)
    return out


def check_output_file(path: str | Path) -> Path:
    """The output file `path` as a Path, after checking it is not a folder and can be created."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ExportError(f"{p} is a folder, not a file")
    _check_writable_folder(p.parent, p)
    return p


# --------------------------------------------------------------------------------------------
# compressed-tensors sparse layout


def _group_counts(nonzero: torch.Tensor) -> torch.Tensor:
    """Non-zeros per group, from the (groups, 4) bool mask. Column sums: a reduction over 4 elements
    per row (.sum(1)) is several times slower on a CPU."""
    c = nonzero.to(torch.int8)
    return c[:, 0] + c[:, 1] + c[:, 2] + c[:, 3]


def _is_24(w: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive weights of a row."""
    return w.shape[-1] % 4 == 0 and bool((_group_counts(w.reshape(-1, 4) != 0) <= 2).all())


def _mask_24(w: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept positions per group of 4 (the format stores 2 values per group): the non-zeros,
    topped up with the group's first zeros."""
    nonzero = w.reshape(-1, 4) != 0
    room = 2 - _group_counts(nonzero)  # zeros still to keep in each group
    keep, zeros_seen = nonzero.clone(), torch.zeros_like(room)
    for j in range(4):
        zeros_seen += ~nonzero[:, j]
        keep[:, j] |= ~nonzero[:, j] & (zeros_seen <= room)
    return keep.reshape(w.shape)


def _compress_matrix(prefix: str, w: torch.Tensor, two_four: bool) -> dict[str, torch.Tensor]:
    from compressed_tensors.utils import pack_bitmasks  # noqa: PLC0415 (slow import; compressed format only)
    w = w.detach().cpu()
    if two_four:
        keep = _mask_24(w)
        return {f"{prefix}.shape": torch.tensor(list(w.shape)).reshape(-1, 1),
                f"{prefix}.compressed": w.masked_select(keep).reshape(w.shape[0], w.shape[1] // 2),
                f"{prefix}.bitmask": pack_bitmasks(keep)}
    keep = w != 0
    counts = torch.count_nonzero(keep, dim=-1)
    return {f"{prefix}.shape": torch.tensor(list(w.shape)), f"{prefix}.compressed": w.masked_select(keep),
            f"{prefix}.bitmask": pack_bitmasks(keep), f"{prefix}.row_offsets": torch.cumsum(counts, 0) - counts}


def _decompress_matrix(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    from compressed_tensors.utils import unpack_bitmasks  # noqa: PLC0415 (slow import; compressed format only)
    shape = [int(x) for x in parts["shape"].flatten()]
    keep = unpack_bitmasks(parts["bitmask"], shape)
    return torch.zeros(shape, dtype=parts["compressed"].dtype).masked_scatter_(keep, parts["compressed"].flatten())


def _quantization_config(model: nn.Module, weights: dict[str, torch.Tensor], two_four: bool,
                         stored_dense: bool) -> dict:
    """config.json's quantization_config for `weights` (name -> pruned matrix; `two_four`: all of them
    2:4), made by compressed-tensors' own config classes: format dense when the matrices are stored
    dense, else the bitmask format (sparse-24-bitmask when two_four)."""
    import compressed_tensors  # noqa: PLC0415 (slow import; compressed-tensors formats only)
    from compressed_tensors.base import (  # noqa: PLC0415
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_METHOD,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
    )
    from compressed_tensors.config import BitmaskConfig, DenseSparsityConfig, Sparse24BitMaskConfig  # noqa: PLC0415

    # compressed-tensors' "average sparsity of the entire model", as llm-compressor fills it: zeros among every
    # parameter (a tied matrix once), not only among the pruned matrices
    zeros = sum(p.numel() - int(torch.count_nonzero(p)) for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in weights)
    cls = DenseSparsityConfig if stored_dense else Sparse24BitMaskConfig if two_four else BitmaskConfig
    # sparsity_structure "unstructured" also covers other N:M patterns: compressed-tensors names only 2:4
    sparsity = cls(targets=["Linear"], ignore=ignore, global_sparsity=zeros / max(total, 1),
                   sparsity_structure="2:4" if two_four else "unstructured").model_dump()
    return {QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD, COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
            SPARSITY_CONFIG_NAME: sparsity}


def _add_quantization_config(folder: Path, quantization: dict) -> None:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quantization
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def _write_compressed(model: nn.Module, weights: dict[str, torch.Tensor], two_four: bool, folder: Path) -> None:
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:  # a tied weight (lm_head = embeddings): stored once, re-tied on load
            continue
        seen.add(t.data_ptr())
        prefix = key.removesuffix(".weight")
        if key.endswith(".weight") and prefix in weights:
            tensors.update(_compress_matrix(prefix, t, two_four))
        else:
            tensors[key] = t.detach().cpu().contiguous()
    safetensors.torch.save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    _add_quantization_config(folder, _quantization_config(model, weights, two_four, stored_dense=False))


def stored_compressed(config) -> bool:
    """Whether a model's transformers config says its matrices are stored in a compressed sparse layout
    (compressed-tensors' sparsity_config with a format other than dense), which transformers loads as
    random weights and `load_pruned` decompresses."""
    quant = getattr(config, "quantization_config", None)
    quant = quant if isinstance(quant, dict) else {}
    return (quant.get("sparsity_config") or {}).get("format", "dense") != "dense"


def load_pruned(folder: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """A model saved by `export` (either format) as a transformers model in eval mode: compressed
    matrices are decompressed to bit-identical dense weights in the stored dtype."""
    folder = Path(folder).expanduser()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if not stored_compressed(config):  # stored dense: transformers reads it
        return AutoModelForCausalLM.from_pretrained(folder, device_map=device, trust_remote_code=False).eval()
    if not (folder / WEIGHTS_FILE).is_file():
        raise ExportError(f"{folder}: a compressed model folder without {WEIGHTS_FILE} (not one `export` wrote)")
    del config.quantization_config
    stored = safetensors.torch.load_file(folder / WEIGHTS_FILE)
    state, parts = {}, {}
    for key, t in stored.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("shape", "compressed", "bitmask", "row_offsets"):
            parts.setdefault(prefix, {})[leaf] = t
        else:
            state[key] = t
    for prefix, p in parts.items():
        state[f"{prefix}.weight"] = _decompress_matrix(p)
    dtype = next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = model.state_dict()
    loaded = {params[k].data_ptr() for k in state if k in params}
    tied = {k for k in missing if params[k].data_ptr() in loaded}  # e.g. lm_head tied to the embeddings
    if unexpected or set(missing) - tied:
        raise ExportError(f"{folder}: weights do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
    return model.to(device or "cpu").eval()


# --------------------------------------------------------------------------------------------
# the model folder


def _allocation_dict(allocation) -> dict:
    return allocation.to_dict() if hasattr(allocation, "to_dict") else dict(allocation or {})


def export(model: nn.Module, tokenizer, allocation, out_dir: str | Path, format: str = DEFAULT_FORMAT,
           overwrite: bool = False, inputs: dict[str, Path] | None = None, pruner: str | None = None) -> Path:
    """Save the (pruned) model in `format` (one of FORMATS, see the module docstring) with its
    tokenizer (None: none) and the allocation as allocation.json. `allocation`: an Allocation (anything
    with to_dict()) or a dict; its per_layer names are the matrices the compressed format compresses.
    `pruner`: the pruner the model was pruned with, kept in allocation.json as a run record's allocation keeps
    it (params.run.pruner: Allocation.pruner, what `export --recipe` makes its modifier from).
    An existing non-empty `out_dir` is replaced only if `overwrite`, and never when it holds one of `inputs`
    (check_destination). Raises ExportError (nothing is left behind, an older export in `out_dir` is kept) when
    the folder cannot be written."""
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = check_destination(out_dir, overwrite, inputs)
    alloc = _allocation_dict(allocation)
    if pruner is not None:
        alloc = {**alloc, "params": {**alloc.get("params", {}), "run": {"pruner": pruner}}}
    weights = {n: m.weight for n, m in model.named_modules() if n in alloc.get("per_layer", {})}
    if format == "dense-ct" and (fused := sorted(set(alloc.get("per_layer", {})) - set(weights))):
        raise ExportError(f"dense-ct: {len(fused)} pruned matrices (e.g. '{fused[0]}') are slices of fused MoE "
                          "experts, which transformers does not load under compressed-tensors metadata; save as "
                          "dense or compressed")
    # all 2:4? (once, for both the layout and the config; plain dense needs neither)
    two_four = format != "dense" and bool(weights) and all(_is_24(w) for w in weights.values())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex}"
        stage.mkdir()  # not tempfile.mkdtemp: its mode 0700 would keep a serving account out of the export
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        if format == "compressed":
            _write_compressed(model, weights, two_four, stage)
        else:
            model.save_pretrained(stage)  # safetensors is the default format
            if format == "dense-ct":
                _add_quantization_config(stage, _quantization_config(model, weights, two_four, stored_dense=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        (stage / "allocation.json").write_text(json.dumps(alloc, indent=2))
        # safetensors writes its files 0600: give every file the mode a file written here gets from the umask,
        # so a serving account that can read the folder can read the weights too
        mode = (stage / "allocation.json").stat().st_mode & 0o777
        for file in stage.rglob("*"):
            if file.is_file():
                file.chmod(mode)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise ExportError(f"cannot write {out}: {e.strerror or e}; nothing was saved") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def folder_bytes(folder: str | Path) -> int:
    """Total size in bytes of the files in `folder` (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# allocation files


def module_order(per_layer: dict[str, float], model: nn.Module | None = None) -> dict[str, float]:
    """`per_layer` in the model's module order (named_modules; the matrices of fused MoE experts at their
    experts module, in the given order); without a model, as given (allocations are built walking the
    model, so their order already is module order)."""
    if model is None:
        return dict(per_layer)
    rank = {n: i for i, (n, _) in enumerate(model.named_modules())}

    def position(name: str) -> int:  # a fused expert's matrix (<experts>.<e>.gate_proj) sits at its experts module
        while name not in rank and "." in name:
            name = name.rsplit(".", 1)[0]
        return rank.get(name, len(rank))
    return dict(sorted(per_layer.items(), key=lambda item: position(item[0])))  # stable: experts keep their order


def recipe_pruner_for(pruner: str | None) -> str:
    """The recipe's pruner for an allocation made for or pruned with `pruner`: that one where llm-compressor has its
    modifier (sparsegpt, wanda), else DEFAULT_RECIPE_PRUNER."""
    return pruner if pruner in RECIPE_PRUNERS else DEFAULT_RECIPE_PRUNER


def recipe_note(alloc) -> str:
    """The comment lines on top of the recipe of `alloc` (an analysis.allocation.Allocation), the same from the CLI
    and the Prune page: how it was made, for which model, its target and achieved sparsity."""
    return (f"alphascope allocation '{alloc.method}' for {alloc.model or 'an unnamed model'}: target "
            f"{alloc.sparsity:.4f}, achieved {alloc.achieved:.6f}\none sparsity per target, in module order")


def recipe_yaml(per_layer: dict[str, float], pruner: str = DEFAULT_RECIPE_PRUNER, nm: tuple[int, int] | None = None,
                note: str = "") -> str:
    """An llm-compressor recipe pruning each matrix of `per_layer` (module name -> sparsity, in module
    order) with `pruner` ("sparsegpt" or "wanda"); `nm` (N, M) sets the mask structure (default
    unstructured). Matrices of ratio 0 are left out of the targets. `note` becomes comment lines on top."""
    if pruner not in RECIPE_PRUNERS:
        raise ExportError(f"recipe pruner must be one of {', '.join(RECIPE_PRUNERS)}, got {pruner!r}")
    if not per_layer:
        raise ExportError("the allocation has no layers")
    if nm is not None and not (isinstance(nm, (tuple, list)) and len(nm) == 2 and all(type(x) is int for x in nm)):
        raise ExportError(f"nm must be (N, M), e.g. (2, 4), got {nm!r} (analysis.pruners.parse_nm reads '2:4')")
    # a matrix kept dense is no target: llm-compressor prunes every N:M target to the pattern whatever its sparsity
    pruned = {name: float(r) for name, r in per_layer.items() if r > 0}
    if not pruned:
        raise ExportError("the allocation prunes no matrix (every ratio is 0): a recipe would have no targets")
    modifier = {"targets": list(pruned), "sparsity": list(pruned.values()),
                "mask_structure": f"{nm[0]}:{nm[1]}" if nm else "0:0"}
    recipe = {"sparsity_stage": {"pruning_modifiers": {RECIPE_PRUNERS[pruner]: modifier}}}
    lines = note.splitlines()
    if len(pruned) < len(per_layer):
        lines.append(f"{len(per_layer) - len(pruned)} matrices with ratio 0 are not targets: they stay dense")
    head = "".join(f"# {line}\n" for line in lines)
    return head + yaml.safe_dump(recipe, sort_keys=False, width=120)


_EXPERT_MATRIX = re.compile(r"\.experts\.\d+\.")


def recipe_caveats(per_layer: dict[str, float]) -> list[str]:
    """Why llm-compressor may not apply a recipe of `per_layer` as written: expert matrices (named
    `...experts.<e>.<proj>`) are modules only where the experts are separate Linear modules, not in a model
    whose experts transformers 5 keeps fused in 3-D parameters (README, "Mixture-of-experts models")."""
    experts = [name for name in per_layer if _EXPERT_MATRIX.search(name)]
    if not experts:
        return []
    return [f"{len(experts)} of the recipe's {len(per_layer)} targets are expert matrices (e.g. {experts[0]}): "
            "llm-compressor finds them only in a model whose experts are separate Linear modules, not where "
            "transformers 5 fuses them into 3-D parameters"]


def ratios_npy(per_layer: dict[str, float]) -> bytes:
    """The ratios of `per_layer` (in module order) as the bytes of a float64 .npy vector."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(list(per_layer.values()), dtype=np.float64))
    return buf.getvalue()
