"""The manifest: what made a store and how it is laid out. Frozen, versioned, checked on load.

`manifest.json` at the store root holds everything fixed at creation; which chunks are done is
recorded apart, per chunk (store/records.py). Reading and writing the manifest file stays here:
the checks it is read with (an unreadable file is named as such, a newer schema refused) are the
schema's own.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from store.durable import write_json_atomic
from store.errors import ManifestError, ManifestUnreadable, StoreOutdatedError
from store.layout import LOGIT_DTYPES, MANIFEST_FILE, STEPPED_DTYPES, STORE_SPLITS, SplitShape
from store.location import StoreLocation, open_location

# 2: `tail_logsumexp` replaced the full-vocabulary `logsumexp`, whose tail was not exact under
# rounded logits. Older manifests still parse (so a store can be recognised and replaced), but
# their arrays are refused by `check_current`.
SCHEMA_VERSION = 2
# Refuse sizes that no real store has, before anything is allocated from them.
MAX_ROWS = 1 << 26
MAX_SEQ_LEN = 1 << 20
MAX_TOP_K = 1 << 22
MAX_TEMPERATURES = 64
# Each draw searches 256 columns: at 1,024 draws a 151,936-token position takes ~15 ms to sample
# and stores ~1.5 kB, as much as a top-1024.
MAX_TAIL_SAMPLES = 1024


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
        out["splits"] = {name: shape.to_dict() for name, shape in self.splits.items()}
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
        _check_sampling(raw["settings"], splits)
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
    if name not in STORE_SPLITS:
        raise ManifestError(f"manifest names an unknown split {name!r}")
    fields = set(SplitShape.__dataclass_fields__)
    optional = {"logit_step", "tail_samples"}
    if not isinstance(raw, dict) or not fields - optional <= set(raw) <= fields:
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
            f"manifest split {name!r}: unknown logits dtype {raw['logits_dtype']!r} (this "
            f"dwq-pipeline reads {', '.join(LOGIT_DTYPES)}; a newer one may read it)"
        )
    _check_logit_step(name, raw)
    samples = raw.get("tail_samples", 0)
    if isinstance(samples, bool) or not isinstance(samples, int):
        samples = -1  # out of range below
    if not 0 <= samples <= MAX_TAIL_SAMPLES:
        shown = raw.get("tail_samples")
        raise ManifestError(f"manifest split {name!r}: tail_samples={shown!r} is out of range")
    if samples and raw["top_k"] == raw["vocab_size"]:
        raise ManifestError(f"manifest split {name!r}: tail samples without a tail (top_k=vocab)")
    return SplitShape(**raw)


def _check_sampling(settings: dict, splits: dict[str, SplitShape]) -> None:
    """Splits with tail samples: every split has the same number, and the settings name the
    temperature they were drawn at, one of the stored tail's temperatures."""
    counts = {shape.tail_samples for shape in splits.values()}
    if counts == {0}:
        return
    if len(counts) > 1:
        raise ManifestError(f"manifest splits disagree on tail_samples ({sorted(counts)})")
    at, stored = settings.get("sample_temperature"), settings.get("lse_temperatures")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not isinstance(stored, list):
        raise ManifestError(f"manifest settings: sample_temperature={at!r} is not a number")
    if at not in stored:
        raise ManifestError(
            f"manifest settings: sample_temperature={at!r} is not among lse_temperatures"
        )


def _check_logit_step(name: str, raw: dict) -> None:
    """A positive finite step for the dtypes that have one (uint8), none for the others."""
    step = raw.get("logit_step")
    if raw["logits_dtype"] not in STEPPED_DTYPES:
        if step is not None:
            raise ManifestError(
                f"manifest split {name!r}: {raw['logits_dtype']} logits have no logit_step"
            )
    elif not isinstance(step, (int, float)) or isinstance(step, bool) or not 1e-6 < step < 1e3:
        raise ManifestError(f"manifest split {name!r}: logit_step={step!r} is out of range")


def read_manifest(store: StoreLocation | Path | str) -> Manifest:
    location = open_location(store)
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
