"""Does the allocation search's proxy rank allocations as the final prune does?

    python -m bench.search_proxy --model default --sparsity 0.6 --method sparsegpt [--seed 0]

The search ("auto", analysis.search) scores a candidate on a stitched model: every block pruned from the
dense model's inputs. The final prune (analysis.pruning.prune) feeds each block the pruned blocks'
outputs. For each search start (uniform, OWL, AlphaPruning and FARMS at eps 0.1/0.2/0.3 and at the eps
bench.quality chose on valid; results before FARMS was a start have no FARMS rows) and for the searched
allocations of bench/results/quality_<model>.json (same seed, sparsity and pruner: auto, and auto-valid
when it was searched), this prunes the model for real and measures the calibration NLL the search
optimises (on the search's confirmation tokens), next to the stitched NLL the search recorded, and the
WikiText-2 test perplexity the quality bench measured. To tell the text from the context length apart,
it also measures the NLL of the first `confirm` positions and of all positions of the same windows: the
calibration windows (16 x 256) and the first 8 WikiText-2 *valid* windows of 512 tokens. Writes
bench/results/search_proxy_<model>_<method>_<sparsity>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from analysis.allocation import Allocation
from analysis.data import calibration_batches, eval_windows, load_text
from analysis.evaluation import token_nll
from analysis.loading import load_model
from analysis.owl import collect_outlier_ratios
from analysis.pipeline import dense_spectra, search_starts
from analysis.pruning import DenseSnapshot, prune
from analysis.search import fitness
from analysis.settings import AllocationSettings, SpectraSettings

RESULTS = Path(__file__).resolve().parent / "results"


def nll_by_position(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL (nats) at each position 1..L-1 over `windows` (n, L)."""
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for w in windows.split(1):
        total += token_nll(model, w)[0].double()
    return total / windows.shape[0]


def prefix_means(nll: torch.Tensor, lengths) -> dict:
    """Mean NLL over the first L-1 predicted positions, for each window length L."""
    return {str(n): round(float(nll[: n - 1].mean()), 4) for n in lengths}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search_proxy", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="packaged model: default or gemma3")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positions", action="store_true",
                   help="also the NLL by window length on the calibration and WikiText-2 valid windows")
    args = p.parse_args(argv)
    quality = json.loads((RESULTS / f"quality_{args.model}.json").read_text())
    key = f"{args.seed}/{args.sparsity:.2f}/{args.method}"
    lm = load_model(args.model, device="cpu", dtype="float32")
    model = lm.model
    cfg = quality["config"]
    confirm_seqlen = int(cfg["search_tokens"].split(",")[1])  # as bench.quality's search confirmed on
    calib = calibration_batches(lm.tokenizer, load_text("default"), cfg["nsamples"], cfg["seqlen"], seed=args.seed,
                                bos=lm.info.bos_per_window)
    outliers = collect_outlier_ratios(model, calib, owl_threshold=5.0)
    # the searches of bench.quality also start from the epsilon it chose on valid
    starts = search_starts(AllocationSettings(sparsity=args.sparsity, epsilon=quality["epsilon"], owl_threshold=5.0),
                           model, calib, dense_spectra(model, SpectraSettings()), outliers, args.model)
    searched = {n: Allocation.from_dict(quality["searches"][f"{key}/{n}"]) for n in ("auto", "auto-valid")
                if f"{key}/{n}" in quality["searches"]}
    auto = searched["auto"]
    stitched = {**auto.params["starts"], "auto": auto.params["best_fitness"]}
    test_ppl = {name: (quality["runs"].get(f"{key}/{run}") or {}).get("ppl") for name, run in
                {"uniform": "uniform", "owl": "owl", "auto": "auto", "auto-valid": "auto-valid",
                 f"alphapruning eps={quality['epsilon']:g}": "alphapruning"}.items()}
    valid = eval_windows(lm.tokenizer, load_text("wikitext2:valid"), 512, bos=lm.info.bos_per_window, max_windows=8)
    snap = DenseSnapshot.take(model)
    rows = {}
    for name, alloc in {**starts, **searched}.items():
        t0 = time.perf_counter()
        prune(model, alloc.per_layer, method=args.method, calib=calib)
        rows[name] = {"stitched_calib_nll": stitched.get(name),
                      "sequential_calib_nll": fitness(model, calib[:, :confirm_seqlen]),
                      "wikitext2_test_ppl": test_ppl.get(name), "prune_s": round(time.perf_counter() - t0, 1)}
        if args.positions:
            lengths = (confirm_seqlen, calib.shape[1])
            rows[name]["calib_nll_by_length"] = prefix_means(nll_by_position(model, calib), lengths)
            rows[name]["valid_nll_by_length"] = prefix_means(nll_by_position(model, valid), (*lengths, 512))
        snap.restore(model)
        print(name, rows[name], flush=True)
    out = RESULTS / f"search_proxy_{args.model}_{args.method}_{args.sparsity:g}.json"
    out.write_text(json.dumps({"model": args.model, "sparsity": args.sparsity, "method": args.method, "seed": args.seed,
                               "confirm_tokens": f"{calib.shape[0]}x{confirm_seqlen}", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
