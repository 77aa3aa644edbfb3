"""Evaluation: teacher, plain round-to-nearest student and tuned student on held-out text.

Every number is over the full vocabulary (no top-k): KL(teacher || model) per token, perplexity,
and how often the model's top-1 token is the teacher's. `gap_closed` is the share of the RTN
student's KL that tuning removed (the teacher's own KL is 0 by definition).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from stages import models
from stages.data import DataSpec, TokenSequences, build_held_out_sequences
from stages.errors import InvalidConfig, ModelError, StageError
from stages.float_modes import MODES
from stages.settings import (
    above_limit_problems,
    choice_problems,
    compute_dtype_setting,
    empty_path_problems,
    fast_matmul_setting,
    representable_problems,
    setting,
    storage_options_setting,
    store_setting,
    trust_remote_code_setting,
)
from store.durable import (
    file_in_the_way,
    is_mark_bytes,
    mark,
    paths_overlap,
    write_json_atomic,
)
from store.errors import StoreError
from store.location import local_spec
from store.manifest import MAX_ROWS, MAX_SEQ_LEN, Manifest
from store.reader import StoreReader

TEACHER, RTN, TUNED = "teacher", "rtn", "tuned"
EVAL_MARK = "eval"  # the `program`/`kind` keys of an eval JSON: `eval --save` replaces only those


@dataclass
class EvalConfig:
    store: str = store_setting("target store: supplies teacher and data when unset")
    storage_options: dict[str, Any] = storage_options_setting()
    student: str | None = setting(
        None, "the tuned student; unset = tune.run_dir's model/", "--student"
    )
    teacher: str | None = setting(
        None, "teacher model; unset = the one that made the store", "--teacher"
    )
    data: str | None = setting(None, "data source; unset = the one that made the store", "--data")
    num_sequences: int = setting(16, "held-out sequences evaluated (0 = all)", "--num-sequences")
    max_seq_length: int | None = setting(None, "tokens per sequence; unset = the store's")
    batch_size: int = setting(4, "sequences per forward pass")
    seed: int = setting(
        123,
        "seed for choosing which held-out sequences are evaluated (which text is held out "
        "follows the store's targets.seed)",
    )
    fast_matmul: str = fast_matmul_setting()
    compute_dtype: str = compute_dtype_setting()
    trust_remote_code: bool = trust_remote_code_setting()

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"eval.batch_size must be >= 1 (got {self.batch_size})")
        if self.num_sequences < 0:
            problems.append(f"eval.num_sequences must be >= 0 (got {self.num_sequences})")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            problems.append(f"eval.max_seq_length must be >= 2 (got {self.max_seq_length})")
        problems += choice_problems(self, "eval")
        if self.seed < 0:
            problems.append(f"eval.seed must be >= 0 (got {self.seed})")
        problems += representable_problems(self, "eval")
        problems += empty_path_problems(self, "eval", ("store", "student", "teacher", "data"))
        limits = {"num_sequences": MAX_ROWS, "batch_size": MAX_ROWS, "max_seq_length": MAX_SEQ_LEN}
        problems += above_limit_problems(self, "eval", limits)
        if problems:
            raise InvalidConfig(problems)


@dataclass(frozen=True)
class ModelScore:
    name: str
    kl: float  # mean full-vocabulary KL(teacher || model) per token, nats
    perplexity: float
    top1_agreement: float  # share of positions whose argmax equals the teacher's


@dataclass(frozen=True)
class EvalResult:
    scores: dict[str, ModelScore]
    split: str
    num_sequences: int
    num_tokens: int
    seconds: float

    @property
    def gap_closed(self) -> float | None:
        """Share of the RTN student's KL removed by tuning (1 = as good as the teacher)."""
        if RTN not in self.scores or TUNED not in self.scores or self.scores[RTN].kl <= 0:
            return None
        return 1.0 - self.scores[TUNED].kl / self.scores[RTN].kl

    def to_dict(self) -> dict[str, Any]:
        return {
            **mark(EVAL_MARK),
            "split": self.split,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "seconds": round(self.seconds, 2),
            "gap_closed": self.gap_closed,
            "models": {name: vars(score) for name, score in self.scores.items()},
        }


