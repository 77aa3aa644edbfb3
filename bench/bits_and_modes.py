"""Bits where they pay and the floating-point modes, RTN against tuned, from one run.

Rows, each tuned once (one seed: the default's) on bench.quality's copy of the default store (the
rows, tokens and steps of configs/default.yaml), and scored together on the held-out rows
`dwq-pipeline eval` draws:

- ours, affine 4-bit g64 and 3-bit g64: `tune` with the default settings (and tune.bits 3, at
  configs/default-3bit.yaml's rate: bench.quality's WIDTH_RATES);
- ours, mixed: `tune --bits-per-weight B` (widths tune.allowed_bits), B the uniform 4-bit
  student's bits per weight as stored (its bytes: 5.0 from the float32 default teacher, whose
  scales are float32; 4.5 from a bf16 one), at the default learning rate (MIX_RATE), with
  tune.allowed_group_sizes [64] (bits chosen, every group of 64, the budget's choice before
  2026-12-01) and [32, 64, 128] (each layer's group size chosen too: the default now);
- mlx-lm, mixed: its `quant/dynamic_quant.py` at the same B (its sensitivities from the live
  teacher on our training rows, its threshold search, `quantize_model`, as its main does), then
  its `dwq_quantize` from its own targets (top 1,024 bf16 logits) on the same rows, steps and
  kernels, at the learning rate of bench.quality's sweep whose student has the lowest KL on the
  validation rows. Its widths are LOW_BITS and its default high width, 5: its default low width,
  4, is already B's bytes from a float32 teacher, so no mix of 4 and 5 bits fits B (its uniform
  4-bit DWQ is bench.quality's mlx-lm row);
- ours, `tune --mode mxfp4|nvfp4|mxfp8`.

As in bench.quality, our runs validate at start and end only and keep no best-by-validation
checkpoint (the start is saved only if the end validates worse); mlx-lm keeps its last
parameters. Each RTN row is the teacher round-to-nearest in the tuned student's mode and bits, per
layer when mixed (`eval`'s RTN row). Columns: bits per weight as stored (mlx-lm's
compute_bits_per_weight of the saved model), full-vocabulary KL(teacher || student) per token,
the share of RTN's KL tuning removed, perplexity, top-1 agreement with the teacher, tune seconds
and MLX's peak memory (ours: the whole `tune` call, loading, quantizing, sensitivities and GPTQ
included; mlx-lm: its sensitivities, threshold search, quantization and DWQ at the chosen rate;
its targets are decoded before its clock starts).

Each finished run's model is kept in artifacts/bench/bits_and_modes/ (…-quick/ at the quick
scale), named by its settings; a run cut short starts again (so that its seconds and peak are
one run's). Several processes on the same cache share the runs (OPENBLAS_NUM_THREADS=1, one
process per core). Delete the folder to start over.

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

from bench.common import (
    FullTime,
    Ratio,
    by_scale,
    report,
    report_details,
    run_shared,
    wide_console,
)
from bench.quality import (
    CLAIM_POLL_S,
    LEARNING_RATES,
    MLX_LM_TARGETS,
    QUICK,
    bench_config,
    full_budget,
    make_store,
    our_settings,
    peak_gb,
    settings_digest,
    store_suffix,
    valid_sequences,
)
from bench.tune import StoredTargets, run_mlx_lm_dwq
from stages.evaluate import (
    EvalConfig,
    held_out_sequences,
    prepare_for_scoring,
    rtn_like,
    score_models,
)
from stages.models import (
    LoadedModel,
    load_model,
    resolve_model_path,
    to_compute_dtype,
    use_dequantized_matmul,
)
from stages.tune import TuneConfig, tune

ROOT = Path(__file__).parent.parent
CACHE = ROOT / "artifacts" / "bench" / by_scale("bits_and_modes-quick", "bits_and_modes")
RUNS, MODELS = CACHE / "runs", CACHE / "models"
UNIFORM, MIXED = "ours, affine 4-bit g64", "ours, mixed"
MIXED_GROUPS = "ours, mixed bits + group sizes"
# The mixes' rate: the default (1.5e-5, as uniform 4-bit's). From the GPTQ-aware budget
# (revision 2) the bits + group sizes mix validated 0.0575 at 1.5e-5 against 0.0594 at 2.5e-5,
# the rate before (seed 123, 2026-12-01: the budget's revision 1 had preferred 2.5e-5, 0.0721
# against 0.0735); the uniform rows keep their width's rate (bench.quality.our_settings).
MIX_RATE = TuneConfig().learning_rate
OURS: dict[str, dict] = {  # label -> settings changed from the default (the mixes' budget: below)
    UNIFORM: {},
    "ours, affine 3-bit g64": {"bits": 3},
    MIXED: {"learning_rate": MIX_RATE, "allowed_group_sizes": [64]},  # bits only: one size
    MIXED_GROUPS: {"learning_rate": MIX_RATE, "allowed_group_sizes": [32, 64, 128]},
    "ours, mxfp4": {"mode": "mxfp4"},
    "ours, nvfp4": {"mode": "nvfp4"},
    "ours, mxfp8": {"mode": "mxfp8"},
}
MLX_LM = "mlx-lm, dynamic_quant + DWQ"
LOW_BITS, HIGH_BITS, GROUP_SIZE = 3, 5, 64
SCORE_BATCH = 4
# The goals: mixed / uniform 4-bit tuned KL; tuned / RTN KL per mode (1 - gap closed).
GOALS = {"mixed": "<= 0.7", "mxfp4": "<= 0.5", "nvfp4": "<= 0.6"}


def run_jobs(jobs: dict[str, Callable[[], dict]]) -> tuple[dict[str, dict], list[str]]:
    """Each job's record (a JSON object), from RUNS or made here; (records by name, names run
    here)."""
    RUNS.mkdir(parents=True, exist_ok=True)
    here = run_shared(
        RUNS, jobs, lambda name: record_path(name).exists(), write_record, CLAIM_POLL_S
    )
    return {name: json.loads(record_path(name).read_text()) for name in jobs}, here


def record_path(name: str) -> Path:
    return RUNS / f"{name}.json"


def write_record(name: str, record: dict) -> None:
    partial = record_path(name).with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, record_path(name))


def our_jobs(config, budget: float, steps: int) -> dict[str, tuple[str, Callable[[], dict]]]:
    """label -> (run name, job) for each of OURS, with bench.quality's settings for its runs."""
    out = {}
    for label, extra in OURS.items():
        budgeted = label in (MIXED, MIXED_GROUPS)
        extra = dict(extra) | ({"bits_per_weight": budget} if budgeted else {})
        bits = extra.pop("bits", 4)
        settings = our_settings(config, bits, GROUP_SIZE, config.tune.seed, **extra)
        name = f"ours-{settings_digest(settings)}{store_suffix(settings.store)}-seed{settings.seed}"
        out[label] = (name, functools.partial(our_run, settings, name, steps))
    return out


