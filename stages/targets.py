"""Stage one: run the teacher over the data and store its top-k logits in a Zarr store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from stages.data import DEFAULT_DATA, DataSpec, TokenSequences, build_sequences
from stages.distributed import Distributed, peer_lost
from stages.errors import InvalidConfig, ModelError, StageError
from stages.models import (
    DEFAULT_TEACHER,
    LoadedModel,
    load_model,
    output_vocab_size,
    teacher_fingerprint,
    tokenizer_fingerprint,
    whole_weights_digest,
)
from stages.settings import (
    above_limit_problems,
    choice_problems,
    compute_dtype_setting,
    empty_path_problems,
    identity_values,
    representable_problems,
    setting,
    storage_options_setting,
    store_setting,
    trust_remote_code_setting,
)
from store.durable import paths_overlap
from store.layout import (
    LOGIT_DTYPES,
    STEPPED_DTYPES,
    SplitShape,
    logits_as_read,
    sequences_digest,
)
from store.location import VOLATILE_SCHEMES
from store.manifest import (
    MAX_ROWS,
    MAX_SEQ_LEN,
    MAX_TAIL_SAMPLES,
    MAX_TEMPERATURES,
    MAX_TOP_K,
    Manifest,
)
from store.writer import BackgroundWriter, StoreWriter, open_store_for_writing

SPLIT_ORDER = ("valid", "train")  # valid first: a short run already gives tune its validation set
# The sizes a manifest may hold (checked again when a store is read).
TARGETS_LIMITS = {
    "top_k": MAX_TOP_K,
    "tail_samples": MAX_TAIL_SAMPLES,
    "max_seq_length": MAX_SEQ_LEN,
    "num_samples": MAX_ROWS,
    "num_valid_samples": MAX_ROWS,
    "batch_size": MAX_ROWS,
    "chunk_size": MAX_ROWS,
}


# uint8 codes span 255 steps below a position's largest logit: below 1e-3 that is a quarter of a
# nat (everything else clipped), above 1 the head is rounded to whole nats
MIN_LOGIT_STEP, MAX_LOGIT_STEP = 1e-3, 1.0


@dataclass
class TargetsConfig:
    teacher: str = setting(
        "default", "teacher model: 'default' (embedded SmolLM2), a folder or HF id", "--teacher"
    )
    data: str = setting(
        "default", "data: 'default' (pydoc text), a jsonl file, a folder or HF id", "--data"
    )
    store: str = store_setting(
        "where the target store is written: a folder, or a URL (s3://...) uploaded chunk by chunk"
    )
    storage_options: dict[str, Any] = storage_options_setting()
    staging_dir: str = setting(
        "artifacts/staging",
        "for a URL store: local folder where chunks are made before upload",
        identity=False,
    )
    top_k: int = setting(
        16,
        "teacher logits kept per position (1 <= top_k <= vocabulary); with tail_samples, a "
        "small top-k tunes as well as 1024 from a 14x smaller store (README: Store layout)",
        "--top-k",
    )
    max_seq_length: int = setting(256, "tokens per sequence", "--max-seq-length")
    # The same as configs/default.yaml: the embedded data gives 26 validation sequences of 256.
    num_samples: int = setting(48, "training sequences (0 = all the data gives)", "--num-samples")
    num_valid_samples: int = setting(8, "validation sequences (0 = all the data gives)")
    valid_share: float = setting(
        0.1, "share held out for validation when the data has no valid split"
    )
    mask_prompt: bool = setting(
        False, "exclude prompt tokens of chat/completions data from the loss"
    )
    batch_size: int = setting(4, "sequences per teacher forward pass", identity=False)
    chunk_size: int = setting(4, "sequences per store chunk (the unit of resume and sharding)")
    logits_dtype: str = setting(
        "bfloat16",
        "stored logit dtype: bfloat16, float16, float32 or uint8 (8-bit codes below each "
        "position's largest logit, logit_step apart)",
    )
    logit_step: float = setting(
        0.1,
        "uint8 logits: nats between codes (rounding error <= step/2); logits more than 255 "
        "steps below their position's largest are stored at 255 steps",
        identity=False,  # recorded in the store's settings only for uint8 (store_identity)
    )
    lse_temperatures: list[float] = setting(
        [1.0, 2.0],
        "temperatures at which the tail outside the top-k is stored (tail-aware losses need "
        "tune.temperature among them)",
    )
    tail_samples: int = setting(
        64,
        "ids drawn per position from the teacher's distribution outside the top-k, at "
        "sample_temperature (0: none); kl_tail then adds an unbiased estimate of the KL inside "
        "that tail, so a small top-k loses little (~1.5 bytes per sample once compressed)",
        "--tail-samples",
        identity=False,  # recorded in the store's settings only when > 0 (store_identity)
    )
    sample_temperature: float = setting(
        2.0,
        "temperature of the tail samples' distribution: one of lse_temperatures, and tune's "
        "temperature",
        identity=False,  # recorded with tail_samples (store_identity)
    )
    seed: int = setting(123, "seed for the sequence selection and the tail samples")
    trust_remote_code: bool = trust_remote_code_setting()
    compute_dtype: str = compute_dtype_setting()
    pipeline: bool = setting(
        False,
        "under mlx.launch, split the teacher's layers across the ranks (mlx-lm's pipeline: "
        "qwen2, qwen3_moe, qwen3_next, deepseek_v2/v3, glm4_moe, ...) for a teacher bigger than "
        "one machine; rank 0 writes the store, the launch is one shard; one rank: as without "
        "(an architecture without mlx-lm's pipeline is refused there too)",
        "--pipeline",
        identity=False,
    )

    def __post_init__(self) -> None:
        problems = []
        for name in ("top_k", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                problems.append(f"targets.{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_seq_length < 2:
            problems.append(f"targets.max_seq_length must be >= 2 (got {self.max_seq_length})")
        for name in ("num_samples", "num_valid_samples"):
            if getattr(self, name) < 0:
                problems.append(f"targets.{name} must be >= 0 (got {getattr(self, name)})")
        if not 0.0 < self.valid_share < 1.0:
            problems.append(
                f"targets.valid_share must be strictly between 0 and 1 (got {self.valid_share})"
            )
        if self.logits_dtype not in LOGIT_DTYPES:
            problems.append(
                f"targets.logits_dtype must be one of {', '.join(LOGIT_DTYPES)}"
                f" (got {self.logits_dtype!r})"
            )
        if not MIN_LOGIT_STEP <= self.logit_step <= MAX_LOGIT_STEP:
            problems.append(
                f"targets.logit_step must be in [{MIN_LOGIT_STEP}, {MAX_LOGIT_STEP}] nats "
                f"(got {self.logit_step})"
            )
        if not self.lse_temperatures or any(t <= 0 for t in self.lse_temperatures):
            problems.append("targets.lse_temperatures must be a non-empty list of positive numbers")
        if self.seed < 0:
            problems.append(f"targets.seed must be >= 0 (got {self.seed})")
        if self.tail_samples < 0:
            problems.append(f"targets.tail_samples must be >= 0 (got {self.tail_samples})")
        if self.tail_samples and self.sample_temperature not in self.lse_temperatures:
            problems.append(
                f"targets.sample_temperature {self.sample_temperature} must be one of "
                f"targets.lse_temperatures {self.lse_temperatures} (tune needs the tail's mass "
                "at the temperature its samples were drawn at)"
            )
        problems += choice_problems(self, "targets")
        problems += representable_problems(self, "targets")
        problems += empty_path_problems(
            self, "targets", ("teacher", "data", "store", "staging_dir")
        )
        if str(self.store).startswith(VOLATILE_SCHEMES):
            problems.append(
                f"targets.store {self.store}: a memory:// store lives only inside one process "
                "and would be lost at exit; give a folder or an object-store URL"
            )
        problems += above_limit_problems(self, "targets", TARGETS_LIMITS)
        if len(self.lse_temperatures) > MAX_TEMPERATURES:
            problems.append(f"targets.lse_temperatures holds more than {MAX_TEMPERATURES} values")
        if problems:
            raise InvalidConfig(problems)

    def data_spec(self) -> DataSpec:
        return DataSpec(
            source=self.data,
            max_seq_length=self.max_seq_length,
            num_samples=self.num_samples,
            num_valid_samples=self.num_valid_samples,
            valid_share=self.valid_share,
            seed=self.seed,
            mask_prompt=self.mask_prompt,
        )

    def store_identity(self, cast_to: str | None = None) -> dict:
        """The settings that decide the store's content (not where it lives or who computes
        it): the manifest's `settings`. `cast_to`: the dtype the teacher computed in when a cast
        changed it from its own (its logits differ slightly); absent when it computed as stored,
        as in every store made before the setting."""
        kept = identity_values(self)
        if self.logits_dtype in STEPPED_DTYPES:  # absent otherwise, as before the setting
            kept["logit_step"] = self.logit_step
        if self.tail_samples:  # absent otherwise, as before the setting
            kept["tail_samples"] = self.tail_samples
            kept["sample_temperature"] = self.sample_temperature
        return {**kept, "compute_dtype": cast_to} if cast_to else kept

    @property
    def stored_logit_step(self) -> float | None:
        """The step of the stored logits' codes; None for a dtype without one."""
        return self.logit_step if self.logits_dtype in STEPPED_DTYPES else None


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise StageError(f"shard {self.index}/{self.count} is invalid: need 0 <= i < N")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Progress:
    """Reported after each chunk is computed: tokens done and to do in this run."""

    tokens_done: int
    tokens_total: int
    chunks_done: int
    chunks_total: int


