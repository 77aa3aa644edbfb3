"""Float64 references for the (k+1)-bucket distributions, from a model's full logits, and a tiny
teacher sharp enough that bfloat16 rounding of its top-k matters (as with a real LM)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np


def logsumexp64(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # an empty tail is log(0) = -inf
        return np.log(np.exp(x - top).sum(axis=axis)) + np.squeeze(top, axis)


def true_tail_logsumexp(full_logits: np.ndarray, indices: np.ndarray, t: float) -> np.ndarray:
    """log-sum-exp of logits / t outside `indices`, in float64."""
    rest = np.asarray(full_logits, np.float64) / t
    np.put_along_axis(rest, indices.astype(np.int64), -np.inf, axis=-1)
    return logsumexp64(rest)


def true_bucket_logprobs(full_logits: np.ndarray, indices: np.ndarray, t: float) -> np.ndarray:
    """The exact (k+1)-bucket log-distribution: the top-k entries, then the rest summed."""
    scaled = np.asarray(full_logits, np.float64) / t
    head = np.take_along_axis(scaled, indices.astype(np.int64), -1)
    tail = true_tail_logsumexp(full_logits, indices, t)
    return np.concatenate([head, tail[..., None]], -1) - logsumexp64(scaled)[..., None]


def stored_bucket_logprobs(head: np.ndarray, tail: np.ndarray, t: float) -> np.ndarray:
    """What the losses build from a store: a softmax over [stored head / t, stored tail]."""
    buckets = np.concatenate([np.asarray(head, np.float64) / t, tail[..., None]], -1)
    return buckets - logsumexp64(buckets)[..., None]


def old_head_mass(head: np.ndarray, full_logits: np.ndarray, t: float) -> np.ndarray:
    """The head mass as schema-1 stores gave it: stored head / t against the full logsumexp
    (over 1 where the head was rounded up, leaving a clamped, non-distribution tail)."""
    full = logsumexp64(np.asarray(full_logits, np.float32) / np.float32(t))
    return np.exp(np.asarray(head, np.float64) / t - full[..., None]).sum(-1)


def sharpen(folder: Path, factor: float = 10.0) -> Path:
    """Scale the final norm of a tiny model folder: logits in the tens, like a trained LM's, so
    the top-k holds most of the mass and bfloat16 rounding moves it by whole percents."""
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * factor
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    return folder
