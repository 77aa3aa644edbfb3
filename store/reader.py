"""Reading a store: sequences, target chunks (checked against their records), and decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from store.errors import StoreCorruptError, StoreError
from store.layout import SEQUENCE_ARRAYS, TARGET_ARRAYS
from store.manifest import ChunkRecord, Manifest, read_manifest, read_records


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class StoreReader:
    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"store {self.path} does not exist; run `dwq-pipeline targets` first")
        self.manifest: Manifest = read_manifest(self.path)
        try:
            self.root = zarr.open_group(
                zarr.storage.LocalStore(self.path, read_only=True), mode="r"
            )
        except Exception as exc:  # zarr raises several kinds for a broken group
            raise StoreCorruptError(f"store {self.path} cannot be opened by zarr: {exc}") from exc
        self._records: dict[str, dict[int, ChunkRecord]] | None = None

    def records(self, refresh: bool = False) -> dict[str, dict[int, ChunkRecord]]:
        if self._records is None or refresh:
            self._records = read_records(self.path, self.manifest)
        return self._records

    def sequences(self, split: str) -> dict[str, np.ndarray]:
        return {name: self.root[split][name][...] for name in SEQUENCE_ARRAYS}

    def read_targets(self, split: str, chunk: int, verify: bool = True) -> dict[str, np.ndarray]:
        """A chunk's stored target arrays (logits in their stored dtype), checksum-verified."""
        from store.writer import array_checksum

        start, stop = self.manifest.splits[split].chunk_rows_range(chunk)
        try:
            values = {name: self.root[split][name][start:stop] for name in TARGET_ARRAYS}
        except Exception as exc:  # a truncated or garbled chunk fails in the codec
            raise StoreCorruptError(
                f"chunk {split}/{chunk} cannot be decoded ({type(exc).__name__}); "
                "re-run `dwq-pipeline targets` to recompute it"
            ) from exc
        if verify:
            record = self.records()[split].get(chunk)
            if record is None:
                raise StoreCorruptError(f"chunk {split}/{chunk} is not complete in {self.path}")
            for name, expected in record.checksums.items():
                if array_checksum(values[name]) != expected:
                    raise StoreCorruptError(
                        f"chunk {split}/{chunk} {name} fails its checksum; "
                        "re-run `dwq-pipeline targets` to recompute it"
                    )
        return values

    def logits_as_float32(self, split: str, stored: np.ndarray) -> np.ndarray:
        if self.manifest.splits[split].logits_dtype == "bfloat16":
            return bfloat16_bits_to_float32(stored)
        return stored.astype(np.float32)