def _as_arrays(seqs: TokenSequences) -> dict[str, np.ndarray]:
    return {"tokens": seqs.tokens, "lengths": seqs.lengths, "prompt_offsets": seqs.prompt_offsets}


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=-1, keepdims=True)
    return top[..., 0] + np.log(np.exp(values - top).sum(axis=-1))


@dataclass(frozen=True)
class TailSampling:
    """How many ids to draw per position from the teacher's distribution outside its top-k, at
    which temperature, and each position's uniform offset in [0, 1) (shaped as the logits less
    their vocabulary axis; drawn per chunk, so a store is the same however it is sharded,
    resumed or batched)."""

    count: int
    temperature: float
    offsets: np.ndarray

    def rows(self, start: int, stop: int) -> TailSampling:
        """The same sampling for rows start..stop of the offsets' first axis."""
        return TailSampling(self.count, self.temperature, self.offsets[start:stop])


def topk_targets(
    logits: np.ndarray,
    top_k: int,
    temperatures: list[float],
    logits_dtype: str,
    logit_step: float | None = None,
    sampling: TailSampling | None = None,
) -> dict[str, np.ndarray]:
    """Top-k logits (float32), their indices and the tail's log-sum-exp per temperature, from
    float32 logits; the store keeps the logits in `logits_dtype` (uint8: `logit_step` apart).
    With `sampling`, also ids drawn from the tail (`tail_samples`) and its entropy
    (`tail_entropy`), at the sampling temperature.

    numpy rather than MLX: its exp is several times faster on CPU, and it runs on the store's
    writer thread, off the teacher's critical path."""
    rows = logits.reshape(-1, logits.shape[-1])
    if sampling and (sampling.temperature not in temperatures or top_k >= rows.shape[-1]):
        raise ValueError("tail samples need a tail, and its terms at their temperature")
    if sampling:  # one offset per row of `rows`
        sampling = TailSampling(sampling.count, sampling.temperature, sampling.offsets.reshape(-1))
    parts = _extract_by_rows(rows, top_k, temperatures, sampling)
    indices, values, tails, *sampled = (part.reshape(*logits.shape[:-1], -1) for part in parts)
    as_read = logits_as_read(values, logits_dtype, logit_step)
    shifts = [
        _logsumexp(as_read / t) - _logsumexp(values / t) for t in map(np.float64, temperatures)
    ]
    out = {
        "topk_logits": values,
        "topk_indices": indices,
        # The head's rounding shift makes a softmax over [stored head / T, tail] give the exact
        # tail mass, and a head summing to exactly the rest (the shift is 0 for float32 logits).
        # uint8 heads are read relative to their largest logit: the shift takes it off the tail.
        "tail_logsumexp": tails + np.stack(shifts, -1),
    }
    if sampling:
        out["tail_samples"], out["tail_entropy"] = sampled[0], sampled[1][..., 0]
    return out


