"""The quantization levers of `tune` that need the teacher's full-precision weights.

- **clip search** (`tune.init=clip_search`): per group, the clip ratio of its min/max range that
  minimises the group's weight quantization error, instead of round-to-nearest over the full range.
- **learned rounding** (`tune.learned_rounding`, AutoRound: Cheng et al. 2023): a per-weight
  offset V in [-0.5, 0.5] added before rounding, trained through a straight-through estimator
  with signed gradient steps, and folded into the integer weights when the model is saved.

The integer grid of learned rounding is the starting student's (its initial scales and biases):
code = clip(q0 + round(r + V)), with q0 the starting integers and r the weight's place between
them. The dequantized weight is code * scale + bias with the *current* scales and biases, so
their gradients are exactly those of plain tuning (rounding against the current grid would zero
the biases' gradient: d(s * round((W - b) / s + V) + b) / db = 0 through the estimator), and V = 0
is plain tuning bit for bit.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from stages.models import classes_from_weight, is_trainable_quantized

INITS = ("rtn", "clip_search", "gptq")
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
OFFSET, RESIDUAL = "rounding_offset", "rounding_residual"
OFFSET_BOUND = 0.5
NEAR_TIE = 0.1  # how far past the tie a start's weight may sit and still count as at the tie


# ---- integer codes ----------------------------------------------------------------------------


def unpack_codes(packed: mx.array, bits: int, group_size: int) -> mx.array:
    """The integers of an affine-quantized weight, as float32 (dequantize with unit scales)."""
    groups = packed.shape[-1] * 32 // bits // group_size
    ones = mx.ones((*packed.shape[:-1], groups), dtype=mx.float32)
    return mx.dequantize(packed, ones, mx.zeros_like(ones), group_size=group_size, bits=bits)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Integers in [0, 2**bits) -> mlx's packed uint32: a little-endian bit stream per row."""
    values = np.asarray(codes, dtype=np.float32).astype(np.uint32)
    rows = values.reshape(-1, values.shape[-1])
    bit_planes = (rows[..., None] >> np.arange(bits, dtype=np.uint32)) & 1
    stream = bit_planes.astype(np.uint8).reshape(rows.shape[0], -1)
    packed = np.packbits(stream, axis=-1, bitorder="little").view("<u4")
    return mx.array(packed.reshape(*values.shape[:-1], -1))


def _per_group(values: mx.array, group_size: int) -> mx.array:
    return values.reshape(*values.shape[:-1], -1, group_size)


