"""Stage two: tune a quantized student's scales and biases to match the stored teacher targets."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from stages import run_dir as run_folder
from stages.adam import MOMENTS_DTYPES, MomentsAdam
from stages.bit_budget import (
    AFFINE_BITS,
    BUDGET_REVISION,
    DEFAULT_ALLOWED_BITS,
    GPTQ_BUDGET_REVISION,
    SENSITIVITY_ROWS,
    choose_layer_bits,
    model_layout,
)
from stages.chunked_output import ChunkedOutput
from stages.data import loss_mask
from stages.distributed import Distributed
from stages.errors import InvalidConfig, ModelError, StageError
from stages.float_modes import (
    AFFINE,
    FLOAT_MODES,
    MODES,
    add_latent_weights,
    fold_latent_weights,
    is_latent,
    untuned_float_layers,
)
from stages.gptq import (
    full_precision_hessians,
    gptq_init,
    output_error_ratio,
    swap_quantized,
    tied_output_layers,
    widest_input,
)
from stages.losses import LOSSES, NEEDS_TAIL, SAMPLED_LOSS, sampled_tail_kl, tail_logsumexp
from stages.models import (
    apply_fast_matmul,
    checkpoint_blocks,
    is_trainable_quantized,
    load_model,
    output_layer,
    output_size,
    quantization_of,
    quantize_student,
    restore_dtypes,
    to_compute_dtype,
    tokenizer_fingerprint,
    unfreeze_scales_and_biases,
    wants_float32,
)
from stages.rounding import (
    INITS,
    add_rounding_offsets,
    clip_search_init,
    fold_rounding_offsets,
    full_precision_weights,
    with_rounding_steps,
)
from stages.settings import (
    MAX_STEPS,
    above_limit_problems,
    choice_problems,
    compute_dtype_setting,
    empty_path_problems,
    fast_matmul_setting,
    identity_values,
    representable_problems,
    setting,
    storage_options_setting,
    store_setting,
    trust_remote_code_setting,
)
from store.errors import StoreCorruptError
from store.layout import SplitShape
from store.reader import StoreReader, stream_batches

SCHEDULES = ("cosine", "constant")
LEVERS_OFF = {
    "train_norms": False,
    "learned_rounding": False,
    "init": "rtn",
    "adam_moments_dtype": "float32",
}
INCOMPLETE = ("refuse", "use", "wait")
MIN_TOKENS_PER_COLUMN = 4  # calibration tokens per input column for a GPTQ-aware budget
GPTQ_ROWS = 128  # GPTQ's calibration sequences (the paper's 128); their hidden states are held
# A start whose algorithm changed gives other integers from the same settings: its revision is
# part of a run's identity, so a checkpoint made before the change is refused, not resumed.
# gptq 2: a tied embedding re-quantized as the output layer; 3: act-order and searched grids
START_REVISIONS = {"gptq": 3}
ROUNDING_REVISION = 2  # 2: a weight its start put well past the tie starts at residual 0
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64
LATENT_LR = 1e-4  # the first rate run on the default teacher, not swept (README: --mode)
TUNE_LIMITS = {
    "max_steps": MAX_STEPS,
    "warmup_steps": MAX_STEPS,
    "val_every": MAX_STEPS,
    "checkpoint_every": MAX_STEPS,
    "epochs": 10**6,
    "batch_size": 1 << 16,
    "grad_accumulation": 1 << 16,
    "prefetch": 1024,
    "group_size": 1 << 16,
    "bits_per_weight": 64,
}

MLX_GROUP_SIZES = (32, 64, 128)  # what mx.quantize supports
CHECK_POSITIONS = 16  # the sequence that checks the model's split before its output layer


@dataclass
class TuneConfig:
    store: str = store_setting(
        "target store from `targets`: a folder, a zip from `store pack`, or a URL (s3://, ...)"
    )
    storage_options: dict[str, Any] = storage_options_setting(
        "fsspec options for a URL store (endpoint_url, anon, ...); credentials from the env"
    )
    run_dir: str = setting(
        "artifacts/runs/default",
        "checkpoints, metrics.jsonl and the model/",
        "--run-dir",
        identity=False,
    )
    student: str | None = setting(
        None,
        "an already quantized mlx-lm model (folder or HF id); unset = quantize the teacher",
        "--student",
    )
    bits: int = setting(DEFAULT_BITS, "bits per weight when quantizing the teacher into a student")
    group_size: int = setting(
        DEFAULT_GROUP_SIZE,
        "quantization group size when quantizing the teacher (under a bits budget, one of "
        "tune.allowed_group_sizes)",
    )
    bits_per_weight: float | None = setting(
        None,
        "a budget: each layer's bits (from tune.allowed_bits) and group size (from "
        "tune.allowed_group_sizes) chosen by its sensitivity on the "
        "store so that the saved student's bits per weight as stored (mlx-lm's "
        "compute_bits_per_weight: scales, biases and float parameters counted) stay within "
        "it; unset = every layer at tune.bits",
        "--bits-per-weight",
    )
    allowed_bits: list[int] = setting(
        DEFAULT_ALLOWED_BITS, "with bits_per_weight: the bit widths a layer may get"
    )
    allowed_group_sizes: list[int] | None = setting(
        list(MLX_GROUP_SIZES),
        "with bits_per_weight: the group sizes a layer may get (those that divide its width; "
        "must include tune.group_size; the smallest decides which layers are quantized); "
        "[tune.group_size] = that size only (the choice before 2026-12-01: a budget run "
        "checkpointed then resumes with it)",
    )
    loss: str = setting("kl_tail", f"distillation loss: {', '.join(LOSSES)}", "--loss")
    temperature: float = setting(2.0, "softmax temperature of the loss")
    learning_rate: float = setting(
        1.5e-5,
        "peak Adam learning rate (chosen on the validation rows for a 4-bit student from the "
        "GPTQ start; a 3-bit one validates better at 5e-5, configs/default-3bit.yaml's; README: "
        "Benchmarks)",
        "--learning-rate",
    )
    adam_moments_dtype: str = setting(
        "float32",
        "dtype of Adam's two moments: bfloat16 halves them (a quarter of the trained state; "
        "rounded stochastically, so they decay as in float32)",
        choices=tuple(MOMENTS_DTYPES),
    )
    warmup_steps: int = setting(5, "linear warm-up steps from 0 to the peak learning rate")
    schedule: str = setting(
        "cosine", "after warm-up: cosine (decay to 10%) or constant", choices=SCHEDULES
    )
    batch_size: int = setting(4, "sequences per global batch (split across ranks)")
    grad_accumulation: int = setting(1, "batches whose gradients are summed per optimizer step")
    epochs: int = setting(1, "passes over the training split (ignored when max_steps > 0)")
    max_steps: int = setting(0, "optimizer steps (0 = as many as the epochs give)", "--max-steps")
    val_every: int = setting(20, "validate every N steps (also at start and end)", identity=False)
    checkpoint_every: int = setting(
        20, "checkpoint every N steps (also on SIGINT/SIGTERM)", identity=False
    )
    prefetch: int = setting(2, "batches decoded ahead of the training loop", identity=False)
    seed: int = setting(123, "seed for the order of chunks in each epoch")
    incomplete_store: str = setting(
        "refuse",
        "a store still being filled or copied: refuse; use (the training chunks done when the "
        "run starts); wait (for each chunk as the loop needs it)",
        identity=False,
        choices=INCOMPLETE,
    )
    wait_timeout_s: float = setting(
        3600.0, "with incomplete_store=wait: give up after this long", identity=False
    )
    fast_matmul: str = fast_matmul_setting()
    # Not in the resume key: the checkpoint's float32 parameters and optimizer state mean the
    # same under any compute dtype (like fast_matmul, it changes only the forward's rounding),
    # so a run started on CPU in float32 may resume on a GPU in bfloat16.
    compute_dtype: str = compute_dtype_setting()
    trust_remote_code: bool = trust_remote_code_setting(identity=True)
    grad_checkpoint: bool = setting(
        False,
        "recompute each transformer block's activations in the backward pass instead of "
        "keeping them, and run the output layer and loss by chunks of positions (less memory, "
        "flat in the sequence length; about 2x the step time; same loss and gradients in float32)",
        identity=False,
    )
    train_norms: bool = setting(
        False, "also train the norm weights and unquantized biases (saved in float, as before)"
    )
    learned_rounding: bool = setting(
        False,
        "learn each weight's rounding (AutoRound: an offset in [-0.5, 0.5] by signed gradient "
        "steps), folded into the integers at save; needs the teacher and 8 bytes per weight",
    )
    rounding_lr: float = setting(
        1e-3,
        "with learned_rounding: the offsets' signed step, decaying linearly to 0 (1e-3 beat "
        "AutoRound's 5e-3 on every seed of bench/levers.py)",
    )
    init: str = setting(
        "auto",
        f"the starting student, one of auto, {', '.join(INITS)}: round-to-nearest, per-group "
        "clip ratio of least weight error, or GPTQ on the store's training tokens (the last two "
        "need the teacher); auto = gptq when tune quantizes the teacher, tune.student as given",
    )
    mode: str = setting(
        AFFINE,
        "quantization mode of the student: affine (scales and biases tuned) or mxfp4, nvfp4, "
        "mxfp8 (a latent weight per layer tuned through its rounding; the mode's own bits and "
        "group size; needs the teacher)",
        "--mode",
        choices=MODES,
    )
    latent_lr: float = setting(
        LATENT_LR,
        "with a floating-point mode: peak Adam learning rate of the latent weights (in weight "
        "units, same warm-up and decay as learning_rate)",
    )

    def __post_init__(self) -> None:
        problems = []
        positive = ("bits", "group_size", "batch_size", "grad_accumulation", "epochs")
        positive += ("val_every", "checkpoint_every", "prefetch")
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"tune.{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("warmup_steps", "max_steps"):
            if getattr(self, name) < 0:
                problems.append(f"tune.{name} must be >= 0 (got {getattr(self, name)})")
        if self.bits >= 8 and self.mode == AFFINE:
            problems.append(f"tune.bits must be below 8 to have scales to tune (got {self.bits})")
        if self.group_size not in MLX_GROUP_SIZES and self.mode == AFFINE:
            sizes = ", ".join(map(str, MLX_GROUP_SIZES))
            problems.append(f"tune.group_size must be one of {sizes} (got {self.group_size})")
        if self.loss not in LOSSES:
            problems.append(f"tune.loss must be one of {', '.join(LOSSES)} (got {self.loss!r})")
        if self.temperature <= 0 or self.learning_rate <= 0:
            problems.append("tune.temperature and tune.learning_rate must be > 0")
        problems += choice_problems(self, "tune")
        if self.wait_timeout_s <= 0:
            problems.append("tune.wait_timeout_s must be > 0")
        if self.seed < 0:
            problems.append(f"tune.seed must be >= 0 (got {self.seed})")
        problems += _lever_problems(self)
        problems += _mode_problems(self)
        problems += _budget_problems(self)
        problems += representable_problems(self, "tune")
        problems += empty_path_problems(self, "tune", ("store", "run_dir", "student"))
        problems += above_limit_problems(self, "tune", TUNE_LIMITS)
        if problems:
            raise InvalidConfig(problems)

    @property
    def start(self) -> str:
        """The starting student `init` resolves to (auto: GPTQ, which beat RTN's start on every
        seed of bench/levers.py, unless a quantized student is given)."""
        if self.init == "auto":
            return "rtn" if self.student or self.mode != AFFINE else "gptq"
        return self.init

    @property
    def quantization(self) -> tuple[int, int]:
        """(bits, group_size) the teacher is quantized with: a floating-point mode's own; under
        a budget the smallest allowed group size, which decides (as mlx-lm's quantize_model
        does) which layers are quantized at all: each then gets its own."""
        return FLOAT_MODES.get(self.mode, (self.bits, min(self.budget_group_sizes)))

    @property
    def budget_group_sizes(self) -> list[int]:
        """The group sizes a bits budget chooses from (tune.group_size alone without one)."""
        if self.bits_per_weight is None or self.allowed_group_sizes is None:
            return [self.group_size]
        return sorted(self.allowed_group_sizes)

    @property
    def needs_teacher_weights(self) -> bool:
        return self.learned_rounding or self.start != "rtn" or self.mode != AFFINE

    @property
    def wait_s(self) -> float | None:
        """How long the stream may wait for a chunk that is not there yet (None: never)."""
        return self.wait_timeout_s if self.incomplete_store == "wait" else None

    def identity(self) -> dict[str, Any]:
        """The run's identity: its identity fields, less the levers that are off (so that
        checkpoints from before the levers still resume)."""
        kept = identity_values(self) | {"init": self.start}
        if self.start in START_REVISIONS:
            kept["start_revision"] = START_REVISIONS[self.start]
        if self.learned_rounding:
            kept["rounding_revision"] = ROUNDING_REVISION
        for name, off in LEVERS_OFF.items():
            if kept[name] == off:
                del kept[name]
        if not self.learned_rounding:
            del kept["rounding_lr"]
        if self.mode == AFFINE:  # absent from checkpoints made before the modes
            del kept["mode"], kept["latent_lr"]
        else:
            kept["bits"], kept["group_size"] = self.quantization
            if not self.train_norms:  # the latents have tune.latent_lr: nothing else trains
                del kept["learning_rate"]
        if self.bits_per_weight is None:
            del kept["bits_per_weight"], kept["allowed_bits"], kept["allowed_group_sizes"]
        else:
            kept["allowed_bits"] = sorted(self.allowed_bits)
            if self.budget_group_sizes == [self.group_size]:
                del kept["allowed_group_sizes"]  # as before the setting: older runs resume
            else:
                kept["allowed_group_sizes"] = self.budget_group_sizes
            gptq = self.start == "gptq"
            kept["budget_revision"] = GPTQ_BUDGET_REVISION if gptq else BUDGET_REVISION
        return kept

    def resume_key(self) -> str:
        """A digest of the settings that must match for a checkpoint to be resumed."""
        kept = self.identity()
        return hashlib.blake2b(
            json.dumps(kept, sort_keys=True).encode(), digest_size=16
        ).hexdigest()


def _lever_problems(config: TuneConfig) -> list[str]:
    problems = []
    if config.init not in ("auto", *INITS):
        choices = ", ".join(("auto", *INITS))
        problems.append(f"tune.init must be one of {choices} (got {config.init!r})")
    if config.rounding_lr < 0:
        problems.append(f"tune.rounding_lr must be >= 0 (got {config.rounding_lr})")
    if config.student and config.needs_teacher_weights:
        problems.append(
            "tune.learned_rounding, tune.init=clip_search/gptq and tune.mode other than affine "
            "need the teacher's full-precision weights: leave tune.student unset to quantize "
            "the teacher"
        )
    return problems


def _mode_problems(config: TuneConfig) -> list[str]:
    """A floating-point mode has its own bits and group size and none of the affine levers."""
    if config.mode not in FLOAT_MODES:
        return []
    problems = []
    bits, group_size = FLOAT_MODES[config.mode]
    if config.bits not in (DEFAULT_BITS, bits) or config.group_size not in (
        DEFAULT_GROUP_SIZE,
        group_size,
    ):
        problems.append(
            f"tune.mode={config.mode} quantizes {bits}-bit groups of {group_size}: leave "
            f"tune.bits and tune.group_size unset (got bits={config.bits}, "
            f"group_size={config.group_size})"
        )
    if config.learned_rounding or config.init in ("clip_search", "gptq"):
        problems.append(
            f"tune.learned_rounding and tune.init=clip_search/gptq are affine-only; with "
            f"tune.mode={config.mode} leave them off (init: auto or rtn)"
        )
    if config.latent_lr <= 0:
        problems.append(f"tune.latent_lr must be > 0 (got {config.latent_lr})")
    return problems


def _budget_problems(config: TuneConfig) -> list[str]:
    problems = []
    allowed = config.allowed_bits
    if any(b not in AFFINE_BITS for b in allowed) or len(set(allowed)) != len(allowed):
        widths = ", ".join(map(str, AFFINE_BITS))
        problems.append(f"tune.allowed_bits must be distinct values of {widths} (got {allowed})")
    if not any(b < 8 for b in allowed):
        problems.append("tune.allowed_bits needs a width below 8 to have scales to tune")
    sizes = config.allowed_group_sizes
    if sizes is not None:
        if any(g not in MLX_GROUP_SIZES for g in sizes) or len(set(sizes)) != len(sizes):
            choices = ", ".join(map(str, MLX_GROUP_SIZES))
            problems.append(
                f"tune.allowed_group_sizes must be distinct values of {choices} (got {sizes})"
            )
        if config.bits_per_weight is not None and config.group_size not in sizes:
            problems.append(
                f"tune.allowed_group_sizes must include tune.group_size ({config.group_size}) "
                f"(got {sizes})"
            )
    if config.bits_per_weight is not None and config.bits_per_weight <= 0:
        problems.append(f"tune.bits_per_weight must be > 0 (got {config.bits_per_weight})")
    if config.bits_per_weight is not None and config.mode != AFFINE:
        problems.append(
            f"tune.bits_per_weight chooses affine bit widths: leave it unset with "
            f"tune.mode={config.mode}"
        )
    if config.bits_per_weight is not None and config.student:
        problems.append(
            "tune.bits_per_weight chooses each layer's bits from the teacher's full-precision "
            "weights: leave tune.student unset to quantize the teacher"
        )
    return problems


@dataclass(frozen=True)
class StepReport:
    step: int
    total_steps: int
    loss: float | None = None
    val_loss: float | None = None
    learning_rate: float = 0.0
    tokens_per_s: float = 0.0
    peak_memory_gb: float = 0.0


@dataclass(frozen=True)
class TuneResult:
    model_dir: Path
    steps: int
    initial_val_loss: float
    best_val_loss: float
    best_step: int
    warning: str | None = None


class TuneInterrupted(StageError):
    pass


@dataclass
class _Student:
    model: Any
    tokenizer: Any
    config: dict
    source: Path | str
    originals: dict | None = None  # the teacher's float weights, for the levers that need them
    dtypes: dict = dataclasses.field(default_factory=dict)  # its own dtypes, kept when saved
    tied_outputs: list = dataclasses.field(default_factory=list)  # kept GPTQ output layers
    layer_bits: dict | None = None  # with a bits budget: each layer's [bits, group size]
    budget_record: dict | None = None  # and what chose them, when measured in this run


def _load_student(config: TuneConfig, inputs: _StartInputs) -> _Student:
    reader = inputs.reader
    if config.student:
        loaded = load_model(config.student, config.trust_remote_code, config.compute_dtype)
        if "quantization" not in loaded.config:
            raise ModelError(
                f"student {config.student!r} is not quantized; give a quantized mlx-lm model "
                "or leave tune.student unset to quantize the teacher"
            )
        quantization_of(loaded.config, config.student)
        student = _Student(loaded.model, loaded.tokenizer, loaded.config, loaded.path)
        student.dtypes = loaded.dtypes
    else:
        teacher = str(reader.manifest.teacher.get("name", ""))
        loaded = load_model(teacher, trust_remote_code=config.trust_remote_code)
        originals = full_precision_weights(loaded.model) if config.needs_teacher_weights else None
        layer_bits, record = _layer_bits(config, loaded.model, inputs)
        per_layer = {p: {"bits": b, "group_size": g} for p, (b, g) in layer_bits.items()}
        # Quantized in the teacher's own dtype (as mlx-lm's convert does), then cast.
        model, quantized_config = quantize_student(
            loaded, *config.quantization, config.mode, per_layer
        )
        dtypes = to_compute_dtype(model, config.compute_dtype)
        student = _Student(model, loaded.tokenizer, quantized_config, loaded.path, originals)
        student.dtypes = dtypes
        if config.bits_per_weight is not None:
            student.layer_bits, student.budget_record = layer_bits, record
    if tokenizer_fingerprint(student.tokenizer) != reader.manifest.tokenizer:
        raise ModelError(
            "the student's tokenizer differs from the one the targets were made with; "
            "use a student of the same model family as the store's teacher"
        )
    outputs, vocab = output_size(student.model), reader.manifest.splits["train"].vocab_size
    if outputs != vocab:  # its logits would be gathered at indices it does not have
        raise ModelError(
            f"the student gives {outputs} logits per position but the store's vocabulary has "
            f"{vocab}; use a student quantized from the store's teacher"
        )
    return student


@dataclass(frozen=True)
class _StartInputs:
    """What a lever's start reads besides the settings and the student."""

    reader: StoreReader
    phase: Callable[[str], None]
    dist: Distributed
    recorded: list | None  # the tied output layers the checkpoint being resumed kept
    recorded_bits: dict | None = None  # the layer bits the checkpoint being resumed chose
    run_dir: Path | None = None


