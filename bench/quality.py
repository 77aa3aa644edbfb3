"""Student quality against mlx-lm's DWQ at the same budget, on held-out text.

Both sides get the same training rows, tokens and optimizer steps (our default run's budget:
configs/default.yaml's rows, tokens per row and batch, one epoch) and the same matmul path
(dequantize + BLAS), at 4-bit and 3-bit group 64. Each tunes from its own targets of the same
teacher on those rows: ours from a store in configs/default.yaml's format, mlx-lm's from one in
its DWQ's (the top 1,024 logits in bf16, bench.common's MLX_LM_FORMAT), whatever our default is.

- RTN: the teacher quantized round-to-nearest (mlx-lm's `quantize_model`), not tuned;
- ours: `tune` with configs/default.yaml's settings, at 3 bits at configs/default-3bit.yaml's
  learning rate (WIDTH_RATES);
- ours with each of LEVERS (a quality lever switched on alone, or an earlier default's
  settings; one that is our default's run at that width is left out), every seed, or the first
  only for FIRST_SEED_LEVERS (CPU time);
- mlx-lm: `dwq_quantize` with its optimizer as its command builds it (bias-corrected Adam,
  constant rate, T=2) at each learning rate of a sweep, in two rounds: every rate with the first
  seed, then the FINALISTS rates with the lowest validation KL get every other seed; its best
  rate is the finalist with the lowest mean KL over all seeds on the validation rows (the
  store's valid split), never on the test rows.

Neither side keeps a best-by-validation checkpoint: both are scored with their final parameters
(ours read from the run's last checkpoint; `dwq_quantize` leaves its last in the model). Every
figure is a mean over SEEDS (the seed orders the batches) with its min-max. Scores are
full-vocabulary KL(teacher || student) per token, perplexity and top-1 agreement with the
teacher, on the default data's test split as `dwq-pipeline eval` draws it, and tune seconds
(validation at start and end included, model loading excluded), and peak memory: MLX's peak
during the run above what the bench process held before it (its teacher and shared student).
The two sides do not do the same work there: ours is the whole `tune` call (loading the
teacher, quantizing, GPTQ or learned rounding holding the teacher's weights, then tuning from
the store), mlx-lm's tunes the bench's already quantized RTN student in place (its bytes are
added) from its stored targets, as its offline mode does. bench/memory.py compares like with
like. A row whose runs were cached before peaks were recorded gets a 2-step probe run of the
same settings (the peak does not depend on the step count beyond the first).

Each finished run's parameters are kept in artifacts/bench/quality/ (quality-quick/ for the quick
scale), keyed by side, bits, learning rate or tune settings, store format and seed, next to the
stores they were tuned on (one per format, store_name): a run cut short (or a later one after
our defaults change) redoes only what is missing. Delete the folder to start over.

Run: `make bench` or `.venv/bin/python -m bench.quality [--bits 4 3] [--no-levers]`
(BENCH_SCALE=quick for a short check). Several such processes on the same cache share the runs
(each claims a run before it starts it): `OPENBLAS_NUM_THREADS=1` and one process per core is
faster on a CPU, since most of MLX's CPU work outside the matmuls runs on one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from rich.table import Table

from bench.common import (
    MLX_LM_FORMAT,
    FullTime,
    Ratio,
    by_scale,
    report,
    report_details,
    run_shared,
    spread,
    wide_console,
)
from bench.tune import StoredTargets, rtn_student, run_mlx_lm_dwq
from pipeline.config import load_config
from stages.data import TokenSequences
from stages.evaluate import EvalConfig, held_out_sequences, score_models
from stages.models import load_model
from stages.targets import compute_targets
from stages.tune import NARROW_RATE, TuneConfig, tune
from store.layout import STEPPED_DTYPES
from store.lock import LockedError

ROOT = Path(__file__).parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
QUANTIZATIONS = ((4, 64), (3, 64))
FULL_SEEDS, FULL_LEARNING_RATES = (123, 7, 2026), (1e-6, 1e-5, 3e-5, 1e-4, 3e-4)
# Quick: the same code on a sliver (its figures mean nothing): fewer seeds, two rates to choose.
SEEDS = by_scale(FULL_SEEDS[:2], FULL_SEEDS)
LEARNING_RATES = by_scale((1e-5, 1e-4), FULL_LEARNING_RATES)
FINALISTS = by_scale(1, 2)  # rates that get every seed after the first seed's round
CLAIM_POLL_S = 15  # how often a bench process looks for runs another one is doing
CACHE = ROOT / "artifacts" / "bench" / by_scale("quality-quick", "quality")
QUICK = {
    "targets.num_samples": 4,
    "targets.max_seq_length": 32,
    "targets.num_valid_samples": 4,
    "eval.num_sequences": 4,
}
SCORE_BATCH = 4
MLX_LM_TARGETS = {f"targets.{key}": value for key, value in MLX_LM_FORMAT.items()}  # overrides
NEVER = 10**9  # val_every / checkpoint_every: validate and checkpoint at start and end only
# Rows beside our default in the main table: one setting changed at a time, every seed.
LEVERS = {
    "lr 5e-5 (the default before)": {"learning_rate": 5e-5},
    "RTN start, lr 1e-4 (DWQ's start)": {"init": "rtn", "learning_rate": 1e-4},
    "+train_norms": {"train_norms": True},
    "+learned_rounding": {"learned_rounding": True},
}
FIRST_SEED_LEVERS = ("+train_norms", "+learned_rounding")
PROBE_STEPS = 2  # a peak-memory probe's steps
# Our rate where a width validates better at another than the default's (1.5e-5, chosen for 4-bit):
# configs/default-3bit.yaml's, 5e-5. Validation KL, seed 123, 2026-12-01: 3-bit 0.2863 at 5e-5
# against 0.3063 at 1.5e-5; 4-bit 0.0657 at 1.5e-5 against 0.0758 at 5e-5 (README: Benchmarks).
WIDTH_RATES = {3: NARROW_RATE}  # tests/test_tune.py keeps default-3bit.yaml's rate equal to it
# `--ours-sweep`: our settings besides the default, each tuned with every seed and scored on the
# validation rows only, to choose our defaults the way mlx-lm's rate is chosen (never on test).
OURS_SWEEP = {  # a rate equal to a width's own (WIDTH_RATES) is the default's run there: skipped
    "lr 1e-5": {"learning_rate": 1e-5},
    "lr 2.5e-5": {"learning_rate": 2.5e-5},
    "lr 5e-5": {"learning_rate": 5e-5},
    "lr 1e-4": {"learning_rate": 1e-4},
}  # T=1 was swept on the k=1024 store; the default store's samples fix tune's temperature at 2


@dataclass(frozen=True)
class Run:
    """One tuned student: its parameters and what it cost."""

    params: dict
    seconds: float
    info: dict = dataclasses.field(default_factory=dict)


class WithParams:
    """One shared model called with a given student's parameters (one model in memory)."""

    def __init__(self, model: Any, params: dict) -> None:
        self.model, self.params = model, params

    def __call__(self, tokens: mx.array) -> mx.array:
        self.model.update(self.params)
        return self.model(tokens)


