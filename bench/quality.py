"""Student quality against mlx-lm's DWQ at the same budget, on held-out text.

Both sides get the same training rows and stored targets, the same tokens and optimizer steps
(our default run's budget: configs/default.yaml's rows, tokens per row and batch, one epoch) and
the same matmul path (dequantize + BLAS), at 4-bit and 3-bit group 64:

- RTN: the teacher quantized round-to-nearest (mlx-lm's `quantize_model`), not tuned;
- ours: `tune` with configs/default.yaml's settings;
- mlx-lm: `dwq_quantize` with its optimizer as its command builds it (bias-corrected Adam,
  constant rate, T=2) at each learning rate of a sweep; its best rate is the one with the lowest
  mean KL on the validation rows (the store's valid split), never on the test rows.

Neither side keeps a best-by-validation checkpoint: both are scored with their final parameters
(ours read from the run's last checkpoint; `dwq_quantize` leaves its last in the model). Every
figure is a mean over SEEDS (the seed orders the batches) with its min-max. Scores are
full-vocabulary KL(teacher || student) per token, perplexity and top-1 agreement with the
teacher, on the default data's test split as `dwq-pipeline eval` draws it, and tune seconds
(validation at start and end included, model loading excluded).

Run: `make bench` or `.venv/bin/python -m bench.quality` (BENCH_SCALE=quick for a short check).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from rich.table import Table

from bench.common import FullTime, Ratio, by_scale, report, report_details, wide_console
from bench.tune import StoredTargets, rtn_student, run_mlx_lm_dwq
from pipeline.config import load_config
from stages.data import TokenSequences
from stages.evaluate import EvalConfig, held_out_sequences, score_models
from stages.models import load_model
from stages.targets import compute_targets
from stages.tune import tune

DEFAULT_CONFIG = Path("configs/default.yaml")
QUANTIZATIONS = ((4, 64), (3, 64))
FULL_SEEDS, FULL_LEARNING_RATES = (123, 7, 2026), (1e-6, 1e-5, 3e-5, 1e-4, 3e-4)
# Quick: the same code on a sliver (its figures mean nothing): fewer seeds, two rates to choose.
SEEDS = by_scale(FULL_SEEDS[:2], FULL_SEEDS)
LEARNING_RATES = by_scale((1e-5, 1e-4), FULL_LEARNING_RATES)
QUICK = {
    "targets.num_samples": 4,
    "targets.max_seq_length": 32,
    "targets.num_valid_samples": 4,
    "eval.num_sequences": 4,
}
SCORE_BATCH = 4
NEVER = 10**9  # val_every / checkpoint_every: validate and checkpoint at start and end only


@dataclass(frozen=True)
class Run:
    """One tuned student: its parameters and what it cost."""

    params: dict
    seconds: float


class WithParams:
    """One shared model called with a given student's parameters (one model in memory)."""

    def __init__(self, model: Any, params: dict) -> None:
        self.model, self.params = model, params

    def __call__(self, tokens: mx.array) -> mx.array:
        self.model.update(self.params)
        return self.model(tokens)


