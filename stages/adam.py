"""Adam whose two moments may be kept in bfloat16: half their memory (a quarter of the trained
state's), for students that must fit a small machine."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

MOMENTS_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
# Bits of a noise key's second word: the parameter's index below, the optimizer's above.
PARAMETER_BITS = 24


class MomentsAdam(optim.Adam):
    """mlx's Adam with bias correction, its moments m and v stored in `moments_dtype`.

    In float32 it is mlx's Adam exactly. bfloat16 moments are computed in float32, rounded
    stochastically (unbiased: rounded to nearest, v's decay of 0.1 % a step is below bfloat16's
    resolution of 0.4 % and v would never decay), and the update is taken from the rounded
    ones; each parameter's is evaluated on its own (after the gradients), so one parameter's
    float32 moments exist at a time, not every parameter's at once. The noise is keyed by
    (seed, step, optimizer `stream`, parameter), so a run resumed from a checkpoint draws the
    same."""

    def __init__(self, learning_rate, moments_dtype: str = "float32", seed: int = 0, stream=0):
        super().__init__(learning_rate=learning_rate, bias_correction=True)
        self.moments_dtype = MOMENTS_DTYPES[moments_dtype]
        self.seed, self.stream = seed, stream
        self._index_of: dict[int, int] = {}

    def init_single(self, parameter: mx.array, state: dict) -> None:
        state["m"] = mx.zeros(parameter.shape, self.moments_dtype)
        state["v"] = mx.zeros(parameter.shape, self.moments_dtype)

    def apply_gradients(self, gradients: dict, parameters: dict):
        if self.moments_dtype != mx.float32:
            # Noise keyed by each parameter's place among the sorted paths, not by the order
            # the tree is walked in: trees read back from a checkpoint list their keys in another.
            paths = sorted(tree_flatten(gradients), key=lambda item: item[0])
            if len(paths) >= 1 << PARAMETER_BITS:
                raise ValueError(f"more than 2**{PARAMETER_BITS} parameters for one optimizer")
            self._index_of = {id(gradient): i for i, (_, gradient) in enumerate(paths)}
            mx.eval(gradients)  # the backward pass first; then one parameter at a time
        return super().apply_gradients(gradients, parameters)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if self.moments_dtype == mx.float32:
            return super().apply_single(gradient, parameter, state)
        b1, b2 = self.betas
        m_key, v_key = mx.random.split(self._key(self._index_of[id(gradient)]))
        m = b1 * state["m"].astype(mx.float32) + (1 - b1) * gradient
        v = b2 * state["v"].astype(mx.float32) + (1 - b2) * mx.square(gradient)
        state["m"], state["v"] = round_to_bfloat16(m, m_key), round_to_bfloat16(v, v_key)
        m, v = state["m"].astype(mx.float32), state["v"].astype(mx.float32)
        lr = self.learning_rate.astype(gradient.dtype)
        c1 = (lr / (1 - b1**self.step)).astype(gradient.dtype)
        c2 = mx.rsqrt(1 - b2**self.step).astype(gradient.dtype)
        updated = parameter - c1 * m / (mx.sqrt(v) * c2 + self.eps)
        mx.eval(updated, state["m"], state["v"])
        return updated

    def _key(self, index: int) -> mx.array:
        """A key of its own for each parameter of each optimizer at each step."""
        where = (self.stream << PARAMETER_BITS) | index
        words = mx.stack([self.step.astype(mx.uint32), mx.array(where, mx.uint32)])
        return mx.random.key(self.seed) ^ words


def round_to_bfloat16(values: mx.array, key: mx.array) -> mx.array:
    """float32 to bfloat16, up or down with probability in proportion to the distance (so the
    expected result is the value): random low 16 bits are added, then dropped."""
    noise = mx.random.randint(0, 1 << 16, values.shape, mx.uint32, key=key)
    kept = (values.view(mx.uint32) + noise) & mx.array(0xFFFF0000, mx.uint32)
    return kept.view(mx.float32).astype(mx.bfloat16)