def _layer_bits(config: TuneConfig, model: Any, inputs: _StartInputs) -> tuple[dict, dict | None]:
    """Each layer's [bits, group size] under tune.bits_per_weight ({} without one): as the
    checkpoint being resumed recorded them, or chosen from the full-precision `model`'s
    sensitivities on the store's first training sequences (with the record of them for the run
    folder). The model computes them in the compute dtype (a bfloat16 teacher on CPU in
    float32: MLX's bfloat16 matmul is slow there and its gather_mm takes float32 only) and is
    put back in its own dtype after, for quantizing."""
    if config.bits_per_weight is None:
        return {}, None
    if inputs.recorded_bits is not None:
        return _with_group_sizes(inputs.recorded_bits, config.group_size), None
    batches = _sensitivity_batches(config, inputs.reader, inputs.run_dir)
    rows = len(batches.rows)
    label = "measuring layer sensitivities: sequence {}/" + str(rows)
    on_batch = lambda number: inputs.phase(label.format(number + 1))  # noqa: E731
    layout = model_layout(model, config.quantization[1])  # scales as stored: the teacher's dtype
    own = to_compute_dtype(model, config.compute_dtype)
    try:
        ratios = _gptq_error_ratios(config, model, inputs) if config.start == "gptq" else None
        inputs.phase("measuring layer sensitivities")
        choice, record = choose_layer_bits(
            layout,
            model,
            batches,
            config.bits_per_weight,
            config.allowed_bits,
            config.seed,
            on_batch,
            config.budget_group_sizes,
            ratios,
        )
    finally:
        restore_dtypes(model, own)
    # Every rank measured the same rows, but machines of a ring may round differently and break
    # a near tie otherwise: all take rank 0's mix, so every rank tunes the same student.
    paths = list(choice)  # the layout's order, the same on every rank
    flat = inputs.dist.from_root([value for p in paths for value in choice[p]])
    pairs = [[flat[2 * i], flat[2 * i + 1]] for i in range(len(paths))]
    return dict(zip(paths, pairs, strict=True)), record