def bench_config(overrides: dict) -> Any:
    """configs/default.yaml changed by `overrides`, its store in the bench's cache, named by the
    targets format (one store per format, shared by every bench run on it)."""
    targets = load_config(DEFAULT_CONFIG, overrides).targets
    return load_config(DEFAULT_CONFIG, {**overrides, "store": str(CACHE / store_name(targets))})


def store_name(targets) -> str:
    """store.zarr for mlx-lm's format (MLX_LM_FORMAT), else named by what differs from it, as
    store-k16-s64.zarr. Two formats that shared a name would fail in `make_store` (the store
    refuses other settings), never reuse each other's store."""
    if all(getattr(targets, key) == value for key, value in MLX_LM_FORMAT.items()):
        return "store.zarr"
    parts = [f"k{targets.top_k}"]
    if targets.logits_dtype != "bfloat16":
        parts.append(targets.logits_dtype)
    if targets.tail_samples:
        parts.append(f"s{targets.tail_samples}")
        if targets.sample_temperature != 2.0:
            parts.append(f"T{targets.sample_temperature:g}")
    if targets.logits_dtype in STEPPED_DTYPES and targets.logit_step != 0.1:
        parts.append(f"step{targets.logit_step:g}")
    if targets.lse_temperatures != [1.0, 2.0]:
        parts.append("lse" + "-".join(f"{t:g}" for t in targets.lse_temperatures))
    return f"store-{'-'.join(parts)}.zarr"


