"""Which tokens should decide whether a checked search's result beats its start?

    python -m bench.search_decision --model default [KEY ...] [--out FILE]

For recorded `auto-checked` searches of bench/results/quality_MODEL.json (KEY: seed/sparsity/pruner/auto-checked;
default: every one whose result was kept), prune the start the search went on from and its result for real on the
same calibration batch, and score both on the first 128 tokens of each calibration window (where the search
selected its moves, and where searches before the decision moved to the later tokens decided) and on the last 128
(each predicted with the window before it: where analysis.search decides now), next to their WikiText-2 test
perplexity (the recorded run's, or measured here for a start that is not one of the table's baselines). The first
numbers must equal the search's recorded real-prune fitness: the same prunes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis.allocation import Allocation
from analysis.data import calibration_batches, eval_windows, load_text
from analysis.evaluation import perplexity
from analysis.loading import load_model
from analysis.pipeline import search_starts
from analysis.pruning import DenseSnapshot, prune
from analysis.search import paired_gain, window_losses
from analysis.settings import SEARCH_SEQLEN, AllocationSettings
from bench.quality import save

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search_decision", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="packaged model: default or gemma3")
    p.add_argument("keys", nargs="*", help="searches, e.g. 0/0.50/sparsegpt/auto-checked (default: every kept one)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/search_decision_MODEL.json")
    args = p.parse_args(argv)
    res = json.loads((RESULTS / f"quality_{args.model}.json").read_text())
    cfg = res["config"]
    keys = args.keys or [k for k, s in res["searches"].items()
                         if k.endswith("/auto-checked") and s["params"]["result"] == "search"]
    out = args.out or RESULTS / f"search_decision_{args.model}.json"
    found = json.loads(out.read_text()) if out.exists() else {"model": args.model, "searches": {}}
    lm = load_model(args.model, device="cpu", dtype="float32")
    tok, model, bos = lm.tokenizer, lm.model, lm.info.bos_per_window
    test = eval_windows(tok, load_text("wikitext2:test"), 512, bos=bos, max_windows=cfg["windows"] or None)
    snap, corpus = DenseSnapshot.take(model), load_text("default")
    baselines = {"uniform": "uniform", "owl": "owl", f"alphapruning eps={res['epsilon']:g}": "alphapruning"}
    for key in keys:
        seed, sparsity, method, _ = key.split("/")
        seed, sparsity = int(seed), float(sparsity)
        params = res["searches"][key]["params"]
        calib = calibration_batches(tok, corpus, cfg["nsamples"], cfg["seqlen"], seed=seed, bos=bos)
        settings = AllocationSettings(sparsity=sparsity, owl_threshold=5.0, epsilon=res["epsilon"])
        allocs = {"start": search_starts(settings, model, calib)[params["start"]],
                  "result": Allocation.from_dict(res["searches"][key])}
        row = {"start": params["start"], "recorded": {"start": params["verified"][params["start"]],
                                                      "result": params["verified"].get("result")},
               "measured_by": "python -m bench.search_decision"}
        losses = {}
        for name, alloc in allocs.items():
            prune(model, alloc.per_layer, method=method, calib=calib)
            losses[name] = (window_losses(model, calib[:, :SEARCH_SEQLEN]),
                            window_losses(model, calib, from_token=SEARCH_SEQLEN))
            run = res["runs"].get(f"{seed}/{sparsity:.2f}/{method}/{baselines.get(params['start'], '-')}") \
                if name == "start" else res["runs"][key]
            row[f"{name}_test_ppl"] = run["ppl"] if run else perplexity(model, test)
            snap.restore(model)
        for i, part in enumerate(("first", "last")):
            gain, se = paired_gain(losses["start"][i], losses["result"][i])
            row[part] = {"start": float(losses["start"][i].mean()), "result": float(losses["result"][i].mean()),
                         "gain": gain, "gain_se": se}
        found["searches"][key] = row
        save(found, out)
        print(f"{key}: first {row['first']['gain']:+.4f} ± {row['first']['gain_se']:.4f}, last "
              f"{row['last']['gain']:+.4f} ± {row['last']['gain_se']:.4f} nats; test start {row['start_test_ppl']:.1f}"
              f" result {row['result_test_ppl']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