# Positions extracted together: 8 rows of a 151,936-token vocabulary (4.9 MB) stay in cache
# through every pass below. The whole chunk at once ran 2.5x slower alone and 4x slower beside
# the teacher's forward (1,020 positions, k=1,024: 1.5 / 3.1 s against 0.61 / 0.79 s, measured
# here); 4 or 32 rows were slower than 8.
ROWS_PER_PASS = 8


def _extract_by_rows(
    rows: np.ndarray, k: int, temperatures: list[float], sampling: TailSampling | None = None
) -> tuple[np.ndarray, ...]:
    """The top-k indices, their logits and the tail log-sum-exps of (positions, vocabulary)
    logits; with `sampling`, then the tail samples and the tail's entropy ([positions, 1])."""
    scratch = np.empty((min(ROWS_PER_PASS, len(rows)), rows.shape[-1]), np.float32)
    terms = np.empty_like(scratch) if sampling else None
    blocks = []
    for start in range(0, len(rows), ROWS_PER_PASS):
        block = rows[start : start + ROWS_PER_PASS]
        indices = _top_k_indices(block, k)
        head = np.take_along_axis(block, indices, axis=-1)
        scaled = scratch[: len(block)]
        kept = (sampling.temperature, terms[: len(block)]) if sampling else None
        found = [indices, head, _tail_logsumexp(block, indices, head, temperatures, scaled, kept)]
        if sampling:
            mine = sampling.rows(start, start + len(block))
            found += _sample_tail(block, indices, head, terms[: len(block)], mine)
        blocks.append(found)
    return tuple(np.concatenate(part) for part in zip(*blocks, strict=True))