def _as_recorded(layer_bits: dict[str, list[int]], config: TuneConfig) -> dict:
    """Bits alone where every layer has tune.group_size (the checkpoint format from before
    group sizes were chosen, which older versions resume), else [bits, group size]."""
    if config.budget_group_sizes == [config.group_size]:
        return {path: bits for path, (bits, _) in layer_bits.items()}
    return layer_bits


def _with_group_sizes(recorded: dict, group_size: int) -> dict[str, list[int]]:
    """A checkpoint's layer choices as [bits, group size] (one made before group sizes were
    chosen recorded bits alone, at tune.group_size)."""
    return {
        path: [value, group_size] if isinstance(value, int) else list(value)
        for path, value in recorded.items()
    }


def _gptq_error_ratios(
    config: TuneConfig, model: Any, inputs: _StartInputs
) -> dict[str, float] | None:
    """Per layer, the share of round-to-nearest's output error a GPTQ start leaves, from the
    full-precision `model`'s inputs on GPTQ's calibration rows: it differs from layer to layer
    (0.02-0.5 on the default teacher) but hardly with the bits, so a budget for a GPTQ start
    spends its bits where GPTQ leaves most error. None (the plain estimates) when the rows hold
    fewer than MIN_TOKENS_PER_COLUMN tokens per input column of some layer: GPTQ then fits
    those few tokens, and the share foretold from them collapses towards 0."""
    batches = _calibration_batches(inputs.reader, config)
    tokens = sum(float(mask.sum().item()) for _, mask in batches)
    if tokens < MIN_TOKENS_PER_COLUMN * widest_input(model):
        return None
    label = "measuring GPTQ's share of each layer's error: block {}/{}"
    on_block = lambda done, total: inputs.phase(label.format(done, total))  # noqa: E731
    hessians = full_precision_hessians(model, batches, on_block)
    return {path: output_error_ratio(hessian) for path, hessian in hessians}


