"""A bits-per-weight budget for `tune` (`tune.bits_per_weight`): each layer's bits chosen from
`tune.allowed_bits` (and its group size from `tune.allowed_group_sizes`, those that divide its
width) by a sensitivity measured on the store, so that the saved student's bits per weight, as
stored, stay within the budget.

**The budget** is mlx-lm's `compute_bits_per_weight` of the saved model: every parameter's bytes
x 8 over the parameter count (a quantized weight counted as the floats it stands for), so the
scales and biases are counted, and so is everything left in floating point (norms, a layer whose
width the group size does not divide). A scale and a bias are stored in the teacher's dtype (tune
quantizes in it, as mlx-lm's convert does): at group size 64 a 4-bit layer is 4.5 bits per
weight from a bfloat16/float16 teacher and 5.0 from a float32 one (the default teacher is float32).
A larger group stores fewer scales: at 128, 4 bits cost 4.25 from bf16 and 4.5 from float32.

**The sensitivity** of a layer at b bits (and a group size) is a second-order estimate of how
much the stored-target KL per token (at temperature 1, what `eval` reports) grows when that layer
alone is rounded to nearest at b bits: 1/2 sum_i F_i (Q_b(W) - W)_i^2, F the diagonal of the
Fisher information of the full-precision model, which is the Hessian of KL(teacher || model) at
the teacher. F is estimated from the squared gradient of -log q(y) with each position's y drawn
from the stored targets (the top-k and the tail bucket; a drawn tail leaves the position out), one
sequence at a time, so the expected square is the sum of the positions' Fishers. mlx-lm's
`quant/dynamic_quant.py` scores a layer by sum(g * (Q_low(W) - Q_high(W))), g the gradient of KL
to the live teacher's logits at the low-bit model: a first-order gain of one step from low to high
bits. Its gradient vanishes at the teacher (the minimum of the KL), and first order cannot rank
more than two widths, hence the squared form here; like dynamic_quant it needs no quantized
model's forward pass, and unlike it no teacher forward pass for targets: they come from the store.

**For a GPTQ start** (`tune.init` gptq, the default) each layer's estimates are scaled by the
share of rounding's output error GPTQ leaves in it (`stages.gptq.output_error_ratio`, from the
full-precision model's inputs on GPTQ's calibration rows): 0.02-0.5 across the default teacher's
layers and hardly dependent on the bits, so unscaled estimates spend bits where GPTQ would have
cancelled the error anyway. 8-bit options are not scaled (GPTQ leaves 8-bit layers rounded to
nearest), and nothing is when the calibration rows hold too few tokens for the widest layer
(`tune.MIN_TOKENS_PER_COLUMN`). A tied embedding's estimate, which also counts its lookups, is
scaled by its output layer's share: a measured choice, not a derived one (tune keeps that
layer's GPTQ only if it validates better). On the default teacher at uniform 4-bit's bytes the
scaled estimates moved the embedding from 5 bits back to 4 and the mix's GPTQ start from
validation KL 0.0798 to 0.0623 (uniform 4-bit's start: 0.0758; README, 2026-12-01).

**The allocation** starts every layer at its cheapest allowed choice (the lowest bits in the largest
group) and spends the rest of the budget greedily: each time the change (a layer to any dearer
choice that lowers its estimate) with the largest estimated KL drop per stored bit among those
that still fit, until none fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from stages.errors import StageError

AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode packs
DEFAULT_ALLOWED_BITS = [3, 4, 5, 6, 8]
Option = tuple[int, int]  # a layer's (bits, group size)
SENSITIVITY_ROWS = 16  # training sequences the Fisher is estimated on, one backward pass each
# A change of the estimate or the allocation chooses other bits from the same settings: part of
# the run's identity, so a checkpoint made before the change is refused, not resumed. Revision 2
# scales a GPTQ start's estimates by what GPTQ leaves; other starts choose as revision 1.
BUDGET_REVISION = 1
GPTQ_BUDGET_REVISION = 2

GPTQ_NOTE = (
    ", below 8 bits times the layer's gptq_error_ratio: the share of that error a GPTQ start "
    "leaves, foretold from its inputs' Hessian on the calibration rows"
)

Batch = tuple  # tokens (1, L), top-k logits (1, L, K), their indices, tail at T=1 or None, mask


@dataclass(frozen=True)
class Candidate:
    """A layer whose bits the budget chooses."""

    path: str
    weights: int  # its weight's parameters
    scale_bits: int  # bits of one stored scale (and of one bias): the weight's dtype
    columns: int = 0  # its weight's last dimension, which a group size must divide (0: any)

    def stored_bits(self, bits: int, group_size: int) -> int:
        return self.weights * bits + 2 * (self.weights // group_size) * self.scale_bits

    def options(self, allowed: list[int], group_sizes: list[int]) -> list[Option]:
        """Its allowed (bits, group size), cheapest first."""
        sizes = [g for g in group_sizes if not self.columns or self.columns % g == 0]
        found = [(b, g) for b in allowed for g in sizes]
        return sorted(found, key=lambda option: (self.stored_bits(*option), -option[1]))


@dataclass(frozen=True)
class Layout:
    """What a model stores, as the budget counts it."""

    candidates: list[Candidate]
    group_size: int  # every candidate's width is divisible by it
    fixed_bits: int  # every parameter that is not a candidate's weight, scales or biases
    parameters: int  # all of them, as mlx-lm counts a model's parameters

    def stored_bits(self, choice: dict[str, Option]) -> int:
        chosen = sum(c.stored_bits(*choice[c.path]) for c in self.candidates)
        return self.fixed_bits + chosen

    def bits_per_weight(self, choice: dict[str, Option]) -> float:
        return self.stored_bits(choice) / self.parameters

    def uniform(self, bits: int) -> dict[str, Option]:
        return {c.path: (bits, self.group_size) for c in self.candidates}

    def sizes(self, allowed: list[int] | None) -> list[int]:
        """The group sizes a budget chooses from, smallest first: its own without a list."""
        return sorted(allowed or [self.group_size])


def _leaf_modules(model: Any) -> list[tuple[str, Any]]:
    return tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)


def _array_bits(module: Any, skip: str | None = None) -> tuple[int, int]:
    """(bits as stored, parameters) of a module's arrays, less the one named `skip`."""
    arrays = [(k, v) for k, v in tree_flatten(module.parameters()) if k != skip]
    return sum(v.nbytes * 8 for _, v in arrays), sum(v.size for _, v in arrays)


