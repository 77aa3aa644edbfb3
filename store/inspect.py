"""`store info` and `store verify`: summaries and full checksum checks of a store."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from store.errors import StoreCorruptError
from store.reader import StoreReader


@dataclass
class SplitInfo:
    sequences: int
    tokens: int
    chunks_done: int
    chunks_total: int
    stored_bytes: int
    raw_bytes: int


@dataclass
class StoreInfo:
    path: str
    teacher: str
    top_k: int
    logits: str = ""  # the stored logits' encoding: "bfloat16", "uint8 (step 0.1)", ...
    tail_samples: int = 0  # ids sampled from the tail per position (0: none)
    sample_temperature: float | None = None
    splits: dict[str, SplitInfo] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(s.chunks_done == s.chunks_total for s in self.splits.values())


def store_info(path: str | Path, storage_options: dict | None = None) -> StoreInfo:
    reader = StoreReader(path, storage_options)
    manifest = reader.manifest
    records = reader.records()
    info = StoreInfo(
        path=str(reader.location), teacher=str(manifest.teacher.get("name", "?")), top_k=0
    )
    for split, shape in manifest.splits.items():
        info.top_k = shape.top_k
        step = f" (step {shape.logit_step:g})" if shape.logit_step is not None else ""
        info.logits = shape.logits_dtype + step
        info.tail_samples = shape.tail_samples
        info.sample_temperature = manifest.settings.get("sample_temperature")
        lengths = reader.sequences(split, verify=False)["lengths"]
        done_rows = sum(stop - start for start, stop in map(shape.chunk_rows_range, records[split]))
        specs = shape.array_specs()
        raw_bytes = sum(
            _itemsize(specs[name]["dtype"]) * done_rows * math.prod(specs[name]["shape"][1:])
            for name in shape.target_arrays
        )
        stored = sum(
            sum(reader.location.keys_under(f"{split}/{name}").values())
            for name in shape.target_arrays
        )
        info.splits[split] = SplitInfo(
            sequences=shape.num_sequences,
            tokens=int(lengths.sum()),
            chunks_done=len(records[split]),
            chunks_total=shape.num_chunks,
            stored_bytes=stored,
            raw_bytes=raw_bytes,
        )
    return info


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def verify_store(path: str | Path, storage_options: dict | None = None) -> list[str]:
    """Every problem found: chunks missing, undecodable or failing their checksums."""
    reader = StoreReader(path, storage_options)
    records = reader.records()
    problems = []
    for split, shape in reader.manifest.splits.items():
        try:
            reader.sequences(split, verify=True)
        except StoreCorruptError as exc:
            problems.append(f"{split} tokens: {str(exc).split('; ')[0]}")
        for chunk in range(shape.num_chunks):
            if chunk not in records[split]:
                problems.append(f"{split}/{chunk}: not complete")
                continue
            try:
                reader.read_targets(split, chunk, verify=True)
            except StoreCorruptError as exc:
                problems.append(f"{split}/{chunk}: {str(exc).split('; ')[0]}")
    return problems
