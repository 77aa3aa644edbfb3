"""Stage two on the default teacher, as ratios from one run (each side measured here, now):

- tune tokens/s streamed from the store / with every target already decoded in memory (goal >= 0.95)
- tune tokens/s / mlx-lm's own `dwq_quantize` on the same sequences, targets and settings
  (goal >= 10 on a CPU)
- peak memory of a tune over a store 4x as large / over 1x (goal <= 1.1)
- quality on the same rows and step budget: held-out full-vocabulary KL of our tuned student /
  of the student mlx-lm's `dwq_quantize` makes with its defaults (lr 1e-6, top-k KL), both through
  the dequantize + BLAS path so the budget is affordable on a CPU; and with mlx-lm at our lr

Run: `make bench` or `.venv/bin/python -m bench.tune`.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import stages.tune as tune_stage
from bench.common import Ratio, report
from stages.targets import TargetsConfig, compute_targets
from stages.tune import TuneConfig, tune
from store.reader import StoreReader, stream_batches

SEQ_LEN, STEPS = 128, 4
QUALITY_STEPS = 6  # of 4x256 tokens, for the KL comparison with mlx-lm's DWQ


def make_store(path: Path, samples: int, seq_len: int = SEQ_LEN) -> Path:
    compute_targets(
        TargetsConfig(
            store=str(path), num_samples=samples, num_valid_samples=4, max_seq_length=seq_len
        )
    )
    return path


def tokens_per_s(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines[-1]["tokens_per_s"]


def tune_run(store: Path, run_dir: Path, **extra) -> float:
    settings = dict(store=str(store), run_dir=str(run_dir), max_steps=STEPS, val_every=10**6)
    tune(TuneConfig(**{**settings, **extra}))
    return tokens_per_s(run_dir)


def in_memory_stream(reader, split, batches, prefetch=2, wait_s=None):
    """Every batch decoded before the loop starts: the 'all targets in memory' baseline."""
    decoded = list(stream_batches(reader, split, batches, prefetch, wait_s))
    yield from decoded


def decoded_targets(reader: StoreReader, split: str) -> dict[tuple, tuple]:
    """token row (inputs) -> (float32 top-k logits, int32 indices), for a lookup by content."""
    shape = reader.manifest.splits[split]
    tokens = reader.sequences(split)["tokens"][:, :-1]
    out = {}
    for chunk in range(shape.num_chunks):
        values = reader.read_targets(split, chunk)
        start, stop = shape.chunk_rows_range(chunk)
        logits = reader.logits_as_float32(split, values["topk_logits"])
        for i, row in enumerate(range(start, stop)):
            out[tuple(tokens[row].tolist())] = (
                logits[i],
                values["topk_indices"][i].astype(np.int32),
            )
    return out


def setup_seconds() -> float:
    """What tune() does before its loop and mlx-lm's function does not: load and quantize."""
    from stages.models import load_model, quantize_student

    start = time.perf_counter()
    quantize_student(load_model("default"), bits=4, group_size=64)
    return time.perf_counter() - start


def whole_tune_tokens_per_s(store: Path, run_dir: Path) -> float:
    """Like mlx-lm's timing: validation at start and end included, setup excluded."""
    start = time.perf_counter()
    tune(TuneConfig(store=str(store), run_dir=str(run_dir), max_steps=STEPS, val_every=10**6))
    elapsed = time.perf_counter() - start - setup_seconds()
    return 4 * STEPS * (SEQ_LEN - 1) / elapsed