def model_layout(model: Any, group_size: int) -> Layout:
    """The layers mlx-lm's quantize_model would quantize at `group_size` (its own width test and
    the model's own quant_predicate, whose fixed choices are kept) and what the rest stores."""
    own = getattr(model, "quant_predicate", None)
    candidates, fixed, parameters = [], 0, 0
    for path, module in _leaf_modules(model):
        rest_bits, rest_count = _array_bits(module, skip="weight")
        weight = module.get("weight") if isinstance(module.get("weight"), mx.array) else None
        parameters += rest_count + (weight.size if weight is not None else 0)
        fixed += rest_bits
        if weight is None:
            continue
        decided = _own_choice(own, path, module, group_size)
        if decided is True:
            scale_bits = weight.dtype.size * 8
            candidates.append(Candidate(path, weight.size, scale_bits, weight.shape[-1]))
        elif isinstance(decided, dict):  # e.g. a mixture-of-experts router at 8 bits
            bits, size = int(decided.get("bits", 8)), int(decided.get("group_size", group_size))
            fixed += Candidate(path, weight.size, weight.dtype.size * 8).stored_bits(bits, size)
        else:
            fixed += weight.nbytes * 8
    return Layout(candidates, group_size, fixed, parameters)


def _own_choice(own: Callable | None, path: str, module: Any, group_size: int) -> bool | dict:
    """What mlx-lm's quantize_model decides for the layer without a budget."""
    if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
        return False
    return True if own is None else own(path, module)


