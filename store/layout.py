"""The store's layout: key names, array names, shapes, chunking, codecs and every stored
encoding. One place for all of it.

A store is a Zarr v3 group with one subgroup per split (`train`, `valid`). Each split holds
`num_sequences` rows of `seq_len` tokens; the teacher sees tokens[:, :-1], so target arrays have
`positions = seq_len - 1` entries per row. Every array is chunked along rows only, `chunk_rows` rows
a chunk, so one chunk index names the same rows in every array.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass

import numpy as np

STORE_SPLITS = ("train", "valid")

# Keys at the store root, beside the split groups.
MANIFEST_FILE = "manifest.json"
RECORDS_DIR = "records"  # records/<split>/<chunk>.json: one per completed chunk
LOCKS_DIR = "locks"  # shard locks; never copied, packed or uploaded
ZARR_GROUP_FILE = "zarr.json"
SCHEMA_ATTR = "dwq_pipeline_schema"  # in the root group's attributes; also the mark of old stores
# A store folder's own entries: all that --overwrite ever deletes from it.
STORE_ENTRIES = (MANIFEST_FILE, ZARR_GROUP_FILE, RECORDS_DIR, LOCKS_DIR, *STORE_SPLITS)

# The delta filter below is a numcodecs codec: zarr warns that it is outside the v3 spec each time
# an array using it is opened. Matched by its message only, so every other warning still shows.
warnings.filterwarnings(
    "ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning
)

# Arrays written once when the store is created, and arrays written chunk by chunk by the teacher.
SEQUENCE_ARRAYS = ("tokens", "lengths", "prompt_offsets")
TARGET_ARRAYS = ("topk_logits", "topk_indices", "tail_logsumexp")
# Arrays of stores with sampled tails (SplitShape.tail_samples > 0), beside TARGET_ARRAYS.
SAMPLED_ARRAYS = ("tail_samples", "tail_entropy")
# Arrays of stores of earlier schemas (schema 1's tail): still their own files, for --overwrite.
EARLIER_ARRAYS = ("logsumexp",)
_ANY_ARRAY = "|".join(SEQUENCE_ARRAYS + TARGET_ARRAYS + SAMPLED_ARRAYS + EARLIER_ARRAYS)


def is_store_key(key: str) -> bool:
    """Is `key` (relative to a store folder; a folder's key ends with '/') one of the entries a
    store of this layout holds: its group and array metadata, chunk files of its arrays,
    chunk records, shard locks? All that --overwrite ever deletes from a store folder."""
    return bool(_STORE_KEY.fullmatch(key))


_STORE_KEY = re.compile(
    "|".join(
        [
            r"(manifest\.json|zarr\.json|\.dwq-pipeline\.json)",
            r"(records|locks)/",
            rf"records/({'|'.join(STORE_SPLITS)})/(\d{{8}}\.json)?",
            r"locks/[^/]+\.lock",
            rf"({'|'.join(STORE_SPLITS)})/(zarr\.json)?",
            rf"({'|'.join(STORE_SPLITS)})/({_ANY_ARRAY})/"
            r"(zarr\.json|c/(\d+/)*\d*)?",
        ]
    )
)

# bfloat16 has no numpy dtype: its bit pattern is stored as uint16 and viewed back on read.
# uint8: codes below the position's largest logit, `logit_step` apart (see encode_logits).
LOGIT_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32", "uint8": "uint8"}
STEPPED_DTYPES = ("uint8",)  # the logit dtypes whose stores record a logit_step
UINT8_LAST_CODE = 255  # a logit 255 steps or more below its position's largest is stored as 255


def sequences_digest(sequences: dict[str, np.ndarray]) -> str:
    """Digest of a split's sequence arrays, as recorded in the manifest's `data` section."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name in SEQUENCE_ARRAYS:
        digest.update(np.ascontiguousarray(sequences[name]).tobytes())
    return digest.hexdigest()


def records_dir(split: str) -> str:
    return f"{RECORDS_DIR}/{split}"


def record_key(split: str, chunk: int) -> str:
    return f"{records_dir(split)}/{chunk:08d}.json"


def chunk_key(split: str, array: str, chunk: int, ndim: int) -> str:
    """Store key of a row chunk under zarr v3's default chunk key encoding."""
    return "/".join([split, array, "c", str(chunk), *(["0"] * (ndim - 1))])


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as MLX's astype(bfloat16) does, and keep the 16-bit pattern."""
    bits = values.astype(np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_logits(
    values: np.ndarray, logits_dtype: str, logit_step: float | None = None
) -> np.ndarray:
    """Logits as stored in `logits_dtype` (bfloat16 as its bit pattern). uint8: each position's
    logits (the last axis, holding its largest) as round((largest - logit) / logit_step), the
    ones beyond the last code clipped to it."""
    if logits_dtype == "bfloat16":
        return float32_to_bfloat16_bits(values)
    if logits_dtype == "uint8":
        below_largest = values.max(axis=-1, keepdims=True) - values
        codes = np.rint(below_largest / np.float32(_step(logit_step)))
        return np.clip(codes, 0, UINT8_LAST_CODE).astype(np.uint8)
    return values.astype(LOGIT_DTYPES[logits_dtype])


def decode_logits(
    stored: np.ndarray, logits_dtype: str, logit_step: float | None = None
) -> np.ndarray:
    """Stored logits back as float32; uint8 codes as logits relative to the position's largest
    (which decodes to 0): only differences within a position survive, all a softmax needs."""
    if logits_dtype == "bfloat16":
        return bfloat16_bits_to_float32(stored)
    if logits_dtype == "uint8":
        return stored.astype(np.float32) * -np.float32(_step(logit_step))
    return stored.astype(np.float32)


def logits_as_read(
    values: np.ndarray, logits_dtype: str, logit_step: float | None = None
) -> np.ndarray:
    """Float32 logits as a reader gets them back after storing in `logits_dtype`."""
    stored = encode_logits(values, logits_dtype, logit_step)
    return decode_logits(stored, logits_dtype, logit_step)


def _step(logit_step: float | None) -> float:
    if logit_step is None or not logit_step > 0:
        raise ValueError(f"uint8 logits need a positive logit_step (got {logit_step})")
    return logit_step


@dataclass(frozen=True)
class SplitShape:
    num_sequences: int
    seq_len: int
    top_k: int
    vocab_size: int
    num_temperatures: int
    chunk_rows: int
    logits_dtype: str
    logit_step: float | None = None  # uint8 logits only; absent from the manifest otherwise
    tail_samples: int = 0  # ids drawn from the tail per position; absent from the manifest if 0

    def to_dict(self) -> dict:
        """As in the manifest: without logit_step where the dtype has none and without
        tail_samples where there are none (as before those settings)."""
        out = asdict(self)
        if self.logit_step is None:
            del out["logit_step"]
        if not self.tail_samples:
            del out["tail_samples"]
        return out

    @property
    def target_arrays(self) -> tuple[str, ...]:
        """The arrays the teacher writes chunk by chunk."""
        return TARGET_ARRAYS + (SAMPLED_ARRAYS if self.tail_samples else ())

    @property
    def positions(self) -> int:
        return self.seq_len - 1

    @property
    def num_chunks(self) -> int:
        return -(-self.num_sequences // self.chunk_rows)

    def chunk_rows_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_sequences)

    @property
    def index_dtype(self) -> str:
        return "uint16" if self.vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"

    def encode_targets(self, targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A chunk's target arrays in their stored dtypes, from float32 logits, integer indices
        and tail values (rows unchanged)."""
        return {
            "topk_logits": encode_logits(
                targets["topk_logits"], self.logits_dtype, self.logit_step
            ),
            "topk_indices": targets["topk_indices"].astype(self.index_dtype),
            "tail_logsumexp": targets["tail_logsumexp"].astype(np.float32),
            **(
                {
                    "tail_samples": np.sort(targets["tail_samples"], axis=-1).astype(
                        self.index_dtype
                    ),
                    "tail_entropy": targets["tail_entropy"].astype(np.float32),
                }
                if self.tail_samples
                else {}
            ),
        }

    def decode_logits(self, stored: np.ndarray) -> np.ndarray:
        """Stored top-k logits back as float32 (see decode_logits)."""
        return decode_logits(stored, self.logits_dtype, self.logit_step)

    def array_specs(self) -> dict[str, dict]:
        """name -> {shape, chunks, dtype, codecs} for every array of the split."""
        n, c, p, k = self.num_sequences, self.chunk_rows, self.positions, self.top_k
        specs = {
            "tokens": _spec((n, self.seq_len), (c, self.seq_len), "int32", _zstd(4, "shuffle")),
            "lengths": _spec((n,), (c,), "int32", _zstd(4, "shuffle")),
            "prompt_offsets": _spec((n,), (c,), "int32", _zstd(4, "shuffle")),
            "topk_logits": _spec(
                (n, p, k),
                (c, p, k),
                LOGIT_DTYPES[self.logits_dtype],
                _zstd(np.dtype(LOGIT_DTYPES[self.logits_dtype]).itemsize, "bitshuffle"),
            ),
            # Indices are sorted per position, so deltas are small and compress well.
            "topk_indices": _spec(
                (n, p, k),
                (c, p, k),
                self.index_dtype,
                {"filters": "delta", **_zstd(np.dtype(self.index_dtype).itemsize, "shuffle")},
            ),
            # Per temperature T: log-sum-exp of logits / T outside the top-k, shifted by the head's
            # rounding (see stages/targets.py), so [stored head / T, tail] has the exact tail mass.
            "tail_logsumexp": _spec(
                (n, p, self.num_temperatures),
                (c, p, self.num_temperatures),
                "float32",
                _zstd(4, "shuffle"),
            ),
        }
        if self.tail_samples:
            s = self.tail_samples
            # Ids drawn from the teacher's distribution outside the top-k, sorted per position
            # (repeats kept: an id's count is how often it was drawn), and that distribution's
            # entropy, at the store's sample_temperature (see stages/targets.py).
            specs["tail_samples"] = _spec(
                (n, p, s),
                (c, p, s),
                self.index_dtype,
                {"filters": "delta", **_zstd(np.dtype(self.index_dtype).itemsize, "shuffle")},
            )
            specs["tail_entropy"] = _spec((n, p), (c, p), "float32", _zstd(4, "shuffle"))
        return specs


def _spec(shape: tuple, chunks: tuple, dtype: str, codec: dict) -> dict:
    return {"shape": list(shape), "chunks": list(chunks), "dtype": dtype, "codec": codec}


def _zstd(typesize: int, shuffle: str) -> dict:
    return {"cname": "zstd", "clevel": 3, "shuffle": shuffle, "typesize": typesize}


def zarr_codec_args(spec: dict) -> dict:
    """Turn a spec's codec description into zarr.create_array keyword arguments."""
    from zarr.codecs import BloscCodec

    codec = dict(spec["codec"])
    filters = codec.pop("filters", None)
    args: dict = {"compressors": [BloscCodec(**codec)]}
    if filters == "delta":
        try:
            from zarr.codecs.numcodecs import Delta  # zarr >= 3.1.3
        except ImportError:
            from numcodecs.zarr3 import Delta

        args["filters"] = [Delta(dtype=spec["dtype"])]
    return args