def store_suffix(store: str) -> str:
    """What our run names add for the store they tuned on: nothing for mlx-lm's format (the
    names runs had before the default store changed), else '-store-k16-s64'."""
    stem = Path(store).stem
    return "" if stem == "store" else f"-{stem}"


class RunCache:
    """Finished runs on disk: the parameters that differ from the RTN student, and seconds."""

    def __init__(self, folder: Path, rtn: dict, tag: str) -> None:
        self.folder, self.tag = folder, tag
        self.rtn_tree, self.rtn = rtn, dict(tree_flatten(rtn))
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def load(self, name: str, base) -> Run | None:
        if not self.path(name).exists():
            return None
        changed, meta = mx.load(str(self.path(name)), return_metadata=True)
        base.update(self.rtn_tree)
        base.load_weights(list(changed.items()), strict=False)
        return Run(base.parameters(), float(meta["seconds"]), json.loads(meta["info"]))

    def save(self, name: str, params: dict, seconds: float, info: dict | None = None) -> Run:
        changed = {
            key: value
            for key, value in tree_flatten(params)
            if key not in self.rtn or not mx.array_equal(value, self.rtn[key]).item()
        }
        partial = self.path(name).with_suffix(".partial.safetensors")
        meta = {"seconds": repr(seconds), "info": json.dumps(info or {})}
        mx.save_safetensors(str(partial), changed, metadata=meta)
        os.replace(partial, self.path(name))
        return Run(params, seconds, info or {})


def settings_digest(config: TuneConfig) -> str:
    """Our side's cache key: every setting that changes the student (store and seed aside)."""
    kept = {k: v for k, v in config.identity().items() if k not in ("store", "seed")}
    return hashlib.blake2b(json.dumps(kept, sort_keys=True).encode(), digest_size=6).hexdigest()


def saved_model_params(model_dir: Path, base, rtn: dict) -> dict:
    """The saved student's parameters, put into the shared model (weights too: a start other
    than RTN changes the integers)."""
    base.update(rtn)
    for file in sorted(model_dir.glob("*.safetensors")):
        base.load_weights(list(mx.load(str(file)).items()), strict=False)
    return base.parameters()


def run_each(cache: RunCache, base, jobs: dict[str, Callable[[], tuple]]) -> tuple[dict, int]:
    """Each job's Run, from the cache or run here ((params, seconds, info) = job()); several
    bench processes on the same cache share the work (bench.common.run_shared). Returns (runs by
    name, how many ran here)."""
    finished = lambda name: cache.path(name).exists()  # noqa: E731
    keep = lambda name, result: cache.save(name, *result)  # noqa: E731
    here = run_shared(cache.folder, jobs, finished, keep, CLAIM_POLL_S)
    return {name: cache.load(name, base) for name in jobs}, len(here)


def our_jobs(
    config,
    tmp: Path,
    bits: int,
    group_size: int,
    base,
    setup: float,
    steps: int,
    cache,
    seeds: tuple[int, ...] = SEEDS,
    **extra,
):
    """`tune` with the default settings (changed by `extra`), once per seed: (jobs by name,
    names by seed). With validation at start and end only, the saved model is the final one
    unless the end validated worse than the start: `best_step` in the details says which."""
    rtn = base.parameters()

    def job(tune_config: TuneConfig, run_dir: Path):
        tic = time.perf_counter()
        result, peak = peak_gb(lambda: tune(dataclasses.replace(tune_config, run_dir=str(run_dir))))
        seconds = time.perf_counter() - tic - setup
        assert result.steps == steps, (result.steps, steps)  # the same budget as mlx-lm's
        params = saved_model_params(result.model_dir, base, rtn)
        shutil.rmtree(run_dir)  # made by this bench; the cache keeps what counts
        return (
            params,
            seconds,
            {"best_step": result.best_step, "steps": result.steps, "peak_gb": peak},
        )

    names, jobs = {}, {}
    for seed in seeds:
        tune_config = our_settings(config, bits, group_size, seed, **extra)
        names[seed] = our_run_name(tune_config, cache)
        jobs[names[seed]] = functools.partial(job, tune_config, tmp / names[seed])
    return jobs, names