def our_run(settings, name: str, steps: int) -> dict:
    run_dir = RUNS / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a run this bench started and was cut short
    tic = time.perf_counter()
    result, peak = peak_gb(lambda: tune(dataclasses.replace(settings, run_dir=str(run_dir))))
    seconds = time.perf_counter() - tic
    assert result.steps == steps, (result.steps, steps)  # the same budget as every row
    model = keep_model(result.model_dir, name)
    shutil.rmtree(run_dir)  # made by this bench; its checkpoints are GBs in the float modes
    return {"model": model, "seconds": seconds, "peak_gb": peak, "best_step": result.best_step}


def keep_model(folder: Path, name: str) -> str:
    MODELS.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(MODELS / name, ignore_errors=True)
    shutil.move(str(folder), MODELS / name)
    return str(MODELS / name)


def uniform_budget() -> float:
    """Bits per weight of the default teacher at uniform 4-bit g64 as mlx-lm stores it."""
    from mlx_lm.utils import compute_bits_per_weight, quantize_model

    teacher = load_model("default")
    with contextlib.redirect_stdout(io.StringIO()):
        model, _ = quantize_model(teacher.model, teacher.config, group_size=GROUP_SIZE, bits=4)
    return round(compute_bits_per_weight(model), 4)


def mlx_lm_sensitivities(store: Path) -> dict:
    """dynamic_quant's sensitivities of the default teacher on the training rows, with their
    seconds and peak (as its command writes them to a file, reused by every rate)."""
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    tokens = mx.array(StoredTargets(store).tokens["train"]["tokens"])

    def measure():
        teacher = load_model("default")
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
            found = estimate_sensitivities(
                teacher.model, tokens, LOW_BITS, GROUP_SIZE, HIGH_BITS, GROUP_SIZE
            )
        return dict(found)

    tic = time.perf_counter()
    sensitivities, peak = peak_gb(measure)
    seconds = time.perf_counter() - tic
    return {"sensitivities": sensitivities, "seconds": seconds, "peak_gb": peak}


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

        _, config = quantize_model(
            teacher.model,
            teacher.config,
            group_size=GROUP_SIZE,
            bits=LOW_BITS,
            quant_predicate=predicate,
        )
    return teacher, config


