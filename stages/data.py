"""Datasets -> deterministic token sequences.

A source is `default` (text that ships with Python, `pydoc_data.topics`), a jsonl file, a folder
with train.jsonl / valid.jsonl, or a Hugging Face dataset id. Records are in mlx-lm's text, chat or
completions formats and are tokenized by mlx-lm's own dataset classes (chat template and prompt
masking included). Plain text is packed into full windows; chat and completions records become one
sequence each, so their prompt offsets stay meaningful.
"""

from __future__ import annotations

import json
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import DataError

DEFAULT_DATA = "default"
DEFAULT_DATA_DIR = Path("artifacts/data/pydoc")
# Of the distinct pydoc topic texts (by name), every 10th is held out for validation and every
# 10th from the 6th on for testing (`eval`): evaluation text is seen neither by tuning nor its
# validation.
HELD_OUT_EVERY = 10
VALID_AT, TEST_AT = 0, 5
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class TokenSequences:
    """Right-padded token rows; positions >= length are padding, < prompt_offset are prompt."""

    tokens: np.ndarray  # (n, max_seq_length) int32
    lengths: np.ndarray  # (n,) int32
    prompt_offsets: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def loss_mask(self) -> np.ndarray:
        """(n, max_seq_length - 1) bool: position p predicts token p+1 and counts when
        prompt_offset <= p+1 < length."""
        return loss_mask(self.lengths, self.prompt_offsets, self.tokens.shape[1] - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class DataSpec:
    """Which sequences to build from which source (the data part of a targets config)."""

    source: str
    max_seq_length: int
    num_samples: int
    num_valid_samples: int
    valid_share: float
    seed: int
    mask_prompt: bool = False


def loss_mask(lengths: np.ndarray, offsets: np.ndarray, positions: int) -> np.ndarray:
    """Position p predicts token p+1: it counts when prompt_offset <= p+1 < length."""
    target = np.arange(1, positions + 1)[None, :]
    return (target >= offsets[:, None]) & (target < lengths[:, None])


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(partial, path)


def ensure_default_data(out_dir: Path = DEFAULT_DATA_DIR) -> Path:
    """Write the pydoc topics as mlx-lm text jsonl (train/valid/test); deterministic."""
    from pydoc_data.topics import topics

    out_dir.mkdir(parents=True, exist_ok=True)
    split_of = {VALID_AT: "valid", TEST_AT: "test"}
    records: dict[str, list[dict]] = {name: [] for name in SPLITS}
    # Several topic names share one text: each text goes to exactly one split.
    texts = list(dict.fromkeys(topics[name] for name in sorted(topics)))
    for i, text in enumerate(texts):
        records[split_of.get(i % HELD_OUT_EVERY, "train")].append({"text": text})
    for split, rows in records.items():
        write_jsonl_atomic(out_dir / f"{split}.jsonl", rows)
    return out_dir


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return records


def load_records(source: str) -> dict[str, list[Any] | Any]:
    """Raw records by split: always 'train', 'valid' and 'test' when the source has them."""
    if source == DEFAULT_DATA:
        source = str(ensure_default_data())
    path = Path(source).expanduser()
    if path.is_file():
        return {"train": _read_jsonl(path)}
    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            raise DataError(f"data folder {path} has no train.jsonl")
        found = {split: path / f"{split}.jsonl" for split in SPLITS}
        splits = {split: _read_jsonl(p) for split, p in found.items() if p.is_file()}
        return {split: rows for split, rows in splits.items() if split == "train" or rows}
    if source.startswith((".", "/", "~")) or source.endswith(".jsonl") or source.count("/") > 1:
        raise DataError(f"data path {source!r} does not exist")
    return _load_hub_records(source)


def _load_hub_records(data_id: str) -> dict[str, Any]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{data_id!r} is not a local file or folder; to load it from the Hugging Face hub "
            "install the `datasets` package (pip install datasets)"
        ) from exc
    try:
        dataset = datasets.load_dataset(data_id)
    except Exception as exc:  # datasets raises many kinds for missing/offline ids
        raise DataError(f"cannot load Hugging Face dataset {data_id!r}: {exc}") from exc
    if "train" not in dataset:
        raise DataError(f"Hugging Face dataset {data_id!r} has no train split")
    splits = {"train": dataset["train"]}
    valid = next((dataset[name] for name in ("valid", "validation") if name in dataset), None)
    if valid is not None:
        splits["valid"] = valid
    if "test" in dataset:
        splits["test"] = dataset["test"]
    return splits


def _mlx_dataset(records: Any, tokenizer: Any, mask_prompt: bool) -> Any:
    from mlx_lm.tuner.datasets import create_dataset

    if len(records) == 0:
        raise DataError("the dataset is empty")
    try:
        return create_dataset(records, tokenizer, types.SimpleNamespace(mask_prompt=mask_prompt))
    except ValueError as exc:
        raise DataError(
            "records must be mlx-lm text ({'text'}), chat ({'messages'}) or completions "
            f"({{'prompt','completion'}}) format: {str(exc).splitlines()[0]}"
        ) from exc