def width_rate(config, bits: int) -> float:
    """Our learning rate at `bits`: the default's, or WIDTH_RATES' where a width has its own."""
    return WIDTH_RATES.get(bits, config.tune.learning_rate)


def our_settings(config, bits: int, group_size: int, seed: int, **extra) -> TuneConfig:
    """The default tune settings of one of our bench runs (at its width's rate), changed by
    `extra`."""
    bench = dict(
        bits=bits, group_size=group_size, seed=seed, val_every=NEVER, checkpoint_every=NEVER
    )
    bench["learning_rate"] = width_rate(config, bits)
    return dataclasses.replace(config.tune, **(bench | extra))


def other_than_ours(variants: dict[str, dict], config, quantization) -> dict[str, dict]:
    """The variants whose runs differ from our default's at this width (at 3 bits, "lr 5e-5" is
    the default's own run: WIDTH_RATES)."""
    bits, group_size = quantization
    ours = our_settings(config, bits, group_size, SEEDS[0])
    return {
        label: extra
        for label, extra in variants.items()
        if our_settings(config, bits, group_size, SEEDS[0], **extra) != ours
    }


def our_run_name(tune_config: TuneConfig, cache) -> str:
    digest, store = settings_digest(tune_config), store_suffix(tune_config.store)
    return f"ours-{digest}-{cache.tag}{store}-seed{tune_config.seed}"


def row_peak(cache, run: Run, name: str, probe: Callable[[], float]) -> float:
    """The peak GB recorded with the run `name`, or measured by `probe` (a short run of the
    same settings, kept beside the cached run) for a run cached before peaks were recorded."""
    if "peak_gb" in run.info:
        return run.info["peak_gb"]
    path = cache.folder / f"{name}.peak.json"
    if path.exists():
        return json.loads(path.read_text())["peak_gb"]
    peak = probe()
    partial = path.with_suffix(f".{os.getpid()}.partial")  # bench processes share the cache
    partial.write_text(json.dumps({"peak_gb": peak}))
    os.replace(partial, path)
    return peak


def our_probe(tune_config: TuneConfig, tmp: Path) -> float:
    run_dir = tmp / "peak-probe"
    shutil.rmtree(run_dir, ignore_errors=True)  # a probe this bench cut short
    probe = dataclasses.replace(tune_config, run_dir=str(run_dir), max_steps=PROBE_STEPS)
    _, peak = peak_gb(lambda: tune(probe))
    shutil.rmtree(run_dir)
    return peak


def mlx_lm_probe(base, stored: StoredTargets, batch_size: int, rate: float, cache) -> float:
    base.update(cache.rtn_tree)
    train, valid = stored.rows("train", PROBE_STEPS * batch_size), stored.rows("valid")
    _, peak = peak_gb(lambda: run_mlx_lm_dwq(base, stored, train, valid, batch_size, rate))
    base.update(cache.rtn_tree)
    return peak + parameter_gb(base)


def variant_jobs(
    config, quantization, base, setup, steps, cache, tmp, variants: dict, seeds_of=lambda _: SEEDS
) -> tuple[dict, dict]:
    """our_jobs for each labelled variant of our settings (label -> changed settings), with
    `seeds_of(label)` seeds: (jobs by name, names by label and seed)."""
    bits, group_size = quantization
    jobs, names = {}, {}
    for label, extra in variants.items():
        more, by_seed = our_jobs(
            config, tmp, bits, group_size, base, setup, steps, cache, seeds_of(label), **extra
        )
        jobs |= more
        names[label] = by_seed
    return jobs, names