def mlx_lm_run(store: Path, budget: float, batch_size: int, rate: float, seed: int, name: str):
    from mlx_lm.utils import save

    sensitivity_name, sensitivity_job = mlx_lm_sensitivity_job(store)
    found = run_jobs({sensitivity_name: sensitivity_job})[0][sensitivity_name]
    stored = StoredTargets(store)
    train, valid = stored.rows("train"), stored.rows("valid")

    def quantize_and_tune():
        student, config = mlx_lm_student(found["sensitivities"], budget)
        use_dequantized_matmul(student.model)  # the same kernels as ours (bench/quality.py)
        run_mlx_lm_dwq(student.model, stored, train, valid, batch_size, rate, seed)
        return student, config

    tic = time.perf_counter()
    (student, config), peak = peak_gb(quantize_and_tune)
    seconds = found["seconds"] + time.perf_counter() - tic
    folder = RUNS / name
    shutil.rmtree(folder, ignore_errors=True)
    save(folder, resolve_model_path("default"), student.model, student.tokenizer, config)
    model = keep_model(folder, name)
    return {"model": model, "seconds": seconds, "peak_gb": max(peak, found["peak_gb"])}


def mlx_lm_tag(store: Path) -> str:
    return f"{LOW_BITS}-{HIGH_BITS}g{GROUP_SIZE}{store_suffix(str(store))}"


def mlx_lm_sensitivity_job(store: Path) -> tuple[str, Callable[[], dict]]:
    return f"mlx-lm-sensitivities-{mlx_lm_tag(store)}", functools.partial(
        mlx_lm_sensitivities, store
    )


def mlx_lm_jobs(store: Path, budget: float, config) -> dict[float, tuple[str, Callable]]:
    """rate -> (run name, job) for dynamic_quant + DWQ at each of bench.quality's rates."""
    seed, out = config.tune.seed, {}
    for rate in LEARNING_RATES:
        name = f"mlx-lm-dq{mlx_lm_tag(store)}-bpw{budget:g}-lr{rate:g}-seed{seed}"
        job = functools.partial(mlx_lm_run, store, budget, config.tune.batch_size, rate, seed, name)
        out[rate] = (name, job)
    return out


def load_student(folder: str) -> tuple[LoadedModel, float]:
    """The saved student, computing in float32 as `eval` does on CPU, and its bits per weight
    as stored (counted before the cast)."""
    from mlx_lm.utils import compute_bits_per_weight

    loaded = load_model(folder)
    bits = compute_bits_per_weight(loaded.model)
    to_compute_dtype(loaded.model, "auto")
    return loaded, bits


def best_mlx_lm_rate(teacher, records: dict[float, dict], store: Path, fast_matmul: str):
    """The rate whose student has the lowest KL on the validation rows, and every rate's KL."""
    students = {
        f"{rate:g}": prepare_for_scoring(load_student(r["model"])[0].model, fast_matmul)
        for rate, r in records.items()
    }
    scores = score_models(teacher.model, students, valid_sequences(store), SCORE_BATCH)
    kls = {rate: scores[f"{rate:g}"].kl for rate in records}
    return min(kls, key=kls.get), kls


def score_rows(teacher, records: dict[str, dict], config) -> tuple[dict, dict, str, int]:
    """Test-split scores of every row's RTN and tuned student, and bits per weight as stored."""
    students, bits, fast = {}, {}, config.eval.fast_matmul
    for label, record in records.items():
        tuned, bits[label] = load_student(record["model"])
        rtn = rtn_like(tuned, record["model"], "default", trust=False, dtype="auto")
        students[f"{label} rtn"] = prepare_for_scoring(rtn, fast)
        students[label] = prepare_for_scoring(tuned.model, fast)
    eval_config = EvalConfig(store=config.targets.store, num_sequences=config.eval.num_sequences)
    test, split = held_out_sequences(eval_config, teacher.tokenizer)
    scores = score_models(teacher.model, students, test, SCORE_BATCH)
    return scores, bits, split, int(test.loss_mask().sum())


