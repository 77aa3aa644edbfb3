"""The manifest: what made a store and how it is laid out. Frozen, versioned, checked on load.

`manifest.json` at the store root holds everything fixed at creation. Completion is recorded per
chunk in `records/<split>/<chunk>.json` (see `ChunkRecord`), so several writers never contend for
one file; together they are the manifest's chunk table.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from store.durable import write_json_atomic
from store.errors import ManifestError, ManifestUnreadable, StoreOutdatedError
from store.layout import LOGIT_DTYPES, SPLITS, SplitShape
from store.location import StoreLocation

# 2: `tail_logsumexp` replaced the full-vocabulary `logsumexp`, whose tail was not exact under
# rounded logits. Older manifests still parse (so a store can be recognised and replaced), but
# their arrays are refused by `check_current`.
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
RECORDS_DIR = "records"
# Refuse sizes that no real store has, before anything is allocated from them.
MAX_ROWS = 1 << 26
MAX_SEQ_LEN = 1 << 20
MAX_TOP_K = 1 << 22
MAX_TEMPERATURES = 64


@dataclass(frozen=True)
class Manifest:
    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    splits: dict[str, SplitShape]
    producer: str = "dwq-pipeline"
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["arrays"] = {name: shape.array_specs() for name, shape in self.splits.items()}
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> Manifest:
        if not isinstance(raw, dict):
            raise ManifestError("manifest is not a JSON object")
        version = raw.get("schema_version")
        if not isinstance(version, int):
            raise ManifestError("manifest has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise ManifestError(
                f"store was written by a newer dwq-pipeline (manifest schema {version}, this one "
                f"reads up to {SCHEMA_VERSION}); upgrade dwq-pipeline"
            )
        known = {f for f in cls.__dataclass_fields__} | {"arrays"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ManifestError(f"manifest has unknown keys: {', '.join(unknown)}")
        missing = sorted(set(cls.__dataclass_fields__) - set(raw))
        if missing:
            raise ManifestError(f"manifest lacks keys: {', '.join(missing)}")
        for key in ("teacher", "tokenizer", "data", "settings", "splits"):
            if not isinstance(raw[key], dict):
                raise ManifestError(f"manifest field {key!r} must be an object")
        splits = {name: _parse_split(name, value) for name, value in raw["splits"].items()}
        manifest = cls(
            teacher=raw["teacher"],
            tokenizer=raw["tokenizer"],
            data=raw["data"],
            settings=raw["settings"],
            splits=splits,
            producer=str(raw["producer"]),
            schema_version=version,
        )
        current = version == SCHEMA_VERSION  # an older array table has other names
        if current and "arrays" in raw and raw["arrays"] != manifest.to_dict()["arrays"]:
            raise ManifestError("manifest's array table does not match its split sizes")
        return manifest

    def check_current(self, where: object) -> None:
        """Refuse a store of an older schema, whose target arrays this version does not read."""
        if self.schema_version < SCHEMA_VERSION:
            raise StoreOutdatedError(
                f"store {where} was written by an older dwq-pipeline (manifest schema "
                f"{self.schema_version}, this one reads {SCHEMA_VERSION}: the tail mass is now "
                "stored exactly); rebuild it with `dwq-pipeline targets --overwrite` and the "
                "config that made it"
            )

    @functools.cached_property
    def digest(self) -> str:
        """Identity of the store's content; every chunk record carries it."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def differences(self, other: Manifest) -> list[str]:
        """Human-readable list of what differs in the inputs and settings that made the stores."""
        mine, theirs = self.to_dict(), other.to_dict()
        out: list[str] = []
        for section in ("teacher", "tokenizer", "data", "settings", "splits"):
            _differing_leaves(section, mine[section], theirs[section], out)
        return out


def describe_differences(differences: list[str], shown: int = 4) -> str:
    """The first few differences in full, and how many more there are."""
    more = len(differences) - shown
    return "; ".join(differences[:shown]) + (f"; and {more} more" if more > 0 else "")


