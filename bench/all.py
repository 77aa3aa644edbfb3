"""`make bench`: every benchmark script in turn, then one report of all their ratios.

Each script runs in its own process (as it would alone) and appends its rows to a JSON-lines
file; the combined table and `artifacts/bench/report.json` carry the machine they came from,
the figures behind the ratios (per-seed quality results) and each script's time.

`--scale quick` (or BENCH_SCALE=quick) runs the same code on small workloads to check it in a
few minutes; its figures mean nothing, but it prints what the full run should take here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from bench.common import SCALES, Ratio, bench_scale, ratio_table, wide_console

SCRIPTS = (
    "bench.blas",
    "bench.targets",
    "bench.tune",
    "bench.memory",
    "bench.quality",
    "bench.store_quality",
    "bench.bits_and_modes",
    "bench.remote",
)
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


def run_scripts(console, env: dict, scripts: tuple[str, ...]) -> dict[str, float]:
    """Each script in its own process; returns its wall seconds (imports and start included)."""
    seconds = {}
    for script in scripts:
        console.rule(script)
        tic = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", script], env=env)
        seconds[script.removeprefix("bench.")] = time.perf_counter() - tic
        if done.returncode:
            raise SystemExit(f"{script} failed with exit code {done.returncode}")
    return seconds


def timing_table(timings: list[dict], wall: dict[str, float], scale: str) -> Table:
    """This run's time per script and, extrapolated from it, the full scale's."""
    table = Table(
        title=f"time per script ({scale} run) and the full run's estimate here",
        caption="linear in tokens from this run: an upper bound when this run is quick",
    )
    for column in ("script", "this run", "full (estimate)"):
        table.add_column(column, justify="right")
    total = 0.0
    for line in timings:
        name = line["timing"]
        # What the script did not time itself (interpreter start, imports) stays as it is.
        full = line["full_estimate_s"] + wall[name] - line["seconds"]
        total += full
        table.add_row(name, f"{wall[name] / 60:.1f} min", f"{full / 60:.0f} min")
    full_total = f"{total / 3600:.1f} h" if total > 5400 else f"{total / 60:.0f} min"
    table.add_row("all", f"{sum(wall.values()) / 60:.1f} min", full_total)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=SCALES, help="quick (check the code) or full (default)")
    names = [script.removeprefix("bench.") for script in SCRIPTS]
    parser.add_argument(
        "--only", nargs="+", choices=names, help="run these scripts only (default: all)"
    )
    args = parser.parse_args()
    scripts = tuple(f"bench.{name}" for name in args.only) if args.only else SCRIPTS
    if args.scale:
        os.environ["BENCH_SCALE"] = args.scale
    scale = bench_scale()
    console = wide_console()
    started = time.time()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as lines_file:
        wall = run_scripts(console, dict(os.environ, BENCH_JSON=lines_file.name), scripts)
        lines = [json.loads(line) for line in Path(lines_file.name).read_text().splitlines()]
    raw = [line for line in lines if "measure" in line]
    details = [line for line in lines if "details" in line]
    timings = [line for line in lines if "timing" in line]
    rows = [Ratio(**{k: v for k, v in r.items() if k not in ("ratio", "met")}) for r in raw]
    where = machine()
    console.rule("all ratios")
    minutes = (time.time() - started) / 60
    title = f"dwq-pipeline benchmarks, {scale} scale (each ratio from this one run)"
    console.print(ratio_table(title, rows, f"{where}; {minutes:.0f} min"))
    console.print(timing_table(timings, wall, scale))
    if scale == "quick":
        console.print("[yellow]quick scale: the figures above only show that the code runs")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": where, "scale": scale, "minutes": minutes, "rows": raw}
    report |= {"details": details, "timings": timings, "wall_seconds": wall}
    REPORT.write_text(json.dumps(report, indent=1))
    console.print(f"written to {REPORT}")


if __name__ == "__main__":
    main()