def lever_runs(config, quantization, base, setup, steps, cache, tmp) -> tuple[dict, int]:
    """Each of LEVERS with every seed (the first only for FIRST_SEED_LEVERS): (runs by label and
    seed, runs done here)."""
    jobs, names = variant_jobs(
        config,
        quantization,
        base,
        setup,
        steps,
        cache,
        tmp,
        other_than_ours(LEVERS, config, quantization),
        lambda label: SEEDS[:1] if label in FIRST_SEED_LEVERS else SEEDS,
    )
    runs, done = run_each(cache, base, jobs)
    by_label = {
        label: {seed: runs[n] for seed, n in by_seed.items()} for label, by_seed in names.items()
    }
    return by_label, done


def peak_gb(run: Callable[[], Any]) -> tuple[Any, float]:
    """run()'s result and MLX's peak memory during it above what was held before it, in GB."""
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    result = run()
    return result, (mx.get_peak_memory() - held) / 1e9


def parameter_gb(model) -> float:
    return sum(value.nbytes for _, value in tree_flatten(model.parameters())) / 1e9


def mlx_lm_run_name(cache, stored: StoredTargets, rate: float, seed: int) -> str:
    return f"mlx-lm-{cache.tag}{store_suffix(str(stored.store))}-lr{rate:g}-seed{seed}"


def mlx_lm_jobs(stored: StoredTargets, base, batch_size: int, pairs: list, cache) -> tuple:
    """mlx-lm's dwq_quantize from the RTN student at each (learning rate, seed) of `pairs`:
    (jobs by name, names by pair)."""
    train, valid = stored.rows("train"), stored.rows("valid")

    def job(rate: float, seed: int):
        base.update(cache.rtn_tree)
        seconds, peak = peak_gb(
            lambda: run_mlx_lm_dwq(base, stored, train, valid, batch_size, rate, seed)
        )
        return base.parameters(), seconds, {"peak_gb": peak + parameter_gb(base)}

    names = {pair: mlx_lm_run_name(cache, stored, *pair) for pair in pairs}
    return {names[p]: functools.partial(job, *p) for p in pairs}, names


def both_sides(config, quantization, base, setup, steps, cache, stored, teacher, valid, tmp):
    """Our runs and mlx-lm's two-round sweep (every rate at the first seed, with our runs: one
    round of work for the bench processes to share; then every seed of the finalists).
    Returns (ours by seed, best rate, mlx-lm runs by rate and seed, valid KLs by rate, runs done
    here)."""
    bits, group_size = quantization
    ours_jobs, ours_names = our_jobs(config, tmp, bits, group_size, base, setup, steps, cache)
    batch = config.tune.batch_size
    screen = [(rate, SEEDS[0]) for rate in LEARNING_RATES]
    screen_jobs, screen_names = mlx_lm_jobs(stored, base, batch, screen, cache)
    first, done = run_each(cache, base, ours_jobs | screen_jobs)
    ours = {seed: first[name] for seed, name in ours_names.items()}
    theirs: dict[float, dict[int, Run]] = {rate: {} for rate in LEARNING_RATES}
    for (rate, seed), name in screen_names.items():
        theirs[rate][seed] = first[name]
    valid_kl = score_valid(teacher, base, theirs, valid)
    finalists = sorted(LEARNING_RATES, key=lambda rate: valid_kl[rate][0])[:FINALISTS]
    pairs = [(rate, seed) for rate in finalists for seed in SEEDS[1:]]
    more_jobs, more_names = mlx_lm_jobs(stored, base, batch, pairs, cache)
    more, did = run_each(cache, base, more_jobs)
    new_runs: dict[float, dict[int, Run]] = {rate: {} for rate in finalists}
    for (rate, seed), name in more_names.items():
        theirs[rate][seed] = new_runs[rate][seed] = more[name]
    for rate, kls in score_valid(teacher, base, new_runs, valid).items():
        valid_kl[rate] += kls  # the first seed's is scored already; seeds stay in order
    best = min(finalists, key=lambda rate: float(np.mean(valid_kl[rate])))
    base.update(cache.rtn_tree)
    return ours, best, theirs, valid_kl, done + did


def score_valid(teacher, base, runs: dict, valid: TokenSequences) -> dict[float, list[float]]:
    candidates = {
        f"{rate:g} {seed}": run.params
        for rate, by_seed in runs.items()
        for seed, run in by_seed.items()
    }
    scores = score(teacher, base, candidates, valid)
    return {
        rate: [scores[f"{rate:g} {seed}"].kl for seed in by_seed] for rate, by_seed in runs.items()
    }