def table(records, scores, bits, title: str, caption: str) -> Table:
    out = Table(title=title, caption=caption)
    columns = ("student", "bits/weight", "KL: RTN → tuned", "closed", "perplexity: RTN → tuned")
    for column in (*columns, "top-1", "tune s", "peak GB"):
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


def ratios(scores, bits: dict) -> list[Ratio]:
    kl = {label: score.kl for label, score in scores.items()}
    rows = []
    for mix in (MIXED, MIXED_GROUPS):
        at = f"{bits[mix]:.3f} bits per weight"
        rows.append(
            Ratio(
                "bits_and_modes",
                f"held-out KL, {mix} at {at} vs ours uniform 4-bit ({bits[UNIFORM]:.3f}), tuned",
                kl[UNIFORM],
                kl[mix],
                GOALS["mixed"],
            )
        )
        rows.append(
            Ratio(
                "bits_and_modes",
                f"held-out KL, {mix} at {at} vs {MLX_LM} at {bits[MLX_LM]:.3f}",
                kl[MLX_LM],
                kl[mix],
                "<= 1",
            )
        )
    for mode in ("mxfp4", "nvfp4", "mxfp8"):
        rows.append(
            Ratio(
                "bits_and_modes",
                f"held-out KL, {mode}: tuned vs RTN (1 - gap closed)",
                kl[f"ours, {mode} rtn"],
                kl[f"ours, {mode}"],
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
    full_rows, full_seq_len, _, full_test = full_budget()
    steps = rows // config.tune.batch_size
    budget = uniform_budget()

    ours = our_jobs(config, budget, steps)
    theirs = mlx_lm_jobs(mlx_lm_store, budget, config)
    jobs = dict([*ours.values(), mlx_lm_sensitivity_job(mlx_lm_store), *theirs.values()])
    tic = time.perf_counter()
    done, here = run_jobs(jobs)
    clock.add(
        time.perf_counter() - tic,
        max(len(here), 1) * rows * seq_len,
        len(here) and full_rows * full_seq_len * len(here),
    )

    teacher = load_model("default", compute_dtype="auto")
    prepare_for_scoring(teacher.model, config.eval.fast_matmul)
    rate, valid_kl = best_mlx_lm_rate(
        teacher,
        {rate: done[name] for rate, (name, _) in theirs.items()},
        mlx_lm_store,
        config.eval.fast_matmul,
    )
    records = {label: done[name] for label, (name, _) in ours.items()}
    records = {**records, MLX_LM: done[theirs[rate][0]]}
    test_models = 1 + 2 * len(records)
    with clock.part(config.eval.num_sequences * test_models, full_test * test_models):
        scores, bits, split, tokens = score_rows(teacher, records, config)

    title = (
        f"RTN and tuned students by bits and mode: {rows}x{seq_len} training tokens, {steps} "
        f"steps, one seed; {split} split, {tokens:,} tokens"
    )
    caption = (
        f"mixed rows at the uniform 4-bit student's {budget:g} bits per weight (its bytes); ours "
        f"from widths {sorted(config.tune.allowed_bits)}, mlx-lm's from {LOW_BITS} and "
        f"{HIGH_BITS}, DWQ at lr {rate:g}, the best on the validation rows of "
        f"{', '.join(f'{r:g}: {kl:.4f}' for r, kl in valid_kl.items())}. tune s and peak GB: "
        "ours the whole tune call; mlx-lm sensitivities, quantization and DWQ (bench docstring)"
    )
    wide_console().print(table(records, scores, bits, title, caption))
    details = {label: {"bits_per_weight": bits[label], **records[label]} for label in records}
    details |= {"scores": {name: vars(score) for name, score in scores.items()}}
    details |= {"mlx_lm_valid_kl": {f"{r:g}": kl for r, kl in valid_kl.items()}, "budget": budget}
    report_details("bits_and_modes", details)
    report("bits per weight and modes (one run)", ratios(scores, bits))
    clock.write()


if __name__ == "__main__":
    main()
