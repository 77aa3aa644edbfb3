"""Stage two on the default teacher, as ratios from one run (each side measured here, now):

- tune tokens/s streamed from the store / with every target decoded in memory before the loop
  (goal >= 0.95)
- tune tokens/s / mlx-lm's own `dwq_quantize` on the same rows, targets (mlx-lm's format:
  the top 1,024 logits), batch and steps, two ways: like-for-like (both through the dequantize
  + BLAS matmul: what our pipeline adds or saves; the README's headline) and as shipped (ours
  dequantize + BLAS, mlx-lm's `quantized_matmul`: what a Linux CPU user gains by switching);
  and ours from a store in our default format (k=16 + 64 tail samples) against the same
  like-for-like mlx-lm run
- peak memory of a tune over a store 4x as large / over 1x (goal <= 1.1)

Quality against mlx-lm's DWQ is bench/quality.py.
Run: `make bench` or `.venv/bin/python -m bench.tune` (BENCH_SCALE=quick for a short check).
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
from typing import Any

import numpy as np

import stages.tune as tune_stage
from bench.common import MLX_LM_FORMAT, FullTime, Ratio, by_scale, report
from stages.targets import TargetsConfig, compute_targets
from stages.tune import TuneConfig, tune
from store.reader import StoreReader, stream_batches

# (tokens per row, steps of 4 rows) of the speed runs; (rows, tokens per row) of the memory stores
QUICK, FULL = (16, 2), (128, 4)
SEQ_LEN, STEPS = by_scale(QUICK, FULL)
MEMORY_QUICK, MEMORY_FULL = (8, 32), (16, 64)
MEMORY_ROWS, MEMORY_SEQ_LEN = by_scale(MEMORY_QUICK, MEMORY_FULL)
BATCH = 4

# mlx-lm's DWQ as its command builds it (mlx_lm/quant/dwq.py main): Adam with bias correction at
# a constant learning rate (default 1e-6), temperature 2, its seed 123. One exception: the
# student keeps its own float32 dtype (dwq_quantize's `dtype` defaults to bfloat16, meant for
# bf16 models; casting our float32 student's scales to bf16 would tune another student).
MLX_LM_LEARNING_RATE, MLX_LM_SEED = 1e-6, 123
# The loop measured from mlx-lm's start, RTN: tune's default GPTQ start is work before the loop
# that mlx-lm does not do (bench/quality.py weighs what it buys), and it holds up to 128 rows'
# hidden states, which would grow the 4x store's peak.
LOOP_SETTINGS = {"init": "rtn", "val_every": 10**6}


def make_store(
    path: Path, samples: int, seq_len: int = SEQ_LEN, store_format: dict = MLX_LM_FORMAT, **settings
) -> Path:
    """A store of the default teacher, by default in mlx-lm's DWQ format, which the like-for-like
    rows give both sides (`store_format={}`: our default format, TargetsConfig's)."""
    compute_targets(
        TargetsConfig(
            store=str(path),
            num_samples=samples,
            num_valid_samples=4,
            max_seq_length=seq_len,
            **(store_format | settings),
        )
    )
    return path


def tokens_per_s(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines[-1]["tokens_per_s"]


def tune_run(store: Path, run_dir: Path, **extra) -> float:
    settings = dict(store=str(store), run_dir=str(run_dir), max_steps=STEPS, **LOOP_SETTINGS)
    tune(TuneConfig(**{**settings, **extra}))
    return tokens_per_s(run_dir)


def in_memory_stream(reader, split, batches, prefetch=2, wait_s=None):
    """Every batch decoded when the stream is made, before the loop and its clock start: the
    'all targets in memory' baseline (a generator function would decode inside the first step)."""
    decoded = list(stream_batches(reader, split, batches, prefetch, wait_s))
    return (batch for batch in decoded)


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


class StoredTargets:
    """A store's rows and its top-k targets in the form mlx-lm's `dwq_quantize` takes."""

    def __init__(self, store: Path) -> None:
        self.store = store
        reader = StoreReader(store)
        self.seq_len = reader.manifest.splits["train"].seq_len
        self.tokens = {split: reader.sequences(split) for split in ("train", "valid")}
        for split, values in self.tokens.items():
            # mlx-lm masks by row length alone: rows must be full windows (packed text is).
            if (values["lengths"] != values["tokens"].shape[1]).any():
                raise SystemExit(f"the bench needs full-length rows; {store} {split} has padding")
        self.targets = {split: decoded_targets(reader, split) for split in ("train", "valid")}

    def rows(self, split: str, count: int | None = None) -> list[tuple[list[int], int]]:
        return [(row.tolist(), 0) for row in self.tokens[split]["tokens"][:count]]

    def target_fn(self, batch, _, split):
        import mlx.core as mx

        pairs = [self.targets[split][tuple(row)] for row in np.array(batch).tolist()]
        return mx.array(np.stack([p[0] for p in pairs])), mx.array(np.stack([p[1] for p in pairs]))


def mlx_lm_optimizer(learning_rate: float):
    import mlx.optimizers as optim

    return optim.Adam(learning_rate=learning_rate, bias_correction=True)


def run_mlx_lm_dwq(
    model: Any,
    stored: StoredTargets,
    train: list,
    valid: list,
    batch_size: int,
    learning_rate: float = MLX_LM_LEARNING_RATE,
    seed: int = MLX_LM_SEED,
) -> float:
    """mlx-lm's dwq_quantize on `model` in place (validation at start and end included);
    returns its seconds."""
    import mlx.core as mx
    from mlx_lm.quant.dwq import dwq_quantize

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        dwq_quantize(
            model,
            stored.target_fn,
            mlx_lm_optimizer(learning_rate),
            train,
            valid,
            batch_size,
            stored.seq_len,
            seed,
            dtype=mx.float32,
        )
    return time.perf_counter() - start


def rtn_student(bits: int = 4, group_size: int = 64, dequantized: bool = True):
    """The default teacher quantized round-to-nearest, on the dequantize + BLAS path or not."""
    from stages.models import load_model, quantize_student, use_dequantized_matmul

    model, _ = quantize_student(load_model("default"), bits=bits, group_size=group_size)
    if dequantized:
        use_dequantized_matmul(model)
    return model


def mlx_lm_tokens_per_s(store: Path, dequantized: bool) -> float:
    """mlx-lm's train tokens/s over the same rows, its two validations included."""
    stored = StoredTargets(store)
    train = stored.rows("train", BATCH * STEPS)
    seconds = run_mlx_lm_dwq(
        rtn_student(dequantized=dequantized), stored, train, stored.rows("valid"), BATCH
    )
    return len(train) * (stored.seq_len - 1) / seconds


def setup_seconds() -> float:
    """What tune() does before its loop and mlx-lm's function does not: load and quantize."""
    start = time.perf_counter()
    rtn_student(dequantized=False)
    return time.perf_counter() - start


def whole_tune_tokens_per_s(store: Path, run_dir: Path, setup: float) -> float:
    """Like mlx-lm's timing: validation at start and end included, setup excluded."""
    start = time.perf_counter()
    tune(TuneConfig(store=str(store), run_dir=str(run_dir), max_steps=STEPS, **LOOP_SETTINGS))
    elapsed = time.perf_counter() - start - setup
    return BATCH * STEPS * (SEQ_LEN - 1) / elapsed


def decoded_mb(store: Path) -> float:
    """float32 logits + int32 indices + logsumexp of the train split, as the loop consumes them."""
    shape = StoreReader(store).manifest.splits["train"]
    per_row = shape.positions * (shape.top_k * 8 + shape.num_temperatures * 4)
    return shape.num_sequences * per_row / 2**20


def peak_rss_mb(store: Path, run_dir: Path) -> float:
    """Peak resident memory of a whole tune over the store, in a fresh process."""
    code = (
        "import resource; from stages.tune import TuneConfig, tune; "
        f"tune(TuneConfig(store={str(store)!r}, run_dir={str(run_dir)!r}, **{LOOP_SETTINGS!r})); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def speed(tmp: Path, clock: FullTime) -> list[Ratio]:
    store = make_store(tmp / "s.zarr", BATCH * STEPS)
    setup = setup_seconds()

    def scaled(run, *args):
        """run(*args), its time less the fixed set-up counted as work that full multiplies."""
        tic = time.perf_counter()
        value = run(*args)
        clock.add(max(time.perf_counter() - tic - setup, 0.0), STEPS * SEQ_LEN, FULL[1] * FULL[0])
        return value

    streamed = scaled(tune_run, store, tmp / "streamed")
    original = tune_stage.stream_batches
    tune_stage.stream_batches = in_memory_stream
    try:
        in_memory = scaled(tune_run, store, tmp / "memory")
    finally:
        tune_stage.stream_batches = original
    ours = scaled(whole_tune_tokens_per_s, store, tmp / "whole", setup)
    default_store = make_store(tmp / "d.zarr", BATCH * STEPS, store_format={})
    ours_default = scaled(whole_tune_tokens_per_s, default_store, tmp / "default", setup)
    theirs_same_path = scaled(mlx_lm_tokens_per_s, store, True)
    theirs_shipped = scaled(mlx_lm_tokens_per_s, store, False)
    return [
        Ratio("tune", "tokens/s streamed vs all targets in memory", in_memory, streamed, ">= 0.95"),
        Ratio(
            "tune",
            "tokens/s vs mlx-lm dwq_quantize, like-for-like (both dequantize + BLAS)",
            theirs_same_path,
            ours,
            ">= 1",
        ),
        Ratio(
            "tune",
            "tokens/s vs mlx-lm dwq_quantize, each from its default targets (ours k=16 + 64 "
            "tail samples, mlx-lm's k=1024; both dequantize + BLAS)",
            theirs_same_path,
            ours_default,
        ),
        Ratio(
            "tune",
            "tokens/s vs mlx-lm dwq_quantize, as shipped (its quantized_matmul)",
            theirs_shipped,
            ours,
            ">= 10",
        ),
    ]


def memory(tmp: Path, clock: FullTime) -> list[Ratio]:
    small = make_store(tmp / "m1.zarr", MEMORY_ROWS, seq_len=MEMORY_SEQ_LEN)
    large = make_store(tmp / "m4.zarr", 4 * MEMORY_ROWS, seq_len=MEMORY_SEQ_LEN)
    tic = time.perf_counter()
    one, four = peak_rss_mb(small, tmp / "r1"), peak_rss_mb(large, tmp / "r4")
    clock.add(time.perf_counter() - tic, MEMORY_ROWS * MEMORY_SEQ_LEN, np.prod(MEMORY_FULL))
    mb = f"{decoded_mb(small):.0f} and {decoded_mb(large):.0f} MB of decoded targets"
    return [Ratio("tune", f"peak RSS MB, 4x store vs 1x ({mb})", one, four, "<= 1.1")]


def main() -> None:
    clock = FullTime("tune")
    with tempfile.TemporaryDirectory() as tmp:
        rows = speed(Path(tmp), clock) + memory(Path(tmp), clock)
    caption = (
        "vs dwq_quantize: the same rows, targets, batch and steps; its optimizer and defaults; "
        "2 validations each"
    )
    title = f"tune, default teacher (one run; speed: {STEPS} steps of {BATCH}x{SEQ_LEN})"
    report(title, rows, caption)
    clock.write()


if __name__ == "__main__":
    main()