@dataclass
class _SensitivityBatches:
    """The store's first training sequences, one per batch, as the losses read them, with
    the teacher's tail at T=1 when the store has it (read as they are iterated)."""

    config: TuneConfig
    reader: StoreReader
    rows: list[int]

    def __iter__(self) -> Iterator[tuple]:
        temperatures = list(self.reader.manifest.settings.get("lse_temperatures", []))
        t_index = temperatures.index(1.0) if 1.0 in temperatures else None
        seqs = self.reader.sequences("train")
        planned = [[row] for row in self.rows]
        wait_s = self.config.wait_s
        stream = stream_batches(self.reader, "train", planned, self.config.prefetch, wait_s=wait_s)
        with closing(stream) as batches:
            for rows, targets in zip(planned, batches, strict=True):
                yield _batch_arrays(seqs, rows, targets, t_index)


def _sensitivity_batches(
    config: TuneConfig, reader: StoreReader, run_dir: Path | None
) -> _SensitivityBatches:
    shape = reader.manifest.splits["train"]
    chunks = _train_chunks(reader, config, run_dir) if run_dir else range(shape.num_chunks)
    rows = [
        r
        for c in sorted(chunks)
        for r in range(c * shape.chunk_rows, min((c + 1) * shape.chunk_rows, shape.num_sequences))
    ]
    return _SensitivityBatches(config, reader, rows[:SENSITIVITY_ROWS])


def _apply_levers(config: TuneConfig, student: _Student, inputs: _StartInputs) -> None:
    """A clip-searched or GPTQ start and trainable rounding offsets, from the teacher's weights
    (then dropped: the offsets keep what they need)."""
    if config.start == "clip_search":
        inputs.phase("clip search start")
        clip_search_init(student.model, student.originals)
    if config.start == "gptq":
        _gptq_start(config, student, inputs)
    if config.learned_rounding:
        add_rounding_offsets(student.model, student.originals)
    if config.mode != AFFINE:
        _add_latents(config, student)
    student.originals = None


def _add_latents(config: TuneConfig, student: _Student) -> None:
    """Trainable latent weights for the floating-point-mode layers (refused when none)."""
    dtype = mx.float32 if wants_float32(config.compute_dtype) else None
    if add_latent_weights(student.model, student.originals, dtype) == 0:
        group_size = config.quantization[1]
        raise ModelError(
            f"no teacher layer could be quantized as {config.mode} (groups of {group_size} "
            "divide none of its widths): nothing to tune"
        )
    untuned = untuned_float_layers(student.model)
    if untuned:  # mixture-of-experts switch layers: no latent weight for them yet
        raise ModelError(
            f"{len(untuned)} {config.mode} layers (e.g. {untuned[0]}) cannot be tuned in a "
            "floating-point mode yet (mixture-of-experts layers); use tune.mode=affine"
        )


def _gptq_start(config: TuneConfig, student: _Student, inputs: _StartInputs) -> None:
    """GPTQ block by block; then a tied embedding's GPTQ as the output layer, kept only if the
    start's validation loss goes down (its rows are also the lookups, which GPTQ does not see),
    or as the checkpoint being resumed `recorded` it."""
    reader, phase, recorded = inputs.reader, inputs.phase, inputs.recorded
    batches = _calibration_batches(reader, config)
    on_block = lambda done, total: phase(f"GPTQ start: block {done}/{total}")  # noqa: E731
    gptq_init(student.model, student.originals, batches, on_block)
    if recorded == []:  # the resumed run kept none: no candidate to build
        return
    candidates = tied_output_layers(student.model, student.originals, batches)
    modules = dict(student.model.named_modules())
    if recorded is not None:  # a resumed run keeps its choice: judged again, a near tie could flip
        kept = [path for path in recorded if path in candidates]
        for path in kept:
            swap_quantized(modules[path], candidates[path])
        student.tied_outputs = kept
        return
    if not candidates:
        return
    phase("GPTQ start: the tied output layer, validating")
    judge = _Trainer(config, reader, student, train_chunks=[], dist=inputs.dist)  # validates only
    before = judge.validate(_float32_trainable(student.model))
    previous = {path: swap_quantized(modules[path], arrays) for path, arrays in candidates.items()}
    if judge.validate(_float32_trainable(student.model)) < before:
        student.tied_outputs = sorted(candidates)
    else:
        for path, arrays in previous.items():
            swap_quantized(modules[path], arrays)


def _same_run_state(
    run_dir: Path, config: TuneConfig, reader: StoreReader, overwrite: bool
) -> dict:
    """The state of the checkpoint this run will resume ({}: none, or --overwrite starts over).
    One of another store or other settings is refused here, before the student loads: GPTQ and
    a bits budget's sensitivities take minutes that a refusal after them would waste."""
    saved = None if overwrite else run_folder.checkpoint_state(run_dir, interrupted_swap=True)
    if not saved:
        return {}
    digest = reader.manifest.digest
    run_folder.refuse_other_run(run_dir, saved, config.resume_key(), digest, config.identity())
    return saved


def _recorded_tied_outputs(state: dict) -> list | None:
    """The tied output layers the checkpoint of this same run kept (None: no such checkpoint)."""
    recorded = state.get("tied_outputs")
    return recorded if isinstance(recorded, list) else None


def _recorded_layer_bits(state: dict) -> dict | None:
    """Each layer's bits, or [bits, group size], as the checkpoint of this same run chose them
    (None: no such checkpoint, or a run without a bits budget)."""
    recorded = state.get("layer_bits")

    def valid(value) -> bool:
        if type(value) is int:  # bits alone, at tune.group_size
            return value in AFFINE_BITS
        return (
            isinstance(value, list)
            and len(value) == 2
            and all(type(v) is int for v in value)
            and value[0] in AFFINE_BITS
            and value[1] in MLX_GROUP_SIZES
        )

    return recorded if isinstance(recorded, dict) and all(map(valid, recorded.values())) else None


def _float32_trainable(model: Any) -> dict:
    return tree_map(lambda x: x.astype(mx.float32), model.trainable_parameters())


