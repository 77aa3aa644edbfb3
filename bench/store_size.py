"""Bytes per token of the store's logit encodings, and what 8-bit logits lose.

One teacher forward over the default teacher and data (ROWS training sequences); from the same
logits, one store per (k, logit dtype, step) written by the store writer, its train split's bytes
per token as `dwq-pipeline store info` counts them, and, for each uint8 store, the KL from the
(k+1)-bucket distribution read back from the float32 store of the same k to the one read back from
the uint8 store, at each stored temperature (mean and largest over positions).
Run: `.venv/bin/python -m bench.store_size` (BENCH_SCALE=quick: 2 sequences of 64 tokens).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.common import by_scale
from stages.data import build_sequences
from stages.models import load_model, output_vocab_size, teacher_fingerprint, tokenizer_fingerprint
from stages.targets import TargetsConfig, build_manifest, teacher_logits, topk_targets
from store.inspect import store_info
from store.layout import UINT8_LAST_CODE
from store.reader import StoreReader
from store.writer import open_store_for_writing

ROWS, SEQ_LEN = by_scale((2, 64), (8, 256))
TOP_KS = (1024, 256, 64, 16)
STEPS = (0.05, 0.1, 0.2)
# (dtype, step): float32 is the reference the uint8 stores are compared with
ENCODINGS = [("float32", None), ("bfloat16", None)] + [("uint8", s) for s in STEPS]


def write_store(path: Path, config: TargetsConfig, loaded, splits, logits) -> Path:
    """A store of `config`'s encoding from logits computed once (chunk = batch = ROWS rows)."""
    manifest = build_manifest(
        config,
        teacher_fingerprint(config.teacher, loaded),
        tokenizer_fingerprint(loaded.tokenizer),
        output_vocab_size(loaded),
        splits,
        loaded.cast_to,
    )
    arrays = {
        name: {"tokens": s.tokens, "lengths": s.lengths, "prompt_offsets": s.prompt_offsets}
        for name, s in splits.items()
    }
    writer = open_store_for_writing(path, manifest, arrays)
    for split, split_logits in logits.items():
        targets = topk_targets(
            split_logits,
            config.top_k,
            config.lse_temperatures,
            config.logits_dtype,
            config.stored_logit_step,
        )
        writer.write_chunk(split, 0, targets, "0/1")
    return path


def bucket_logprobs(store: Path, temperatures: list[float]) -> list[np.ndarray]:
    """Per temperature, the train split's (k+1)-bucket log-distribution as tune reads it."""
    reader = StoreReader(store)
    stored = reader.read_targets("train", 0)
    head = reader.logits_as_float32("train", stored["topk_logits"])
    tails = stored["tail_logsumexp"]
    out = []
    for i, t in enumerate(temperatures):
        buckets = np.concatenate([head / np.float64(t), tails[..., i, None]], -1)
        top = buckets.max(-1, keepdims=True)
        out.append(buckets - top - np.log(np.exp(buckets - top).sum(-1, keepdims=True)))
    return out


def kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def main(keep: Path | None = None) -> None:
    """`keep`: a folder to leave the stores in (`python -m bench.store_size FOLDER`)."""
    base = TargetsConfig(  # the logits' encodings, without tail samples
        num_samples=ROWS,
        num_valid_samples=1,
        max_seq_length=SEQ_LEN,
        chunk_size=ROWS,
        tail_samples=0,
    )
    loaded = load_model(base.teacher, compute_dtype=base.compute_dtype)
    train, valid = build_sequences(loaded.tokenizer, base.data_spec())
    splits = {"train": train, "valid": valid}
    logits = {name: teacher_logits(loaded.model, seqs.tokens) for name, seqs in splits.items()}
    temperatures = base.lse_temperatures
    table = Table(title=f"stored logits: {ROWS} x {SEQ_LEN} tokens of the default data")
    for column in ("k", "logits", "step", "B/token", "clipped", *_kl_columns(temperatures)):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or Path(tmp)
        for k in TOP_KS:
            reference = None
            for dtype, step in ENCODINGS:
                config = TargetsConfig(
                    **{**vars(base), "top_k": k, "logits_dtype": dtype, "logit_step": step or 0.1}
                )
                path = write_store(folder / f"{k}-{dtype}-{step}", config, loaded, splits, logits)
                info = store_info(path).splits["train"]
                per_token = info.stored_bytes / info.tokens
                buckets = bucket_logprobs(path, temperatures)
                reference = reference or buckets
                kls = [kl(p, q) for p, q in zip(reference, buckets, strict=True)]
                table.add_row(
                    str(k),
                    dtype,
                    f"{step}" if step else "",
                    f"{per_token:,.0f}",
                    _clipped_share(path) if step else "",
                    *[f"{d.mean():.2e} / {d.max():.1e}" for d in kls],
                )
    Console().print(table)


def _kl_columns(temperatures: list[float]) -> list[str]:
    return [f"KL vs f32 T={t:g} (mean / max)" for t in temperatures]


def _clipped_share(store: Path) -> str:
    """The share of stored uint8 logits at the last code (those at or beyond the range)."""
    reader = StoreReader(store)
    codes = reader.read_targets("train", 0)["topk_logits"]
    return f"{(codes == UINT8_LAST_CODE).mean():.1%}"


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
