"""What every benchmark reports: ratios of ours over a baseline measured in the same run.

Each script prints its own table; with BENCH_JSON set (as `bench/all.py` does) it also appends
its rows to that file, so one report can gather every ratio.

`BENCH_SCALE=quick` shrinks every workload so that the whole suite runs in minutes (to check the
code); `full` (the default) is what the README's figures come from. A quick run also estimates
how long the full one takes: each timed part of its work scaled by how much more work full does.
"""

from __future__ import annotations

import json
import operator
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.table import Table

GOAL_TESTS = {">=": operator.ge, "<=": operator.le}
SCALES = ("quick", "full")
T = TypeVar("T")
# mlx-lm's DWQ targets as TargetsConfig settings: the teacher's top 1,024 logits per position in
# bf16 (mlx_lm/quant/dwq.py), no tail. The benches give mlx-lm's side a store of this format
# whatever our default is, and compare our store's size with it.
MLX_LM_FORMAT = {
    "top_k": 1024,
    "logits_dtype": "bfloat16",
    "tail_samples": 0,
    "lse_temperatures": [1.0, 2.0],
}


def bench_scale() -> str:
    scale = os.environ.get("BENCH_SCALE", "full")
    if scale not in SCALES:
        raise SystemExit(f"BENCH_SCALE must be one of {', '.join(SCALES)} (got {scale!r})")
    return scale


def by_scale(quick: T, full: T) -> T:
    """The setting of the current scale (BENCH_SCALE)."""
    return quick if bench_scale() == "quick" else full


class FullTime:
    """Extrapolates this run's wall time to the full scale: each part timed with `part` is
    scaled by (full work / this run's work), everything else (loading, set-up) counted as is.
    Linear in tokens, so only a guide: short sequences use the BLAS less well than long ones."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.start = time.perf_counter()
        self.timed = 0.0
        self.scaled = 0.0

    @contextmanager
    def part(self, work: float, full_work: float) -> Iterator[None]:
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.add(time.perf_counter() - tic, work, full_work)

    def add(self, seconds: float, work: float, full_work: float) -> None:
        """A part timed elsewhere (in a child process) that took `seconds` of this run."""
        self.timed += seconds
        self.scaled += seconds * full_work / work

    def write(self) -> None:
        """Append {seconds, full_estimate_s} to BENCH_JSON (bench/all.py adds them up)."""
        seconds = time.perf_counter() - self.start
        line = {"timing": self.bench, "seconds": seconds}
        line["full_estimate_s"] = seconds - self.timed + self.scaled
        _append_json([line])


@dataclass(frozen=True)
class Ratio:
    bench: str
    measure: str
    baseline: float
    ours: float
    goal: str = ""  # ">= 0.9", "<= 0.25" or "" (reported, no goal)
    unit: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("inf")

    @property
    def met(self) -> bool | None:
        if not self.goal:
            return None
        op, value = self.goal.split()
        return GOAL_TESTS[op](self.ratio, float(value))


def claim(path: Path) -> bool:
    """True when this process may do the work `path` (a .claim file) stands for: no other live
    bench process claimed it (one that died is taken over). Several bench processes on one cache
    share its work this way."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and _alive(pid):
            return False  # another bench process is doing it
        path.unlink(missing_ok=True)  # its process died (or never wrote its pid): take it over
        return claim(path)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def run_shared(
    folder: Path,
    jobs: dict[str, Callable[[], T]],
    finished: Callable[[str], bool],
    keep: Callable[[str, T], None],
    poll_s: float = 15,
) -> list[str]:
    """Each job not `finished` yet run here and its result passed to `keep`, once claimed in
    `folder` (see `claim`); then wait until the ones other processes claimed are finished.
    Returns the names run here."""
    here, pending = [], list(jobs)
    while pending:
        for name in list(pending):
            if finished(name):
                pending.remove(name)
            elif claim(folder / f"{name}.claim"):
                try:
                    keep(name, jobs[name]())
                finally:
                    (folder / f"{name}.claim").unlink(missing_ok=True)
                pending.remove(name)
                here.append(name)
        if pending:
            time.sleep(poll_s)
    return here


def spread(values: list[float], fmt: str = "{:.4f}") -> str:
    """A figure over seeds: "mean (min-max)", or the one value."""
    if len(values) == 1:
        return fmt.format(values[0])
    mean = fmt.format(sum(values) / len(values))
    return f"{mean} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def ratio_table(title: str, rows: list[Ratio], caption: str = "") -> Table:
    table = Table(title=title, caption=caption or None)
    for column in ("measure", "baseline", "ours", "ratio", "goal", "met"):
        table.add_column(column, justify="right")
    for row in rows:
        met = {True: "[green]yes", False: "[red]no", None: ""}[row.met]
        table.add_row(
            row.measure,
            f"{row.baseline:,.4g}{row.unit}",
            f"{row.ours:,.4g}{row.unit}",
            f"{row.ratio:.3g}",
            row.goal,
            met,
        )
    return table


def wide_console() -> Console:
    """Tables keep their columns when printed to a file or pipe (rich assumes 80 there)."""
    return Console() if Console().is_terminal else Console(width=150)


def report(title: str, rows: list[Ratio], caption: str = "") -> None:
    wide_console().print(ratio_table(title, rows, caption))
    _append_json([{**asdict(row), "ratio": row.ratio, "met": row.met} for row in rows])


def report_details(bench: str, details: dict) -> None:
    """Figures behind the ratios (per-seed results, ...) for artifacts/bench/report.json."""
    _append_json([{"details": bench, **details}])


def _append_json(lines: list[dict]) -> None:
    path = os.environ.get("BENCH_JSON")
    if path:
        with open(path, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