def _calibration_batches(reader: StoreReader, config: TuneConfig) -> list[tuple]:
    """GPTQ's calibration data: the training split's first GPTQ_ROWS token rows as the model
    reads them, in batches of tune.batch_size, with their loss mask (prompt and padding out)."""
    seqs = {k: v[:GPTQ_ROWS] for k, v in reader.sequences("train").items()}
    tokens = seqs["tokens"]
    mask = loss_mask(seqs["lengths"], seqs["prompt_offsets"], tokens.shape[1] - 1)
    return [
        (
            mx.array(tokens[i : i + config.batch_size, :-1]),
            mx.array(mask[i : i + config.batch_size].astype(np.float32)),
        )
        for i in range(0, len(tokens), config.batch_size)
    ]


def _check_store(reader: StoreReader, config: TuneConfig) -> None:
    """Cheap checks before any model is loaded; each chunk's checksum is verified as it streams."""
    records = reader.records()
    for split, shape in reader.manifest.splits.items():
        missing = len(reader.missing_chunks(split))
        allowed = config.incomplete_store == "wait" or (
            config.incomplete_store == "use" and split == "train" and records[split]
        )
        if missing and not allowed:
            raise StoreCorruptError(
                f"store {reader.location} is incomplete: {missing} of {shape.num_chunks} {split} "
                "chunks missing; run `dwq-pipeline targets` with the same config to finish it"
                + (", or set tune.incomplete_store=use or wait" if split == "train" else "")
            )
        absent = [c for c in records[split] if reader.missing_chunk_files(split, c)]
        if absent:
            raise StoreCorruptError(
                f"store {reader.location} lacks the files of {len(absent)} {split} chunks "
                f"(first: {split}/{absent[0]}; an interrupted copy?); copy the store again or "
                "re-run `dwq-pipeline targets` with the same config to repair it"
            )
    sampled_at = reader.manifest.settings.get("sample_temperature")
    if _uses_tail_samples(config, reader.manifest.splits["train"]) and (
        config.temperature != sampled_at
    ):
        raise StageError(
            f"the store's tail samples were drawn at temperature {sampled_at}: tune.temperature "
            f"{config.temperature} would weigh them wrongly; use {sampled_at}, or a store whose "
            f"samples were drawn at {config.temperature} (targets.sample_temperature) or made "
            "with --tail-samples 0"
        )
    temperatures = reader.manifest.settings.get("lse_temperatures", [])
    if config.loss in NEEDS_TAIL and config.temperature not in temperatures:
        raise StageError(
            f"loss {config.loss} at temperature {config.temperature} needs the teacher's tail "
            f"logsumexp at that temperature; the store has {temperatures}: use one of those or "
            "re-run targets with it in lse_temperatures"
        )


def _uses_tail_samples(config: TuneConfig, shape: SplitShape) -> bool:
    """Whether the loss reads the store's tail samples (kl_tail on a store that has them)."""
    return config.loss == SAMPLED_LOSS and shape.tail_samples > 0


def _train_chunks(reader: StoreReader, config: TuneConfig, run_dir: Path) -> list[int]:
    """The training chunks this run uses: all, or with incomplete_store=use those done when the
    run started (kept in the checkpoint, so a resumed run uses the same ones)."""
    if config.incomplete_store != "use":
        return list(range(reader.manifest.splits["train"].num_chunks))
    saved = run_folder.checkpoint_state(run_dir)
    if saved and "train_chunks" in saved:
        return list(saved["train_chunks"])
    return sorted(reader.records()["train"])


def _batch_plan(
    chunks: list[int], num_rows: int, chunk_rows: int, config: TuneConfig, epoch: int
) -> list[list[int]]:
    """Global batches of one epoch: chunks in a seeded order, rows of a chunk kept together."""
    order = [
        chunks[i] for i in np.random.default_rng([config.seed, epoch]).permutation(len(chunks))
    ]
    rows = [r for c in order for r in range(c * chunk_rows, min((c + 1) * chunk_rows, num_rows))]
    whole = len(rows) // config.batch_size * config.batch_size
    return [rows[i : i + config.batch_size] for i in range(0, whole, config.batch_size)]


def _schedule(config: TuneConfig, total_steps: int, peak: float | None = None):
    peak = peak or config.learning_rate
    after = max(1, total_steps - config.warmup_steps)
    decay = (
        optim.cosine_decay(peak, after, end=peak * 0.1)
        if config.schedule == "cosine"
        else (lambda _: mx.array(peak))
    )
    if config.warmup_steps == 0:
        return decay
    # Starts at peak / warmup_steps, so that the first step already moves the parameters.
    warmup = optim.linear_schedule(peak / config.warmup_steps, peak, config.warmup_steps)
    return optim.join_schedules([warmup, decay], [config.warmup_steps])


