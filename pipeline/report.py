"""`dwq-pipeline report RUN`: a tune run's metrics log as a summary and a PNG plot;
`dwq-pipeline report RUN RUN ... --out FILE.png`: several runs side by side.

Levels on the plot are in the run's own loss: the student before tuning (step 0 validation, at
the run's start: GPTQ by default, RTN, clip search or the given student) and the teacher, whose
loss against itself is 0. If `eval --save RUN/eval.json` was run, its full-vocabulary figures
join the summary. A run with a bits budget (`tune.bits_per_weight`) adds a panel of its layer
sensitivities (`sensitivities.json`): each layer's estimated KL at every allowed width, and the
width it got.

Several runs (the levers of one tuning, say) are compared on one plot: each run's validation
loss against step, labelled with the settings in which the runs differ, and, where runs have an
eval.json, their held-out KL next to RTN's; the runs' folders are only read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from stages.run_dir import RUN_CONFIG_FILE, SENSITIVITY_FILE, read_metrics

PLOT_FILE = "report.png"
SUMMARY_FILE = "report.md"
EVAL_FILE = "eval.json"
# The marks of a report this command wrote: only such a report.md/report.png is ever replaced.
SUMMARY_MARK = "<!-- written by dwq-pipeline report -->\n"
PLOT_SOFTWARE = "dwq-pipeline report"  # the PNG's Software text


def _is_our_summary(data: bytes) -> bool:
    return data.startswith(SUMMARY_MARK.encode())


def _is_our_plot(data: bytes) -> bool:
    return b"Software\x00" + PLOT_SOFTWARE.encode() in data[:8192]  # a tEXt chunk near the top


def _check_replaceable(run_dir: Path) -> None:
    """Refuse, before anything is written, a report.md/report.png that this command did not
    write (the user's own file of that name is never replaced)."""
    for name, ours in ((SUMMARY_FILE, _is_our_summary), (PLOT_FILE, _is_our_plot)):
        _refuse_unless_ours(run_dir / name, ours, "move it away first")


def _refuse_unless_ours(path: Path, ours: Callable[[bytes], bool], remedy: str) -> None:
    """Refuse a file at `path` (or a folder, a link) that `report` did not write."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
    except OSError:
        data = b""
    if not ours(data):
        raise PipelineError(
            f"{path} was not written by `dwq-pipeline report`; it is never replaced: {remedy}"
        )


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    loss: str
    start: str  # the student before tuning, as the run's tune.init made it
    steps: int
    total_steps: int
    start_val_loss: float
    best_val_loss: float
    best_step: int
    final_val_loss: float
    tokens_per_s: float
    peak_memory_gb: float
    train: list[tuple[int, float]]
    validation: list[tuple[int, float]]
    evaluation: dict[str, Any] | None
    sensitivities: dict[str, Any] | None = None  # a bits budget's layers, estimates and bits
    settings: dict[str, Any] = field(default_factory=dict)  # the run's tune_config.json

    @property
    def val_reduction(self) -> float:
        return 1.0 - self.best_val_loss / self.start_val_loss if self.start_val_loss else 0.0

    def lines(self) -> list[str]:
        lines = [
            f"run {self.run_dir}: {self.steps}/{self.total_steps} steps, loss {self.loss}",
            f"validation {self.start_val_loss:.4f} (before tuning) -> {self.best_val_loss:.4f} "
            f"(best, step {self.best_step}): -{self.val_reduction:.1%}; "
            f"last {self.final_val_loss:.4f}",
            f"training speed {self.tokens_per_s:,.1f} tokens/s, peak memory "
            f"{self.peak_memory_gb:.2f} GB",
        ]
        if self.evaluation:
            order = {"teacher": 0, "rtn": 1, "tuned": 2}
            found = self.evaluation["models"]
            models = {name: found[name] for name in sorted(found, key=lambda n: order.get(n, 3))}
            lines.append(
                f"held-out {self.evaluation['split']} ({self.evaluation['num_tokens']:,} tokens), "
                "full-vocabulary KL(teacher||model) per token: "
                + ", ".join(f"{name} {m['kl']:.4f}" for name, m in models.items())
            )
            lines.append(
                "perplexity: " + ", ".join(f"{n} {m['perplexity']:.2f}" for n, m in models.items())
            )
            if self.evaluation.get("gap_closed") is not None:
                lines.append(f"tuning closed {self.evaluation['gap_closed']:.1%} of RTN's KL gap")
        if self.sensitivities:
            lines.append(_budget_line(self.sensitivities))
        return lines


def _budget_line(record: dict[str, Any]) -> str:
    weights: dict[str, int] = {}
    for layer in record["layers"]:
        key = _choice_key(layer)
        weights[key] = weights.get(key, 0) + layer["parameters"]
    total = sum(weights.values()) or 1
    ordered = sorted(weights.items(), key=lambda item: _key_order(item[0]))
    shares = ", ".join(f"{_choice_label(key)} {n / total:.0%}" for key, n in ordered)
    return (
        f"bits budget {record['budget']} per weight as stored: {record['bits_per_weight']:.3f} "
        f"spent; of the quantized weights {shares}"
    )


STARTS = {"rtn": "RTN", "gptq": "GPTQ", "clip_search": "clip search", "given": "given student"}


def starting_student(config: dict) -> str:
    """What tune.init made the student before tuning (auto: GPTQ, or RTN in a floating-point
    mode, or the given student), named with its mode when not affine."""
    init, mode = config.get("init", "rtn"), config.get("mode", "affine")
    if config.get("student"):  # tune starts from it as it is (other starts are refused with it)
        init = "given"
    elif init == "auto":
        init = "gptq" if mode == "affine" else "rtn"
    start = STARTS.get(init, str(init))
    return start if mode == "affine" else f"{start} {mode}"


def summarize(run_dir: Path) -> RunSummary:
    records = read_metrics(run_dir)
    validation = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not validation:
        raise PipelineError(f"{run_dir}: the metrics log has no validation yet; nothing to report")
    best_step, best = min(validation, key=lambda sv: sv[1])
    last = records[-1]
    config = _read_json(run_dir / RUN_CONFIG_FILE, lambda raw: isinstance(raw, dict)) or {}
    return RunSummary(
        run_dir=run_dir,
        loss=f"{config.get('loss', '?')} (T={config.get('temperature', '?')})",
        start=starting_student(config),
        steps=last["step"],
        total_steps=last["total_steps"],
        start_val_loss=validation[0][1],
        best_val_loss=best,
        best_step=best_step,
        final_val_loss=validation[-1][1],
        tokens_per_s=last.get("tokens_per_s", 0.0),
        peak_memory_gb=max(r.get("peak_memory_gb", 0.0) for r in records),
        train=train,
        validation=validation,
        evaluation=_read_json(run_dir / EVAL_FILE, _is_evaluation),
        sensitivities=_budget_sensitivities(run_dir, config),
        settings=config,
    )


def _budget_sensitivities(run_dir: Path, config: dict) -> dict[str, Any] | None:
    """The layer sensitivities of this run's bits budget (None without a budget, or when the
    file is from an earlier run of another budget)."""
    budget = config.get("bits_per_weight")
    record = _read_json(run_dir / SENSITIVITY_FILE, _is_sensitivity_record) if budget else None
    return record if record and record["budget"] == budget else None


def _is_sensitivity_record(raw: Any) -> bool:
    """What tune writes for a bits budget (stages/bit_budget.py's budget_record)."""
    number = (int, float)
    if not (isinstance(raw, dict) and isinstance(raw.get("layers"), list)):
        return False
    return (
        isinstance(raw.get("budget"), number)
        and isinstance(raw.get("bits_per_weight"), number)
        and all(
            isinstance(layer, dict)
            and isinstance(layer.get("path"), str)
            and isinstance(layer.get("bits"), int)
            and isinstance(layer.get("parameters"), int)
            and isinstance(layer.get("estimated_kl"), dict)
            and all(isinstance(v, number) for v in layer["estimated_kl"].values())
            and all(re.fullmatch(r"[0-9]{1,2}(g[0-9]{1,4})?", key) for key in layer["estimated_kl"])
            and _choice_key(layer) in layer["estimated_kl"]
            for layer in raw["layers"]
        )
    )


def _read_json(path: Path, valid: Callable[[Any], bool]) -> Any:
    """The file's JSON if it has the shape `valid` checks; None when there is no such file."""
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # a folder in its place, torn, not UTF-8
        raise PipelineError(f"{path} is not a readable JSON file ({type(exc).__name__})") from exc
    if not valid(raw):
        raise PipelineError(f"{path} does not hold what this program writes there ({raw!r:.60})")
    return raw


def _is_evaluation(raw: Any) -> bool:
    """What `eval --save` writes: split, token count, gap closed and each model's figures."""
    number = (int, float)
    if not (isinstance(raw, dict) and isinstance(raw.get("models"), dict)):
        return False
    models = raw["models"].values()
    return (
        isinstance(raw.get("split"), str)
        and isinstance(raw.get("num_tokens"), int)
        and isinstance(raw.get("gap_closed"), (*number, type(None)))
        and all(isinstance(m, dict) for m in models)
        and all(isinstance(m.get(k), number) for m in models for k in ("kl", "perplexity"))
    )


def build_figure(summary: RunSummary):
    """Train and validation loss against step, with the before-tuning and teacher levels."""
    from matplotlib.figure import Figure

    budget = summary.sensitivities
    figure = Figure(figsize=(8, 9.5) if budget else (8, 4.5), dpi=120)
    ax = figure.add_subplot(2, 1, 1) if budget else figure.add_subplot()
    if summary.train:
        steps, losses = zip(*summary.train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.6, lw=1, label="train (per step)")
    steps, losses = zip(*summary.validation, strict=True)
    ax.plot(steps, losses, "o-", color="tab:orange", lw=2, label="validation")
    ax.axhline(
        summary.start_val_loss,
        color="tab:red",
        ls="--",
        label=f"before tuning ({summary.start} start)",
    )
    ax.axhline(0.0, color="tab:green", ls=":", lw=2, label="teacher (loss 0)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{summary.loss} per token (nats)")
    ax.set_title(
        f"{summary.run_dir.name}: validation -{summary.val_reduction:.0%} in {summary.steps} steps"
    )
    ax.set_ylim(bottom=-0.02 * summary.start_val_loss)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if budget:
        _plot_sensitivities(figure.add_subplot(2, 1, 2), budget)
    figure.tight_layout()
    return figure


def _choice_key(layer: dict[str, Any]) -> str:
    """The layer's own key in its estimates (bit_budget.option_label): "4" with one group size
    allowed, "4g128" with several; records from before group sizes have bits alone."""
    return str(layer.get("choice", layer["bits"]))


def _choice_label(key: str) -> str:
    bits, _, size = key.partition("g")
    return f"{bits}-bit" + (f" g{size}" if size else "")


def _key_order(key: str) -> tuple[int, int]:
    bits, _, size = key.partition("g")
    return int(bits), int(size or 0)


def _plot_sensitivities(ax, record: dict[str, Any]) -> None:
    """Per layer (in model order) the estimated KL at each allowed width (and group size), a
    dot at its own."""
    layers = record["layers"]
    positions = range(len(layers))
    keys = sorted({key for layer in layers for key in layer["estimated_kl"]}, key=_key_order)
    floor = 1e-12  # a log axis: an estimate of 0 (a width that loses nothing) sits at the floor
    widths = sorted({_key_order(key)[0] for key in keys})
    sizes = sorted({_key_order(key)[1] for key in keys})
    for key in keys:  # a group size a layer's width does not divide: a gap, not the floor
        found = [layer["estimated_kl"].get(key) for layer in layers]
        values = [math.nan if v is None else max(v, floor) for v in found]
        bits, size = _key_order(key)
        style = dict(
            color=f"C{widths.index(bits) % 10}", ls=("-", "--", ":")[sizes.index(size) % 3]
        )
        ax.plot(
            positions, values, marker=".", lw=1, ms=2, alpha=0.7, label=_choice_label(key), **style
        )
    chosen = [max(layer["estimated_kl"][_choice_key(layer)], floor) for layer in layers]
    ax.plot(positions, chosen, "k.", ms=5, label="chosen")
    ax.set_yscale("log")
    ax.set_xlabel("quantized layer (model order)")
    ax.set_ylabel("estimated KL per token (nats)")
    ax.set_title(
        f"layer sensitivities: budget {record['budget']} bits per weight, "
        f"{record['bits_per_weight']:.3f} spent"
    )
    ax.grid(alpha=0.3)
    # Below the axes: with every group size there are 16 entries, which would hide the peaks.
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncol=min(len(keys) + 1, 6),
        fontsize="small",
        frameon=False,
    )


