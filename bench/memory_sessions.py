"""Peak memory of one and two dashboard sessions pruning the packaged default model on the CPU.

Each scenario runs in its own process (peak RSS, `resource.getrusage(...).ru_maxrss`, is per
process; its increase over the RSS right after loading is what the sessions add), with the engine
the dashboard runs (analysis.session): the shared model in float32, then
  - copy1 / copy2: one / two sessions prune private copies at the same time (memory to spare);
  - lease1 / lease2: $ALPHASCOPE_MEMORY_LIMIT_BYTES leaves no room for a copy, so one session
    prunes the shared model in place; with two, the second waits in the queue until the first
    restores, then prunes in place itself.
Each prune: 50% Wanda, uniform, 16 calibration samples x 256 tokens (the Prune page's defaults),
2 evaluation windows of 256 tokens.

Usage: .venv/bin/python -m bench.memory_sessions [SCENARIO ...]   -> bench/results/memory_sessions.json
(named scenarios replace their rows in an existing result file; default: all)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.jobs import DONE, Job  # noqa: E402
from analysis.loading import MEMORY_LIMIT_ENV, load_model  # noqa: E402
from analysis.session import ModelGate, WorkingCopy, prune_and_evaluate, prune_need  # noqa: E402
from analysis.settings import AllocationSettings, EvaluationSettings, PruneSettings, RunSettings  # noqa: E402
from bench import machine_info, write_result  # noqa: E402

SCENARIOS = ("copy1", "copy2", "lease1", "lease2")
MIB = 2 ** 20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_scenario(name: str) -> dict:
    settings = RunSettings(allocation=AllocationSettings(method="uniform", sparsity=0.5),
                           prune=PruneSettings(method="wanda"),
                           evaluation=EvaluationSettings(source="default", seqlen=256, max_windows=2))
    loaded = load_model("default", device="cpu", dtype="float32")
    after_load, rss_after_load = _peak_mib(), psutil.Process().memory_info().rss / MIB
    need = prune_need(loaded.model, settings)
    if name.startswith("lease"):
        os.environ[MEMORY_LIMIT_ENV] = str(need.prunable + need.working + MIB)  # no room for a copy
    gate = ModelGate()
    works = [WorkingCopy("k", gate, f"session {i}") for i in range(int(name[-1]))]
    jobs = [Job(lambda j, w=w: prune_and_evaluate(j, w, loaded.model, loaded.tokenizer, settings),
                name="prune").start() for w in works]
    for job, work in zip(jobs, works, strict=True):
        while not job.wait(1.0):
            pass
        assert job.status == DONE, job.traceback
        assert work.leased == name.startswith("lease")
        if work.leased:
            work.restore()  # lets the next session in the queue prune
    return {"scenario": name, "sessions": len(works), "model_mib": round(need.weights / MIB, 1),
            "prunable_mib": round(need.prunable / MIB, 1), "peak_rss_after_load_mib": round(after_load, 1),
            "rss_after_load_mib": round(rss_after_load, 1), "peak_rss_mib": round(_peak_mib(), 1),
            "peak_minus_rss_after_load_mib": round(_peak_mib() - rss_after_load, 1),
            "pruned_ppl": [round(j.result["pruned_ppl"], 3) for j in jobs]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memory_sessions", description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                    help=f"scenarios to run and replace in the result file (default: all of {', '.join(SCENARIOS)})")
    ap.add_argument("--scenario", choices=SCENARIOS, help="run one scenario in this process and print its row")
    args = ap.parse_args(argv)
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    if args.scenario:
        print(json.dumps(run_scenario(args.scenario)))
        return
    result = ROOT / "bench" / "results" / "memory_sessions.json"
    rows = {r["scenario"]: r for r in json.loads(result.read_text())["scenarios"]} if result.exists() else {}
    for name in args.scenarios or SCENARIOS:
        out = subprocess.run([sys.executable, "-m", "bench.memory_sessions", "--scenario", name], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1]) | {"machine": machine_info()}
        print(rows[name], file=sys.stderr)
    write_result({"scenarios": [rows[n] for n in SCENARIOS if n in rows]}, result)


if __name__ == "__main__":
    main()
