"""Size on disk of a pruned default model: dense (save_pretrained) vs compressed (compressed-tensors bitmask).

    python -m bench.export_size [--out bench/results/export_size.json] [--dtypes float32,bfloat16]

Cases: magnitude pruning (no calibration needed: sizes depend only on where the zeros are) at
uniform 50% unstructured, 2:4, and a non-uniform custom curve 0.3 -> 0.7 over depth scaled to a 50%
budget. Each is exported in both formats to a temporary folder; the compressed one is read back with
load_pruned and compared bit for bit. Sizes are the bytes of every file in the folder (weights,
config, tokenizer, allocation.json). Seconds are wall time on a possibly shared machine (load
average recorded).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from analysis.allocation import allocate, custom_allocation
from analysis.export import export, folder_bytes, load_pruned
from analysis.layers import layer_table
from analysis.loading import load_model
from analysis.pruning import DenseSnapshot, prune
from bench import machine_info, write_result

CASES = {"uniform 0.5": ("uniform", None), "2:4": ("uniform", "2:4"), "custom 0.3->0.7 at 0.5": ("custom", None)}


def _allocation(kind: str, table):
    if kind == "custom":
        return custom_allocation([(0.0, 0.3), (1.0, 0.7)], table, sparsity=0.5, model="default")
    return allocate(table, 0.5, "uniform", model="default")


def run_case(loaded, name: str, dtype: torch.dtype, tmp: Path) -> dict:
    kind, nm = CASES[name]
    model = loaded.model
    alloc = _allocation(kind, layer_table(model))
    report = prune(model, alloc.per_layer, method="magnitude", nm=nm)
    row = {"case": name, "dtype": str(dtype).removeprefix("torch."), "achieved_sparsity": round(report.overall, 6)}
    for fmt in ("dense", "compressed"):
        t = time.perf_counter()
        out = export(model, loaded.tokenizer, alloc, tmp / f"{fmt}", format=fmt, overwrite=True)
        row[f"{fmt}_write_s"] = round(time.perf_counter() - t, 2)
        row[f"{fmt}_bytes"] = folder_bytes(out)
    t = time.perf_counter()
    back = load_pruned(tmp / "compressed")
    row["compressed_load_s"] = round(time.perf_counter() - t, 2)
    a, b = model.state_dict(), back.state_dict()
    row["bit_identical"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    row["compressed_over_dense"] = round(row["compressed_bytes"] / row["dense_bytes"], 4)
    print(row, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/export_size.json")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args(argv)
    loaded = load_model("default", device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            loaded.model.to(dtype)
            snap = DenseSnapshot.take(loaded.model)
            for name in CASES:
                rows.append(run_case(loaded, name, dtype, Path(tmp)))
                snap.restore(loaded.model)
    write_result({"benchmark": "export_size", "model": loaded.info.title, "command": "python -m bench.export_size",
                  "machine": machine_info(), "shared_machine": True, "results": rows}, args.out)


if __name__ == "__main__":
    main()
