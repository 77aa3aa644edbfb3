"""Each loss against a direct numpy computation over full-vocabulary distributions, its
gradient where the head holds all the mass, and the losses on a real store against the full
vocabulary."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pipeline.config import load_config
from stages.data import loss_mask
from stages.losses import LOSSES, NEEDS_TAIL, tail_logsumexp
from stages.models import load_model, quantize_student, use_dequantized_matmul, want_fast_matmul
from stages.targets import compute_targets
from stages.tune import tune
from store.reader import StoreReader
from tests.conftest import make_tiny_model_folder
from tests.tail_mass import logsumexp64, sharpen, true_bucket_logprobs, true_tail_logsumexp

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
    args = [
        mx.array(np.take_along_axis(student, top, -1)),
        mx.array(true_tail_logsumexp(student, top, T).astype(np.float32)),
        mx.array(np.take_along_axis(teacher, top, -1)),
        mx.array(true_tail_logsumexp(teacher, top, T).astype(np.float32)),
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


def test_student_tail_is_summed_outside_the_top_k(case):
    _, student, top = case
    tail = tail_logsumexp(mx.array(student / T), mx.array(top.astype(np.int32)))
    np.testing.assert_allclose(np.array(tail), true_tail_logsumexp(student, top, T), rtol=1e-5)


def reference_kl_tail(student_logits, teacher_logits, top):
    """kl_tail spelled out over the full softmax: the tail bucket as a masked sum of q."""
    q = mx.softmax(student_logits / T, axis=-1)
    p = mx.softmax(teacher_logits / T, axis=-1)
    in_head = mx.put_along_axis(mx.zeros_like(q), top, mx.array(1.0), axis=-1)
    q_bucket = mx.concatenate(
        [mx.take_along_axis(q, top, -1), (q * (1 - in_head)).sum(-1)[..., None]], -1
    )
    p_bucket = mx.concatenate(
        [mx.take_along_axis(p, top, -1), (p * (1 - in_head)).sum(-1)[..., None]], -1
    )
    return (p_bucket * (mx.log(p_bucket) - mx.log(q_bucket))).sum(-1).sum()


def student_loss(name, teacher_logits, top):
    """The loss as tune computes it, as a function of the student's full logits."""
    teacher_topk = mx.take_along_axis(teacher_logits, top, -1)
    teacher_tail = tail_logsumexp(teacher_logits / T, top)

    def loss(student_logits):
        student_topk = mx.take_along_axis(student_logits, top, -1)
        student_tail = tail_logsumexp(student_logits / T, top)
        return LOSSES[name](student_topk, student_tail, teacher_topk, teacher_tail, T).sum()

    return loss


def test_kl_tail_gradient_equals_the_full_softmax_one(case):
    teacher, student, top = (mx.array(a) for a in (*case[:2], case[2].astype(np.int32)))
    ours = np.array(mx.grad(student_loss("kl_tail", teacher, top))(student))
    reference = np.array(mx.grad(lambda s: reference_kl_tail(s, teacher, top))(student))
    assert np.abs(ours[..., ~np.isin(np.arange(V), case[2])]).max() > 0  # the tail gets gradient
    np.testing.assert_allclose(ours, reference, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("name", sorted(NEEDS_TAIL))
@pytest.mark.parametrize("top_k", [K, V])  # V: the top-k is the whole vocabulary, no tail left
def test_gradient_is_finite_where_the_head_holds_all_the_mass(name, top_k):
    rng = np.random.default_rng(1)
    top = np.argsort(rng.normal(size=(2, 3, V)), -1)[..., :top_k].astype(np.int32)
    # the head's logits 120 above the rest: exp of the gap underflows float32 to exactly 0
    student = np.full((2, 3, V), -60.0, np.float32)
    np.put_along_axis(student, top, 60.0 + rng.normal(size=top.shape).astype(np.float32), -1)
    teacher = student + rng.normal(size=student.shape).astype(np.float32)
    loss = student_loss(name, mx.array(teacher), mx.array(top))
    value, grad = mx.value_and_grad(loss)(mx.array(student))
    assert np.isfinite(value.item()) and value.item() >= 0
    assert np.isfinite(np.array(grad)).all()
    assert np.abs(np.array(grad)).max() > 0


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory) -> Path:
    return sharpen(make_tiny_model_folder(tmp_path_factory.mktemp("sharp") / "teacher"))