def write_report(run_dir: Path) -> tuple[RunSummary, Path | None]:
    """Summary (also written as report.md) and the plot; plot is None without matplotlib."""
    from store.durable import write_text_atomic

    summary = summarize(run_dir)
    _check_replaceable(run_dir)
    text = "".join(f"- {line}\n" for line in summary.lines())
    write_text_atomic(run_dir / SUMMARY_FILE, SUMMARY_MARK + text)
    return summary, _write_plot(lambda: build_figure(summary), run_dir / PLOT_FILE)


def _write_plot(build: Callable[[], Any], path: Path) -> Path | None:
    """The figure `build` makes, as a PNG marked as ours at `path`; None without matplotlib."""
    import io

    from store.durable import write_bytes_atomic

    try:
        figure = build()
    except ImportError:
        return None
    png = io.BytesIO()
    figure.savefig(png, format="png", metadata={"Software": PLOT_SOFTWARE})
    write_bytes_atomic(path, png.getvalue())
    return path


# Settings that say where a run is, not how it tuned: never what tells runs apart on the plot.
PLACE_SETTINGS = frozenset({"run_dir", "storage_options", "wait_timeout_s", "prefetch"})


def _recorded_or_default(settings: dict[str, Any]) -> dict[str, Any]:
    """A run's settings with the ones its version did not record yet as it ran them: a lever
    off (a run from before the levers started from RTN, as `starting_student` says), any other
    setting at its default."""
    from dataclasses import asdict

    from stages.tune import LEVERS_OFF, TuneConfig

    return asdict(TuneConfig()) | LEVERS_OFF | settings


