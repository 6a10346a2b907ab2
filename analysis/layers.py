"""The weight matrices of a causal LM: its decoder blocks and the linear layers inside them.

One walker for every architecture: the decoder blocks are the longest `nn.ModuleList`; inside a block
every `nn.Linear` (or GPT-2 style `Conv1D`) is a prunable matrix, listed in module order, but for MoE
routers (`ROUTERS`). The input embedding and an untied lm_head are listed too, as not prunable. A
matrix is always described as (out_features, in_features), whatever its module stores.

Mixture-of-experts blocks (Mixtral, Qwen-MoE, GPT-OSS, Llama 4, ... in transformers 5) keep their experts in
3-D parameters of one module: `gate_up_proj` (every expert's gate and up projections) and `down_proj`, or
`up_proj` and `down_proj` for experts without a gate (Nemotron-H). The module's layout flags, those of
transformers' experts interface, say how they are stored: transposed or not, gate and up rows concatenated
or interleaved, with biases or not (`ExpertsLayout`; `_FLAGS` for Llama 4's module, which sets none). Every
expert's gate, up and down projection is a matrix of its own here, a view of those parameters, named as
Qwen-MoE's checkpoints name them (`<experts>.<e>.gate_proj`, `.up_proj`, `.down_proj`), so spectra,
allocations and pruners see them like any other matrix. Other 3-D layouts are left dense and counted by
`unsupported_weights`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from analysis.errors import AlphascopeError


class NoBlocksError(AlphascopeError, ValueError):
    """A module with no decoder blocks (no non-empty nn.ModuleList) where a causal LM's are needed."""


@dataclass
class LayerRef:
    """One weight matrix of the model, by name.

    `rows` x `cols` is the matrix as (out_features, in_features), whatever the module stores
    (GPT-2's Conv1D keeps the transpose).
    """

    name: str  # module name, e.g. "model.layers.3.self_attn.q_proj"
    block: int  # decoder block index, -1 for matrices outside the blocks
    kind: str  # q_proj, k_proj, ..., fc1, c_attn, embed_tokens, lm_head
    group: str  # "attn", "mlp", "embed", "head", or "other"
    rows: int
    cols: int
    prunable: bool  # inside a decoder block; routers, embeddings and lm_head are listed but excluded
    transposed: bool = False  # Conv1D (and transposed experts): the stored matrix is (in, out)
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    # a matrix sliced from fused MoE experts: (parameter, expert, start, stop, step): rows start:stop:step of
    # expert e's (out, in) matrix in module's 3-D parameter
    expert: tuple[str, int, int, int, int] | None = None

    @property
    def params(self) -> int:
        return self.rows * self.cols

    @property
    def input_key(self) -> tuple:
        """Equal for matrices that read the same inputs by construction: an expert's gate and up projections,
        slices of one parameter (so they share one calibration statistic)."""
        return (id(self.module), *self.expert[:2]) if self.expert is not None else (self.name,)

    def expert_view(self, stored: torch.Tensor) -> torch.Tensor:
        """This expert matrix as (out, in), a view of `stored`: its expert's 2-D entry of the fused parameter (in
        the module, or read from a checkpoint)."""
        _, _, a, b, step = self.expert
        return (stored.t() if self.transposed else stored)[a:b:step]

    def weight(self) -> torch.Tensor:
        """The matrix as (out, in); a view of the module's parameter, not a copy."""
        if self.expert is not None:
            param, e = self.expert[:2]
            return self.expert_view(getattr(self.module, param)[e])
        w = self.module.weight
        return w.t() if self.transposed else w



# MoE routers and gating vectors (Linear in some models, or a Linear inside a module of that name, as DBRX's
# router.layer): they choose which experts run, so they are listed, not pruned
ROUTERS = ("gate", "router", "shared_expert_gate")

_GROUPS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value", "out_proj",
             "dense", "Wqkv", "wq", "wk", "wv", "wo"),
    "mlp": ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "c_proj",
            "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3"),
}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder blocks: the longest nn.ModuleList (ties: the first), with its dotted name."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    return best


