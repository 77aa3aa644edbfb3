"""Stage one, as ratios from one run, on the default teacher and on a Qwen3-0.6B-shaped one
(random weights, Qwen3's 151,936-token vocabulary: three times the top-k and log-sum-exp work
per token of the default's 49,152):

- targets tokens/s / bare teacher forward tokens/s on the same batches (goal >= 0.9)
- store bytes/token / mlx-lm's DWQ targets as it writes them (safetensors, its top 1,024 bf16
  logits + uint32 indices; goal <= 0.25), on the default teacher: at our default format (k=16 +
  64 tail samples, which tunes as good a student: bench/store_quality.py); `--top-k 1024
  --tail-samples 0` compares the same k

The fixed cost subtracted from the targets time (load, fingerprints, data, opening the store) is
timed by a second run on the finished store with its re-verification of finished chunks skipped:
that check is work a first run does not do.

Run: `make bench` or
`.venv/bin/python -m bench.targets [--samples N] [--top-k K] [--tail-samples S]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import mlx.core as mx

from bench.common import MLX_LM_FORMAT, FullTime, Ratio, by_scale, report
from stages.data import build_sequences
from stages.models import load_model
from stages.targets import TargetsConfig, compute_targets
from store.inspect import store_info
from store.writer import StoreWriter

# (training sequences, tokens per sequence)
QUICK, FULL = (4, 64), (16, 256)
MLX_LM_TOP_K = MLX_LM_FORMAT["top_k"]  # mlx_lm/quant/dwq.py's compute_dwq_targets keeps these


def bare_forward_seconds(model, tokens, batch_size: int) -> float:
    mx.eval(model(mx.array(tokens[:1, :8])))
    start = time.perf_counter()
    for i in range(0, len(tokens), batch_size):
        mx.eval(model(mx.array(tokens[i : i + batch_size, :-1])))
    return time.perf_counter() - start


def mlx_lm_layout_bytes(model, tokens, batch_size: int, top_k: int, folder: Path) -> int:
    """Write targets exactly as mlx-lm's compute_dwq_targets does (bf16 teacher) and measure."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, i in enumerate(range(0, len(tokens), batch_size)):
        logits = model(mx.array(tokens[i : i + batch_size, :-1])).astype(mx.bfloat16)
        idx = mx.argpartition(logits, kth=-top_k, axis=-1)[..., -top_k:]
        values = mx.take_along_axis(logits, idx, axis=-1)
        mx.save_safetensors(
            str(folder / f"{n:010d}.safetensors"), {"logits": values, "indices": idx}
        )
    return sum(f.stat().st_size for f in folder.iterdir())


def measure_teacher(
    teacher: str, samples: int, seq_len: int, tmp: Path, clock: FullTime, **store_format
) -> dict:
    """Bare forward and targets seconds of one teacher on the same rows, the fixed cost, and
    bytes per token of our store (TargetsConfig's defaults changed by `store_format`: top_k,
    tail_samples, logits_dtype, ...) and of mlx-lm's DWQ targets (its k=1024)."""
    work, full_work = (samples + 4) * seq_len, (FULL[0] + 4) * FULL[1]
    config = TargetsConfig(
        teacher=teacher,
        store=f"{tmp}/bench.zarr",
        num_samples=samples,
        num_valid_samples=4,
        max_seq_length=seq_len,
        **store_format,
    )
    loaded = load_model(config.teacher)
    train, valid = build_sequences(loaded.tokenizer, config.data_spec())
    with clock.part(work, full_work):
        forward_s = bare_forward_seconds(loaded.model, valid.tokens, config.batch_size)
        forward_s += bare_forward_seconds(loaded.model, train.tokens, config.batch_size)
    start = time.perf_counter()
    compute_targets(config)
    with_setup = time.perf_counter() - start
    start = time.perf_counter()
    # Store complete: only loading, fingerprints, data and opening; no chunk re-verified.
    with mock.patch.object(StoreWriter, "repair", lambda self, *args, **kwargs: []):
        compute_targets(config)
    setup = time.perf_counter() - start
    clock.add(max(with_setup - setup, 0.0), work, full_work)
    tokens = train.num_tokens + valid.num_tokens
    info = store_info(Path(config.store))
    with clock.part(work, full_work):
        theirs = mlx_lm_layout_bytes(
            loaded.model, train.tokens, config.batch_size, MLX_LM_TOP_K, tmp / "mlx"
        )
    return {
        "forward_tok_s": tokens / forward_s,
        "targets_tok_s": tokens / max(with_setup - setup, 1e-9),
        "setup_s": setup,
        "ours_bytes": sum(s.stored_bytes for s in info.splits.values()) / tokens,
        "theirs_bytes": theirs / train.num_tokens,
        "tokens": tokens,
    }


def main() -> None:
    from bench.memory import QUICK_MODELS, QWEN3_0_6B, build_model_folder

    parser = argparse.ArgumentParser()
    samples, seq_len = by_scale(QUICK, FULL)
    parser.add_argument("--samples", type=int, default=samples)
    built_in = TargetsConfig()
    parser.add_argument("--top-k", type=int, default=built_in.top_k)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--tail-samples", type=int, default=built_in.tail_samples)
    args = parser.parse_args()
    clock = FullTime("targets")
    with tempfile.TemporaryDirectory() as tmp:
        # quick: a narrow stand-in with the same vocabulary
        quick = {**QUICK_MODELS["qwen3 (small)"], "vocab_size": QWEN3_0_6B["vocab_size"]}
        name, config = by_scale(
            ("qwen3 small, Qwen3's vocabulary", quick), ("Qwen3-0.6B shape", QWEN3_0_6B)
        )
        shaped = str(build_model_folder(Path(tmp) / "wide-vocabulary", config))
        teachers = {"default teacher": "default", name: shaped}
        runs = {}
        for name, teacher in teachers.items():
            with tempfile.TemporaryDirectory(dir=tmp) as work_dir:
                runs[name] = measure_teacher(
                    teacher,
                    args.samples,
                    args.seq_len,
                    Path(work_dir),
                    clock,
                    top_k=args.top_k,
                    tail_samples=args.tail_samples,
                )
    rows = []
    for name, run in runs.items():
        what = f"targets tokens/s vs bare teacher forward, {name}"
        rows.append(Ratio("targets", what, run["forward_tok_s"], run["targets_tok_s"], ">= 0.9"))
    default = runs["default teacher"]
    what = f"store bytes/token vs mlx-lm's DWQ targets (k={MLX_LM_TOP_K} bf16 + uint32 indices)"
    rows.append(Ratio("targets", what, default["theirs_bytes"], default["ours_bytes"], "<= 0.25"))
    samples = f" + {args.tail_samples} tail samples" if args.tail_samples else ""
    title = f"targets, {default['tokens']:,} tokens per teacher, k={args.top_k}{samples} (one run)"
    fixed = ", ".join(f"{name} {run['setup_s']:.1f}s" for name, run in runs.items())
    report(title, rows, f"fixed cost per run (load, fingerprint, data): {fixed}")
    clock.write()


if __name__ == "__main__":
    main()