def differing_settings(summaries: list[RunSummary]) -> list[str]:
    """The tune settings whose values are not the same in every run (in the config's order)."""
    settings = [_recorded_or_default(s.settings) for s in summaries]
    keys: dict[str, None] = {}
    for values in settings:
        keys |= dict.fromkeys(values)
    return [
        key
        for key in keys
        if key not in PLACE_SETTINGS
        and len({json.dumps(values.get(key), sort_keys=True) for values in settings}) > 1
    ]


def setting_values(summary: RunSummary, keys: list[str]) -> str:
    """`key value` for each of `keys`, as this run has it."""
    settings = _recorded_or_default(summary.settings)
    return ", ".join(f"{key} {_short(settings.get(key))}" for key in keys)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_label(summary: RunSummary, keys: list[str]) -> str:
    """The run's folder name and its values of the settings that differ between the runs."""
    values = setting_values(summary, keys)
    return f"{summary.run_dir}: {values}" if values else str(summary.run_dir)


def held_out_kl(summary: RunSummary) -> tuple[float, float] | None:
    """(tuned, RTN) full-vocabulary KL from the run's eval.json, when it has both."""
    models = (summary.evaluation or {}).get("models", {})
    if "tuned" not in models or "rtn" not in models:
        return None
    return models["tuned"]["kl"], models["rtn"]["kl"]


