"""Benchmarks: `python -m bench.<name>`; each writes its JSON result under bench/results/."""
from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path


def machine_info() -> dict:
    """What a reader needs to judge a timing: cores, load (the machine may be shared), platform."""
    return {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def write_result(report: dict, out: str | Path) -> None:
    """Write the JSON result (creating its folder) and echo it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