class _Trainer:
    """What the loop is made of: batches, loss, one optimizer step, validation."""

    def __init__(
        self,
        config: TuneConfig,
        reader: StoreReader,
        student: _Student,
        train_chunks: list[int],
        dist: Distributed,
    ):
        self.config = config
        self.reader = reader
        self.dist = dist
        self.model = student.model
        self.shape = reader.manifest.splits["train"]
        self.train_chunks = train_chunks
        self.t_index = _temperature_index(reader, config)
        self.samples = _uses_tail_samples(config, self.shape)
        self.sequences = {split: reader.sequences(split) for split in reader.manifest.splits}
        self.loss_fn = LOSSES[config.loss]
        self.chunked = None  # with grad_checkpoint, for a model split before its output layer
        if config.grad_checkpoint:  # checked on a stored sequence
            first = mx.array(self.sequences["valid"]["tokens"][:1, :CHECK_POSITIONS])
            output = output_layer(self.model, first)
            if output is not None:
                self.chunked = ChunkedOutput(output, self.position_loss)
        self.batches_per_epoch = len(self.plan_of_epoch(0))
        self.model_dtypes = {k: v.dtype for k, v in tree_flatten(self.model.trainable_parameters())}
        self.value_and_grad = mx.value_and_grad(
            lambda params, *inputs: self.summed_loss(self.as_model_params(params), *inputs)
        )

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one trainer per run, two epochs at most live
    def plan_of_epoch(self, epoch: int) -> list[list[int]]:
        shape = self.shape
        return _batch_plan(
            self.train_chunks, shape.num_sequences, shape.chunk_rows, self.config, epoch
        )

    def my_batches(self, steps: range) -> Iterator[list[int]]:
        """This rank's rows of each batch of `steps`, planned as they are consumed: a run of 10**9
        steps holds one epoch's plan, not every step's batches."""
        for step in steps:
            for batch in self.batches_of_step(step):
                yield self.dist.my_rows(batch)

    def batches_of_step(self, step: int) -> list[list[int]]:
        first = (step - 1) * self.config.grad_accumulation
        batches = range(first, first + self.config.grad_accumulation)
        per_epoch = self.batches_per_epoch
        return [self.plan_of_epoch(b // per_epoch)[b % per_epoch] for b in batches]

    def as_model_params(self, params):
        """The float32 master copy, cast to the dtypes the model computes in."""
        flat = [(k, v.astype(self.model_dtypes[k])) for k, v in tree_flatten(params)]
        return tree_unflatten(flat)

    def batch_inputs(self, split: str, rows: list[int], targets: dict[str, np.ndarray]):
        return _batch_arrays(self.sequences[split], rows, targets, self.t_index, self.samples)

    def summed_loss(self, params, tokens, *targets):
        """The loss summed over the batch's positions (targets: teacher top-k, indices, tail,
        tail samples and tail entropy (each None where unused), mask)."""
        self.model.update(params)
        if self.chunked is None:
            return self.position_loss(self.model(tokens), *targets)
        hidden = self.chunked.output.backbone(tokens)
        return self.chunked.loss(hidden, self.chunked.weight_blocks(), targets)

    def position_loss(self, logits, teacher_topk, indices, teacher_tail, samples, entropy, mask):
        logits = logits.astype(mx.float32)
        t = self.config.temperature
        student_topk = mx.take_along_axis(logits, indices, axis=-1)
        # kl_topk renormalises over the top-k alone and needs no tail
        student_tail = None if teacher_tail is None else tail_logsumexp(logits / t, indices)
        per_position = self.loss_fn(student_topk, student_tail, teacher_topk, teacher_tail, t)
        if samples is not None:
            student_samples = mx.take_along_axis(logits, samples, axis=-1)
            per_position = per_position + sampled_tail_kl(
                student_samples, student_tail, teacher_topk, teacher_tail, entropy, t
            )
        return (per_position * mask).sum()

    def loss_and_grads(self, params, tokens, *targets):
        if self.chunked is None:
            return self.value_and_grad(params, tokens, *targets)
        return self.chunked_loss_and_grads(params, tokens, *targets)

    def chunked_loss_and_grads(self, params, tokens, *targets):
        """value_and_grad with the output layer and loss by chunks (stages/chunked_output.py):
        the hidden states' gradient is pulled back through the blocks, the head's weight's
        through its parameters. Costs one more forward pass of the blocks."""
        flat = dict(tree_flatten(params))

        def use(named: dict) -> None:
            self.model.update(self.as_model_params(tree_unflatten(list(named.items()))))

        def hidden_of(*values):
            use(dict(zip(flat, values, strict=True)))
            return self.chunked.output.backbone(tokens)

        hidden = hidden_of(*flat.values())
        mx.eval(hidden)
        weights = self.chunked.weight_blocks()
        loss, hidden_grad, weight_grads = self.chunked.loss_and_grads(hidden, weights, targets)
        del hidden, weights
        head_grads = self.chunked.head_grads(flat, use, weight_grads)
        del weight_grads
        _, block_grads = mx.vjp(hidden_of, list(flat.values()), [hidden_grad])
        grads = dict(zip(flat, block_grads, strict=True))
        for name, grad in head_grads.items():
            grads[name] = grads[name] + grad
        return loss, tree_map_with_path(lambda name, _: grads[name], params)

    def global_tokens(self, split: str, batches: list[list[int]]) -> float:
        seqs = self.sequences[split]
        rows = [r for batch in batches for r in batch]
        positions = seqs["tokens"].shape[1] - 1
        mask = loss_mask(seqs["lengths"][rows], seqs["prompt_offsets"][rows], positions)
        return float(mask.sum())

    def step(self, params, optimizer, stream: Iterator, step: int) -> tuple[Any, float, float]:
        """One optimizer step over grad_accumulation batches: (params, mean loss, tokens)."""
        ntoks = self.global_tokens("train", self.batches_of_step(step))
        grads, loss_sum = None, 0.0
        for _ in range(self.config.grad_accumulation):
            rows, targets = next(stream)
            loss, g = self.loss_and_grads(params, *self.batch_inputs("train", rows, targets))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, grads)
            loss_sum += loss.item()
        # Sums over ranks of (each rank's summed loss / global tokens) = the global mean.
        grads = self.dist.sum(tree_map(lambda x: x / ntoks, grads))
        loss = float(self.dist.sum(mx.array(loss_sum)).item()) / ntoks
        if not (math.isfinite(loss) and _all_finite(grads)):  # never step into NaN weights
            raise _NonFinite(step)
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
        return params, loss, ntoks

    def validate(self, params) -> float:
        """Mean loss per token over the whole valid split, summed over ranks."""
        size = self.config.batch_size
        rows = list(range(self.reader.manifest.splits["valid"].num_sequences))
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        mine = [rows for rows in map(self.dist.my_rows, batches) if rows]
        stream = stream_batches(
            self.reader, "valid", mine, self.config.prefetch, wait_s=self.config.wait_s
        )
        model_params, total = self.as_model_params(params), 0.0
        for my_rows, targets in zip(mine, stream, strict=True):
            inputs = self.batch_inputs("valid", my_rows, targets)
            total += self.summed_loss(model_params, *inputs).item()
        return float(self.dist.sum(mx.array(total)).item()) / self.global_tokens("valid", batches)


def _batch_arrays(
    seqs: dict, rows: list[int], targets: dict[str, np.ndarray], t_index, samples: bool = False
):
    """A batch's token rows, stored targets (the tail at temperature index `t_index`, or none;
    the tail samples and entropy, or none) and loss mask, as the losses read them."""
    tokens = seqs["tokens"][rows]
    mask = loss_mask(seqs["lengths"][rows], seqs["prompt_offsets"][rows], tokens.shape[1] - 1)
    tail = targets["tail_logsumexp"][..., t_index] if t_index is not None else None
    sampled = (targets["tail_samples"], targets["tail_entropy"]) if samples else (None, None)
    return (
        mx.array(tokens[:, :-1]),
        mx.array(targets["topk_logits"]),
        mx.array(targets["topk_indices"]),
        None if tail is None else mx.array(tail),
        *(None if value is None else mx.array(value) for value in sampled),
        mx.array(mask.astype(np.float32)),
    )


class _NonFinite(Exception):
    def __init__(self, step: int):
        self.step = step


def _all_finite(tree) -> bool:
    checks = [mx.all(mx.isfinite(value)) for _, value in tree_flatten(tree)]
    return bool(mx.all(mx.stack(checks)).item())  # one evaluation for the whole tree


NARROW_RATE = 5e-5  # 3-bit validated at KL 0.2863 here against 0.3063 at the default (README)


def rate_note(config: TuneConfig) -> str | None:
    """A line for a uniform affine student of 3 bits or fewer left at the default rate, which
    was chosen for 4 bits (configs/default-3bit.yaml sets NARROW_RATE)."""
    default = TuneConfig.learning_rate
    narrow = config.mode == AFFINE and config.bits_per_weight is None and config.bits <= 3
    if not narrow or config.learning_rate != default:
        return None
    measured = "a 3-bit one" if config.bits == 3 else "a 3-bit one (2-bit was not measured)"
    return (
        f"tune.learning_rate {default:g} was chosen for 4-bit students; {measured} validated "
        f"better at {NARROW_RATE:g} (--learning-rate {NARROW_RATE:g}, as configs/default-3bit.yaml)"
    )


def _rate_setting(config: TuneConfig) -> str:
    """The setting whose rate moves the student: a floating-point mode's latents have their own."""
    return "tune.learning_rate" if config.mode == AFFINE else "tune.latent_lr"


def _diverged(step: int, checkpoint_step: int | None, run_dir: Path, rate: str) -> StageError:
    kept = (
        f"the last good checkpoint (step {checkpoint_step}) is kept in {run_dir}"
        if checkpoint_step is not None
        else "no checkpoint had been written yet"
    )
    return StageError(
        f"the loss or its gradients became NaN/inf at step {step}; the update was not applied "
        f"and {kept}; lower {rate} (or use another loss or temperature) and start "
        "over with --overwrite"
    )


def _temperature_index(reader: StoreReader, config: TuneConfig) -> int | None:
    if config.loss not in NEEDS_TAIL:
        return None
    return list(reader.manifest.settings["lse_temperatures"]).index(config.temperature)


# How long a rank of a launch may take to stop after a SIGTERM (mlx.launch sends one when another
# rank exits with an error) or a Ctrl-C: a collective waiting on a dead rank can block for good
# (MLX 0.32's ring, on sums of more than about 1 MiB), where the stop flag is never read.
LAUNCH_STOP_GRACE_S = 180.0
EXIT_STUCK = 1


@contextmanager
def _stop_requests(dist: Distributed | None = None) -> Iterator[list[int]]:
    """SIGINT/SIGTERM set a flag instead of killing: the loop checkpoints, then stops. A rank of
    a launch (`dist` of several ranks) still running LAUNCH_STOP_GRACE_S after one says so and
    exits."""
    requested: list[int] = []
    handler = lambda signum, frame: requested.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    launched = dist is not None and dist.size > 1
    try:
        with _exit_if_stuck_after_stop_signal(LAUNCH_STOP_GRACE_S) if launched else nullcontext():
            yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _pass_on(received: bytes, wakeup_fd: int) -> None:
    """What the wakeup fd brought, to the one it replaced (an asyncio loop's, say)."""
    if wakeup_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(wakeup_fd, received)


@contextmanager
def _exit_if_stuck_after_stop_signal(seconds: float) -> Iterator[None]:
    """Exit with one line when still inside `seconds` after a SIGTERM or SIGINT. A thread learns
    of the signal from Python's wakeup fd, which the C-level handler writes even while the main
    thread is blocked in MLX (where no Python handler runs)."""
    read_fd, write_fd = os.pipe()
    done = threading.Event()

    def watch() -> None:
        while True:
            received = os.read(read_fd, 64)
            if not received or done.is_set():  # the context is over: this is the wake byte
                return
            _pass_on(received, previous_fd)
            if signal.SIGTERM in received or signal.SIGINT in received:
                if not done.wait(seconds):
                    line = (
                        f"error: still running {seconds:.0f} s after it was asked to stop "
                        "(another process of the launch ended, or the launch was interrupted); "
                        "the last checkpoint in the run folder is kept; re-run the same command "
                        "to resume\n"
                    )
                    os.write(2, line.encode())  # not sys.stderr: its lock may be held
                    os._exit(EXIT_STUCK)
                return

    try:
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    watcher = threading.Thread(target=watch, name="stop-watchdog", daemon=True)
    try:
        watcher.start()
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous_fd)
        if watcher.is_alive():
            os.write(write_fd, b"\0")  # wakes its read (a forked child may hold the pipe open)
            watcher.join()
        os.close(write_fd)
        os.close(read_fd)