def _differing_leaves(path: str, a: Any, b: Any, out: list[str]) -> None:
    """'splits.train.vocab_size: 384 != 512', down to the field that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                _differing_leaves(f"{path}.{key}", a.get(key), b.get(key), out)
        return
    out.append(f"{path}: {_contrast(a, b)}")


def _contrast(a: Any, b: Any, width: int = 40) -> str:
    """Both values, each cut to `width` around where they first differ (never before it)."""
    texts = [json.dumps(v, sort_keys=True) for v in (a, b)]
    first = next(
        (i for i, (x, y) in enumerate(zip(*texts, strict=False)) if x != y),
        min(map(len, texts)),
    )
    start = max(0, first - width // 2)

    def cut(text: str) -> str:
        part = text[start : start + width]
        return ("..." if start else "") + part + ("..." if start + width < len(text) else "")

    return f"{cut(texts[0])} != {cut(texts[1])}"


def _parse_split(name: str, raw: Any) -> SplitShape:
    if name not in SPLITS:
        raise ManifestError(f"manifest names an unknown split {name!r}")
    if not isinstance(raw, dict) or set(raw) != set(SplitShape.__dataclass_fields__):
        raise ManifestError(f"manifest split {name!r} has the wrong fields")
    limits = {
        "num_sequences": MAX_ROWS,
        "seq_len": MAX_SEQ_LEN,
        "top_k": MAX_TOP_K,
        "vocab_size": 1 << 32,
        "num_temperatures": MAX_TEMPERATURES,
        "chunk_rows": MAX_ROWS,
    }
    for key, limit in limits.items():
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ManifestError(f"manifest split {name!r}: {key}={value!r} is out of range")
    if raw["seq_len"] < 2 or raw["top_k"] > raw["vocab_size"]:
        raise ManifestError(f"manifest split {name!r}: inconsistent seq_len/top_k/vocab_size")
    if raw["logits_dtype"] not in LOGIT_DTYPES:
        raise ManifestError(
            f"manifest split {name!r}: unknown logits dtype {raw['logits_dtype']!r}"
        )
    return SplitShape(**raw)


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
    manifest: str  # Manifest.digest() of the store it was written for
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


def as_location(store: StoreLocation | Path | str) -> StoreLocation:
    return store if isinstance(store, StoreLocation) else StoreLocation(store)


def read_manifest(store: StoreLocation | Path | str) -> Manifest:
    location = as_location(store)
    raw_bytes = location.read_bytes(MANIFEST_FILE)
    if raw_bytes is None:
        raise ManifestUnreadable(
            f"{location} has no {MANIFEST_FILE}: not a dwq-pipeline store, or a partial copy "
            "(copy it again, or re-run `dwq-pipeline targets` with its config to repair it)"
        )
    try:
        raw = json.loads(raw_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestUnreadable(
            f"{location}/{MANIFEST_FILE} is unreadable ({type(exc).__name__}); re-run "
            "`dwq-pipeline targets` with the store's config to repair it"
        ) from exc
    return Manifest.from_dict(raw)


def write_manifest(store_path: Path, manifest: Manifest) -> None:
    write_json_atomic(store_path / MANIFEST_FILE, manifest.to_dict())


def record_key(split: str, chunk: int) -> str:
    return f"{RECORDS_DIR}/{split}/{chunk:08d}.json"


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
    location = as_location(store)
    out: dict[str, dict[int, ChunkRecord]] = {}
    for split in manifest.splits:
        keys = sorted(
            k for k in location.keys_under(f"{RECORDS_DIR}/{split}") if k.endswith(".json")
        )
        found: dict[int, ChunkRecord] = {}
        for raw in location.read_many(keys).values():
            record = parse_record(raw, split, manifest)
            if record is not None:
                found[record.chunk] = record
        out[split] = found
    return out
