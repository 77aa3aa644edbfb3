"""Distillation losses per position, as pure functions of student and stored teacher values.

Inputs at temperature T (all [..., K] unless noted):
  student_topk:  the student's logits at the teacher's top-k indices
  student_tail:  [...] log-sum-exp of the student's logits / T outside those indices
                 (`tail_logsumexp`), or None
  teacher_topk:  the teacher's stored top-k logits (possibly rounded to bfloat16)
  teacher_tail:  [...] the stored tail log-sum-exp at T (the store's `tail_logsumexp`), or None

`kl_topk` renormalises over the top-k only (mlx-lm's DWQ). The others compare (k+1)-bucket
distributions: the top-k entries plus one bucket for all the rest of the vocabulary. Each side's
buckets are a softmax over [top-k logits / T, tail], so they sum to 1 whatever the rounding of the
stored logits; the store shifts the teacher's tail so that its mass is the teacher's exact one.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx


def tail_logsumexp(scaled_logits: mx.array, topk_indices: mx.array) -> mx.array:
    """Log-sum-exp over the vocabulary outside `topk_indices` (-inf when nothing is left).

    Summed directly rather than as the full sum minus the head, which cancels to noise when the
    head holds nearly all the mass; masked entries get no gradient."""
    rest = mx.put_along_axis(scaled_logits, topk_indices, mx.array(-mx.inf), axis=-1)
    return mx.logsumexp(rest, axis=-1)


def bucket_logprobs(topk_logits: mx.array, tail: mx.array, temperature: float) -> mx.array:
    """Log-probabilities of the k top entries and of the tail bucket: [..., K + 1]."""
    buckets = mx.concatenate([topk_logits / temperature, tail[..., None]], axis=-1)
    return buckets - mx.logsumexp(buckets, axis=-1, keepdims=True)


def _kl(log_p: mx.array, log_q: mx.array) -> mx.array:
    """KL(p || q) along the last axis. Buckets with p = 0 (an empty tail when k is the whole
    vocabulary) add 0, and no NaN reaches the gradient through the unused difference."""
    difference = mx.where(log_p > -mx.inf, log_p - log_q, 0.0)
    return (mx.exp(log_p) * difference).sum(axis=-1)


def _log_mixture(log_p: mx.array, log_q: mx.array) -> mx.array:
    """log((p + q) / 2), with a NaN-free gradient where both are 0."""
    empty = (log_p == -mx.inf) & (log_q == -mx.inf)
    mixed = mx.logaddexp(mx.where(empty, 0.0, log_p), mx.where(empty, 0.0, log_q))
    return mx.where(empty, -mx.inf, mixed - mx.log(mx.array(2.0)))


def kl_topk(student_topk, student_tail, teacher_topk, teacher_tail, temperature):
    del student_tail, teacher_tail  # renormalised over the top-k: the rest is ignored
    log_q = nn_log_softmax(student_topk / temperature)
    log_p = nn_log_softmax(teacher_topk / temperature)
    return _kl(log_p, log_q)


def kl_tail(student_topk, student_tail, teacher_topk, teacher_tail, temperature):
    log_p = bucket_logprobs(teacher_topk, teacher_tail, temperature)
    log_q = bucket_logprobs(student_topk, student_tail, temperature)
    return _kl(log_p, log_q)


def sampled_tail_kl(
    student_samples, student_tail, teacher_topk, teacher_tail, tail_entropy, temperature
):
    """The KL inside the tail bucket, which kl_tail leaves out, estimated from the store's
    tail samples (ids drawn from the teacher's distribution outside the top-k, at T):
    KL(p || q) = KL of the buckets + p(tail) * KL(p | tail || q | tail), and
    KL(p | tail || q | tail) = E_p|tail[-log q | tail] - H(p | tail), the expectation taken as
    the samples' mean. Unbiased in value and gradient. student_samples: the student's logits at
    the sampled ids [..., S]; tail_entropy: the stored H(p | tail) [...]."""
    tail_mass = mx.exp(bucket_logprobs(teacher_topk, teacher_tail, temperature)[..., -1])
    cross_entropy = student_tail - (student_samples / temperature).mean(axis=-1)
    return tail_mass * (cross_entropy - tail_entropy)


def reverse_kl(student_topk, student_tail, teacher_topk, teacher_tail, temperature):
    log_p = bucket_logprobs(teacher_topk, teacher_tail, temperature)
    log_q = bucket_logprobs(student_topk, student_tail, temperature)
    return _kl(log_q, log_p)


def jensen_shannon(student_topk, student_tail, teacher_topk, teacher_tail, temperature):
    log_p = bucket_logprobs(teacher_topk, teacher_tail, temperature)
    log_q = bucket_logprobs(student_topk, student_tail, temperature)
    log_m = _log_mixture(log_p, log_q)
    return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)


def nn_log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


LossFn = Callable[[mx.array, mx.array | None, mx.array, mx.array | None, float], mx.array]
LOSSES: dict[str, LossFn] = {
    "kl_topk": kl_topk,
    "kl_tail": kl_tail,
    "reverse_kl": reverse_kl,
    "js": jensen_shannon,
}
NEEDS_TAIL = {"kl_tail", "reverse_kl", "js"}  # need the store's tail_logsumexp at their T
SAMPLED_LOSS = "kl_tail"  # the loss that adds sampled_tail_kl when the store has tail samples