def reference_loss(name: str, log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """The losses in float64 numpy, from exact (k+1)-bucket log-distributions."""

    def kl64(a, b):
        return (np.exp(a) * (a - b)).sum(-1)

    if name == "kl_topk":
        head_p, head_q = log_p[..., :-1], log_q[..., :-1]
        return kl64(
            head_p - logsumexp64(head_p)[..., None], head_q - logsumexp64(head_q)[..., None]
        )
    if name == "reverse_kl":
        return kl64(log_q, log_p)
    if name == "js":
        log_m = np.logaddexp(log_p, log_q) - np.log(2)
        return 0.5 * kl64(log_p, log_m) + 0.5 * kl64(log_q, log_m)
    return kl64(log_p, log_q)


def full_logits(model_dir: Path, tokens: np.ndarray) -> np.ndarray:
    return np.array(load_model(str(model_dir)).model(mx.array(tokens[:, :-1])).astype(mx.float32))


def test_losses_on_a_float32_store_equal_the_full_vocabulary_bucket_losses(
    tiny_targets_overrides, sharp_teacher, tiny_teacher
):
    """Exact head (float32 logits): every loss from the store equals the one computed from the
    teacher's and student's full logits, at every stored temperature."""
    config = load_config(None, {**tiny_targets_overrides, "targets.teacher": str(sharp_teacher)})
    assert config.targets.logits_dtype == "float32"
    compute_targets(config.targets)
    reader = StoreReader(Path(config.targets.store))
    tokens = reader.sequences("valid")["tokens"]
    targets = reader.read_targets("valid", 0)
    rows = len(targets["topk_indices"])
    teacher = full_logits(sharp_teacher, tokens[:rows])
    student = full_logits(tiny_teacher, tokens[:rows])  # the same weights, unsharpened
    top = targets["topk_indices"].astype(np.int32)
    for i, t in enumerate(config.targets.lse_temperatures):
        log_p = true_bucket_logprobs(teacher, top, t)
        log_q = true_bucket_logprobs(student, top, t)
        student_tail = tail_logsumexp(mx.array(student / t), mx.array(top))
        for name, loss in LOSSES.items():
            ours = loss(
                mx.take_along_axis(mx.array(student), mx.array(top), -1),
                student_tail,
                mx.array(targets["topk_logits"]),
                mx.array(targets["tail_logsumexp"][..., i]),
                t,
            )
            expected = reference_loss(name, log_p, log_q)
            np.testing.assert_allclose(np.array(ours), expected, rtol=1e-4, atol=1e-4, err_msg=name)


def test_tune_validation_loss_is_the_full_vocabulary_one(
    tiny_targets_overrides, sharp_teacher, tmp_path
):
    """Through tune's own batches and temperature index: its loss before the first step equals
    kl_tail at T=1 computed from the teacher's and the RTN student's full logits."""
    overrides = {**tiny_targets_overrides, "targets.teacher": str(sharp_teacher)}
    overrides |= {"tune.run_dir": str(tmp_path / "run"), "tune.group_size": 32}
    overrides |= {"tune.loss": "kl_tail", "tune.temperature": 1.0, "tune.max_steps": 1}
    overrides |= {"tune.init": "rtn"}  # the expected loss is the RTN student's
    config = load_config(None, overrides)
    compute_targets(config.targets)
    result = tune(config.tune)
    sequences = StoreReader(Path(config.targets.store)).sequences("valid")
    tokens = sequences["tokens"]
    teacher = full_logits(sharp_teacher, tokens)
    student, _ = quantize_student(load_model(str(sharp_teacher)), bits=4, group_size=32)
    if want_fast_matmul(config.tune.fast_matmul):
        use_dequantized_matmul(student)
    student_logits = np.array(student(mx.array(tokens[:, :-1])).astype(mx.float32))
    top = np.argsort(-teacher, -1)[..., : config.targets.top_k]
    per_position = reference_loss(
        "kl_tail",
        true_bucket_logprobs(teacher, top, 1.0),
        true_bucket_logprobs(student_logits, top, 1.0),
    )
    mask = loss_mask(sequences["lengths"], sequences["prompt_offsets"], tokens.shape[1] - 1)
    expected = (per_position * mask).sum() / mask.sum()
    assert result.initial_val_loss == pytest.approx(expected, rel=1e-4)