def token_ids_problem(ids: torch.Tensor, model: nn.Module) -> str | None:
    """Why `ids` cannot be fed to `model` as token ids (not integers, or outside its embedding's rows: a text
    tokenized by another model's tokenizer), or None."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        return f"token ids must be integers (torch.long), got {str(ids.dtype).replace('torch.', '')}"
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if not ids.numel() or rows is None:
        return None
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= rows:
        return (f"token id {low if low < 0 else high} is outside the model's vocabulary of {rows} embedding rows "
                "(ids tokenized for another model?)")
    return None


def blocks_beyond(keys: Iterable[str], model: nn.Module) -> list[str]:
    """The tensor names of `keys` (a checkpoint's) under the decoder blocks at an index the model has no block
    for: a config.json naming fewer blocks than its checkpoint holds, whose last blocks would be dropped. Names
    the model class ignores on purpose (e.g. a multi-token-prediction block stored after the last) are not."""
    found = find_blocks(model)
    if found is None:
        return []
    name, blocks = found
    index = re.compile(rf"{re.escape(name)}\.(\d+)\.")
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    return sorted(k for k in keys if (m := index.match(k)) and int(m.group(1)) >= len(blocks)
                  and not any(p.search(k) for p in ignored))


def _is_router_module(sub: str, mod: nn.Module) -> bool:
    """A router that is no Linear but keeps its (experts, hidden) matrix as `weight`, as transformers 5's
    top-k routers (Qwen-MoE's, Mixtral's `gate`) do: listed like the Linear routers of older versions."""
    w = getattr(mod, "weight", None)
    return sub.split(".")[-1] in ROUTERS and isinstance(w, nn.Parameter) and w.dim() == 2


def _is_matrix_module(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    # GPT-2 style Conv1D (weight stored as (in, out)) without importing its class
    return type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused-experts module stores its experts: the flags transformers' experts interface
    (`use_experts_implementation`) sets on it, or the defaults of that interface where it sets none."""

    experts: int
    hidden: int  # width of the experts' input and output
    inner: int  # width of one expert's intermediate layer
    gated: bool  # `gate_up_proj` holds each expert's gate and up projections; else `up_proj` alone (no gate)
    concatenated: bool  # gate rows, then up rows; else interleaved (gate, up, gate, up, ...)
    transposed: bool  # parameters stored (experts, in, out) instead of (experts, out, in)
    bias: bool  # `<parameter>_bias` (experts, out) beside each parameter
    # called with every expert's rows stacked, (experts x tokens, hidden), each token scaled by its router score
    # and zero where the router did not choose that expert; else with (tokens, the chosen experts, their weights)
    pre_routed: bool = False

    @property
    def first(self) -> str:
        """The parameter the experts' input goes through first."""
        return "gate_up_proj" if self.gated else "up_proj"

    def matrices(self) -> list[tuple[str, str, int, int, int, int, int]]:
        """(kind, parameter, start, stop, step, rows, cols) of one expert's matrices: rows start:stop:step of its
        (out, in) matrix in the parameter."""
        i, h = self.inner, self.hidden
        down = ("down_proj", "down_proj", 0, h, 1, h, i)
        if not self.gated:
            return [("up_proj", "up_proj", 0, i, 1, i, h), down]
        gate, up = ((0, i, 1), (i, 2 * i, 1)) if self.concatenated else ((0, 2 * i, 2), (1, 2 * i, 2))
        return [("gate_proj", "gate_up_proj", *gate, i, h), ("up_proj", "gate_up_proj", *up, i, h), down]


# experts modules outside transformers' experts interface, and the flags they would set (read only while the
# module sets none: a later transformers that moves the module into the interface is read by its own flags)
_FLAGS = {"Llama4TextExperts": {"is_transposed": True, "pre_routed": True}}


def _param_3d(mod: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(mod, name, None)
    return p if isinstance(p, nn.Parameter) and p.dim() == 3 else None


def fused_experts(mod: nn.Module) -> ExpertsLayout | None:
    """The layout of `mod`'s experts when it holds MoE experts this module reads (see the module docstring):
    3-D `gate_up_proj` (or `up_proj` where the module says it has no gate) and `down_proj` of matching
    shapes, stored as its layout flags say (`_FLAGS` for modules that set none); else None. A module without
    flags must be the interface's default: (E, 2I, H) and (E, H, I), concatenated, without biases."""
    known = {} if hasattr(mod, "is_transposed") else _FLAGS.get(type(mod).__name__, {})  # the interface's own first

    def flag(name: str, default: bool) -> bool:
        return bool(known.get(name, getattr(mod, name, default)))

    if flag("has_post_expert_norm", False):
        return None  # a norm after each expert: its output is not down(act(...)) alone
    gated = flag("has_gate", True)
    names = ("gate_up_proj" if gated else "up_proj", "down_proj")
    first, down = (_param_3d(mod, n) for n in names)
    if first is None or down is None:
        return None
    transposed, bias = flag("is_transposed", False), flag("has_bias", False)
    if {isinstance(getattr(mod, f"{n}_bias", None), torch.Tensor) for n in names} != {bias}:
        return None  # biases the flags do not announce (or lack): something else is computed
    (e, out, hidden), (e_down, h_down, inner) = ((t.shape[0], *t.shape[1:][::-1]) if transposed else t.shape
                                                 for t in (first, down))  # (experts, out, in)
    if (gated and out % 2) or (e_down, h_down, inner) != (e, hidden, out // 2 if gated else out):
        return None
    return ExpertsLayout(int(e), int(hidden), int(inner), gated, flag("is_concatenated", True), transposed, bias,
                         flag("pre_routed", False))


def _expert_refs(name: str, b: int, mod: nn.Module) -> list[LayerRef]:
    layout = fused_experts(mod)
    return [LayerRef(f"{name}.{e}.{kind}", b, f"experts.{kind}", "mlp", rows, cols, True, layout.transposed, mod,
                     (param, e, start, stop, step))
            for e in range(layout.experts) for kind, param, start, stop, step, rows, cols in layout.matrices()]


UNSUPPORTED = ("{n:,} weights of the decoder blocks sit in parameters of a layout this tool does not read (MoE "
               "experts other than gate_up_proj or up_proj + down_proj as transformers' experts interface stores "
               "them, or quantized experts): they are neither analysed nor pruned, and sparsities count the other "
               "matrices only")


def unsupported_weights(model: nn.Module) -> int:
    """Weights inside the decoder blocks that are neither analysed nor pruned for being stored in a layout
    this module does not read: parameters of 3 or more dimensions, and 2-D ones inside a module named
    `experts` (DBRX stacks its experts in 2-D parameters), that are not of fused experts `fused_experts`
    reads (e.g. experts with a norm after each, or quantized ones, such as GPT-OSS's MXFP4 blocks where
    transformers keeps them). Convolutions (Mamba's, linear attention's) are not matrices and are not counted."""
    found = find_blocks(model)
    if not found:
        return 0
    total = 0
    for block in found[1]:
        for sub, mod in block.named_modules():
            if fused_experts(mod) is not None or isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                continue
            least = 2 if "experts" in sub.split(".") and not _is_matrix_module(mod) else 3
            total += sum(p.numel() for p in mod.parameters(recurse=False) if p.dim() >= least)
    return total


def _group(name: str, kind: str) -> str:
    parent = name.split(".")[-2] if "." in name else ""
    if "attn" in parent or "attention" in parent:
        return "attn"
    if "mlp" in parent or "ffn" in parent or "feed_forward" in parent:
        return "mlp"
    for g, kinds in _GROUPS.items():
        if kind in kinds:
            return g
    return "other"


def find_layers(model: nn.Module, include_outside: bool = True) -> list[LayerRef]:
    """All weight matrices: every Linear/Conv1D and fused expert matrix inside the decoder blocks
    (prunable, but for MoE routers: ROUTERS), in module order, plus the input embedding and lm_head
    (listed, not prunable) when `include_outside`."""
    found = find_blocks(model)
    refs: list[LayerRef] = []
    if found:
        prefix, blocks = found
        for b, block in enumerate(blocks):
            for sub, mod in block.named_modules():
                if fused_experts(mod) is not None:
                    refs.extend(_expert_refs(f"{prefix}.{b}.{sub}", b, mod))
                if not (_is_matrix_module(mod) or _is_router_module(sub, mod)):
                    continue
                name = f"{prefix}.{b}.{sub}"
                parts = sub.split(".")
                kind = parts[-1]
                if len(parts) > 1 and parts[-2].startswith("shared_expert"):  # Qwen-MoE's, DeepSeek's: not the
                    kind = f"{parts[-2]}.{kind}"  # routed experts' (experts.*) nor a dense MLP's gate_proj
                transposed = type(mod).__name__ == "Conv1D"
                r, c = mod.weight.shape[::-1] if transposed else mod.weight.shape
                router = any(part in ROUTERS for part in parts[-2:])
                refs.append(LayerRef(name, b, kind, _group(name, parts[-1]), int(r), int(c), not router, transposed,
                                     mod))
    if include_outside:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = {id(m): n for n, m in model.named_modules()}
        for mod, kind, group in ((emb, "embed_tokens", "embed"), (head, "lm_head", "head")):
            if mod is None or getattr(mod, "weight", None) is None or id(mod) not in names:
                continue
            if group == "head" and emb is not None and mod.weight is emb.weight:
                continue  # tied with the embedding: the same matrix, list it once
            r, c = mod.weight.shape
            refs.append(LayerRef(names[id(mod)], -1, kind, group, int(r), int(c), False, False, mod))
    return refs


def prunable_layers(model: nn.Module) -> list[LayerRef]:
    return [r for r in find_layers(model, include_outside=False) if r.prunable]


def layer_table(model: nn.Module):
    """The prunable matrices as a metrics-like DataFrame (name, block, kind, params, prunable) without
    spectra: what uniform, OWL and N:M allocations need."""
    return pd.DataFrame([dict(name=r.name, block=r.block, kind=r.kind, params=r.params, prunable=True)
                         for r in prunable_layers(model)])


def layers_by_block(model: nn.Module) -> dict[int, list[LayerRef]]:
    """The prunable matrices grouped by decoder block index."""
    out: dict[int, list[LayerRef]] = {}
    for ref in prunable_layers(model):
        out.setdefault(ref.block, []).append(ref)
    return out


def module_device(module: nn.Module) -> torch.device:
    """Where the module's first parameter lives."""
    return next(module.parameters()).device


def module_device_dtype(module: nn.Module) -> tuple[str, str]:
    """The device type (cpu, cuda) and dtype name (float32, bfloat16) of the module's first parameter: where
    and in what precision it computes, as a search records for its real prunes."""
    p = next(module.parameters())
    return p.device.type, str(p.dtype).removeprefix("torch.")


def zero_fraction(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the prunable matrices (0.0 for a dense model)."""
    refs = prunable_layers(model)
    total = sum(r.params for r in refs)
    return sum(int((r.weight() == 0).sum()) for r in refs) / total if total else 0.0


def skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of a transformers `config` on the meta device: module names and shapes, no
    weights, no memory (for checks and streamed spectra before, or without, loading the weights)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
