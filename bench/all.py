"""`make bench`: every benchmark script in turn, then one report of all their ratios.

Each script runs in its own process (as it would alone) and appends its rows to a JSON-lines
file; the combined table and `artifacts/bench/report.json` carry the machine they came from.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bench.common import Ratio, ratio_table

SCRIPTS = ("bench.blas", "bench.targets", "bench.tune", "bench.remote")
REPORT = Path("artifacts/bench/report.json")


def machine() -> str:
    from pipeline.runtime import describe_blas

    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
        ]
        cpu = names[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}; {describe_blas()}"


def main() -> None:
    console = Console()
    started = time.time()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as rows_file:
        env = dict(os.environ, BENCH_JSON=rows_file.name)
        for script in SCRIPTS:
            console.rule(script)
            done = subprocess.run([sys.executable, "-m", script], env=env)
            if done.returncode:
                raise SystemExit(f"{script} failed with exit code {done.returncode}")
        raw = [json.loads(line) for line in Path(rows_file.name).read_text().splitlines()]
    rows = [Ratio(**{k: v for k, v in r.items() if k not in ("ratio", "met")}) for r in raw]
    where = machine()
    console.rule("all ratios")
    minutes = (time.time() - started) / 60
    console.print(
        ratio_table(
            "dwq-pipeline benchmarks (each ratio from one run)", rows, f"{where}; {minutes:.0f} min"
        )
    )
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"machine": where, "rows": raw}, indent=1))
    console.print(f"written to {REPORT}")


if __name__ == "__main__":
    main()
