"""Screening of tune's quality levers (issue 13) on the default teacher, several seeds per row.

Rows: RTN, tune from RTN's start (DWQ's; tune's default before init=auto), + train_norms,
+ learned_rounding (AutoRound's 5e-3 and 1e-3), + init=clip_search, all three combined,
+ init=gptq (alone and with learned rounding); every row but those setting init starts from RTN.
Columns:
full-vocabulary KL(teacher || student) on the store's validation split (choose on this), the same
on held-out test text (never seen by tuning), tune seconds (whole call: load, quantize,
validations, save) and MLX peak memory; mean and min-max over seeds.

Small on purpose (a store of 32x128 tokens, 16 steps of batch 2, ~3 min per run on 2 cores): a
screen, not the final benchmark. Each finished run is kept in artifacts/bench/levers/, so a rerun
only does what is missing; runs go seed by seed, so a cut-short screen still has every row.

Run: `.venv/bin/python -m bench.levers [--seeds 123 7 42] [--steps 16] [--bits 4] [--rows ...]`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from rich.console import Console
from rich.table import Table

from bench.common import spread
from pipeline.config import load_config
from stages.data import TokenSequences, build_held_out_sequences
from stages.evaluate import score_models
from stages.models import load_model, quantize_student, use_dequantized_matmul
from stages.targets import compute_targets
from stages.tune import tune
from store.reader import StoreReader

ROOT = Path(__file__).parent.parent
OUT = ROOT / "artifacts" / "bench" / "levers"
STORE = OUT / "store.zarr"
RESULTS = OUT / "runs.jsonl"
# Every row is a lever on DWQ's start (bench_config pins init=rtn) unless it sets init itself.
ROWS = {
    "RTN start": {},
    "+train_norms": {"train_norms": True},
    "+learned_rounding lr 5e-3": {"learned_rounding": True, "rounding_lr": 5e-3},
    "+learned_rounding lr 1e-3": {"learned_rounding": True, "rounding_lr": 1e-3},
    "+clip_search": {"init": "clip_search"},
    "+init=gptq": {"init": "gptq"},
    "+init=gptq T=1": {"init": "gptq", "temperature": 1.0},
    "+init=gptq lr 3e-4": {"init": "gptq", "learning_rate": 3e-4},
    "+init=gptq lr 3e-5": {"init": "gptq", "learning_rate": 3e-5},
    "+init=gptq bf16 moments": {"init": "gptq", "adam_moments_dtype": "bfloat16"},
    "+init=gptq +learned_rounding lr 1e-3": {
        "init": "gptq",
        "learned_rounding": True,
        "rounding_lr": 1e-3,
    },
    "all three": {
        "train_norms": True,
        "learned_rounding": True,
        "rounding_lr": 5e-3,  # as screened, before 1e-3 was chosen
        "init": "clip_search",
    },
}
EVAL_SEQUENCES = 8


def bench_config(steps: int, bits: int = 4):
    overrides = {
        "store": str(STORE),
        "targets.top_k": 1024,  # the store format the screen ran on (the default then)
        "targets.tail_samples": 0,
        "targets.num_samples": 32,
        "targets.num_valid_samples": 8,
        "targets.max_seq_length": 128,
        "tune.max_steps": steps,
        "tune.val_every": steps,
        "tune.checkpoint_every": steps,
        "tune.bits": bits,
        "tune.init": "rtn",
    }
    return load_config(ROOT / "configs" / "default.yaml", overrides)


def run_name(row: str, seed: int, bits: int = 4) -> str:
    at_bits = "" if bits == 4 else f"-b{bits}"  # 4-bit runs keep their names from before --bits
    return f"{row.replace('+', 'with-').replace(' ', '-')}-s{seed}{at_bits}"


def model_dir(name: str) -> Path:
    """Where a run's model is, found by name (the cache folder can move)."""
    return OUT / "runs" / name / "model"


def finished_runs() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    records = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {r["name"]: r for r in records}


def tune_once(config, row: str, seed: int, steps: int) -> dict:
    name = run_name(row, seed, config.tune.bits)
    settings = replace(config.tune, **ROWS[row], seed=seed, run_dir=str(OUT / "runs" / name))
    mx.reset_peak_memory()
    start = time.perf_counter()
    result = tune(settings, overwrite=True)
    record = {
        "name": name,
        "row": row,
        "seed": seed,
        "steps": steps,
        "bits": config.tune.bits,
        "model_dir": str(result.model_dir),
        "tune_s": time.perf_counter() - start,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "val_loss": result.best_val_loss,
        "initial_val_loss": result.initial_val_loss,
    }
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def fast(model):
    use_dequantized_matmul(model)
    return model


def kl_scores(config, records: list[dict]) -> dict[str, dict[str, float]]:
    """name -> {"valid": KL, "test": KL}, full vocabulary, at T=1, for RTN and every run."""
    teacher = load_model("default")
    rtn, _ = quantize_student(load_model("default"), config.tune.bits, config.tune.group_size)
    students = {"RTN": fast(rtn)}
    students.update({r["name"]: fast(load_model(str(model_dir(r["name"]))).model) for r in records})
    valid = TokenSequences(**StoreReader(str(STORE)).sequences("valid"))
    test, _ = build_held_out_sequences(
        teacher.tokenizer, config.targets.data_spec(), count=EVAL_SEQUENCES
    )
    scores: dict[str, dict[str, float]] = {name: {} for name in students}
    for split, sequences in (("valid", valid), ("test", test)):
        for name, score in score_models(teacher.model, students, sequences, batch_size=4).items():
            if name in scores:
                scores[name][split] = score.kl
    return scores


def table(records: list[dict], scores: dict, steps: int) -> Table:
    seeds = sorted({r["seed"] for r in records})
    out = Table(
        title=f"tune levers, default teacher, {records[0].get('bits', 4)}-bit g64, 32x128 tokens, "
        f"{steps} steps of batch 2",
        caption=f"mean (min-max) over seeds {seeds}; KL = full-vocabulary KL(teacher || student) "
        f"per token at T=1; test: {EVAL_SEQUENCES} held-out sequences",
    )
    for column in ("student", "runs", "valid KL", "test KL", "tune s", "peak GB"):
        out.add_column(column, justify="right")
    out.add_row("RTN", "-", f"{scores['RTN']['valid']:.4f}", f"{scores['RTN']['test']:.4f}", "", "")
    for row in ROWS:
        mine = [r for r in records if r["row"] == row]
        if not mine:
            continue
        out.add_row(
            row,
            str(len(mine)),
            spread([scores[r["name"]]["valid"] for r in mine]),
            spread([scores[r["name"]]["test"] for r in mine]),
            spread([r["tune_s"] for r in mine], "{:.0f}"),
            spread([r["peak_gb"] for r in mine], "{:.2f}"),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[123, 7, 42])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4, help="the student's bits (group 64)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    config = bench_config(args.steps, args.bits)
    compute_targets(config.targets)  # resumes: a finished store is only checked
    done = finished_runs()
    for seed in args.seeds:
        for row in args.rows:
            name = run_name(row, seed, args.bits)
            if name not in done or done[name]["steps"] != args.steps:
                done[name] = tune_once(config, row, seed, args.steps)
                print(f"{name}: {done[name]['tune_s']:.0f} s", flush=True)
    records = [done[run_name(row, seed, args.bits)] for seed in args.seeds for row in args.rows]
    scores = kl_scores(config, records)
    (OUT / f"scores-b{args.bits}.json").write_text(json.dumps(scores, indent=2))
    Console().print(table(records, scores, args.steps))


if __name__ == "__main__":
    main()