# ---- what a budget can reach -----------------------------------------------------------------


def options_of(
    layout: Layout, allowed: list[int], group_sizes: list[int]
) -> dict[str, list[Option]]:
    """Each candidate's allowed (bits, group size), cheapest first; a layer no allowed group
    size divides is refused (the smallest should be the layout's group size)."""
    options = {c.path: c.options(allowed, group_sizes) for c in layout.candidates}
    for candidate in layout.candidates:
        if not options[candidate.path]:
            raise StageError(
                f"no allowed group size ({', '.join(map(str, group_sizes))}) divides the width "
                f"{candidate.columns} of {candidate.path}; allow {layout.group_size}"
            )
    return options


def reachable(
    layout: Layout, allowed: list[int], group_sizes: list[int] | None = None
) -> tuple[float, float]:
    """The least and the most bits per weight the allowed widths and group sizes give."""
    group_sizes = layout.sizes(group_sizes)
    options = options_of(layout, allowed, group_sizes)
    low = layout.bits_per_weight({p: found[0] for p, found in options.items()})
    high = layout.bits_per_weight({p: found[-1] for p, found in options.items()})
    return low, high


def check_reachable(
    layout: Layout, allowed: list[int], budget: float, group_sizes: list[int] | None = None
) -> None:
    """Refuse a budget no mix of the allowed widths meets, naming the nearest one that is met."""
    if not layout.candidates:
        raise StageError(
            f"tune.bits_per_weight: no layer of this model quantizes at group size "
            f"{layout.group_size}, so there are no bits to choose; leave it unset"
        )
    group_sizes = layout.sizes(group_sizes)
    low, high = reachable(layout, allowed, group_sizes)
    widths = ", ".join(map(str, sorted(allowed)))
    least = most = ""
    if len(group_sizes) > 1:
        widths += f" in groups of {', '.join(map(str, sorted(group_sizes)))}"
        least, most = " in its largest group", " in its smallest group"
    if budget < low:
        nearest = math.ceil(low * 1000) / 1000
        raise StageError(
            f"tune.bits_per_weight={budget} is below what bits {widths} reach on this model: "
            f"the least is {nearest} (every layer at {min(allowed)} bits{least}, scales and biases "
            "included); ask for at least that or allow fewer bits in tune.allowed_bits"
        )
    if budget > high:
        nearest = math.floor(high * 1000) / 1000
        raise StageError(
            f"tune.bits_per_weight={budget} is above what bits {widths} reach on this model: "
            f"the most is {nearest} (every layer at {max(allowed)} bits{most}, scales and biases "
            "included); ask for at most that or allow more bits in tune.allowed_bits"
        )


# ---- sensitivities -----------------------------------------------------------------------------


def sampled_labels(
    topk_logits: mx.array, indices: mx.array, tail: mx.array | None, key: mx.array
) -> tuple[mx.array, mx.array]:
    """(token ids, kept) drawn from the stored teacher distribution at T=1: the k buckets and,
    when stored, the tail's; a position that drew the tail (no token to name) is not kept."""
    buckets = topk_logits.astype(mx.float32)
    if tail is not None:
        buckets = mx.concatenate([buckets, tail.astype(mx.float32)[..., None]], axis=-1)
    drawn = mx.random.categorical(buckets, key=key)
    k = indices.shape[-1]
    labels = mx.take_along_axis(indices, mx.minimum(drawn, k - 1)[..., None], axis=-1)
    return labels.squeeze(-1), (drawn < k).astype(mx.float32)


