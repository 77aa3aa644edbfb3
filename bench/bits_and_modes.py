"""Bits where they pay and the floating-point modes, RTN against tuned, from one run.

Rows, each tuned once (one seed: the default's) on configs/default.yaml's store, rows, tokens and
steps, and scored together on its held-out rows as `dwq-pipeline eval` draws them:

- ours, affine 4-bit g64 and 3-bit g64: `tune` with the default settings (and `--set tune.bits=3`);
- ours, mixed: `tune --bits-per-weight B`, B the uniform 4-bit student's bits per weight as
  stored (its bytes; 5.0 from the float32 default teacher, 4.5 from a bf16 one);
- mlx-lm, mixed: its `quant/dynamic_quant.py` at the same B (its sensitivities from the live
  teacher on our training rows, its threshold search, `quantize_model`), then its `dwq_quantize`
  from its own targets (top 1,024 bf16 logits) on the same rows and steps, at the better on the
  validation rows of MLX_LM_RATES (its best rates at uniform 4 and 3 bits in bench.quality's
  full sweep). Its widths are LOW_BITS and its default high width, 5: its default low width, 4,
  is already B's bytes from a float32 teacher, so no mix of 4 and 5 bits fits B;
- ours, `tune --mode mxfp4|nvfp4|mxfp8`.

Each RTN row is the teacher round-to-nearest in the tuned student's mode and bits, per layer when
mixed (`eval`'s RTN row). Columns: bits per weight as stored (mlx-lm's compute_bits_per_weight of
the model), full-vocabulary KL(teacher || student) per token, the share of RTN's KL tuning
removed, perplexity, top-1 agreement with the teacher, tune seconds and MLX's peak memory during
the tune call (ours: the whole `tune`, loading, quantizing, sensitivities and GPTQ included;
mlx-lm: sensitivities, threshold search, quantization and DWQ, each rate's).

Each finished run is kept in artifacts/bench/bits_and_modes/ (…-quick/ at the quick scale),
named by its settings: a run cut short redoes only what is missing; several processes on the same
cache share the runs (OPENBLAS_NUM_THREADS=1, one process per core).

Run: `make bench` or `.venv/bin/python -m bench.bits_and_modes` (BENCH_SCALE=quick: minutes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from rich.table import Table

from bench.common import FullTime, Ratio, by_scale, claim, report, report_details, wide_console
from bench.quality import (
    CLAIM_POLL_S,
    MLX_LM_TARGETS,
    QUICK,
    bench_config,
    full_budget,
    make_store,
    peak_gb,
    settings_digest,
    store_suffix,
    valid_sequences,
)
from bench.tune import StoredTargets, run_mlx_lm_dwq
from stages.evaluate import EvalConfig, held_out_sequences, rtn_like, score_models
from stages.models import (
    LoadedModel,
    load_model,
    resolve_model_path,
    to_compute_dtype,
    use_dequantized_matmul,
)
from stages.tune import tune

ROOT = Path(__file__).parent.parent
CACHE = ROOT / "artifacts" / "bench" / by_scale("bits_and_modes-quick", "bits_and_modes")
MIXED = "mixed"  # the row whose budget is measured here (the uniform 4-bit student's)
OURS: dict[str, dict] = {
    "affine 4-bit g64": {},
    "affine 3-bit g64": {"bits": 3},
    MIXED: {},
    "mxfp4": {"mode": "mxfp4"},
    "nvfp4": {"mode": "nvfp4"},
    "mxfp8": {"mode": "mxfp8"},
}
MLX_LM = "mlx-lm dynamic_quant + DWQ"
LOW_BITS, HIGH_BITS, GROUP_SIZE = 3, 5, 64
MLX_LM_RATES = (3e-5, 1e-4)
SCORE_BATCH = 4
# The goals: mixed ÷ uniform 4-bit tuned KL; tuned ÷ RTN KL per mode (1 - gap closed).
GOALS = {MIXED: "<= 0.7", "mxfp4": "<= 0.5", "nvfp4": "<= 0.6"}


def run_jobs(jobs: dict[str, Callable[[], dict]]) -> tuple[dict[str, dict], float]:
    """Each job's record ({"model": folder, "seconds", "peak_gb", ...}), from CACHE/runs or run
    here (claimed first, so that several bench processes share them). Returns (records by name,
    seconds of the runs done here)."""
    folder = CACHE / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    here, pending = 0.0, list(jobs)
    while pending:
        for name in list(pending):
            record = folder / f"{name}.json"
            if record.exists():
                pending.remove(name)
            elif claim(folder / f"{name}.claim"):
                try:
                    tic = time.perf_counter()
                    result = jobs[name]()
                    here += time.perf_counter() - tic
                    partial = record.with_suffix(f".{os.getpid()}.partial")
                    partial.write_text(json.dumps(result))
                    os.replace(partial, record)
                finally:
                    (folder / f"{name}.claim").unlink(missing_ok=True)
                pending.remove(name)
        if pending:
            time.sleep(CLAIM_POLL_S)
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in jobs}, here


def our_jobs(config, budget: float) -> dict[str, tuple[str, Callable[[], dict]]]:
    """label -> (run name, job) for each of OURS."""
    out = {}
    for label, extra in OURS.items():
        extra = {"bits_per_weight": budget} if label == MIXED else extra
        settings = dataclasses.replace(config.tune, **extra)
        name = f"ours-{settings_digest(settings)}{store_suffix(settings.store)}-seed{settings.seed}"
        out[label] = (name, functools.partial(our_run, settings, CACHE / "runs" / name))
    return out


def our_run(settings, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a run this bench started and was cut short
    tic = time.perf_counter()
    result, peak = peak_gb(lambda: tune(dataclasses.replace(settings, run_dir=str(run_dir))))
    seconds = time.perf_counter() - tic
    return {"model": str(result.model_dir), "seconds": seconds, "peak_gb": peak}


def uniform_budget() -> float:
    """Bits per weight of the default teacher at uniform 4-bit g64 as mlx-lm stores it."""
    from mlx_lm.utils import compute_bits_per_weight, quantize_model

    teacher = load_model("default")
    with contextlib.redirect_stdout(io.StringIO()):
        model, _ = quantize_model(teacher.model, teacher.config, group_size=GROUP_SIZE, bits=4)
    return round(compute_bits_per_weight(model), 4)


def mlx_lm_sensitivities(stored: StoredTargets, path: Path) -> tuple[dict, float]:
    """dynamic_quant's sensitivities of the default teacher on the training rows (as its
    command writes them to a JSON file, reused by every rate), and their seconds."""
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    if path.exists():
        saved = json.loads(path.read_text())
        return saved["sensitivities"], saved["seconds"]
    teacher = load_model("default")
    data = mx.array(stored.tokens["train"]["tokens"])
    tic = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
        found = estimate_sensitivities(
            teacher.model, data, LOW_BITS, GROUP_SIZE, HIGH_BITS, GROUP_SIZE
        )
    seconds = time.perf_counter() - tic
    path.write_text(json.dumps({"sensitivities": dict(found), "seconds": seconds}))
    return dict(found), seconds


def mlx_lm_student(sensitivities: dict, budget: float) -> tuple[LoadedModel, dict]:
    """dynamic_quant's mix at `budget` (its threshold search and predicate, as its main)."""
    from mlx_lm.quant.dynamic_quant import estimate_threshold
    from mlx_lm.utils import quantize_model

    teacher = load_model("default")
    with contextlib.redirect_stdout(io.StringIO()):
        threshold = estimate_threshold(
            teacher.model, sensitivities, budget, LOW_BITS, GROUP_SIZE, HIGH_BITS, GROUP_SIZE
        )

        def predicate(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            if sensitivities[path] > threshold:
                return {"bits": HIGH_BITS, "group_size": GROUP_SIZE}
            return True

        model, config = quantize_model(
            teacher.model,
            teacher.config,
            group_size=GROUP_SIZE,
            bits=LOW_BITS,
            quant_predicate=predicate,
        )
    return teacher, config


def mlx_lm_run(store: Path, budget: float, batch_size: int, rate: float, seed: int, name: str):
    from mlx_lm.utils import save

    stored = StoredTargets(store)
    sensitivities, sensitivity_s = mlx_lm_sensitivities(stored, CACHE / "runs" / "sens.json")
    tic = time.perf_counter()
    (student, config), peak_quantize = peak_gb(lambda: mlx_lm_student(sensitivities, budget))
    use_dequantized_matmul(student.model)  # the same kernels as ours (bench/quality.py)
    train, valid = stored.rows("train"), stored.rows("valid")
    _, peak = peak_gb(
        lambda: run_mlx_lm_dwq(student.model, stored, train, valid, batch_size, rate, seed)
    )
    seconds = sensitivity_s + time.perf_counter() - tic
    folder = CACHE / "runs" / name
    shutil.rmtree(folder, ignore_errors=True)
    save(folder, resolve_model_path("default"), student.model, student.tokenizer, config)
    return {"model": str(folder), "seconds": seconds, "peak_gb": max(peak, peak_quantize)}


def mlx_lm_jobs(store: Path, budget: float, config) -> dict[float, tuple[str, Callable]]:
    tag = f"{LOW_BITS}-{HIGH_BITS}g{GROUP_SIZE}-bpw{budget:g}{store_suffix(str(store))}"
    seed = config.tune.seed
    out = {}
    for rate in MLX_LM_RATES:
        name = f"mlx-lm-dq{tag}-lr{rate:g}-seed{seed}"
        job = functools.partial(mlx_lm_run, store, budget, config.tune.batch_size, rate, seed, name)
        out[rate] = (name, job)
    return out


def prepared(model):
    model.eval()
    use_dequantized_matmul(model)
    return model


def load_student(folder: str) -> tuple[LoadedModel, float]:
    """The saved student in float32 (as `eval` computes on CPU) and its bits per weight as
    stored (counted before the cast)."""
    from mlx_lm.utils import compute_bits_per_weight

    loaded = load_model(folder)
    bits = compute_bits_per_weight(loaded.model)
    to_compute_dtype(loaded.model, "auto")
    return loaded, bits


def best_mlx_lm_rate(teacher, records: dict[float, dict], store: Path) -> tuple[float, dict]:
    """The rate whose student has the lowest KL on the validation rows, and those KLs."""
    students = {
        f"{rate:g}": prepared(load_student(r["model"])[0].model) for rate, r in records.items()
    }
    scores = score_models(teacher.model, students, valid_sequences(store), SCORE_BATCH)
    kls = {rate: scores[f"{rate:g}"].kl for rate in records}
    return min(kls, key=kls.get), kls


def score_rows(teacher, records: dict[str, dict], config) -> tuple[dict, dict, str, int]:
    """Test-split scores of every row's RTN and tuned student, and bits per weight as stored."""
    students, bits = {}, {}
    for label, record in records.items():
        tuned, bits[label] = load_student(record["model"])
        rtn = rtn_like(tuned, record["model"], "default", False, "auto")
        students[f"{label} rtn"], students[label] = prepared(rtn), prepared(tuned.model)
    eval_config = EvalConfig(store=config.targets.store, num_sequences=config.eval.num_sequences)
    test, split = held_out_sequences(eval_config, teacher.tokenizer)
    scores = score_models(teacher.model, students, test, SCORE_BATCH)
    return scores, bits, split, int(test.loss_mask().sum())


def table(records, scores, bits, title: str) -> Table:
    out = Table(title=title)
    for column in (
        "student",
        "bits/weight",
        "KL: RTN → tuned",
        "closed",
        "perplexity: RTN → tuned",
        "top-1",
        "tune s",
        "peak GB",
    ):
        out.add_column(column, justify="right")
    teacher = scores["teacher"]
    out.add_row("teacher", "", "0", "", f"{teacher.perplexity:.2f}", "100%", "", "")
    for label, record in records.items():
        rtn, tuned = scores[f"{label} rtn"], scores[label]
        out.add_row(
            label,
            f"{bits[label]:.3f}",
            f"{rtn.kl:.4f} → {tuned.kl:.4f}",
            f"{1 - tuned.kl / rtn.kl:.1%}",
            f"{rtn.perplexity:.2f} → {tuned.perplexity:.2f}",
            f"{tuned.top1_agreement:.1%}",
            f"{record['seconds']:.0f}",
            f"{record['peak_gb']:.2f}",
        )
    return out


def ratios(scores, budget: float) -> list[Ratio]:
    kl = {label: score.kl for label, score in scores.items()}
    rows = [
        Ratio(
            "bits_and_modes",
            f"held-out KL at {budget:g} bits per weight: ours mixed vs ours uniform 4-bit, tuned",
            kl["affine 4-bit g64"],
            kl[MIXED],
            GOALS[MIXED],
        ),
        Ratio(
            "bits_and_modes",
            f"held-out KL at {budget:g} bits per weight: ours mixed vs {MLX_LM}",
            kl[MLX_LM],
            kl[MIXED],
            "<= 1",
        ),
    ]
    for mode in ("mxfp4", "nvfp4", "mxfp8"):
        rows.append(
            Ratio(
                "bits_and_modes",
                f"held-out KL, {mode}: tuned vs RTN (1 - gap closed)",
                kl[f"{mode} rtn"],
                kl[mode],
                GOALS.get(mode, ""),
            )
        )
    return rows


def main() -> None:
    clock = FullTime("bits_and_modes")
    config = bench_config(by_scale(QUICK, {}))
    mlx_lm_config = bench_config(by_scale(QUICK, {}) | MLX_LM_TARGETS)
    make_store(config)
    make_store(mlx_lm_config)
    mlx_lm_store = Path(mlx_lm_config.targets.store)
    rows, seq_len = config.targets.num_samples, config.targets.max_seq_length
    full_rows, full_seq_len, *_ = full_budget()
    budget = uniform_budget()

    ours = our_jobs(config, budget)
    theirs = mlx_lm_jobs(mlx_lm_store, budget, config)
    jobs = {name: job for name, job in [*ours.values(), *theirs.values()]}
    done, here = run_jobs(jobs)
    clock.add(here, rows * seq_len, full_rows * full_seq_len)

    teacher = load_model("default")
    prepared(teacher.model)
    rate, valid_kl = best_mlx_lm_rate(
        teacher, {rate: done[name] for rate, (name, _) in theirs.items()}, mlx_lm_store
    )
    records = {label: done[name] for label, (name, _) in ours.items()}
    records = {**records, MLX_LM: done[theirs[rate][0]]}
    scores, bits, split, tokens = score_rows(teacher, records, config)

    steps = rows // config.tune.batch_size
    title = (
        f"RTN and tuned by bits and mode: {rows}x{seq_len} training tokens, {steps} steps, one "
        f"seed; {split} split, {tokens:,} tokens; mixed rows at {budget:g} bits per weight "
        f"(uniform 4-bit's bytes); {MLX_LM} at lr {rate:g}, chosen on the validation rows "
        f"({', '.join(f'{r:g}: {kl:.4f}' for r, kl in valid_kl.items())})"
    )
    wide_console().print(table(records, scores, bits, title))
    details = {label: {"bits_per_weight": bits[label], **records[label]} for label in records}
    details |= {"scores": {name: vars(score) for name, score in scores.items()}}
    report_details("bits_and_modes", details | {"mlx_lm_valid_kl": valid_kl, "budget": budget})
    report("bits per weight and modes (one run)", ratios(scores, budget))
    clock.write()


if __name__ == "__main__":
    main()