# ---- the stage: setup -> loop -> save ----------------------------------------------------------


def tune(
    config: TuneConfig,
    overwrite: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TuneResult:
    """Tune the student's scales and biases on the store's targets; save an mlx-lm model.
    on_phase names what runs before the first step (loading, GPTQ block by block, validating)."""
    reader = StoreReader(config.store, config.storage_options)
    run_dir = Path(config.run_dir)
    dist = Distributed()
    phase = on_phase if on_phase and dist.rank == 0 else lambda text: None
    _check_before_loading(config, reader, run_dir, dist)
    state = _same_run_state(run_dir, config, reader, overwrite)
    recorded, recorded_bits = _recorded_tied_outputs(state), _recorded_layer_bits(state)
    inputs = _StartInputs(reader, phase, dist, recorded, recorded_bits, run_dir)
    student = _prepare_student(config, inputs)
    with _claimed_run_dir(run_dir, dist, overwrite):
        train_chunks = _train_chunks(reader, config, run_dir)
        trainer = _Trainer(config, reader, student, train_chunks, dist)
        run = _start_or_resume(trainer, run_dir, on_step, phase)
        if dist.rank == 0 and student.budget_record is not None:  # once the run is accepted
            run_folder.write_sensitivities(run_dir, student.budget_record)
        run.state["tied_outputs"] = student.tied_outputs  # which start a resume rebuilds
        if student.layer_bits is not None:  # the mix a resume rebuilds
            run.state["layer_bits"] = _as_recorded(student.layer_bits, config)
        _train_loop(trainer, run, on_step)
        with _stop_requests(dist):  # every step is done: a Ctrl-C now waits for the model on disk
            model_dir = _save_best(trainer, run, student)
    return _result(run, model_dir, _rate_setting(config))


def _check_before_loading(
    config: TuneConfig, reader: StoreReader, run_dir: Path, dist: Distributed
) -> None:
    """The cheap checks, before the student loads: run folder, ranks, store."""
    if dist.rank == 0:  # the only rank that writes the run folder
        run_folder.check_run_dir(run_dir, {"store": config.store, "student": config.student})
    if config.batch_size % dist.size:
        raise StageError(
            f"tune.batch_size={config.batch_size} must divide by the {dist.size} ranks"
        )
    _check_store(reader, config)


def _prepare_student(config: TuneConfig, inputs: _StartInputs) -> _Student:
    """The student, loaded with its scales and biases trainable."""
    phase = inputs.phase
    phase("loading the student" if config.student else "loading and quantizing the teacher")
    student = _load_student(config, inputs)
    tuned = unfreeze_scales_and_biases(student.model, config.train_norms)
    if tuned == 0 and config.mode == AFFINE:
        why = (
            ""
            if config.student
            else f" (tune.group_size={config.group_size} divides no teacher layer width)"
        )
        if student.layer_bits:  # a budget as high as every layer at 8 bits
            why = " (tune.bits_per_weight gave every layer 8 bits: ask for fewer)"
        raise ModelError(
            f"the student has no affine-quantized layers below 8 bits{why}: nothing to tune"
        )
    apply_fast_matmul(student.model, config.fast_matmul)  # before the levers: GPTQ validates
    _apply_levers(config, student, inputs)
    if config.grad_checkpoint:
        checkpoint_blocks(student.model)
    return student


@contextmanager
def _claimed_run_dir(run_dir: Path, dist: Distributed, overwrite: bool) -> Iterator[None]:
    """The run folder made and locked by rank 0, its checkpoint recovered (or cleared with
    --overwrite) before any rank reads it."""
    if dist.rank == 0:
        run_folder.make_run_dir(run_dir)
    with run_folder.lock_run_dir(run_dir) if dist.rank == 0 else nullcontext():
        if dist.rank == 0:
            run_folder.recover_checkpoint(run_dir)
            if overwrite:
                run_folder.clear_run(run_dir)
        dist.barrier()  # every rank reads the checkpoint only once it is recovered or cleared
        yield


@dataclass
class _Run:
    """What the loop updates and a checkpoint holds."""

    run_dir: Path
    total_steps: int
    optimizer: Any
    params: Any  # the best so far are on disk (run_dir.BEST_FILE), not in memory
    state: dict[str, Any]  # step, initial/best validation loss, best step, train chunks
    checkpoint_step: int | None  # the step of the last checkpoint written (None: none yet)


def _total_steps(trainer: _Trainer) -> int:
    config, per_epoch = trainer.config, trainer.batches_per_epoch
    if per_epoch < config.grad_accumulation:
        raise StageError(
            f"the store's {trainer.shape.num_sequences} training sequences make {per_epoch} "
            f"batches of {config.batch_size}, fewer than "
            f"grad_accumulation={config.grad_accumulation}"
        )
    return config.max_steps or config.epochs * (per_epoch // config.grad_accumulation)


class _PerWidthAdam(optim.MultiOptimizer):
    """One Adam per bit width; its learning rate is the last one's (tune.bits' width)."""

    @property
    def learning_rate(self):
        return self.optimizers[-1].learning_rate


def _scales_optimizer(trainer: _Trainer, total_steps: int) -> optim.Optimizer:
    """Adam on the scales and biases. Under a bits budget a layer wider than tune.bits (the
    width the learning rate is set for) gets (2**tune.bits - 1) / (2**bits - 1) of the rate: an
    Adam step moves a layer's weights by up to (2**bits - 1) x the step, so one rate for all
    moves a 6-bit layer 4x as far as a 4-bit one on a grid 4x as fine (measured: the mixed 5.0
    bits-per-weight student's validation loss went from 0.038 to 0.064 at one rate, to 0.045
    with every width in proportion, narrower ones faster too; those now keep the rate)."""
    config = trainer.config
    schedule = _schedule(config, total_steps)
    if config.bits_per_weight is None:
        return _adam(config, schedule)
    paths = {}
    for path, module in trainer.model.named_modules():
        if is_trainable_quantized(module) and module.bits > config.bits:
            paths.setdefault(module.bits, []).append(path + ".")
    optimizers, filters = [], []
    for bits, prefixes in sorted(paths.items()):
        factor = (2**config.bits - 1) / (2**bits - 1)
        scaled = lambda step, factor=factor: factor * schedule(step)  # noqa: E731
        optimizers.append(_adam(config, scaled, len(optimizers)))
        filters.append(lambda path, _, prefixes=tuple(prefixes): path.startswith(prefixes))
    optimizers.append(_adam(config, schedule, len(optimizers)))
    return _PerWidthAdam(optimizers, filters)


def _adam(config: TuneConfig, schedule, stream: int = 0) -> MomentsAdam:
    """One of the run's Adams, with its own rounding noise (`stream`) for bfloat16 moments."""
    return MomentsAdam(schedule, config.adam_moments_dtype, config.seed, stream)


def _start_or_resume(
    trainer: _Trainer, run_dir: Path, on_step, phase: Callable[[str], None]
) -> _Run:
    """Optimizer and float32 parameters, from the checkpoint when there is one; a new run is
    validated once before its first step."""
    config, dist = trainer.config, trainer.dist
    total_steps = _total_steps(trainer)
    optimizer = _scales_optimizer(trainer, total_steps)
    if config.mode != AFFINE:
        latents = _adam(config, _schedule(config, total_steps, config.latent_lr), stream=255)
        optimizer = optim.MultiOptimizer([latents, optimizer], [lambda path, _: is_latent(path)])
    if config.learned_rounding:
        optimizer = with_rounding_steps(optimizer, config.rounding_lr, total_steps)
    params = _float32_trainable(trainer.model)
    optimizer.init(params)
    state = {"step": 0, "initial_val_loss": None, "best_val_loss": None, "best_step": 0}
    state["train_chunks"] = trainer.train_chunks
    run = _Run(run_dir, total_steps, optimizer, params, state, None)
    store_digest = trainer.reader.manifest.digest
    resumed = run_folder.load_checkpoint(
        run_dir, optimizer, config.resume_key(), store_digest, config.identity()
    )
    if resumed:
        run.params, run.state = resumed
        if dist.rank == 0:
            run_folder.restore_best(run_dir)
        run.checkpoint_step = run.state["step"]
        phase(f"resuming at step {run.checkpoint_step + 1}")  # until that step reports
    if dist.rank == 0:  # the config once the checkpoint is accepted; lines after it are redone
        run_folder.write_run_config(run_dir, asdict(config))
        run_folder.trim_metrics(run_dir, run.state["step"] if resumed else -1)
    if run.state["initial_val_loss"] is None:
        phase("validating the start")
        initial = trainer.validate(run.params)
        if not math.isfinite(initial):
            raise ModelError(
                "the student's validation loss is NaN/inf before any step: its weights hold "
                "NaN/inf or do not fit the store; quantize the student again from the teacher"
            )
        run.state["initial_val_loss"] = run.state["best_val_loss"] = initial
        if dist.rank == 0:
            run_folder.save_best(run_dir, run.params)
        _report(dist, run_dir, on_step, StepReport(0, total_steps, val_loss=initial))
    return run


def _save_checkpoint(trainer: _Trainer, run: _Run) -> None:
    if trainer.dist.rank == 0:
        digest = trainer.reader.manifest.digest
        saved = {**run.state, "resume_key": trainer.config.resume_key(), "store": digest}
        saved["settings"] = trainer.config.identity()  # names what differs on a refusal
        run_folder.save_checkpoint(run.run_dir, run.params, run.optimizer, saved)
    run.checkpoint_step = run.state["step"]


def _train_loop(trainer: _Trainer, run: _Run, on_step) -> None:
    """The steps left to run: validate, report and checkpoint as configured; on SIGINT/SIGTERM
    checkpoint and stop."""
    config = trainer.config
    steps = range(run.state["step"] + 1, run.total_steps + 1)
    # One stream for the whole run, so decoding runs ahead across step boundaries too.
    planned = trainer.my_batches(steps)
    prefetched = closing(
        stream_batches(trainer.reader, "train", planned, config.prefetch, wait_s=config.wait_s)
    )
    with _stop_requests(trainer.dist) as stop_requested, prefetched as batches:
        stream = zip(trainer.my_batches(steps), batches, strict=True)
        speed = _Speed()
        for step in steps:
            report = _step(trainer, run, stream, step, speed)
            if step % config.val_every == 0 or step == run.total_steps:
                report = _validated(trainer, run, report)
            _report(trainer.dist, run.run_dir, on_step, report)
            if step % config.checkpoint_every == 0 or step == run.total_steps or stop_requested:
                _save_checkpoint(trainer, run)
            if stop_requested:
                raise TuneInterrupted(
                    f"stopped at step {step}/{run.total_steps}; checkpoint saved in "
                    f"{run.run_dir}, re-run the same command to resume"
                )


@dataclass
class _Speed:
    """Training tokens per second of this process, over the steps it ran."""

    seconds: float = 0.0
    tokens: float = 0.0


def _step(trainer: _Trainer, run: _Run, stream: Iterator, step: int, speed: _Speed) -> StepReport:
    tic = time.perf_counter()
    try:
        run.params, loss, ntoks = trainer.step(run.params, run.optimizer, stream, step)
    except _NonFinite:
        rate = _rate_setting(trainer.config)
        raise _diverged(step, run.checkpoint_step, run.run_dir, rate) from None
    speed.seconds += time.perf_counter() - tic
    speed.tokens += ntoks
    run.state["step"] = step
    return StepReport(
        step,
        run.total_steps,
        loss=loss,
        learning_rate=float(run.optimizer.learning_rate.item()),  # the rate this step used
        tokens_per_s=speed.tokens / speed.seconds,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


def _validated(trainer: _Trainer, run: _Run, report: StepReport) -> StepReport:
    """The report with the validation loss; the best parameters so far written by rank 0."""
    val = trainer.validate(run.params)
    if val < run.state["best_val_loss"]:
        run.state["best_val_loss"], run.state["best_step"] = val, report.step
        if trainer.dist.rank == 0:
            run_folder.save_best(run.run_dir, run.params)
    return dataclasses.replace(report, val_loss=val)


def _save_best(trainer: _Trainer, run: _Run, student: _Student) -> Path:
    """The best parameters saved as an mlx-lm model by rank 0, which every rank waits for."""
    model_dir = run.run_dir / run_folder.MODEL_DIR
    if trainer.dist.rank == 0:
        run.params = run.optimizer = None  # the best read once the last state is freed
        best = trainer.as_model_params(run_folder.load_best(run.run_dir))
        model_dir = run_folder.save_model(run.run_dir, lambda to: _save_student(to, student, best))
    trainer.dist.barrier()  # no rank exits (ending the launch) before the model is on disk
    return model_dir


def _result(run: _Run, model_dir: Path, rate: str) -> TuneResult:
    state = run.state
    warning = None
    if state["best_val_loss"] >= state["initial_val_loss"]:
        warning = (
            f"validation loss never improved on the start ({state['initial_val_loss']:.4f}); "
            f"try a lower {rate}, more data or more steps"
        )
    return TuneResult(
        model_dir=model_dir,
        steps=state["step"],
        initial_val_loss=state["initial_val_loss"],
        best_val_loss=state["best_val_loss"],
        best_step=state["best_step"],
        warning=warning,
    )


def _report(dist: Distributed, run_dir: Path, on_step, report: StepReport) -> None:
    if dist.rank != 0:
        return
    run_folder.append_metrics(run_dir, {k: v for k, v in asdict(report).items() if v is not None})
    if on_step:
        on_step(report)


def _save_student(folder: Path, student: _Student, params) -> None:
    """The tuned student as an mlx-lm model folder (weights, config, tokenizer)."""
    from mlx_lm.utils import save

    student.model.update(params)
    fold_rounding_offsets(student.model)
    fold_latent_weights(student.model)
    restore_dtypes(student.model, student.dtypes)
    save(
        folder, student.source, student.model, student.tokenizer, student.config, donate_model=False
    )