def check_save_path(path: Path, config: EvalConfig) -> None:
    """Refuse, before any model runs, a `--save` path on, in or around the store or the student,
    or an existing file that is not an eval JSON this program wrote."""
    for name, other in (("store", config.store), ("student", config.student)):
        if other and Path(local_spec(other)).exists() and paths_overlap(path, other):
            raise StageError(
                f"--save {path} and the {name} {other} overlap (one is, or is inside, the "
                "other); save the results elsewhere"
            )
    if path.is_dir():
        raise StageError(f"--save {path} is a folder; name a .json file to write")
    if file_in_the_way(path) is not None:
        raise StageError(f"--save {path} lies under the file {file_in_the_way(path)}")
    if path.exists() and not _is_eval_json(path):
        raise StageError(
            f"{path} exists and is not an eval JSON written by `dwq-pipeline eval`; it is never "
            "replaced: choose another --save path"
        )


def _is_eval_json(path: Path) -> bool:
    try:
        return is_mark_bytes(path.read_bytes(), EVAL_MARK)
    except OSError:
        return False


def save_result(path: Path, result: EvalResult) -> None:
    """Write the results as JSON, atomically (an existing file was checked by check_save_path)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result.to_dict())
    except OSError as exc:
        raise StageError(f"cannot write {path}: {exc.strerror or exc}") from exc


class _Totals:
    """Running sums for one model over the evaluated positions."""

    def __init__(self) -> None:
        self.kl = self.nll = self.agree = 0.0

    def add(self, teacher_logprobs, logprobs, targets, teacher_top1, mask) -> None:
        kl = (mx.exp(teacher_logprobs) * (teacher_logprobs - logprobs)).sum(axis=-1)
        nll = -mx.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        agree = (mx.argmax(logprobs, axis=-1) == teacher_top1).astype(mx.float32)
        sums = [(values * mask).sum() for values in (kl, nll, agree)]
        mx.eval(sums)
        self.kl += sums[0].item()
        self.nll += sums[1].item()
        self.agree += sums[2].item()

    def score(self, name: str, tokens: float) -> ModelScore:
        return ModelScore(
            name=name,
            kl=self.kl / tokens,
            perplexity=math.exp(self.nll / tokens),
            top1_agreement=self.agree / tokens,
        )


def _log_softmax(model, tokens: mx.array) -> mx.array:
    logits = model(tokens).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def score_models(
    teacher: Any,
    students: dict[str, Any],
    sequences: TokenSequences,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, ModelScore]:
    """Scores of the teacher and each student on the same sequences, batch by batch."""
    scored = {TEACHER: teacher, **students}
    totals = {name: _Totals() for name in scored}
    mask_all = sequences.loss_mask()
    num_batches = -(-len(sequences) // batch_size)
    for number, start in enumerate(range(0, len(sequences), batch_size), 1):
        rows = sequences.tokens[start : start + batch_size]
        inputs, targets = mx.array(rows[:, :-1]), mx.array(rows[:, 1:])
        mask = mx.array(mask_all[start : start + batch_size].astype(np.float32))
        teacher_logprobs = _log_softmax(teacher, inputs)
        teacher_top1 = mx.argmax(teacher_logprobs, axis=-1)
        mx.eval(teacher_logprobs, teacher_top1)
        for name, model in scored.items():
            logprobs = teacher_logprobs if model is teacher else _log_softmax(model, inputs)
            totals[name].add(teacher_logprobs, logprobs, targets, teacher_top1, mask)
        if on_batch:
            on_batch(number, num_batches)
    tokens = float(mask_all.sum())
    return {name: total.score(name, tokens) for name, total in totals.items()}


def _store_manifest(config: EvalConfig) -> Manifest | None:
    """What made the store, for the settings the user left unset; None when all are set."""
    if config.teacher and config.data and config.max_seq_length:
        return None
    try:
        return StoreReader(config.store, config.storage_options).manifest
    except StoreError as exc:
        raise StoreError(
            f"{exc}; or give eval.teacher, eval.data and eval.max_seq_length explicitly"
        ) from exc


def _check_output_sizes(teacher: Any, student: Any, manifest: Manifest | None) -> None:
    """Teacher, student (and the store, when read) must give logits over the same vocabulary."""
    sizes = {"the teacher": models.output_size(teacher), "the student": models.output_size(student)}
    if manifest is not None:
        sizes["the store's vocabulary"] = manifest.splits["train"].vocab_size
    if len(set(sizes.values())) > 1:
        raise ModelError(
            "the models do not share one vocabulary ("
            + ", ".join(f"{name}: {size}" for name, size in sizes.items())
            + "); evaluate a student quantized from the store's teacher"
        )


def _held_out_spec(config: EvalConfig, made_with: dict[str, Any]) -> DataSpec:
    """The store's settings decide which text was held out, so eval never scores text that
    tuning trained on; eval.seed only chooses among it."""
    return DataSpec(
        source=config.data or made_with["data"],
        max_seq_length=config.max_seq_length or made_with["max_seq_length"],
        num_samples=0,
        num_valid_samples=0,
        valid_share=made_with.get("valid_share", 0.1),
        seed=made_with.get("seed", config.seed),
        mask_prompt=made_with.get("mask_prompt", False),
    )


def held_out_sequences(config: EvalConfig, tokenizer: Any) -> tuple[TokenSequences, str]:
    """The rows `evaluate` scores (the data's test split) and the split's name; for benchmarks
    that score other students on exactly the same text."""
    manifest = _store_manifest(config)
    return _held_out(config, dict(manifest.settings) if manifest else {}, tokenizer)


def _held_out(
    config: EvalConfig, made_with: dict[str, Any], tokenizer: Any
) -> tuple[TokenSequences, str]:
    spec = _held_out_spec(config, made_with)
    return build_held_out_sequences(tokenizer, spec, config.num_sequences, config.seed)


def prepare_for_scoring(model: Any, fast_matmul: str) -> Any:
    """As `eval` scores a model: inference mode, its fast_matmul setting."""
    model.eval()
    models.apply_fast_matmul(model, fast_matmul)
    return model


def rtn_like(
    student: models.LoadedModel, name: str, teacher_spec: str, *, trust: bool, dtype: str
) -> Any:
    """The teacher round-to-nearest in `student`'s own mode and bits (per layer when mixed:
    config.json names them), quantized in the teacher's own dtype as tune's starting student is,
    then cast to the compute dtype."""
    bits, group_size = models.quantization_of(student.config, name)
    mode = models.quantization_mode(student.config)
    if mode not in MODES:
        raise ModelError(
            f"student {name!r}: its config.json names quantization mode {mode!r}, "
            f"not one of {', '.join(MODES)}"
        )
    per_layer = models.layer_quantization(student.config, name)
    rtn, _ = models.quantize_student(
        models.load_model(teacher_spec, trust), bits, group_size, mode, per_layer
    )
    models.to_compute_dtype(rtn, dtype)
    return rtn


def evaluate(config: EvalConfig, on_batch: Callable[[int, int], None] | None = None) -> EvalResult:
    """Teacher, RTN student (the tuned student's bits, group size and mode, per layer when
    mixed) and tuned student."""
    if not config.student:
        raise InvalidConfig(["eval.student must name the tuned model to evaluate"])
    manifest = _store_manifest(config)
    made_with = dict(manifest.settings) if manifest else {}
    teacher_spec = config.teacher or made_with["teacher"]
    trust, dtype = config.trust_remote_code, config.compute_dtype
    tuned = models.load_model(config.student, trust, dtype)
    if not tuned.config.get("quantization"):
        raise ModelError(f"student {config.student!r} is not quantized: nothing to compare")
    models.quantization_of(tuned.config, config.student)  # malformed: refused before the teacher
    teacher = models.load_model(teacher_spec, trust, dtype)
    teacher_vocab = models.tokenizer_fingerprint(teacher.tokenizer)
    if teacher_vocab != models.tokenizer_fingerprint(tuned.tokenizer):
        raise ModelError(
            "the student's tokenizer differs from the teacher's; they cannot be compared"
        )
    _check_output_sizes(teacher.model, tuned.model, manifest)
    rtn = rtn_like(tuned, config.student, teacher_spec, trust=trust, dtype=dtype)

    sequences, split = _held_out(config, made_with, teacher.tokenizer)
    tic = time.perf_counter()
    students = {
        RTN: prepare_for_scoring(rtn, config.fast_matmul),
        TUNED: prepare_for_scoring(tuned.model, config.fast_matmul),
    }
    scores = score_models(
        prepare_for_scoring(teacher.model, config.fast_matmul),
        students,
        sequences,
        config.batch_size,
        on_batch,
    )
    return EvalResult(
        scores=scores,
        split=split,
        num_sequences=len(sequences),
        num_tokens=int(sequences.loss_mask().sum()),
        seconds=time.perf_counter() - tic,
    )
