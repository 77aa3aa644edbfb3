"""The mx.distributed group, started in one place: rank 0 of 1 when not launched by mlx.launch."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map

# How MLX's collectives fail when another process of the launch has exited (the ring backend's
# words, MLX 0.32).
_PEER_LOST = "connection to a peer was lost"


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank stopped (that rank prints its
    own error: this one only follows it)."""
    return isinstance(exc, RuntimeError) and _PEER_LOST in str(exc)


class Distributed:
    """This process's rank in the group, and the few collectives the stages need."""

    def __init__(self) -> None:
        self.group = mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    def my_rows(self, rows: list[int]) -> list[int]:
        return rows[self.rank :: self.size]

    def barrier(self) -> None:
        """Every rank waits here for the others (e.g. until rank 0 has saved the model)."""
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))

    def sum(self, value: Any) -> Any:
        if self.size == 1:
            return value
        return tree_map(lambda x: mx.distributed.all_sum(x, stream=mx.cpu), value)

    def from_root(self, values: list[int]) -> list[int]:
        """Rank 0's `values` on every rank (what the other ranks pass is ignored)."""
        if self.size == 1:
            return list(values)
        mine = list(values) if self.rank == 0 else []
        count = int(self.sum(mx.array(len(mine), dtype=mx.int32)).item())
        sent = mx.array(mine if self.rank == 0 else [0] * count, dtype=mx.int32)
        return [int(v) for v in self.sum(sent).tolist()] if count else []