def spread(values: list[float], fmt: str = "{:.4f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    mean = fmt.format(float(np.mean(values)))
    return f"{mean} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def bench_config(store: Path, overrides: dict) -> Any:
    return load_config(DEFAULT_CONFIG, {**overrides, "store": str(store)})


def our_runs(config, tmp: Path, bits: int, group_size: int, base, setup: float, steps: int):
    """`tune` with the default settings, once per seed; the final parameters of each."""
    rtn = base.parameters()
    runs = {}
    for seed in SEEDS:
        run_dir = tmp / f"ours-{bits}-{seed}"
        settings = dict(
            run_dir=str(run_dir),
            bits=bits,
            group_size=group_size,
            seed=seed,
            val_every=NEVER,
            checkpoint_every=NEVER,
        )
        tic = time.perf_counter()
        done = tune(dataclasses.replace(config.tune, **settings))
        seconds = time.perf_counter() - tic - setup
        assert done.steps == steps, (done.steps, steps)  # the same budget as mlx-lm's
        base.update(rtn)
        final = mx.load(str(run_dir / "checkpoint" / "params.safetensors"))
        base.load_weights(list(final.items()), strict=False)
        runs[seed] = Run(base.parameters(), seconds)
    base.update(rtn)
    return runs


def mlx_lm_runs(stored: StoredTargets, base, batch_size: int) -> dict[float, dict[int, Run]]:
    """mlx-lm's dwq_quantize from the same RTN student at each learning rate and seed."""
    rtn = base.parameters()
    train, valid = stored.rows("train"), stored.rows("valid")
    runs: dict[float, dict[int, Run]] = {}
    for rate in LEARNING_RATES:
        runs[rate] = {}
        for seed in SEEDS:
            base.update(rtn)
            seconds = run_mlx_lm_dwq(base, stored, train, valid, batch_size, rate, seed)
            runs[rate][seed] = Run(base.parameters(), seconds)
    base.update(rtn)
    return runs


def score(teacher, base, students: dict[str, dict], sequences: TokenSequences) -> dict:
    base.eval()
    models = {name: WithParams(base, params) for name, params in students.items()}
    return score_models(teacher.model, models, sequences, SCORE_BATCH)


def valid_sequences(store: Path) -> TokenSequences:
    values = StoredTargets(store).tokens["valid"]
    return TokenSequences(values["tokens"], values["lengths"], values["prompt_offsets"])


def one_quantization(bits, group_size, *, config, store, tmp, teacher, clock, budget) -> dict:
    rows, seq_len, steps = budget
    tic = time.perf_counter()
    base = rtn_student(bits, group_size)
    setup = time.perf_counter() - tic
    rtn = base.parameters()
    stored = StoredTargets(store)
    full = full_budget()
    train_work, full_train = rows * seq_len * len(SEEDS), full[0] * full[1] * len(FULL_SEEDS)

    tic = time.perf_counter()
    ours = our_runs(config, tmp, bits, group_size, base, setup, steps)
    clock.add(time.perf_counter() - tic - len(SEEDS) * setup, train_work, full_train)
    sweep = len(LEARNING_RATES), len(FULL_LEARNING_RATES)
    with clock.part(train_work * sweep[0], full_train * sweep[1]):
        theirs = mlx_lm_runs(stored, base, config.tune.batch_size)

    valid = valid_sequences(store)
    candidates = {
        f"mlx-lm {rate:g} {seed}": run.params
        for rate, by_seed in theirs.items()
        for seed, run in by_seed.items()
    }
    scored = len(SEEDS) * len(LEARNING_RATES), len(FULL_SEEDS) * len(FULL_LEARNING_RATES)
    with clock.part(len(valid) * seq_len * scored[0], full[2] * full[1] * scored[1]):
        valid_scores = score(teacher, base, candidates, valid)
    valid_kl = {
        rate: [valid_scores[f"mlx-lm {rate:g} {seed}"].kl for seed in SEEDS] for rate in theirs
    }
    best = min(LEARNING_RATES, key=lambda rate: float(np.mean(valid_kl[rate])))

    test, split = held_out_sequences(
        EvalConfig(store=str(store), num_sequences=config.eval.num_sequences), teacher.tokenizer
    )
    students = {"rtn": rtn}
    students |= {f"ours {seed}": run.params for seed, run in ours.items()}
    students |= {f"mlx-lm {seed}": theirs[best][seed].params for seed in SEEDS}
    scored = 1 + 2 * len(SEEDS), 1 + 2 * len(FULL_SEEDS)
    with clock.part(len(test) * seq_len * scored[0], full[3] * full[1] * scored[1]):
        test_scores = score(teacher, base, students, test)
    return {
        "bits": bits,
        "group_size": group_size,
        "split": split,
        "test_tokens": int(test.loss_mask().sum()),
        "best_learning_rate": best,
        "valid_kl": {f"{rate:g}": values for rate, values in valid_kl.items()},
        "scores": {name: vars(value) for name, value in test_scores.items()},
        "ours_seconds": [run.seconds for run in ours.values()],
        "mlx_lm_seconds": {
            f"{rate:g}": [run.seconds for run in by_seed.values()]
            for rate, by_seed in theirs.items()
        },
    }


def full_budget() -> tuple[int, int, int, int]:
    """(train rows, tokens per row, valid rows, test rows) of the full scale: our default run's."""
    config = load_config(DEFAULT_CONFIG)
    targets = config.targets
    return (
        targets.num_samples,
        targets.max_seq_length,
        targets.num_valid_samples,
        config.eval.num_sequences,
    )


def side(result: dict, prefix: str, field: str) -> list[float]:
    return [result["scores"][f"{prefix} {seed}"][field] for seed in SEEDS]


def table(result: dict, budget: tuple[int, int, int]) -> Table:
    rows, seq_len, steps = budget
    scores, rtn_kl = result["scores"], result["scores"]["rtn"]["kl"]
    title = (
        f"{result['bits']}-bit g{result['group_size']}: {rows}x{seq_len} training tokens, "
        f"{steps} steps; {result['split']} split, {result['test_tokens']:,} tokens; "
        f"mean (min-max) of {len(SEEDS)} seeds"
    )
    out = Table(title=title)
    for column in (
        "student",
        "lr",
        "valid KL",
        "test KL",
        "closed",
        "perplexity",
        "top-1",
        "tune s",
    ):
        out.add_column(column, justify="right")

    def closed(kls: list[float]) -> str:
        return spread([1 - kl / rtn_kl for kl in kls], "{:.1%}")

    teacher = scores["teacher"]
    out.add_row("teacher", "", "", "0", "", f"{teacher['perplexity']:.2f}", "100%", "")
    rtn = scores["rtn"]
    out.add_row(
        "RTN",
        "",
        "",
        f"{rtn['kl']:.4f}",
        "0%",
        f"{rtn['perplexity']:.2f}",
        f"{rtn['top1_agreement']:.1%}",
        "",
    )
    for label, prefix, rate, seconds in (
        ("ours, default settings", "ours", "default", result["ours_seconds"]),
        (
            "mlx-lm, best lr",
            "mlx-lm",
            f"{result['best_learning_rate']:g}",
            result["mlx_lm_seconds"][f"{result['best_learning_rate']:g}"],
        ),
    ):
        kls = side(result, prefix, "kl")
        out.add_row(
            label,
            rate,
            "",
            spread(kls),
            closed(kls),
            spread(side(result, prefix, "perplexity"), "{:.2f}"),
            spread(side(result, prefix, "top1_agreement"), "{:.1%}"),
            spread(seconds, "{:.0f}"),
        )
    for rate, kls in result["valid_kl"].items():
        chosen = " (best)" if float(rate) == result["best_learning_rate"] else ""
        out.add_row(f"mlx-lm sweep{chosen}", rate, spread(kls), "", "", "", "", "")
    return out


def ratios(result: dict, budget: tuple[int, int, int]) -> list[Ratio]:
    rows, seq_len, steps = budget
    what = f"{result['bits']}-bit g{result['group_size']}, {rows}x{seq_len} tokens, {steps} steps"
    best = f"mlx-lm DWQ at its best lr {result['best_learning_rate']:g}"
    best_seconds = result["mlx_lm_seconds"][f"{result['best_learning_rate']:g}"]
    return [
        Ratio(
            "quality",
            f"held-out KL, {what}: ours vs {best} (mean of {len(SEEDS)} seeds)",
            float(np.mean(side(result, "mlx-lm", "kl"))),
            float(np.mean(side(result, "ours", "kl"))),
            "<= 1",
        ),
        Ratio(
            "quality",
            f"tune seconds, {what}: ours vs {best} (both dequantize + BLAS)",
            float(np.mean(best_seconds)),
            float(np.mean(result["ours_seconds"])),
        ),
    ]


def main() -> None:
    clock = FullTime("quality")
    overrides = by_scale(QUICK, {})
    console = wide_console()
    results, rows_out = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = bench_config(tmp / "q.zarr", overrides)
        compute_targets(config.targets)
        targets = config.targets
        steps = targets.num_samples // config.tune.batch_size
        budget = (targets.num_samples, targets.max_seq_length, steps)
        teacher = load_model("default")
        for bits, group_size in QUANTIZATIONS:
            result = one_quantization(
                bits,
                group_size,
                config=config,
                store=Path(targets.store),
                tmp=tmp,
                teacher=teacher,
                clock=clock,
                budget=budget,
            )
            results.append(result)
            console.print(table(result, budget))
            rows_out += ratios(result, budget)
    assert all(math.isfinite(r.ours) for r in rows_out)
    report_details("quality", {"budget": budget, "seeds": SEEDS, "results": results})
    report("quality vs mlx-lm DWQ, same rows, tokens, steps and kernels (one run)", rows_out)
    clock.write()


if __name__ == "__main__":
    main()