def fisher_diagonals(
    model: Any,
    paths: list[str],
    batches: Iterable[Batch],
    seed: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, mx.array], float]:
    """(sum over batches of each weight's squared gradient of -log q(y), y drawn from the stored
    targets; the positions they cover), for the weights of the modules at `paths`."""
    modules = dict(model.named_modules())
    weights = {p: modules[p]["weight"] for p in paths}

    def negative_log_likelihood(weights, tokens, labels, mask):
        model.update(tree_unflatten([(f"{p}.weight", w) for p, w in weights.items()]))
        logits = model(tokens).astype(mx.float32)
        picked = mx.take_along_axis(logits, labels[..., None], axis=-1).squeeze(-1)
        return ((mx.logsumexp(logits, axis=-1) - picked) * mask).sum()

    gradient = mx.grad(negative_log_likelihood)
    squares = {p: mx.zeros(w.shape, dtype=mx.float32) for p, w in weights.items()}
    positions, key = 0.0, mx.random.key(seed)
    for number, (tokens, topk_logits, indices, tail, *_, mask) in enumerate(batches):
        if on_batch:
            on_batch(number)
        key, draw = mx.random.split(key)
        labels, kept = sampled_labels(topk_logits, indices, tail, draw)
        grads = gradient(weights, tokens, labels, mask * kept)
        squares = {p: squares[p] + mx.square(grads[p].astype(mx.float32)) for p in squares}
        mx.eval(squares)
        positions += float(mask.sum().item())
    model.update(tree_unflatten([(f"{p}.weight", w) for p, w in weights.items()]))
    return squares, positions


def rounding_error(weight: mx.array, bits: int, group_size: int) -> mx.array:
    """Q_b(W) - W for round-to-nearest at `bits` (mx.quantize's affine mode), in float32."""
    packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    restored = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    return restored.astype(mx.float32) - weight.astype(mx.float32)


def estimated_kl(
    model: Any,
    fishers: dict[str, mx.array],
    positions: float,
    options: dict[str, list[Option]],
) -> dict[str, dict[Option, float]]:
    """Per layer and allowed (bits, group size): 1/2 sum F (Q_b(W) - W)^2 per position, in nats."""
    modules = dict(model.named_modules())
    estimates = {}
    for path, fisher in fishers.items():
        weight = modules[path]["weight"]
        per_option = {}
        for bits, group_size in options[path]:
            error = rounding_error(weight, bits, group_size)
            kl = 0.5 * (fisher * mx.square(error)).sum().item() / max(positions, 1.0)
            per_option[(bits, group_size)] = kl
        estimates[path] = per_option
    return estimates


# ---- allocation ------------------------------------------------------------------------------


def allocate(
    layout: Layout,
    estimates: dict[str, dict[Option, float]],
    allowed: list[int],
    budget: float,
    group_sizes: list[int] | None = None,
) -> dict[str, Option]:
    """Each layer's (bits, group size): all at their cheapest choice, then the change with the
    largest estimated drop per stored bit that fits, again and again until none fits. When it
    stops no layer can take a dearer choice of a lower estimate within the budget."""
    group_sizes = layout.sizes(group_sizes)
    check_reachable(layout, allowed, budget, group_sizes)
    options = options_of(layout, allowed, group_sizes)
    choice = {path: found[0] for path, found in options.items()}
    spare = budget * layout.parameters - layout.stored_bits(choice)
    while True:
        best = None  # (drop per bit, candidate, option, extra bits)
        for candidate in layout.candidates:
            now, estimate = choice[candidate.path], estimates[candidate.path]
            cost = candidate.stored_bits(*now)
            for option in options[candidate.path]:
                extra = candidate.stored_bits(*option) - cost
                if extra > spare:
                    break  # cheapest first: the rest cost more still
                drop = estimate[now] - estimate[option]
                # Another group size is taken only for a gain: it is not more bits of the same
                # grid, and its estimate can be the higher one.
                useful = drop > 0 or option[1] == now[1]
                if extra > 0 and useful and (best is None or drop / extra > best[0]):
                    best = (drop / extra, candidate, option, extra)
        if best is None:
            return choice
        _, candidate, option, extra = best
        choice[candidate.path] = option
        spare -= extra