def _dequantize(codes: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    grouped = _per_group(codes, group_size) * scales[..., None] + biases[..., None]
    return grouped.reshape(codes.shape)


# ---- the teacher's weights -------------------------------------------------------------------


def full_precision_weights(model: Any) -> dict[str, mx.array]:
    """Module path -> weight of every Linear/Embedding, taken before the model is quantized."""
    return {
        path: module["weight"]
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and "weight" in module
    }


def _layers_with_originals(model: Any, originals: dict[str, mx.array]):
    for path, module in model.named_modules():
        if is_trainable_quantized(module) and path in originals:
            yield path, module, originals[path]


# ---- clip search ------------------------------------------------------------------------------


def group_errors(weight: mx.array, quantized: tuple, bits: int, group_size: int) -> mx.array:
    """Squared error of each group of `weight` against its quantized version."""
    restored = mx.dequantize(*quantized, group_size=group_size, bits=bits).astype(mx.float32)
    diff = _per_group(weight.astype(mx.float32) - restored, group_size)
    return (diff * diff).sum(axis=-1)


def _clipped(weight: mx.array, ratio: mx.array, group_size: int) -> mx.array:
    grouped = _per_group(weight.astype(mx.float32), group_size)
    low = grouped.min(axis=-1, keepdims=True) * ratio
    high = grouped.max(axis=-1, keepdims=True) * ratio
    return mx.clip(grouped, low, high).reshape(weight.shape).astype(weight.dtype)


def clip_search_quantize(
    weight: mx.array, bits: int, group_size: int, ratios=CLIP_RATIOS
) -> tuple[mx.array, mx.array, mx.array]:
    """(packed, scales, biases) with each group's range clipped to the ratio of the grid that
    gives the least squared error; ratio 1.0 is round-to-nearest, so no group gets worse."""
    best_error, best_ratio = None, None
    for ratio in ratios:
        candidate = mx.quantize(_clipped(weight, mx.array(ratio), group_size), group_size, bits)
        error = group_errors(weight, candidate, bits, group_size)
        if best_error is None:
            best_error, best_ratio = error, mx.full(error.shape, ratio)
        else:
            better = error < best_error
            best_error = mx.where(better, error, best_error)
            best_ratio = mx.where(better, ratio, best_ratio)
        mx.eval(best_error, best_ratio)
    return mx.quantize(_clipped(weight, best_ratio[..., None], group_size), group_size, bits)


def clip_search_init(model: Any, originals: dict[str, mx.array]) -> int:
    """Re-quantize every trainable layer from the teacher's weight by clip search; returns how
    many layers were re-quantized."""
    count = 0
    for _, module, weight in _layers_with_originals(model, originals):
        packed, scales, biases = clip_search_quantize(weight, module.bits, module.group_size)
        module["weight"] = packed
        module["scales"] = scales.astype(module["scales"].dtype)
        module["biases"] = biases.astype(module["biases"].dtype)
        mx.eval(module.parameters())
        count += 1
    return count


# ---- learned rounding -------------------------------------------------------------------------


def rounding_residual(weight: mx.array, module: Any) -> mx.array:
    """Where each weight lies between the integers of the module's grid, in [-0.5, 0.5]. A
    weight its start put well past the tie (GPTQ feeding errors forward, a clipped range: more
    than NEAR_TIE beyond half a step) gets 0, not the clipped 0.5: on the tie, a first step
    towards the nearer integer would flip it back, undoing the start (measured: the GPTQ start's
    validation loss doubled at step 1). Those just past the tie (stored scales' rounding) keep
    the tie, so they can still flip as with round-to-nearest."""
    codes = unpack_codes(module["weight"], module.bits, module.group_size)
    scales, biases = (module[k].astype(mx.float32) for k in ("scales", "biases"))
    grouped = _per_group(weight.astype(mx.float32), module.group_size)
    position = ((grouped - biases[..., None]) / scales[..., None]).reshape(weight.shape)
    residual = position - codes
    near = mx.clip(residual, -OFFSET_BOUND, OFFSET_BOUND)
    return mx.where(mx.abs(residual) <= OFFSET_BOUND + NEAR_TIE, near, 0.0)


def rounded_codes(module: Any, rows: mx.array | None = None) -> mx.array:
    """clip(q0 + round(r + V)); the rounding passes gradients straight through to V."""
    pick = (lambda a: a) if rows is None else (lambda a: a[rows])
    base = unpack_codes(pick(module["weight"]), module.bits, module.group_size)
    shift = pick(module[RESIDUAL]) + pick(module[OFFSET])
    shift = shift + mx.stop_gradient(mx.round(shift) - shift)
    return mx.clip(base + shift, 0, 2**module.bits - 1)


class _RoundedWeight:
    """Mixin: the weight is rebuilt from the starting integers, residuals, offsets and the current
    scales and biases (a dense matmul: the offsets need a float weight to get gradients)."""

    def _weight(self, rows: mx.array | None = None) -> mx.array:
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])
        codes = rounded_codes(self, rows)
        weight = _dequantize(codes, pick(self["scales"]), pick(self["biases"]), self.group_size)
        return weight.astype(self["scales"].dtype)


_ROUNDED = classes_from_weight(_RoundedWeight)


def add_rounding_offsets(model: Any, originals: dict[str, mx.array]) -> int:
    """Give every trainable quantized layer a trainable offset per weight (zero: the student is
    unchanged) and its frozen residuals; returns the bytes they take."""
    added = 0
    for _, module, weight in _layers_with_originals(model, originals):
        base = next(c for c in type(module).__mro__ if c in _ROUNDED)
        residual = rounding_residual(weight, module)
        module[RESIDUAL] = residual
        module[OFFSET] = mx.zeros_like(residual)
        module.freeze(keys=[RESIDUAL], recurse=False)
        module.unfreeze(keys=[OFFSET], recurse=False)
        module.__class__ = _ROUNDED[base]
        mx.eval(residual)
        added += 2 * residual.nbytes
    return added


def fold_rounding_offsets(model: Any) -> int:
    """Write each layer's rounded integers into its packed weight and drop the offsets, leaving
    a plain mlx-lm quantized model; returns how many layers were folded."""
    folded = 0
    for _, module in model.named_modules():
        if isinstance(module, _RoundedWeight):
            module["weight"] = pack_codes(rounded_codes(module), module.bits)
            del module[RESIDUAL], module[OFFSET]
            module.__class__ = next(c for c in _ROUNDED if isinstance(module, c))
            folded += 1
    return folded


def rounding_offsets(params: Any) -> list[mx.array]:
    return [v for k, v in tree_flatten(params) if k.endswith(OFFSET)]


class SignSGD(optim.Optimizer):
    """x <- clip(x - lr * sign(grad)), AutoRound's update for the rounding offsets."""

    def __init__(self, learning_rate, bound: float = OFFSET_BOUND):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self.bound = bound

    def init_single(self, parameter: mx.array, state: dict) -> None:
        pass

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        step = self.learning_rate.astype(parameter.dtype) * mx.sign(gradient)
        return mx.clip(parameter - step, -self.bound, self.bound)


def with_rounding_steps(optimizer: optim.Optimizer, rounding_lr: float, total_steps: int):
    """The scales' optimizer, plus signed steps for the rounding offsets with AutoRound's linear
    decay of their learning rate to 0."""
    signed = SignSGD(optim.linear_schedule(rounding_lr, 0.0, max(1, total_steps)))
    return optim.MultiOptimizer([optimizer, signed], [lambda path, _: not path.endswith(OFFSET)])