def our_sweep(
    config, quantization, base, setup, steps, cache, teacher, valid, tmp, labels
) -> Table:
    """Our default and each OURS_SWEEP setting in `labels` scored on the validation rows, in two
    rounds as mlx-lm's rates: every setting with the first seed, then the FINALISTS best of them
    (and the default) with every other seed."""
    bits, group_size = quantization
    swept = other_than_ours({label: OURS_SWEEP[label] for label in labels}, config, quantization)
    variants = {"default": {}} | swept
    jobs, names = variant_jobs(config, quantization, base, setup, steps, cache, tmp, variants)

    def run_and_score(labels, seeds) -> dict:
        wanted = {
            names[label][seed]: jobs[names[label][seed]] for label in labels for seed in seeds
        }
        runs, _ = run_each(cache, base, wanted)
        scores = score(teacher, base, {name: run.params for name, run in runs.items()}, valid)
        return {name: (scores[name].kl, runs[name].seconds) for name in runs}

    first = run_and_score(variants, SEEDS[:1])
    first_kl = {label: first[names[label][SEEDS[0]]][0] for label in variants}
    finalists = sorted(variants, key=first_kl.get)[:FINALISTS]
    finalists += ["default"] if "default" not in finalists else []
    results = first | run_and_score(finalists, SEEDS[1:])
    base.update(cache.rtn_tree)
    out = Table(title=f"ours, {bits}-bit g{group_size}: validation KL by setting")
    for column in ("setting", "seeds", "valid KL", "tune s"):
        out.add_column(column, justify="right")
    for label, by_seed in names.items():
        done = [results[name] for name in by_seed.values() if name in results]
        kls, seconds = [kl for kl, _ in done], [s for _, s in done]
        out.add_row(label, str(len(done)), spread(kls), spread(seconds, "{:.0f}"))
    return out


def score(teacher, base, students: dict[str, dict], sequences: TokenSequences) -> dict:
    base.eval()
    models = {name: WithParams(base, params) for name, params in students.items()}
    return score_models(teacher.model, models, sequences, SCORE_BATCH)


def valid_sequences(store: Path) -> TokenSequences:
    values = StoredTargets(store).tokens["valid"]
    return TokenSequences(values["tokens"], values["lengths"], values["prompt_offsets"])


def one_quantization(
    bits, group_size, *, config, mlx_lm_store, tmp, teacher, clock, budget, levers_wanted=True
) -> dict:
    rows, seq_len, steps = budget
    tic = time.perf_counter()
    base = rtn_student(bits, group_size)
    setup = time.perf_counter() - tic
    rtn = base.parameters()
    cache = RunCache(CACHE / "runs", rtn, f"{bits}g{group_size}")
    stored = StoredTargets(mlx_lm_store)  # the rows are the same in every format's store
    valid = valid_sequences(mlx_lm_store)
    full = full_budget()
    run_work, full_run = rows * seq_len, full[0] * full[1]

    tic = time.perf_counter()
    ours, best, theirs, valid_kl, done = both_sides(
        config, (bits, group_size), base, setup, steps, cache, stored, teacher, valid, tmp
    )
    levers, lever_done = {}, 0
    if levers_wanted:
        levers, lever_done = lever_runs(config, (bits, group_size), base, setup, steps, cache, tmp)
    done += lever_done
    full_runs = len(FULL_SEEDS) * (1 + len(LEVERS)) + len(FULL_LEARNING_RATES)
    full_runs += 2 * (len(FULL_SEEDS) - 1)
    clock.add(time.perf_counter() - tic, max(done, 1) * run_work, done and full_run * full_runs)
    mlx_lm = (best, theirs[best][SEEDS[0]])
    peaks = row_peaks(config, (bits, group_size), base, cache, stored, tmp, ours, levers, mlx_lm)

    test, split = held_out_sequences(
        EvalConfig(store=str(mlx_lm_store), num_sequences=config.eval.num_sequences),
        teacher.tokenizer,
    )
    students = {"rtn": rtn}
    students |= {f"ours {seed}": run.params for seed, run in ours.items()}
    students |= {f"mlx-lm {seed}": theirs[best][seed].params for seed in SEEDS}
    for label, by_seed in levers.items():
        students |= {f"{label} {seed}": run.params for seed, run in by_seed.items()}
    scored = len(students), 1 + (2 + len(LEVERS)) * len(FULL_SEEDS)
    with clock.part(len(test) * seq_len * scored[0], full[3] * full[1] * scored[1]):
        test_scores = score(teacher, base, students, test)
    rate = width_rate(config, bits)
    return {
        "bits": bits,
        "group_size": group_size,
        "split": split,
        "test_tokens": int(test.loss_mask().sum()),
        "best_learning_rate": best,
        "ours_learning_rate": rate,
        "ours_store": Path(config.targets.store).name,
        "ours_settings": settings_digest(
            dataclasses.replace(config.tune, bits=bits, learning_rate=rate)
        ),
        "ours_best_step": [run.info.get("best_step") for run in ours.values()],
        "valid_kl": {f"{rate:g}": values for rate, values in valid_kl.items()},
        "scores": {name: vars(value) for name, value in test_scores.items()},
        "ours_seconds": [run.seconds for run in ours.values()],
        "levers": {
            label: {"settings": LEVERS[label], "seconds": [run.seconds for run in by_seed.values()]}
            for label, by_seed in levers.items()
        },
        "peak_gb": peaks,
        "mlx_lm_seconds": {
            f"{rate:g}": [run.seconds for run in by_seed.values()]
            for rate, by_seed in theirs.items()
        },
    }


