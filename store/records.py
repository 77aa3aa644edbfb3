"""Chunk records: which chunks of a store are done, and the checksums they were written with.

Completion is recorded per chunk in `records/<split>/<chunk>.json`, written only after the chunk's
data is durable, so several writers never contend for one file; together they are the manifest's
chunk table. A record names the manifest it was written for: one of another manifest (a store
rebuilt, or mixed up by a copy) does not count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from store.durable import write_json_atomic
from store.errors import ManifestError
from store.layout import record_key, records_dir
from store.location import StoreLocation, open_location
from store.manifest import Manifest


def array_checksum(values: np.ndarray) -> str:
    """What a chunk record keeps per array: a digest of dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{values.dtype.str}{values.shape}".encode())
    digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ChunkRecord:
    """One completed chunk: written only after its data is durable."""

    split: str
    chunk: int
    shard: str
    manifest: str  # Manifest.digest of the store it was written for
    checksums: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> ChunkRecord:
        try:
            record = cls(
                split=str(raw["split"]),
                chunk=int(raw["chunk"]),
                shard=str(raw["shard"]),
                manifest=str(raw["manifest"]),
                checksums={str(k): str(v) for k, v in raw["checksums"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"malformed chunk record: {exc}") from exc
        return record


def record_path(store_path: Path, split: str, chunk: int) -> Path:
    return store_path / record_key(split, chunk)


def write_record(store_path: Path, record: ChunkRecord) -> None:
    path = record_path(store_path, record.split, record.chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record.to_dict())


def parse_record(raw: bytes | None, split: str, manifest: Manifest) -> ChunkRecord | None:
    """The record in `raw` if it is whole, of `split`, in range and of this manifest; else None
    (a torn or vanished record, or one written for another manifest: the chunk is not done)."""
    try:
        record = ChunkRecord.from_dict(json.loads(raw))
    except (TypeError, json.JSONDecodeError, UnicodeDecodeError, ManifestError):
        return None
    in_range = record.split == split and 0 <= record.chunk < manifest.splits[split].num_chunks
    return record if in_range and record.manifest == manifest.digest else None


def read_records(
    store: StoreLocation | Path | str, manifest: Manifest
) -> dict[str, dict[int, ChunkRecord]]:
    """split -> chunk -> record, for every readable record of this manifest's chunks.

    A torn record, or one written for another manifest (a store rebuilt or mixed up by a copy),
    does not count: its chunk is not done."""
    location = open_location(store)
    out: dict[str, dict[int, ChunkRecord]] = {}
    for split in manifest.splits:
        keys = sorted(k for k in location.keys_under(records_dir(split)) if k.endswith(".json"))
        found: dict[int, ChunkRecord] = {}
        for raw in location.read_many(keys).values():
            record = parse_record(raw, split, manifest)
            if record is not None:
                found[record.chunk] = record
        out[split] = found
    return out


def chunks_for_shard(num_chunks: int, index: int, count: int) -> list[int]:
    """Round-robin assignment: shards are disjoint and together cover every chunk."""
    return list(range(index, num_chunks, count))


def missing_chunks(
    num_chunks: int, done: Iterable[int], shard_index: int = 0, shard_count: int = 1
) -> list[int]:
    """The chunks of shard `shard_index`/`shard_count` not among `done`, in order."""
    done = set(done)
    return [c for c in chunks_for_shard(num_chunks, shard_index, shard_count) if c not in done]
