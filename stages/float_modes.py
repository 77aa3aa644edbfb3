"""DWQ for MLX's floating-point quantization modes (`tune.mode`: mxfp4, nvfp4, mxfp8).

These modes have no biases and their scales are powers of two (mxfp) or fp8 (nvfp4), so there
are no continuous scales to tune. Instead each quantized layer keeps a float32 latent weight,
started from the teacher's full-precision weight, and computes with its quantized version
through a straight-through estimator,

    w = latent + stop_gradient(dequantize(quantize(latent)) - latent),

so the forward sees exactly the weight mx.quantize of that mode makes from the latent and the
gradient reaches the latent as if rounding were the identity (quantization-aware training). The
scales move with the latent (each group's scale is chosen from its largest weight). At save the
layer gets exactly mx.quantize(latent)'s packed weight and scales: a plain mlx-lm model of that
mode, which `mlx_lm.load` builds back unchanged. A latent equal to the teacher's weight is
round-to-nearest, so the run starts at the RTN student.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from stages.models import classes_from_weight

AFFINE = "affine"
# mode -> (bits, group_size): each floating-point mode has one of each (mx.quantize's).
FLOAT_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
MODES = (AFFINE, *FLOAT_MODES)
LATENT = "latent_weight"


def fake_quantized(latent: mx.array, bits: int, group_size: int, mode: str) -> mx.array:
    """dequantize(quantize(latent)) in `mode`: the weight the saved layer will compute with."""
    packed, scales = mx.quantize(latent, group_size=group_size, bits=bits, mode=mode)
    args = {"group_size": group_size, "bits": bits, "mode": mode}
    return mx.dequantize(packed, scales, **args, dtype=latent.dtype)  # its default is bfloat16


class _LatentWeight:
    """Mixin: the weight is the latent's quantized version, with gradients straight through."""

    def _weight(self, rows: mx.array | None = None) -> mx.array:
        # Quantization groups run along rows, so quantizing picked rows equals picking them.
        latent = self[LATENT] if rows is None else self[LATENT][rows]
        quantized = fake_quantized(latent, self.bits, self.group_size, self.mode)
        weight = latent + mx.stop_gradient(quantized - latent)
        return weight.astype(self.compute_dtype)


_LATENT_CLASSES = classes_from_weight(_LatentWeight)


def _float_mode_layers(model: Any, originals: dict[str, mx.array]):
    """Linear/Embedding layers quantized in a floating-point mode whose teacher weight we hold."""
    for path, module in model.named_modules():
        base = next((c for c in type(module).__mro__ if c in _LATENT_CLASSES), None)
        if base and getattr(module, "mode", AFFINE) in FLOAT_MODES and path in originals:
            yield module, base, originals[path]


def add_latent_weights(
    model: Any, originals: dict[str, mx.array], compute_dtype: mx.Dtype | None = None
) -> int:
    """Give every floating-point-mode layer a trainable float32 latent weight, the teacher's
    (the student is unchanged: it is the latent's round-to-nearest), computing in
    `compute_dtype` (None: the teacher weight's dtype); returns how many layers."""
    count = 0
    for module, base, weight in _float_mode_layers(model, originals):
        module[LATENT] = _off_the_ties(weight.astype(mx.float32), module)
        module.unfreeze(keys=[LATENT], recurse=False)
        module.compute_dtype = compute_dtype or weight.dtype
        module.__class__ = _LATENT_CLASSES[base]
        mx.eval(module[LATENT])
        count += 1
    return count


# A latent starts this share of the way from the teacher's weight to its quantized value, per
# mode. Many weights sit exactly on a rounding tie of the mode's grid (1.3 % of a default-teacher
# layer's mxfp8 codes flipped at a first step of any size from 6e-7 to 1e-5); started there,
# the first step flips them all at once. In mxfp8 that doubled the validation loss and tuning
# never beat RTN; started off them it does. In nvfp4 those first flips helped: from off the
# ties the default job's validation loss ended at 0.0884 against 0.0562 from on them, so the
# 4-bit modes start on the teacher's weight as before (README: --mode).
OFF_TIE = {"mxfp8": 0.1}


def _off_the_ties(weight: mx.array, module: Any) -> mx.array:
    """The teacher's weight moved its mode's OFF_TIE share toward its quantized value, group by
    group where that keeps the group's quantization (a moved maximum may change a group's scale:
    such a group starts at the teacher's weight), so the start is RTN's exactly."""
    share = OFF_TIE.get(module.mode, 0.0)
    if not share:
        return weight
    args, size = (module.bits, module.group_size, module.mode), module.group_size
    quantized = fake_quantized(weight, *args)
    moved = weight + share * (quantized - weight)
    same = (fake_quantized(moved, *args) == quantized).reshape(*weight.shape[:-1], -1, size)
    kept = mx.broadcast_to(same.all(axis=-1, keepdims=True), same.shape).reshape(weight.shape)
    return mx.where(kept, moved, weight)


def fold_latent_weights(model: Any) -> int:
    """Write mx.quantize(latent)'s packed weight and scales into each layer and drop the latent,
    leaving a plain mlx-lm quantized model; returns how many layers were folded."""
    folded = 0
    for _, module in model.named_modules():
        if isinstance(module, _LatentWeight):
            packed, scales = mx.quantize(
                module[LATENT], group_size=module.group_size, bits=module.bits, mode=module.mode
            )
            module["weight"], module["scales"] = packed, scales
            del module[LATENT]
            module.__class__ = next(c for c in _LATENT_CLASSES if isinstance(module, c))
            folded += 1
    return folded


def untuned_float_layers(model: Any) -> list[str]:
    """Paths of the floating-point-mode layers left without a latent weight (mixture-of-experts
    switch layers: not built yet), which would stay round-to-nearest."""
    return [
        path
        for path, module in model.named_modules()
        if getattr(module, "mode", AFFINE) in FLOAT_MODES
        and "scales" in module
        and not isinstance(module, _LatentWeight)
    ]


def is_latent(path: str) -> bool:
    """Whether a parameter path names a latent weight (its own learning rate)."""
    return path.endswith(LATENT)
