"""Sampled tails (targets.tail_samples): ids drawn from the teacher's distribution outside its
top-k, and the loss that turns them into an unbiased estimate of the KL the top-k leaves out."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from stages.losses import kl_tail, sampled_tail_kl, tail_logsumexp
from stages.models import load_model
from stages.targets import TailSampling, compute_targets, topk_targets
from stages.tune import tune
from store.inspect import store_info, verify_store
from store.layout import MANIFEST_FILE
from store.reader import StoreReader
from tests.tail_mass import logsumexp64

runner = CliRunner()


def tail_distribution(logits: np.ndarray, indices: np.ndarray, t: float) -> np.ndarray:
    """float64 softmax(logits / t) over the vocabulary outside `indices` (0 at them)."""
    scaled = np.asarray(logits, np.float64) / t
    np.put_along_axis(scaled, indices.astype(np.int64), -np.inf, axis=-1)
    return np.exp(scaled - logsumexp64(scaled)[..., None])


def entropy64(p: np.ndarray) -> np.ndarray:
    return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(-1)


def assert_systematic_draws(samples: np.ndarray, p: np.ndarray) -> None:
    """Every id drawn has mass in p, and each id is drawn floor or ceil of n * p times."""
    n, vocab = samples.shape[-1], p.shape[-1]
    flat_samples, flat_p = samples.reshape(-1, n), p.reshape(-1, vocab)
    for drawn, probabilities in zip(flat_samples, flat_p, strict=True):
        counts = np.bincount(drawn, minlength=vocab)
        assert (probabilities[drawn] > 0).all()
        expected = n * probabilities
        assert (counts >= np.floor(expected - 1e-6)).all() and (
            counts <= np.ceil(expected + 1e-6)
        ).all()


@pytest.mark.parametrize(
    "vocab, k, n, t", [(300, 20, 64, 2.0), (5000, 64, 16, 1.0), (40, 39, 8, 2.0)]
)
def test_tail_samples_follow_the_tails_distribution_and_its_entropy(vocab, k, n, t):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((3, 7, vocab)) * 3).astype(np.float32)
    logits[0, 0, :k] += 250  # a tail ~100 T below the head: still sampled by its own shape
    offsets = rng.random(logits.shape[:-1])
    out = topk_targets(logits, k, [t], "float32", sampling=TailSampling(n, t, offsets))
    samples, indices = out["tail_samples"], out["topk_indices"]
    assert samples.shape == (3, 7, n) and (np.diff(samples, axis=-1) >= 0).all()
    for drawn, head in zip(samples.reshape(-1, n), indices.reshape(-1, k), strict=True):
        assert not np.isin(drawn, head).any()
    p = tail_distribution(logits, indices, t)
    assert_systematic_draws(samples, p)
    np.testing.assert_allclose(out["tail_entropy"], entropy64(p), rtol=1e-5, atol=1e-6)


def test_the_draws_do_not_depend_on_how_the_rows_are_batched():
    """A resumed store may be computed with another targets.batch_size (not part of its
    identity): each position keeps its offset, so its draws are the same."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 5, 700)) * 2).astype(np.float32)
    sampling = TailSampling(8, 2.0, rng.random((3, 5)))
    whole = topk_targets(logits, 10, [1.0, 2.0], "float32", sampling=sampling)
    for row in range(3):
        alone = topk_targets(
            logits[row : row + 1], 10, [1.0, 2.0], "float32", sampling=sampling.rows(row, row + 1)
        )
        assert np.array_equal(alone["tail_samples"][0], whole["tail_samples"][row])
        assert np.array_equal(alone["tail_entropy"][0], whole["tail_entropy"][row])


def full_kl(teacher: np.ndarray, student: mx.array, t: float) -> mx.array:
    log_p = mx.array(teacher / t) - mx.logsumexp(mx.array(teacher / t), axis=-1, keepdims=True)
    log_q = student / t - mx.logsumexp(student / t, axis=-1, keepdims=True)
    return (mx.exp(log_p) * (log_p - log_q)).sum(-1)


