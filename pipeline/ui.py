"""All terminal output: rich progress bars and tables. Stages report through callbacks only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from stages.evaluate import EvalResult
from stages.targets import Progress as TargetsProgress
from stages.tune import StepReport as TuneStep
from store.inspect import StoreInfo

console = Console(stderr=True)
out = Console()


# Messages carry paths and values: printed as text, never parsed as rich markup.
def error(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def info(message: str) -> None:
    console.print(escape(message), highlight=False, soft_wrap=True)


class CountColumn(ProgressColumn):
    """'done/total unit', with '?' for a total not known yet (a task starts with total None)."""

    def __init__(self, prefix: str = "", unit: str = "") -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.prefix, self.unit = prefix, unit

    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else f"{task.total:,.0f}"
        return Text(f"{self.prefix}{task.completed:,.0f}/{total}{self.unit}")


NARROW, WIDE = 80, 120  # terminal columns below which the bar, then elapsed time, are left out


def _progress(label: str, *columns) -> Progress:
    """A bar with elapsed time and ETA; drawn only on a terminal. On a narrow terminal the bar
    shrinks, then goes, and only the time left is shown, so the counts stay whole."""
    width = console.width
    bar = [BarColumn(bar_width=min(40, width - NARROW + 10))] if width >= NARROW else []
    times = [TimeElapsedColumn(), TimeRemainingColumn()] if width >= WIDE else []
    return Progress(
        TextColumn(f"[bold]{label}"),
        *bar,
        *columns,
        *(times or [TimeRemainingColumn(compact=True)]),
        console=console,
        disable=not console.is_terminal,
    )


@contextmanager
def targets_progress() -> Iterator:
    """A progress bar in tokens with tokens/s and ETA; yields the stage's on_progress callback."""
    progress = _progress(
        "targets",
        TaskProgressColumn(),
        CountColumn(unit=" tok"),
        TextColumn("{task.fields[rate]}"),
    )
    task = progress.add_task("targets", total=None, rate="")

    def update(p: TargetsProgress) -> None:
        elapsed = progress.tasks[task].elapsed or 0.0
        rate = f"{p.tokens_done / elapsed:,.0f} tok/s" if elapsed > 0 else ""
        progress.update(task, completed=p.tokens_done, total=p.tokens_total, rate=rate)

    with progress:
        yield update


@dataclass(frozen=True)
class TuneDisplay:
    """The tune stage's two callbacks: each step's report, and what runs before the first."""

    on_step: Callable[[TuneStep], None]
    on_phase: Callable[[str], None]


@contextmanager
def tune_progress() -> Iterator[TuneDisplay]:
    """Loss, validation loss, tokens/s, ETA and memory; before the first step, what is running
    (loading, GPTQ's blocks, the first validation: minutes on a big model)."""
    progress = _progress(
        "tune",
        CountColumn(prefix="step "),
        TextColumn("{task.fields[stats]}"),
    )
    task = progress.add_task("tune", total=None, stats="")
    last_val: list[float] = []

    def on_phase(text: str) -> None:
        progress.update(task, stats=f"{text}…")

    def on_step(r: TuneStep) -> None:
        if r.val_loss is not None:
            last_val[:] = [r.val_loss]
        parts = [f"loss {r.loss:.4f}" if r.loss is not None else ""]
        parts += [f"val {last_val[0]:.4f}" if last_val else ""]
        # none before step 1; the least useful, left out on a narrow terminal
        if console.width >= NARROW and r.tokens_per_s > 0:
            parts += [f"{r.tokens_per_s:,.0f} tok/s", f"{r.peak_memory_gb:.2f} GB"]
        progress.update(
            task, completed=r.step, total=r.total_steps, stats="  ".join(filter(None, parts))
        )

    with progress:
        yield TuneDisplay(on_step, on_phase)


@contextmanager
def batch_progress(label: str, enabled: bool = True) -> Iterator:
    """A bar over batches; yields an on_batch(done, total) callback."""
    progress = _progress(label, CountColumn(prefix="batch "))
    progress.disable = progress.disable or not enabled
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield update


