"""What every benchmark reports: ratios of ours over a baseline measured in the same run.

Each script prints its own table; with BENCH_JSON set (as `bench/all.py` does) it also appends
its rows to that file, so one report can gather every ratio.
"""

from __future__ import annotations

import json
import operator
import os
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table

GOAL_TESTS = {">=": operator.ge, "<=": operator.le}


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


def report(title: str, rows: list[Ratio], caption: str = "") -> None:
    Console().print(ratio_table(title, rows, caption))
    path = os.environ.get("BENCH_JSON")
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps({**asdict(row), "ratio": row.ratio, "met": row.met}) + "\n")