def mlx_lm_dwq(store: Path, steps: int, learning_rate: float = 1e-4, fast: bool = False):
    """mlx-lm's dwq_quantize over the same rows and stored targets, validation included.

    Returns (the tuned model, train tokens/s including its two validations)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.quant.dwq import dwq_quantize

    from stages.models import load_model, quantize_student, use_dequantized_matmul

    reader = StoreReader(store)
    targets = {split: decoded_targets(reader, split) for split in ("train", "valid")}
    seq_len = reader.manifest.splits["train"].seq_len

    def target_fn(batch, _, split):
        pairs = [targets[split][tuple(row)] for row in np.array(batch).tolist()]
        return mx.array(np.stack([p[0] for p in pairs])), mx.array(np.stack([p[1] for p in pairs]))

    def data(split, n):
        return [(row.tolist(), 0) for row in reader.sequences(split)["tokens"][:n]]

    model, _ = quantize_student(load_model("default"), bits=4, group_size=64)
    if fast:
        use_dequantized_matmul(model)
    train = data("train", 4 * steps)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        dwq_quantize(
            model,
            target_fn,
            optim.Adam(learning_rate),
            train,
            data("valid", 4),
            4,
            seq_len,
            123,
            dtype=mx.float32,
        )
    return model, len(train) * (seq_len - 1) / (time.perf_counter() - start)


def decoded_mb(store: Path) -> float:
    """float32 logits + int32 indices + logsumexp of the train split, as the loop consumes them."""
    shape = StoreReader(store).manifest.splits["train"]
    per_row = shape.positions * (shape.top_k * 8 + shape.num_temperatures * 4)
    return shape.num_sequences * per_row / 2**20


def peak_rss_mb(store: Path, run_dir: Path) -> float:
    """Peak resident memory of a whole tune over the store, in a fresh process."""
    code = (
        "import resource; from stages.tune import TuneConfig, tune; "
        f"tune(TuneConfig(store={str(store)!r}, run_dir={str(run_dir)!r}, val_every=10**6)); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def speed_and_memory(tmp: Path) -> list[Ratio]:
    store = make_store(tmp / "s.zarr", 4 * STEPS)
    streamed = tune_run(store, tmp / "streamed")
    original = tune_stage.stream_batches
    tune_stage.stream_batches = in_memory_stream
    try:
        in_memory = tune_run(store, tmp / "memory")
    finally:
        tune_stage.stream_batches = original
    ours = whole_tune_tokens_per_s(store, tmp / "whole")
    _, theirs = mlx_lm_dwq(store, STEPS)
    small = make_store(tmp / "m1.zarr", 16, seq_len=64)
    large = make_store(tmp / "m4.zarr", 64, seq_len=64)
    one, four = peak_rss_mb(small, tmp / "r1"), peak_rss_mb(large, tmp / "r4")
    mb = f"{decoded_mb(small):.0f} and {decoded_mb(large):.0f} MB of decoded targets"
    return [
        Ratio("tune", "tokens/s streamed vs all targets in memory", in_memory, streamed, ">= 0.95"),
        Ratio(
            "tune", "tokens/s vs mlx-lm dwq_quantize (2 validations each)", theirs, ours, ">= 10"
        ),
        Ratio("tune", f"peak RSS MB, 4x store vs 1x ({mb})", one, four, "<= 1.1"),
    ]


def quality(tmp: Path, steps: int) -> list[Ratio]:
    """Same rows, same steps: held-out KL of our student vs mlx-lm's DWQ students."""
    from stages.data import build_held_out_sequences
    from stages.evaluate import score_models
    from stages.models import load_model, use_dequantized_matmul

    store = make_store(tmp / "q.zarr", 4 * steps, seq_len=256)
    tune(TuneConfig(store=str(store), run_dir=str(tmp / "ours"), max_steps=steps, val_every=10**6))
    ours = load_model(str(tmp / "ours" / "model")).model
    mlx_default, _ = mlx_lm_dwq(store, steps, learning_rate=1e-6, fast=True)
    mlx_our_lr, _ = mlx_lm_dwq(store, steps, learning_rate=1e-4, fast=True)
    teacher = load_model("default")
    settings = TargetsConfig(max_seq_length=256).data_settings()
    held_out, _ = build_held_out_sequences(teacher.tokenizer, settings, count=8)
    students = {"ours": ours, "mlx1e-6": mlx_default, "mlx1e-4": mlx_our_lr}
    for model in students.values():
        use_dequantized_matmul(model)
    scores = score_models(teacher.model, students, held_out, batch_size=4)
    label = f"held-out KL after {steps} steps of 4x256"
    return [
        Ratio(
            "quality",
            f"{label}: ours vs mlx-lm DWQ defaults (lr 1e-6)",
            scores["mlx1e-6"].kl,
            scores["ours"].kl,
            "<= 1",
        ),
        Ratio(
            "quality",
            f"{label}: ours vs mlx-lm DWQ at our lr 1e-4",
            scores["mlx1e-4"].kl,
            scores["ours"].kl,
            "<= 1",
        ),
    ]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = speed_and_memory(Path(tmp)) + quality(Path(tmp), steps=QUALITY_STEPS)
    report(f"tune, default teacher (one run; speed: {STEPS} steps of 4x{SEQ_LEN})", rows)


if __name__ == "__main__":
    main()