def test_the_sampled_loss_is_the_full_kl_in_expectation_in_value_and_gradient():
    """kl_tail + sampled_tail_kl averaged over independent draws against the full-vocabulary
    KL at T=2 on a 48-token vocabulary whose tail holds a third of the mass; kl_tail alone is
    off by the tail's own KL, which the test must see."""
    vocab, k, n, t, draws = 48, 6, 4, 2.0, 3000
    rng = np.random.default_rng(0)
    teacher = (rng.standard_normal((2, vocab)) * 2).astype(np.float32)
    student = mx.array(teacher + rng.standard_normal((2, vocab)).astype(np.float32))
    out = topk_targets(teacher[None], k, [t], "float32")
    indices = mx.array(out["topk_indices"][0].astype(np.int32))
    head, tail = mx.array(out["topk_logits"][0]), mx.array(out["tail_logsumexp"][0, :, 0])

    def head_loss(logits):
        student_tail = tail_logsumexp(logits / t, indices)
        topk = mx.take_along_axis(logits, indices, axis=-1)
        return kl_tail(topk, student_tail, head, tail, t).sum()

    def sampled_loss(logits, samples, entropy):
        student_tail = tail_logsumexp(logits / t, indices)
        at_samples = mx.take_along_axis(logits, samples, axis=-1)
        return (
            head_loss(logits)
            + sampled_tail_kl(at_samples, student_tail, head, tail, entropy, t).sum()
        )

    exact, exact_grad = mx.value_and_grad(lambda s: full_kl(teacher, s, t).sum())(student)
    head_only, head_grad = mx.value_and_grad(head_loss)(student)
    value_and_grad = mx.value_and_grad(sampled_loss)
    values, grads = [], []
    for _ in range(draws):
        drawn = topk_targets(
            teacher[None], k, [t], "float32", sampling=TailSampling(n, t, rng.random((1, 2)))
        )
        value, grad = value_and_grad(
            student,
            mx.array(drawn["tail_samples"][0].astype(np.int32)),
            mx.array(drawn["tail_entropy"][0]),
        )
        values.append(value.item())
        grads.append(np.array(grad))
    mean_grad = np.mean(grads, axis=0)
    grad_error = np.abs(mean_grad - np.array(exact_grad)).max()
    head_grad_error = np.abs(np.array(head_grad) - np.array(exact_grad)).max()
    assert abs(np.mean(values) - exact.item()) < 0.05 * abs(exact.item() - head_only.item())
    assert grad_error < 0.05 * head_grad_error


def sampled_overrides(overrides: dict, n: int = 4) -> dict:
    return {**overrides, "targets.tail_samples": n, "targets.lse_temperatures": [1.0, 2.0]}


def test_the_store_keeps_the_teachers_tail_draws_and_entropy(tiny_targets_overrides, tiny_teacher):
    overrides = sampled_overrides(tiny_targets_overrides, n=8)
    config = load_config(None, overrides).targets
    compute_targets(config)
    reader = StoreReader(Path(config.store))
    teacher = load_model(str(tiny_teacher)).model
    for split, shape in reader.manifest.splits.items():
        assert shape.tail_samples == 8
        tokens = reader.sequences(split)["tokens"]
        logits = np.array(teacher(mx.array(tokens[:, :-1])).astype(mx.float32))
        chunks = [reader.read_targets(split, c) for c in range(shape.num_chunks)]
        stored = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
        p = tail_distribution(logits, stored["topk_indices"], config.sample_temperature)
        assert_systematic_draws(stored["tail_samples"].astype(np.int64), p)
        np.testing.assert_allclose(stored["tail_entropy"], entropy64(p), rtol=1e-5, atol=1e-5)
    info = store_info(Path(config.store))
    assert info.tail_samples == 8 and info.sample_temperature == 2.0
    result = runner.invoke(app, ["store", "info", config.store])
    assert result.exit_code == 0 and "8 tail samples at T=2" in result.output


def tune_overrides(overrides: dict, run_dir: Path, **more) -> dict:
    return {
        **overrides,
        "tune.run_dir": str(run_dir),
        "tune.group_size": 32,
        "tune.max_steps": 2,
        **more,
    }


