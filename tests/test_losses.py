"""Each loss against a direct numpy computation over full-vocabulary distributions."""

import mlx.core as mx
import numpy as np
import pytest

from stages.losses import LOSSES

V, K, T = 40, 6, 2.0


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(3, 5, V)).astype(np.float32) * 3
    student = teacher + rng.normal(size=teacher.shape).astype(np.float32)
    top = np.argsort(-teacher, -1)[..., :K]
    return teacher, student, top


def buckets(full_logits, top):
    """Full softmax at T, then the top-k entries and the summed rest: computed directly."""
    p = softmax(full_logits / T)
    head = np.take_along_axis(p, top, -1)
    return np.concatenate([head, 1 - head.sum(-1, keepdims=True)], -1)


def run(name, teacher, student, top):
    def lse(x):
        return np.log(np.exp(x / T).sum(-1))

    args = [
        mx.array(np.take_along_axis(student, top, -1)),
        mx.array(lse(student)),
        mx.array(np.take_along_axis(teacher, top, -1)),
        mx.array(lse(teacher)),
        T,
    ]
    return np.array(LOSSES[name](*args))


def test_kl_topk_renormalises_over_the_top_k(case):
    teacher, student, top = case
    p = softmax(np.take_along_axis(teacher, top, -1) / T)
    q = softmax(np.take_along_axis(student, top, -1) / T)
    np.testing.assert_allclose(run("kl_topk", *case), kl(p, q), rtol=1e-4, atol=1e-6)


def test_kl_tail_uses_exact_tail_mass(case):
    teacher, student, top = case
    expected = kl(buckets(teacher, top), buckets(student, top))
    np.testing.assert_allclose(run("kl_tail", *case), expected, rtol=1e-4, atol=1e-6)


def test_reverse_kl(case):
    teacher, student, top = case
    expected = kl(buckets(student, top), buckets(teacher, top))
    np.testing.assert_allclose(run("reverse_kl", *case), expected, rtol=1e-4, atol=1e-6)


def test_jensen_shannon(case):
    teacher, student, top = case
    p, q = buckets(teacher, top), buckets(student, top)
    m = (p + q) / 2
    np.testing.assert_allclose(
        run("js", *case), 0.5 * kl(p, m) + 0.5 * kl(q, m), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_zero_when_student_equals_teacher(case, name):
    teacher, _, top = case
    np.testing.assert_allclose(run(name, teacher, teacher, top), 0.0, atol=1e-5)