def _tokenize(records: Any, tokenizer: Any, spec: DataSpec) -> list[tuple[list[int], int]]:
    """One (tokens, prompt_offset) per sequence: text packed into windows, others one each."""
    from mlx_lm.tuner.datasets import TextDataset

    dataset = _mlx_dataset(records, tokenizer, spec.mask_prompt)
    processed = [dataset.process(dataset[i]) for i in range(len(dataset))]
    length = spec.max_seq_length
    if isinstance(dataset, TextDataset):
        stream = [t for tokens, _ in processed for t in tokens]
        return [(stream[i : i + length], 0) for i in range(0, len(stream) - length + 1, length)]
    return [(list(tokens[:length]), min(offset, length)) for tokens, offset in processed]


def _select(
    rows: list[tuple[list[int], int]], count: int, seed: int
) -> list[tuple[list[int], int]]:
    order = np.random.default_rng(seed).permutation(len(rows))
    chosen = order if count == 0 else order[:count]
    return [rows[i] for i in chosen]


def _to_arrays(
    rows: list[tuple[list[int], int]], max_seq_length: int, pad_id: int
) -> TokenSequences:
    tokens = np.full((len(rows), max_seq_length), pad_id, dtype=np.int32)
    lengths = np.zeros(len(rows), dtype=np.int32)
    offsets = np.zeros(len(rows), dtype=np.int32)
    for i, (row, offset) in enumerate(rows):
        tokens[i, : len(row)] = row
        lengths[i] = len(row)
        offsets[i] = offset
    return TokenSequences(tokens=tokens, lengths=lengths, prompt_offsets=offsets)


def _as_sequences(
    rows: list[tuple[list[int], int]], count: int, seed: int, length: int, tokenizer: Any
) -> TokenSequences:
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return _to_arrays(_select(rows, count, seed), length, pad_id)


def _train_and_valid_records(splits: dict[str, Any], spec: DataSpec) -> tuple[Any, Any]:
    if "valid" in splits:
        return splits["train"], splits["valid"]
    return _hold_out(splits["train"], spec)


def build_sequences(tokenizer: Any, spec: DataSpec) -> tuple[TokenSequences, TokenSequences]:
    """Deterministic (train, valid) sequences for the same source, tokenizer and spec."""
    train_records, valid_records = _train_and_valid_records(load_records(spec.source), spec)
    train_rows = _tokenize(train_records, tokenizer, spec)
    valid_rows = _tokenize(valid_records, tokenizer, spec)
    _check_enough("train", train_rows, spec.num_samples, spec)
    _check_enough("valid", valid_rows, spec.num_valid_samples, spec)
    length = spec.max_seq_length
    return (
        _as_sequences(train_rows, spec.num_samples, spec.seed, length, tokenizer),
        _as_sequences(valid_rows, spec.num_valid_samples, spec.seed + 1, length, tokenizer),
    )


def build_held_out_sequences(
    tokenizer: Any, spec: DataSpec, count: int, seed: int | None = None
) -> tuple[TokenSequences, str]:
    """Sequences tuning never trained on: the source's test split, else its validation split
    (which tuning saw only to pick its best checkpoint). Returns them and the split's name.
    `seed` chooses which `count` of them (default: the spec's seed, which decides the split)."""
    splits = load_records(spec.source)
    split = "test" if "test" in splits else "valid"
    records = splits["test"] if split == "test" else _train_and_valid_records(splits, spec)[1]
    rows = _tokenize(records, tokenizer, spec)
    _check_enough(split, rows, count, spec)
    length = spec.max_seq_length
    chooser = spec.seed if seed is None else seed
    return _as_sequences(rows, count, chooser + 2, length, tokenizer), split


def _hold_out(records: Any, spec: DataSpec) -> tuple[list, list]:
    """Split whole records (never windows of one record) into train and validation."""
    if len(records) == 0:
        raise DataError("the dataset is empty")
    if len(records) < 2:
        raise DataError("the data needs at least 2 records to hold some out for validation")
    order = np.random.default_rng(spec.seed).permutation(len(records)).tolist()
    n_valid = min(len(records) - 1, max(1, round(len(records) * spec.valid_share)))
    return [records[i] for i in order[n_valid:]], [records[i] for i in order[:n_valid]]


def _check_enough(split: str, rows: list, wanted: int, spec: DataSpec) -> None:
    if not rows:
        raise DataError(
            f"the data gives no {split} sequences of {spec.max_seq_length} tokens; "
            "add data or lower max_seq_length"
        )
    if wanted > len(rows):
        raise DataError(
            f"the data gives only {len(rows)} {split} sequences of up to {spec.max_seq_length} "
            f"tokens, fewer than the {wanted} asked for; lower the sample count or add data"
        )