def _sample_tail(
    logits: np.ndarray,
    indices: np.ndarray,
    head: np.ndarray,
    terms: np.ndarray,
    sampling: TailSampling,
) -> list[np.ndarray]:
    """[ids drawn from softmax(logits / T) outside `indices`, sorted, per row; that
    distribution's entropy, [rows, 1]], T the sampling temperature, from `terms`:
    exp((logits - the head's smallest) / T), 0 at `indices` (as _tail_logsumexp makes them).

    Systematic sampling: one uniform offset per row, the n draws 1/n apart along the tail's
    cumulative distribution. Each id is drawn n * p times in expectation, as by independent
    draws (so an average over the draws is unbiased), but at most one time more or less than
    that, which independent draws do not bound. Rows whose tail is too light for its float32
    terms (below ROOTED_MASS_MIN of the head's smallest) are drawn again from float64 terms
    shifted by their own largest tail logit."""
    t, n = sampling.temperature, sampling.count
    fractions = (np.arange(n) + sampling.offsets[:, None]) / n
    samples, mass = _systematic_draws(terms, fractions)
    # sum of terms * logits as one BLAS product per row (~1e-7 relative here; 0 at the head)
    weighted = np.matmul(terms[:, None, :], logits[:, :, None])[:, 0]
    shift = head.min(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.maximum(np.log(mass) - (weighted / mass - shift) / t, 0.0)
    light = mass[:, 0] < ROOTED_MASS_MIN
    if light.any():
        samples[light], entropy[light] = _sample_tail_exactly(
            logits[light], indices[light], t, fractions[light]
        )
    return [samples, entropy]


def _sample_tail_exactly(
    logits: np.ndarray, indices: np.ndarray, t: float, fractions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """_sample_tail of a few rows, from float64 terms shifted by each tail's largest logit."""
    scaled = logits.astype(np.float64)
    np.put_along_axis(scaled, indices, -np.inf, axis=-1)
    scaled -= scaled.max(axis=-1, keepdims=True)
    scaled /= t
    terms = np.exp(scaled)
    np.put_along_axis(scaled, indices, 0.0, axis=-1)  # their terms are 0
    samples, mass = _systematic_draws(terms, fractions)
    weighted = (terms * scaled).sum(axis=-1, keepdims=True)
    return samples, np.maximum(np.log(mass) - weighted / mass, 0.0)


# Columns per group of _systematic_draws's two-level search.
SAMPLE_GROUP = 256


def _systematic_draws(terms: np.ndarray, fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(For each row of non-negative `terms` and each of its `fractions` f in [0, 1), the
    column where the running sum first exceeds f * the row's sum; each row's sum, [rows, 1]).

    In two levels: a draw finds its group of SAMPLE_GROUP columns among the rows' running
    group sums, then its column within that group's running sum (a running sum of a whole
    150k-column row took most of the extraction's time). A column of term 0 is never drawn."""
    rows, vocab = terms.shape
    whole = vocab // SAMPLE_GROUP * SAMPLE_GROUP
    sums = [terms[:, :whole].reshape(rows, -1, SAMPLE_GROUP).sum(axis=-1)]
    if whole < vocab:
        sums.append(terms[:, whole:].sum(axis=-1, keepdims=True))
    running = np.cumsum(np.concatenate(sums, axis=-1), axis=-1, dtype=np.float64)
    mass = running[:, -1:]
    targets = np.minimum(fractions * mass, np.nextafter(mass, 0))  # below the end, always
    group = (running[:, None, :] <= targets[..., None]).sum(axis=-1)
    before = np.where(group > 0, np.take_along_axis(running, np.maximum(group - 1, 0), -1), 0.0)
    columns = group[..., None] * SAMPLE_GROUP + np.arange(SAMPLE_GROUP)
    inside = columns < vocab
    within = np.take_along_axis(terms, np.minimum(columns, vocab - 1).reshape(rows, -1), -1)
    within = np.where(inside, within.reshape(columns.shape), 0)
    offset = (np.cumsum(within, axis=-1, dtype=np.float64) <= (targets - before)[..., None]).sum(-1)
    # a draw at its group's very end (the group's sum rounded above its running sum) takes the
    # group's last column of positive term
    last = SAMPLE_GROUP - 1 - np.argmax(within[..., ::-1] > 0, axis=-1)
    return group * SAMPLE_GROUP + np.minimum(offset, last), mass


def _top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of each row of (positions, vocabulary) logits, in no order.

    A wide vocabulary is cut into at least 4k disjoint groups of columns (column c in group
    c mod groups: a strided view whose maxima take one vectorised pass). The k-th largest group
    maximum is reached by at least k logits, one in each of k groups, so no logit of the top k
    is below it: only the logits at or above it are partitioned (~1.15k per position when the
    vocabulary's bulk is alike; all of it at worst, which is still right)."""
    positions, vocab = logits.shape
    if vocab < 8 * k:
        return np.argpartition(logits, -k, axis=-1)[:, -k:]
    length = vocab // (4 * k)
    groups = vocab // length
    group_max = logits[:, : groups * length].reshape(positions, length, groups).max(axis=1)
    if groups * length < vocab:  # the last few columns join the last group
        last = logits[:, groups * length :].max(axis=-1)
        np.maximum(group_max[:, -1], last, out=group_max[:, -1])
    bound = np.partition(group_max, -k, axis=-1)[:, -k, None]
    row, column = _at_or_above(logits, bound)
    found = np.empty((positions, k), np.int64)
    for i, candidates in enumerate(np.split(column, np.searchsorted(row, range(1, positions)))):
        if len(candidates) > k:
            candidates = candidates[np.argpartition(logits[i, candidates], -k)[-k:]]
        found[i] = candidates
    return found


def _at_or_above(logits: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of each logit at or above its row's bound, in row order. The mask is
    expected sparse and is scanned 8 bytes at a time (np.nonzero of the whole mask took 2.2x
    as long here)."""
    size = logits.size
    mask = np.empty(-(-size // 8) * 8, bool)
    mask[size:] = False
    np.greater_equal(logits, bound, out=mask[:size].reshape(logits.shape))
    words = np.flatnonzero(mask.view(np.uint64))
    flat = (words[:, None] * 8 + np.arange(8)).ravel()
    return np.divmod(flat[mask[flat]], logits.shape[-1])


# With a mass of at least 1e-6 at T, the largest term is >= 1e-6 / vocabulary (~7e-12 at 151,936
# tokens); all terms below float32's normal range together then move the root's sum by < 1e-8.
ROOTED_MASS_MIN = 1e-6


def _tail_logsumexp(
    logits: np.ndarray,
    indices: np.ndarray,
    head: np.ndarray,
    temperatures: list[float],
    scratch: np.ndarray | None = None,
    terms_at: tuple[float, np.ndarray] | None = None,
):
    """Per temperature, log-sum-exp of logits / T over the vocabulary outside `indices` (whose
    logits are `head`), summed from the unrounded logits (never as the full sum minus the head:
    that cancels to noise when the head holds nearly all the mass). -inf when the top-k is the
    whole vocabulary.

    In one scratch array of the logits' shape (`scratch`, or a new one), in place: shifted by
    the head's smallest logit, which no tail logit exceeds, so no tail term overflows; the
    head's terms (which may) are then set to 0. A temperature twice the one before it takes the
    square root of that one's terms (exp(x / 2T) = exp(x / T) ** 0.5, a third of the work)
    when those came from exp.
    Positions whose tail underflows (a gap of ~87 T below the head), or whose terms at T were
    too small to root precisely, are summed again shifted by their own largest tail logit.
    `terms_at` (T, array): the terms at T are copied into the array."""
    if indices.shape[-1] == logits.shape[-1]:
        return np.full((*logits.shape[:-1], len(temperatures)), -np.inf)
    shift = head.min(axis=-1, keepdims=True)
    scaled = np.empty_like(logits) if scratch is None else scratch
    tails, previous, previous_mass, previous_rooted = [], None, None, False
    for t in temperatures:
        # only from exp's terms: a root of a root would lose what underflowed two levels down
        rooted = previous is not None and t == 2 * previous and not previous_rooted
        if rooted:
            np.sqrt(scaled, out=scaled)
        else:
            np.subtract(logits, shift, out=scaled)
            if t != 1:
                scaled *= np.float32(1 / t)
            with np.errstate(over="ignore"):
                np.exp(scaled, out=scaled)
            np.put_along_axis(scaled, indices, 0.0, axis=-1)
        if terms_at and terms_at[0] == t:
            np.copyto(terms_at[1], scaled)
        mass = scaled.sum(axis=-1)  # float32, pairwise: ~1e-6 relative, as stored
        with np.errstate(divide="ignore"):
            tail = shift[..., 0] / np.float64(t) + np.log(mass, dtype=np.float64)
        redo = mass < np.finfo(np.float32).tiny
        if rooted:  # terms below float32's normal range (of a mass < 1e-6) lose precision
            redo |= previous_mass < ROOTED_MASS_MIN
        if redo.any():
            tail[redo] = _tail_by_its_maximum(logits[redo], indices[redo], t)
        tails.append(tail)
        previous, previous_mass, previous_rooted = t, mass, rooted
    return np.stack(tails, -1)


def _tail_by_its_maximum(logits: np.ndarray, indices: np.ndarray, t: float) -> np.ndarray:
    """_tail_logsumexp of a few (position, vocabulary) rows, shifted by each tail's maximum."""
    rest = logits.astype(np.float64)
    np.put_along_axis(rest, indices, -np.inf, axis=-1)
    return _logsumexp(rest / t)


def teacher_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Float32 logits for tokens[:, :-1]: position p predicts token p+1. A read-only view of
    MLX's buffer (a copy of 150k-vocabulary logits costs a fair part of the forward here)."""
    logits = model(mx.array(tokens[:, :-1])).astype(mx.float32)
    mx.eval(logits)
    view = np.asarray(memoryview(logits))
    view.flags.writeable = False
    return view


def _all_finite(values: np.ndarray) -> bool:
    """No NaN or inf: a NaN makes the maximum NaN, an inf the maximum or minimum infinite."""
    return bool(np.isfinite(values.max(axis=-1)).all() and np.isfinite(values.min(axis=-1)).all())


def _check_against_model(config: TargetsConfig, vocab_size: int, train: TokenSequences) -> None:
    problems = []
    if config.top_k > vocab_size:
        problems.append(f"top_k={config.top_k} exceeds the teacher's vocabulary of {vocab_size}")
    elif config.tail_samples and config.top_k == vocab_size:
        problems.append(
            f"tail_samples needs a tail: top_k={config.top_k} is the teacher's whole vocabulary "
            "(--tail-samples 0 keeps it exact)"
        )
    if len(train) < config.batch_size:
        problems.append(
            f"only {len(train)} training sequences, fewer than one batch of {config.batch_size}"
        )
    if problems:
        raise StageError("; ".join(problems))


def build_manifest(
    config: TargetsConfig,
    teacher: dict,
    tokenizer: dict,
    vocab_size: int,
    splits: dict[str, TokenSequences],
    cast_to: str | None = None,
) -> Manifest:
    shapes = {
        name: SplitShape(
            num_sequences=len(seqs),
            seq_len=config.max_seq_length,
            top_k=config.top_k,
            vocab_size=vocab_size,
            num_temperatures=len(config.lse_temperatures),
            chunk_rows=config.chunk_size,
            logits_dtype=config.logits_dtype,
            logit_step=config.stored_logit_step,
            tail_samples=config.tail_samples,
        )
        for name, seqs in splits.items()
    }
    data = {f"{name}_digest": sequences_digest(_as_arrays(seqs)) for name, seqs in splits.items()}
    return Manifest(
        teacher=teacher,
        tokenizer=tokenizer,
        data=data,
        settings=config.store_identity(cast_to),
        splits=shapes,
    )


def compute_targets(
    config: TargetsConfig,
    shard: Shard = Shard(),
    overwrite: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    on_repair: Callable[[str], None] | None = None,
) -> Manifest | None:
    """Fill the store with this shard's missing chunks; returns the store's manifest.

    Chunks an earlier run finished are re-verified first: damaged ones are computed again.
    With `config.pipeline` every rank of the launch holds some of the teacher's layers and runs
    every forward; rank 0 alone touches the store, and the other ranks return None."""
    _check_store_apart(config)
    ranks = Distributed() if config.pipeline else None
    loaded = load_model(
        config.teacher,
        config.trust_remote_code,
        config.compute_dtype,
        pipeline_group=ranks.group if ranks else None,
    )
    train, valid = build_sequences(loaded.tokenizer, config.data_spec())
    vocab_size = output_vocab_size(loaded)
    _check_against_model(config, vocab_size, train)
    splits = {"train": train, "valid": valid}
    split_ranks = ranks if ranks and ranks.size > 1 else None
    if split_ranks and split_ranks.rank != 0:
        _run_layers_for_rank_0(loaded.model, splits, config, split_ranks)
        return None
    plan = RowsPlan(split_ranks, splits)
    try:
        return _fill_store(config, loaded, splits, shard, overwrite, on_progress, on_repair, plan)
    except Exception:
        plan.stop()  # failed before sending its plan (a refused store...): the others stop too
        raise


def _fill_store(
    config: TargetsConfig,
    loaded: LoadedModel,
    splits: dict[str, TokenSequences],
    shard: Shard,
    overwrite: bool,
    on_progress: Callable[[Progress], None] | None,
    on_repair: Callable[[str], None] | None,
    plan: RowsPlan,
) -> Manifest:
    whole_digest = (
        whole_weights_digest(config.teacher, config.trust_remote_code) if plan.ranks else None
    )
    manifest = build_manifest(
        config,
        teacher_fingerprint(config.teacher, loaded, whole_digest),
        tokenizer_fingerprint(loaded.tokenizer),
        output_vocab_size(loaded),
        splits,
        loaded.cast_to,
    )
    as_arrays = {name: _as_arrays(seqs) for name, seqs in splits.items()}
    writer = open_store_for_writing(
        config.store,
        manifest,
        as_arrays,
        overwrite=overwrite,
        staging_dir=config.staging_dir,
        storage_options=config.storage_options,
    )
    with writer.lock_shard(shard.index, shard.count):
        mine = writer.shard_chunks(shard.index, shard.count)
        for repaired in writer.repair(as_arrays, mine):
            if on_repair:
                on_repair(repaired)
        _compute_missing(writer, loaded.model, splits, shard, config, on_progress, plan)
    return writer.manifest


def _check_store_apart(config: TargetsConfig) -> None:
    """Before anything is written: the store is not, holds or lies inside the teacher or data."""
    for name, path in (("teacher", config.teacher), ("data", config.data)):
        if path in (DEFAULT_TEACHER, DEFAULT_DATA) or not Path(path).exists():
            continue  # the embedded defaults, or a hub id
        if paths_overlap(config.store, path):
            raise StageError(
                f"the store {config.store} and the {name} {path} overlap (one is, or is inside, "
                "the other); choose another --store"
            )


def _compute_missing(
    writer: StoreWriter,
    model,
    splits,
    shard: Shard,
    config: TargetsConfig,
    on_progress,
    plan: RowsPlan,
):
    todo = [
        (split, c)
        for split in SPLIT_ORDER
        for c in writer.missing_chunks(split, shard.index, shard.count)
    ]
    plan.send(writer.manifest, todo)
    total_tokens = sum(_chunk_tokens(writer.manifest, splits, s, c) for s, c in todo)
    done_tokens = 0
    model.eval()
    with BackgroundWriter(writer, str(shard)) as background:
        for number, (split, chunk) in enumerate(todo, 1):
            start, stop = writer.manifest.splits[split].chunk_rows_range(chunk)
            background.submit(
                split, chunk, _chunk_targets(model, splits[split], (split, start, stop), config)
            )
            done_tokens += _chunk_tokens(writer.manifest, splits, split, chunk)
            if on_progress:
                on_progress(Progress(done_tokens, total_tokens, number, len(todo)))


class RowsPlan:
    """Rank 0's one message to the other ranks of a split teacher (none without): a digest of
    its token rows, then the rows of each chunk it computes, as (split number, first row, end
    row) triples, or that it stopped. Every rank then says whether its own rows have the same
    digest: the first layers run on the last rank's tokens, so another machine's data file or
    tokenizer would fill rank 0's store with targets of other text."""

    STOP = [-1]

    def __init__(self, ranks: Distributed | None, splits: dict[str, TokenSequences]) -> None:
        self.ranks, self.splits, self.sent = ranks, splits, False

    def send(self, manifest: Manifest, todo: list[tuple[str, int]]) -> None:
        """The plan, and the ranks' answer (nothing to do without other ranks)."""
        if not self.ranks or self.sent:
            return
        rows = []
        for split, chunk in todo:
            rows += [SPLIT_ORDER.index(split), *manifest.splits[split].chunk_rows_range(chunk)]
        self._send([*rows_digest(self.splits), *rows])
        if _disagreeing_ranks(self.ranks, mismatch=False):
            raise StageError(_OTHER_ROWS)

    def stop(self) -> None:
        """Tells the other ranks that rank 0 stops; when they are gone already, its own error
        is what matters, not this."""
        try:
            self._send(self.STOP)
        except RuntimeError as exc:
            if not peer_lost(exc):
                raise

    def _send(self, values: list[int]) -> None:
        if self.ranks and not self.sent:
            self.sent = True
            self.ranks.from_root(values)

    @classmethod
    def receive(cls, ranks: Distributed, splits) -> list[tuple[str, int, int]]:
        values = ranks.from_root([])
        if values == cls.STOP:
            raise StageError("rank 0 stopped before computing (its own error line says why)")
        digest, values = values[:DIGEST_INTS], values[DIGEST_INTS:]
        if _disagreeing_ranks(ranks, mismatch=digest != rows_digest(splits)):
            raise StageError(_OTHER_ROWS)
        triples = zip(values[::3], values[1::3], values[2::3], strict=True)
        return [(SPLIT_ORDER[split], start, stop) for split, start, stop in triples]


DIGEST_INTS = 6  # 96 bits of the rows' digest, 16 bits per int32 sent
_OTHER_ROWS = (
    "the ranks of --pipeline read different token rows (another data file, dataset revision or "
    "tokenizer on some machine); give every machine the same --data and teacher"
)


def rows_digest(splits: dict[str, TokenSequences]) -> list[int]:
    """The first DIGEST_INTS * 16 bits of the splits' sequence digests, as RowsPlan sends them."""
    text = "".join(sequences_digest(_as_arrays(splits[name])) for name in sorted(splits))
    return [int(text[4 * i : 4 * i + 4], 16) for i in range(DIGEST_INTS)]


def _disagreeing_ranks(ranks: Distributed, mismatch: bool) -> int:
    """How many ranks found rows other than rank 0's (every rank calls this once)."""
    return int(ranks.sum(mx.array(int(mismatch), dtype=mx.int32)).item())


def _run_layers_for_rank_0(model, splits, config: TargetsConfig, ranks: Distributed) -> None:
    """A rank other than 0 of a split teacher: run its layers for every batch rank 0 computes,
    in the same order (each forward passes the hidden state on from rank to rank)."""
    plan = RowsPlan.receive(ranks, splits)
    model.eval()
    for split, start, stop in plan:
        for i, j in _batches(start, stop, config.batch_size):
            # the inner model only: its layers and the hand-offs; the head's logits go unused
            mx.eval(model.model(mx.array(splits[split].tokens[i:j, :-1])))


def _chunk_tokens(
    manifest: Manifest, splits: dict[str, TokenSequences], split: str, chunk: int
) -> int:
    start, stop = manifest.splits[split].chunk_rows_range(chunk)
    return int(splits[split].lengths[start:stop].sum())


def _batches(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """The rows of each teacher forward over rows start..stop (the last batch may be short)."""
    return [(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]


def _tail_sampling(config: TargetsConfig, split: str, start: int, stop: int) -> TailSampling | None:
    """The tail sampling of rows start..stop of a split (None without samples): its offsets
    from a generator of the seed, split and chunk alone."""
    if not config.tail_samples:
        return None
    chunk = start // config.chunk_size
    rng = np.random.default_rng([config.seed, SPLIT_ORDER.index(split), chunk])
    offsets = rng.random((stop - start, config.max_seq_length - 1))
    return TailSampling(config.tail_samples, config.sample_temperature, offsets)


def _chunk_targets(model, seqs: TokenSequences, rows: tuple[str, int, int], config: TargetsConfig):
    """Run the teacher on (split, start, stop) rows now; return the top-k extraction for the
    writer thread to run later."""
    split, start, stop = rows
    logits = [
        teacher_logits(model, seqs.tokens[i:j]) for i, j in _batches(start, stop, config.batch_size)
    ]
    if not all(_all_finite(part) for part in logits):
        # Stored, a NaN would become any code (uint8 clips it to 0: the position's top logit).
        raise ModelError(
            f"the teacher's logits for rows {start}-{stop - 1} of the {split} split are not "
            "finite (NaN or inf): check the teacher's weights, or set targets.compute_dtype "
            "float32 if it overflows in its own dtype"
        )

    sampling = _tail_sampling(config, split, start, stop)

    def extract() -> dict[str, np.ndarray]:
        parts = [
            topk_targets(
                part,
                config.top_k,
                config.lse_temperatures,
                config.logits_dtype,
                config.stored_logit_step,
                sampling.rows(i - start, j - start) if sampling else None,
            )
            for part, (i, j) in zip(logits, _batches(start, stop, config.batch_size), strict=True)
        ]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    return extract
