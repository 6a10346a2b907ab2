"""Saving a pruned model: safetensors weights, its tokenizer, and the allocation it was pruned with."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn


def export(model: nn.Module, tokenizer, allocation, out_dir: str | Path) -> Path:
    """Save the (pruned) model as safetensors with its tokenizer, and the allocation as
    allocation.json beside them. `allocation`: an Allocation (anything with to_dict()) or a dict."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors is the default format
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    alloc = allocation.to_dict() if hasattr(allocation, "to_dict") else dict(allocation or {})
    (out / "allocation.json").write_text(json.dumps(alloc, indent=2))
    return out