def option_label(option: Option, group_sizes: list[int]) -> str:
    """The record's and the report's key: "4" with one group size, "4g128" with several."""
    bits, size = option
    return str(bits) if len(group_sizes) == 1 else f"{bits}g{size}"


def budget_record(
    layout: Layout,
    estimates: dict[str, dict[Option, float]],
    choice: dict[str, Option],
    budget: float,
    positions: float,
    group_sizes: list[int] | None = None,
) -> dict[str, Any]:
    """What the run folder keeps of the choice: per layer its estimates, bits and group size."""
    group_sizes = layout.sizes(group_sizes)
    label = lambda option: option_label(option, group_sizes)  # noqa: E731
    options = {option for per_option in estimates.values() for option in per_option}
    return {
        "budget": budget,
        "bits_per_weight": layout.bits_per_weight(choice),
        "group_size": layout.group_size,
        "allowed_bits": sorted({bits for bits, _ in options}),
        "allowed_group_sizes": group_sizes,
        "estimate": "1/2 sum F (Q_b(W) - W)^2 per position: the stored-target KL (T=1) growth "
        "with that layer alone rounded to nearest at b bits (key: bits, then gN, the group "
        "size, when several are allowed)",
        "positions": positions,
        "layers": [
            {
                "path": c.path,
                "parameters": c.weights,
                "bits": choice[c.path][0],
                "group_size": choice[c.path][1],
                "choice": label(choice[c.path]),
                "estimated_kl": {label(o): v for o, v in sorted(estimates[c.path].items())},
            }
            for c in layout.candidates
        ],
    }


def choose_layer_bits(
    layout: Layout,
    model: Any,
    batches: Iterable[Batch],
    budget: float,
    allowed: list[int],
    seed: int,
    on_batch: Callable[[int], None] | None = None,
    group_sizes: list[int] | None = None,
    error_ratios: dict[str, float] | None = None,
) -> tuple[dict[str, Option], dict[str, Any]]:
    """(path -> (bits, group size), the record for the run folder) of the full-precision
    `model`, whose stored bits `layout` counts (taken in the dtype it is quantized in: the model
    may compute in another); a budget no mix reaches is refused before anything is measured.
    `error_ratios` (path -> the share of rounding's error a GPTQ start leaves in that layer)
    scale the layers' estimates for a student that starts from GPTQ."""
    group_sizes = layout.sizes(group_sizes)
    check_reachable(layout, allowed, budget, group_sizes)
    options = options_of(layout, allowed, group_sizes)
    fishers, positions = fisher_diagonals(model, list(options), batches, seed, on_batch)
    estimates = estimated_kl(model, fishers, positions, options)
    del fishers
    if error_ratios:
        estimates = scaled(estimates, error_ratios)
    choice = allocate(layout, estimates, allowed, budget, group_sizes)
    record = budget_record(layout, estimates, choice, budget, positions, group_sizes)
    if error_ratios:
        record["estimate"] += GPTQ_NOTE
        for layer in record["layers"]:
            layer["gptq_error_ratio"] = error_ratios.get(layer["path"], 1.0)
    return choice, record


def scaled(
    estimates: dict[str, dict[Option, float]], ratios: dict[str, float]
) -> dict[str, dict[Option, float]]:
    """Each layer's estimates below 8 bits times its ratio (1 for a layer without one): GPTQ
    leaves an 8-bit layer rounded to nearest, as it is not tuned either."""
    return {
        path: {
            option: kl * ratios.get(path, 1.0) if option[0] < 8 else kl
            for option, kl in per_option.items()
        }
        for path, per_option in estimates.items()
    }