def build_comparison(summaries: list[RunSummary]):
    """Validation loss against step for every run; held-out KL per run where evaluated."""
    from matplotlib.figure import Figure

    keys = differing_settings(summaries)
    evaluated = [(s, kl) for s in summaries if (kl := held_out_kl(s))]
    figure = Figure(figsize=(9, 8.5) if evaluated else (9, 5), dpi=120)
    ax = figure.add_subplot(2, 1, 1) if evaluated else figure.add_subplot()
    for summary in summaries:
        steps, losses = zip(*summary.validation, strict=True)
        ax.plot(steps, losses, "o-", lw=2, ms=4, label=run_label(summary, keys))
    ax.axhline(0.0, color="tab:green", ls=":", lw=2, label="teacher (loss 0)")
    ax.set_xlabel("optimizer step")
    losses = sorted({s.loss for s in summaries})
    ax.set_ylabel(f"validation {losses[0]} per token" if len(losses) == 1 else "validation loss")
    ax.set_title(f"{len(summaries)} runs: validation loss (each in its run's own loss)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if evaluated:
        _plot_held_out(figure.add_subplot(2, 1, 2), evaluated, keys)
    figure.tight_layout()
    return figure


def _plot_held_out(ax, evaluated: list[tuple[RunSummary, tuple[float, float]]], keys) -> None:
    positions = range(len(evaluated))
    tuned = [kl for _, (kl, _) in evaluated]
    ax.bar(positions, tuned, width=0.5, color="tab:blue", label="tuned")
    ax.set_xlim(-0.75, len(evaluated) - 0.25)
    ax.plot(positions, [rtn for _, (_, rtn) in evaluated], "rx", ms=10, label="RTN")
    for position, (_, (kl, rtn)) in zip(positions, evaluated, strict=True):
        closed = f"\n{1 - kl / rtn:.0%} closed" if rtn else ""
        ax.annotate(f"{kl:.4f}{closed}", (position, kl), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(positions), [run_label(s, keys) for s, _ in evaluated], fontsize=7)
    ax.set_ylabel("held-out KL(teacher||model) per token")
    ax.set_title("held-out text (each run's eval.json)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best")


def _check_comparison_target(out: Path, run_dirs: list[Path]) -> None:
    """One PNG, not a run given twice, and never a file this command did not write."""
    if out.suffix.lower() != ".png":
        raise PipelineError(f"--out {out}: the comparison is a PNG; give a path ending in .png")
    seen: set[Path] = set()
    for run_dir in run_dirs:
        if run_dir.resolve() in seen:
            raise PipelineError(f"{run_dir} is given twice; give each run once")
        seen.add(run_dir.resolve())
    target = out.resolve()
    inside = next((run for run in run_dirs if target.is_relative_to(run.resolve())), None)
    if inside is not None:
        raise PipelineError(
            f"--out {out} is inside the run folder {inside}, which a comparison only reads: "
            "write it elsewhere"
        )
    if out.is_dir():
        raise PipelineError(f"--out {out} is a folder; give the path of a .png file")
    _refuse_unless_ours(out, _is_our_plot, "choose another --out")
    if not out.parent.is_dir():
        raise PipelineError(f"--out {out}: folder {out.parent} does not exist")


def write_comparison(run_dirs: list[Path], out: Path) -> tuple[list[RunSummary], Path | None]:
    """Every run's summary and the comparison plot at `out` (None without matplotlib)."""
    _check_comparison_target(out, run_dirs)
    summaries = [summarize(run_dir) for run_dir in run_dirs]
    return summaries, _write_plot(lambda: build_comparison(summaries), out)
