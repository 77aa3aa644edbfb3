"""The output layer and loss of a tune step a few positions at a time (tune.grad_checkpoint).

The logits, batch x positions x vocabulary floats, outgrow a small student at a 150k
vocabulary (1,024 positions: 0.6 GB each, held several times by the loss and its gradient).
Here they are never held whole: the head's weight is built once, in blocks of rows, and each
chunk of positions is evaluated before the next, with the gradients of the hidden states and
of the weight taken by hand through the head's matmul (the weight's summed in place, addmm).
The caller then pulls those back through the blocks (`mx.vjp`) and, with `head_grads`, through
the head's own parameters, a block of rows at a time. MLX evaluates one graph's independent
chunks together, so chunking inside one value_and_grad would not bound anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate

import mlx.core as mx
from mlx.utils import tree_flatten

from stages.models import OutputLayer

# At most this many logits (batch x positions x vocabulary) at a time, and this many values
# per block of the head's weight: 32 MB in float32 (~55 positions of a 150k vocabulary).
LOGITS_PER_CHUNK = 1 << 23


@dataclass(frozen=True)
class ChunkedOutput:
    output: OutputLayer
    position_loss: Callable[..., mx.array]  # (logits, *targets) -> loss summed over positions

    @property
    def head_trained(self) -> bool:
        """Whether any of the head's parameters is trained (else no weight gradient is made)."""
        return bool(tree_flatten(self.output.module.trainable_parameters()))

    def weight_blocks(self) -> list[mx.array]:
        """The head's weight as the model computes with it (its dtype), in blocks of rows,
        each built and evaluated alone: built whole, MLX's CPU dequantize holds twice its size
        in temporaries."""
        blocks = []
        for rows in self._row_blocks():
            blocks.append(self.output.weight(rows))
            mx.eval(blocks[-1])
        return blocks

    def _row_blocks(self) -> list[mx.array]:
        vocab, width = self.output.weight_shape()
        size = max(1, LOGITS_PER_CHUNK // width)
        return [mx.arange(start, min(start + size, vocab)) for start in range(0, vocab, size)]

    def _chunks(self, hidden: mx.array, vocab: int, targets: Sequence) -> Iterator[tuple]:
        """(hidden states, targets) of each chunk of positions (targets: None where absent)."""
        size = max(1, LOGITS_PER_CHUNK // (hidden.shape[0] * vocab))
        for start in range(0, hidden.shape[1], size):
            part = [None if t is None else t[:, start : start + size] for t in targets]
            yield hidden[:, start : start + size], part

    def _logits(self, hidden: mx.array, weights: Sequence[mx.array]) -> mx.array:
        """In the model's dtype, as the whole model computes them (the loss casts to float32)."""
        return mx.concatenate([self.output.project(hidden, w) for w in weights], axis=-1)

    def loss(self, hidden: mx.array, weights: Sequence[mx.array], targets: Sequence) -> mx.array:
        """The loss summed over positions (targets: per position, None where absent)."""
        total = mx.array(0.0)
        for h, part in self._chunks(hidden, sum(w.shape[0] for w in weights), targets):
            total = total + self.position_loss(self._logits(h, weights), *part)
            mx.eval(total)
        return total

    def loss_and_grads(
        self, hidden: mx.array, weights: Sequence[mx.array], targets: Sequence
    ) -> tuple[mx.array, mx.array, list[mx.array]]:
        """The summed loss, its gradient with respect to `hidden`, and (when the head is
        trained) per block of `weights` its float32 gradient with respect to that block."""
        edges = [0, *accumulate(w.shape[0] for w in weights)]
        vocab, head_trained = edges[-1], self.head_trained
        loss_and_logits_grad = mx.value_and_grad(self.position_loss)
        total, hidden_grads = mx.array(0.0), []
        weight_grads = [mx.zeros(w.shape, mx.float32) for w in weights if head_trained]
        for h, part in self._chunks(hidden, vocab, targets):
            value, logits_grad = loss_and_logits_grad(self._logits(h, weights), *part)
            logits_grad = logits_grad.astype(mx.float32).reshape(-1, vocab)
            flat_h = h.reshape(-1, h.shape[-1]).astype(mx.float32)
            h_grad = mx.zeros(flat_h.shape, mx.float32)
            for i, w in enumerate(weights):
                block_grad = logits_grad[:, edges[i] : edges[i + 1]]
                if head_trained:
                    weight_grads[i] = mx.addmm(weight_grads[i], block_grad.T, flat_h)
                h_grad = mx.addmm(h_grad, block_grad, w.astype(mx.float32))
            hidden_grads.append(h_grad.reshape(h.shape).astype(h.dtype))
            total = total + value
            mx.eval(total, hidden_grads[-1], weight_grads)
        return total, mx.concatenate(hidden_grads, axis=1), weight_grads

    def head_grads(
        self,
        parameters: dict[str, mx.array],
        use: Callable[[dict[str, mx.array]], None],
        weight_grads: Sequence[mx.array],
    ) -> dict[str, mx.array]:
        """The gradients of the head's own trained `parameters` (name -> value; `use` puts
        such a dict into the model) from its weight's gradient, a block of rows at a time."""
        head = [n for n in parameters if n.startswith(self.output.name + ".")]
        grads = {n: mx.zeros_like(parameters[n]) for n in head}
        if not head:
            return grads
        for rows, cotangent in zip(self._row_blocks(), weight_grads, strict=True):

            def weight_rows(*values, rows=rows):
                use(dict(zip(head, values, strict=True)))
                return self.output.weight(rows).astype(mx.float32)

            _, block = mx.vjp(weight_rows, [parameters[n] for n in head], [cotangent])
            grads = {n: grads[n] + g for n, g in zip(head, block, strict=True)}
            mx.eval(grads)
        return grads