def row_peaks(config, quantization, base, cache, stored, tmp, ours, levers, mlx_lm) -> dict:
    """Peak GB of each row (ours, each lever, mlx-lm at its best rate), from its first seed's run
    or a probe of its settings."""
    bits, group_size = quantization
    seed = SEEDS[0]
    peaks = {}
    for label, extra, run in [("ours", {}, ours[seed])] + [
        (label, LEVERS[label], by_seed[seed]) for label, by_seed in levers.items()
    ]:
        settings = our_settings(config, bits, group_size, seed, **extra)
        probe = functools.partial(our_probe, settings, tmp)
        peaks[label] = row_peak(cache, run, our_run_name(settings, cache), probe)
    rate, run = mlx_lm
    probe = functools.partial(mlx_lm_probe, base, stored, config.tune.batch_size, rate, cache)
    peaks["mlx-lm"] = row_peak(cache, run, mlx_lm_run_name(cache, stored, rate, seed), probe)
    return peaks


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
    """`field` of every seed scored for the row `prefix`."""
    return [
        result["scores"][f"{prefix} {seed}"][field]
        for seed in SEEDS
        if f"{prefix} {seed}" in result["scores"]
    ]


def table(result: dict, budget: tuple[int, int, int]) -> Table:
    rows, seq_len, steps = budget
    scores, rtn_kl = result["scores"], result["scores"]["rtn"]["kl"]
    title = (
        f"{result['bits']}-bit g{result['group_size']}: {rows}x{seq_len} training tokens, "
        f"{steps} steps; {result['split']} split, {result['test_tokens']:,} tokens; "
        f"mean (min-max) of {len(SEEDS)} seeds"
    )
    caption = (
        f"targets: ours from the default store ({result['ours_store']}), mlx-lm from its own "
        "format (top 1,024 bf16 logits, store.zarr), the same rows; peak GB: MLX's peak during "
        "the run; ours: the whole tune call (teacher loaded, quantized, GPTQ); mlx-lm: tuning a "
        "loaded RTN student (see bench/quality.py)"
    )
    out = Table(title=title, caption=caption)
    columns = ("student", "lr", "valid KL", "test KL", "closed", "perplexity", "top-1", "tune s")
    for column in (*columns, "peak GB"):
        out.add_column(column, justify="right")

    def closed(kls: list[float]) -> str:
        return spread([1 - kl / rtn_kl for kl in kls], "{:.1%}")

    teacher, rtn = scores["teacher"], scores["rtn"]
    out.add_row("teacher", "", "", "0", "", f"{teacher['perplexity']:.2f}", "100%", "", "")
    rtn_figures = (f"{rtn['kl']:.4f}", "0%", f"{rtn['perplexity']:.2f}")
    out.add_row("RTN", "", "", *rtn_figures, f"{rtn['top1_agreement']:.1%}", "", "")
    best = f"{result['best_learning_rate']:g}"
    ours_rate = result["ours_learning_rate"]
    students = [("ours, default settings", "ours", ours_rate, result["ours_seconds"])]
    for label, lever in result["levers"].items():
        rate = lever["settings"].get("learning_rate", ours_rate)
        seeds = "" if len(lever["seconds"]) == len(SEEDS) else ", first seed only"
        students.append((f"ours, {label}{seeds}", label, rate, lever["seconds"]))
    students.append(("mlx-lm, best lr", "mlx-lm", float(best), result["mlx_lm_seconds"][best]))
    for label, prefix, rate, seconds in students:
        kls = side(result, prefix, "kl")
        out.add_row(
            label,
            f"{rate:g}",
            "",
            spread(kls),
            closed(kls),
            spread(side(result, prefix, "perplexity"), "{:.2f}"),
            spread(side(result, prefix, "top1_agreement"), "{:.1%}"),
            spread(seconds, "{:.0f}"),
            f"{result['peak_gb'][prefix]:.2f}",
        )
    for rate, kls in result["valid_kl"].items():
        chosen = " (best)" if rate == best else ""
        out.add_row(f"mlx-lm sweep{chosen}", rate, spread(kls), "", "", "", "", "", "")
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