def test_tune_on_a_sampled_store_adds_the_tails_kl_and_refuses_another_temperature(
    tiny_targets_overrides, tmp_path
):
    sampled = sampled_overrides(tiny_targets_overrides)
    compute_targets(load_config(None, sampled).targets)
    plain = {
        **tiny_targets_overrides,
        "store": str(tmp_path / "plain.zarr"),
        "targets.lse_temperatures": [1.0, 2.0],
    }
    compute_targets(load_config(None, plain).targets)
    with_samples = tune(load_config(None, tune_overrides(sampled, tmp_path / "a")).tune)
    without = tune(load_config(None, tune_overrides(plain, tmp_path / "b")).tune)
    # the same head and tail bucket, plus the (positive) KL inside the tail
    assert with_samples.initial_val_loss > without.initial_val_loss > 0
    checkpointed = tune_overrides(sampled, tmp_path / "e", **{"tune.grad_checkpoint": True})
    chunked = tune(load_config(None, checkpointed).tune)  # the loss by chunks of positions
    assert chunked.initial_val_loss == pytest.approx(with_samples.initial_val_loss, rel=1e-5)
    assert chunked.best_val_loss == pytest.approx(with_samples.best_val_loss, rel=1e-4)
    args = ["tune", *[f"--set={k}={v}" for k, v in tune_overrides(sampled, tmp_path / "c").items()]]
    result = runner.invoke(app, [*args, "--set=tune.temperature=1.0"])
    assert result.exit_code == 2, result.output
    assert "tail samples were drawn at temperature 2.0" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # a loss without the tail's own term reads the same store and ignores the samples
    js = tune(
        load_config(None, tune_overrides(sampled, tmp_path / "d", **{"tune.loss": "js"})).tune
    )
    assert js.steps == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"targets.tail_samples": -1}, "tail_samples must be >= 0"),
        ({"targets.tail_samples": 2000}, "tail_samples must be <= 1,024"),
        ({"targets.tail_samples": 4, "targets.sample_temperature": 3.0}, "must be one of"),
    ],
)
def test_bad_sampling_settings_are_one_line(tiny_targets_overrides, change, message):
    args = ["targets", *[f"--set={k}={v}" for k, v in {**tiny_targets_overrides, **change}.items()]]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not Path(tiny_targets_overrides["store"]).exists()


def test_samples_with_a_top_k_of_the_whole_vocabulary_are_one_line(
    tiny_targets_overrides, tiny_teacher
):
    vocab = json.loads((tiny_teacher / "config.json").read_text())["vocab_size"]
    change = {"targets.top_k": vocab, "targets.tail_samples": 4}
    args = ["targets", *[f"--set={k}={v}" for k, v in {**tiny_targets_overrides, **change}.items()]]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "tail_samples needs a tail" in result.output and "--tail-samples 0" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not Path(tiny_targets_overrides["store"]).exists()


@pytest.mark.parametrize("value", [-1, "4", True, 1 << 30])
def test_a_store_with_a_malformed_sample_count_is_refused_with_one_line(
    tiny_targets_overrides, value
):
    config = load_config(None, sampled_overrides(tiny_targets_overrides)).targets
    compute_targets(config)
    manifest = json.loads((Path(config.store) / MANIFEST_FILE).read_text())
    for split in manifest["splits"].values():
        split["tail_samples"] = value
    (Path(config.store) / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = runner.invoke(app, ["store", "verify", config.store])
    assert result.exit_code == 2, result.output
    assert "tail_samples=" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"settings": {"sample_temperature": None}}, "sample_temperature=None is not a number"),
        ({"settings": {"sample_temperature": 3.0}}, "sample_temperature=3.0 is not among"),
        ({"valid": {"tail_samples": 2}}, "splits disagree on tail_samples"),
        ({"valid": {"tail_samples": None}}, "splits disagree on tail_samples"),
    ],
)
def test_a_manifest_whose_sampling_fields_disagree_is_refused_with_one_line(
    tiny_targets_overrides, tmp_path, change, message
):
    config = load_config(None, sampled_overrides(tiny_targets_overrides)).targets
    compute_targets(config)
    path = Path(config.store) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    for where, fields in change.items():
        section = manifest["settings"] if where == "settings" else manifest["splits"][where]
        for name, value in fields.items():
            if value is None:
                del section[name]
            else:
                section[name] = value
    path.write_text(json.dumps(manifest))
    for command in (["store", "info", config.store], ["store", "verify", config.store]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    args = [
        f"--set={k}={v}"
        for k, v in tune_overrides(
            sampled_overrides(tiny_targets_overrides), tmp_path / "run"
        ).items()
    ]
    result = runner.invoke(app, ["tune", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_sampled_store_is_not_the_plain_one(tiny_targets_overrides):
    """Asking for samples of a store made without them (or another count) is a store made
    differently: refused with one line, the store untouched."""
    compute_targets(load_config(None, sampled_overrides(tiny_targets_overrides)).targets)
    for n in (0, 5):
        args = [f"--set={k}={v}" for k, v in sampled_overrides(tiny_targets_overrides, n).items()]
        result = runner.invoke(app, ["targets", *args])
        assert result.exit_code == 2 and "made differently" in result.output, result.output
    assert verify_store(Path(tiny_targets_overrides["store"])) == []
