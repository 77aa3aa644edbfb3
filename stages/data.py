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
DEFAULT_VALID_EVERY = 10  # every 10th pydoc topic (sorted by name) is held out for validation


@dataclass(frozen=True)
class TokenSequences:
    """Right-padded token rows; positions >= length are padding, < prompt_offset are prompt."""

    tokens: np.ndarray  # (n, max_seq_length) int32
    lengths: np.ndarray  # (n,) int32
    prompt_offsets: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class DataSettings:
    source: str
    max_seq_length: int
    num_samples: int
    num_valid_samples: int
    valid_share: float
    seed: int
    mask_prompt: bool = False


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(partial, path)


def ensure_default_data(out_dir: Path = DEFAULT_DATA_DIR) -> Path:
    """Write the pydoc topics as mlx-lm text jsonl (train/valid); deterministic, so idempotent."""
    from pydoc_data.topics import topics

    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{"text": topics[name]} for name in sorted(topics)]
    valid = records[::DEFAULT_VALID_EVERY]
    train = [r for i, r in enumerate(records) if i % DEFAULT_VALID_EVERY]
    write_jsonl_atomic(out_dir / "train.jsonl", train)
    write_jsonl_atomic(out_dir / "valid.jsonl", valid)
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


def load_records(source: str) -> tuple[list[Any] | Any, list[Any] | Any | None]:
    """(train, valid) raw records; valid is None when the source has no validation split."""
    if source == DEFAULT_DATA:
        source = str(ensure_default_data())
    path = Path(source).expanduser()
    if path.is_file():
        return _read_jsonl(path), None
    if path.is_dir():
        train_path, valid_path = path / "train.jsonl", path / "valid.jsonl"
        if not train_path.is_file():
            raise DataError(f"data folder {path} has no train.jsonl")
        valid = _read_jsonl(valid_path) if valid_path.is_file() else None
        return _read_jsonl(train_path), valid or None
    if source.startswith((".", "/", "~")) or source.endswith(".jsonl") or source.count("/") > 1:
        raise DataError(f"data path {source!r} does not exist")
    return _load_hub_records(source)


def _load_hub_records(data_id: str) -> tuple[Any, Any | None]:
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
    valid = next((dataset[name] for name in ("valid", "validation") if name in dataset), None)
    return dataset["train"], valid


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


def _tokenize(records: Any, tokenizer: Any, settings: DataSettings) -> list[tuple[list[int], int]]:
    """One (tokens, prompt_offset) per sequence: text packed into windows, others one each."""
    from mlx_lm.tuner.datasets import TextDataset

    dataset = _mlx_dataset(records, tokenizer, settings.mask_prompt)
    processed = [dataset.process(dataset[i]) for i in range(len(dataset))]
    length = settings.max_seq_length
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


def build_sequences(
    tokenizer: Any, settings: DataSettings
) -> tuple[TokenSequences, TokenSequences]:
    """Deterministic (train, valid) sequences for the same source, tokenizer and settings."""
    train_records, valid_records = load_records(settings.source)
    if valid_records is None:
        train_records, valid_records = _hold_out(train_records, settings)
    train_rows = _tokenize(train_records, tokenizer, settings)
    valid_rows = _tokenize(valid_records, tokenizer, settings)
    _check_enough("train", train_rows, settings.num_samples, settings)
    _check_enough("valid", valid_rows, settings.num_valid_samples, settings)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return (
        _to_arrays(
            _select(train_rows, settings.num_samples, settings.seed),
            settings.max_seq_length,
            pad_id,
        ),
        _to_arrays(
            _select(valid_rows, settings.num_valid_samples, settings.seed + 1),
            settings.max_seq_length,
            pad_id,
        ),
    )


def _hold_out(records: Any, settings: DataSettings) -> tuple[list, list]:
    """Split whole records (never windows of one record) into train and validation."""
    if len(records) == 0:
        raise DataError("the dataset is empty")
    if len(records) < 2:
        raise DataError("the data needs at least 2 records to hold some out for validation")
    order = np.random.default_rng(settings.seed).permutation(len(records)).tolist()
    n_valid = min(len(records) - 1, max(1, round(len(records) * settings.valid_share)))
    return [records[i] for i in order[n_valid:]], [records[i] for i in order[:n_valid]]


def _check_enough(split: str, rows: list, wanted: int, settings: DataSettings) -> None:
    if not rows:
        raise DataError(
            f"the data gives no {split} sequences of {settings.max_seq_length} tokens; "
            "add data or lower max_seq_length"
        )
    if wanted > len(rows):
        raise DataError(
            f"the data gives only {len(rows)} {split} sequences of up to {settings.max_seq_length} "
            f"tokens, fewer than the {wanted} asked for; lower the sample count or add data"
        )