def make_store(config) -> None:
    """The bench's store, made or finished here, or by another bench process (wait for it)."""
    while True:
        try:
            compute_targets(config.targets)
            return
        except LockedError:
            time.sleep(CLAIM_POLL_S)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="quality against mlx-lm's DWQ")
    parser.add_argument("--bits", type=int, nargs="+", default=[b for b, _ in QUANTIZATIONS])
    parser.add_argument(
        "--no-levers",
        action="store_true",
        help="the RTN, ours and mlx-lm rows only (LEVERS cost 8 tune runs per bit width)",
    )
    parser.add_argument(
        "--ours-sweep",
        nargs="*",
        choices=list(OURS_SWEEP),
        help="only our side: the default and these OURS_SWEEP settings (all when none are "
        "named), on the validation rows",
    )
    args = parser.parse_args(argv)
    if args.ours_sweep == []:
        args.ours_sweep = list(OURS_SWEEP)
    args.quantizations = tuple(q for q in QUANTIZATIONS if q[0] in args.bits)
    return args


def sweep_ours(quantizations, config, budget, labels: list[str]) -> None:
    console, teacher = wide_console(), load_model("default")
    valid = valid_sequences(Path(config.targets.store))
    for bits, group_size in quantizations:
        tic = time.perf_counter()
        base = rtn_student(bits, group_size)
        setup = time.perf_counter() - tic
        cache = RunCache(CACHE / "runs", base.parameters(), f"{bits}g{group_size}")
        console.print(
            our_sweep(
                config,
                (bits, group_size),
                base,
                setup,
                budget[2],
                cache,
                teacher,
                valid,
                CACHE / "tmp",
                labels,
            )
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    clock = FullTime("quality")
    overrides = by_scale(QUICK, {})
    console = wide_console()
    results, rows_out = [], []
    tmp = CACHE / "tmp"
    config = bench_config(overrides)
    make_store(config)
    targets = config.targets
    steps = targets.num_samples // config.tune.batch_size
    budget = (targets.num_samples, targets.max_seq_length, steps)
    if args.ours_sweep is not None:
        sweep_ours(args.quantizations, config, budget, args.ours_sweep)
        return
    mlx_lm_config = bench_config(overrides | MLX_LM_TARGETS)
    make_store(mlx_lm_config)
    teacher = load_model("default")
    for bits, group_size in args.quantizations:
        result = one_quantization(
            bits,
            group_size,
            config=config,
            mlx_lm_store=Path(mlx_lm_config.targets.store),
            tmp=tmp,
            teacher=teacher,
            clock=clock,
            budget=budget,
            levers_wanted=not args.no_levers,
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