def eval_table(result: EvalResult) -> Table:
    table = Table(
        title=f"held-out {result.split} text: {result.num_sequences} sequences, "
        f"{result.num_tokens:,} tokens"
    )
    for column in ("model", "KL(teacher||model)/token", "perplexity", "top-1 = teacher"):
        table.add_column(column, justify="right", overflow="fold")
    for score in result.scores.values():
        table.add_row(
            score.name,
            f"{score.kl:.4f}",
            f"{score.perplexity:.3f}",
            f"{score.top1_agreement:.1%}",
        )
    if result.gap_closed is not None:
        table.caption = f"tuning closed {result.gap_closed:.1%} of the RTN student's KL gap"
    return table


def comparison_table(summaries: list, keys: list[str]) -> Table:
    """One row per run (pipeline/report.py's RunSummary): the settings in which the runs
    differ, validation before and after, held-out KL where the run was evaluated."""
    from pipeline.report import held_out_kl, setting_values

    table = Table(title=f"{len(summaries)} runs compared", caption=_comparison_caption(summaries))
    headers = ("run", "settings that differ", "steps", "validation start -> best (step)")
    for column in (*headers, "held-out KL (RTN's)", "tok/s", "peak GB"):
        justify = "left" if column in headers[:2] else "right"
        table.add_column(column, justify=justify, overflow="fold")
    for s in summaries:
        held_out = held_out_kl(s)
        table.add_row(
            escape(str(s.run_dir)),
            escape(setting_values(s, keys)) or "none",
            f"{s.steps}/{s.total_steps}",
            f"{s.start_val_loss:.4f} -> {s.best_val_loss:.4f} ({s.best_step})",
            f"{held_out[0]:.4f} ({held_out[1]:.4f})" if held_out else "no eval.json",
            f"{s.tokens_per_s:,.0f}",
            f"{s.peak_memory_gb:.2f}",
        )
    return table


def _comparison_caption(summaries: list) -> str:
    losses = sorted({s.loss for s in summaries})
    if len(losses) > 1:
        return "validation is each run's own loss (" + "; ".join(losses) + "): compare held-out KL"
    return f"validation: {losses[0]} per token; held-out: full-vocabulary KL(teacher||model)"


def config_table(config) -> Table:
    from dataclasses import fields

    table = Table(title="configuration (CLI > file > default)")
    for column in ("key", "value", "meaning"):
        table.add_column(column, overflow="fold")
    for section in fields(config):
        stage_config = getattr(config, section.name)
        for f in fields(stage_config):
            value = escape(repr(getattr(stage_config, f.name)))
            table.add_row(f"{section.name}.{f.name}", value, f.metadata.get("help", ""))
    return table


def store_info_table(info: StoreInfo) -> Table:
    table = Table(title=f"store {escape(str(info.path))}", show_header=True)
    headers = ("split", "sequences", "tokens", "chunks done", "stored MB", "bytes/token", "ratio")
    if out.width < NARROW:  # whole words rather than headers cut or folded mid-word
        headers = ("split", "seqs", "tokens", "chunks", "MB", "B/tok", "ratio")
    for column in headers:
        table.add_column(column, justify="right", overflow="fold")
    for split, s in info.splits.items():
        per_token = s.stored_bytes / max(1, s.tokens * s.chunks_done / max(1, s.chunks_total))
        ratio = s.raw_bytes / s.stored_bytes if s.stored_bytes else 0.0
        table.add_row(
            split,
            f"{s.sequences:,}",
            f"{s.tokens:,}",
            f"{s.chunks_done}/{s.chunks_total}",
            f"{s.stored_bytes / 1e6:.1f}",
            f"{per_token:,.0f}",
            f"{ratio:.2f}x",
        )
    table.caption = (
        f"teacher {escape(str(info.teacher))}, top-k {info.top_k}, "
        + (f"{info.logits} logits, " if info.logits else "")
        + (
            f"{info.tail_samples} tail samples at T={info.sample_temperature:g}, "
            if info.tail_samples
            else ""
        )
        + ("complete" if info.complete else "incomplete")
    )
    return table
