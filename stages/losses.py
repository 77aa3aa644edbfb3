"""Distillation losses per position, as pure functions of student and stored teacher values.

Inputs at temperature T (all [..., K] unless noted):
  student_topk: the student's logits at the teacher's top-k indices
  student_lse:  [...] the student's full-vocabulary logsumexp of logits / T
  teacher_topk: the teacher's top-k logits
  teacher_lse:  [...] the teacher's full-vocabulary logsumexp of logits / T (stored), or None

`kl_topk` renormalises over the top-k only (mlx-lm's DWQ). The others compare (k+1)-bucket
distributions: the top-k entries plus one bucket for all the rest of the vocabulary, whose mass
follows exactly from the logsumexp.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

TAIL_FLOOR = 1e-12  # bf16 logits can make the top-k mass exceed 1 by a hair


def bucket_logprobs(topk_logits: mx.array, lse: mx.array, temperature: float) -> mx.array:
    """Log-probabilities of the k top entries and of the tail bucket: [..., K + 1]."""
    head = topk_logits / temperature - lse[..., None]
    head_mass = mx.exp(head).sum(axis=-1, keepdims=True)
    tail = mx.log(mx.maximum(1.0 - head_mass, TAIL_FLOOR))
    return mx.concatenate([head, tail], axis=-1)


def _kl(log_p: mx.array, log_q: mx.array) -> mx.array:
    """KL(p || q) along the last axis."""
    return (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def kl_topk(student_topk, student_lse, teacher_topk, teacher_lse, temperature):
    del (
        student_lse,
        teacher_lse,
    )  # renormalised over the top-k: the rest of the vocabulary is ignored
    log_q = nn_log_softmax(student_topk / temperature)
    log_p = nn_log_softmax(teacher_topk / temperature)
    return _kl(log_p, log_q)


def kl_tail(student_topk, student_lse, teacher_topk, teacher_lse, temperature):
    log_p = bucket_logprobs(teacher_topk, teacher_lse, temperature)
    log_q = bucket_logprobs(student_topk, student_lse, temperature)
    return _kl(log_p, log_q)


def reverse_kl(student_topk, student_lse, teacher_topk, teacher_lse, temperature):
    log_p = bucket_logprobs(teacher_topk, teacher_lse, temperature)
    log_q = bucket_logprobs(student_topk, student_lse, temperature)
    return _kl(log_q, log_p)


def jensen_shannon(student_topk, student_lse, teacher_topk, teacher_lse, temperature):
    log_p = bucket_logprobs(teacher_topk, teacher_lse, temperature)
    log_q = bucket_logprobs(student_topk, student_lse, temperature)
    log_m = mx.logaddexp(log_p, log_q) - mx.log(mx.array(2.0))
    return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)


def nn_log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


LossFn = Callable[[mx.array, mx.array, mx.array, mx.array | None, float], mx.array]
LOSSES: dict[str, LossFn] = {
    "kl_topk": kl_topk,
    "kl_tail": kl_tail,
    "reverse_kl": reverse_kl,
    "js": jensen_shannon,
}
NEEDS_TEACHER_LSE = {"kl_tail", "reverse_kl", "js"}
