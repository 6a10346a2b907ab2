"""How long does the allocation search take with the CLI defaults?

    python -m bench.search_time [--sparsity 0.6] [--model default] [--out FILE]

Runs `/usr/bin/time -v python -m analysis allocate --allocation auto` (issue 11's target: a 60% search on the default
model in at most 10 min on the 2-core CPU) and writes the wall time, the peak RSS, the search's own account (its
`cost:` line: seconds inside the search, forward passes, real prunes; the result it kept) and the machine's load
average before and after (`machine`), so a run beside another job shows. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import machine_info, write_result

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 600.0


def measure(model: str, sparsity: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "auto.json"
        command = ["/usr/bin/time", "-v", sys.executable, "-m", "analysis", "allocate", "--model", model,
                   "--allocation", "auto", "--sparsity", str(sparsity), "--out", str(out)]
        before = os.getloadavg()
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise SystemExit(f"the search failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
        params = json.loads(out.read_text())["params"]
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", run.stderr).group(1)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    wall_s = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    account = [line for line in run.stdout.splitlines() if line.startswith(("starts (real", "the search's", "cost:"))]
    return {
        "benchmark": f"time of the allocation search (--allocation auto) at {sparsity:.0%} on the {model} model, "
                     "CLI defaults",
        "command": " ".join(["/usr/bin/time", "-v", "python"] + command[3:-2]),
        "wall_s": round(wall_s, 2), "search_s": params["seconds"], "max_rss_mb": rss_kb // 1024,
        "forward_passes": params["forward_passes"], "real_prunes": params["real_prunes"],
        "start": params["start"], "result": params["result"], "real_fitness": params["real_fitness"],
        "decided": params["decided"], "gain_nats": params["gain"], "gain_se": params["gain_se"],
        "account": account, "target_s": TARGET_S, "met": wall_s <= TARGET_S,
        "load_avg_before": [round(x, 2) for x in before],
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 check=False).stdout.strip(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),  # its load average is the one after the run
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search_time", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="packaged model or a path (default: default)")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--out", type=Path, default=RESULTS / "search_time_cpu_default.json")
    args = p.parse_args(argv)
    write_result(measure(args.model, args.sparsity), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
