"""Adam with bfloat16 moments (tune.adam_moments_dtype): unbiased rounding, float32's decay, and
a run that resumes bit-identically with its moments in bfloat16."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from stages.adam import MomentsAdam, round_to_bfloat16
from stages.errors import InvalidConfig
from stages.tune import TuneConfig, tune
from tests import test_tune
from tests.test_tune import assert_kill_and_resume_is_bit_identical, tune_config

tiny_store = test_tune.tiny_store  # the store fixture of the tune tests


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    values = mx.array([1.001, -3.3e-5, 7.7e-20, 0.4], mx.float32)
    many = mx.broadcast_to(values, (100_000, 4))
    rounded = np.array(round_to_bfloat16(many, mx.random.key(5)).astype(mx.float32))
    exact = np.array(values)
    down = np.array(values.astype(mx.bfloat16).astype(mx.float32))  # nearest: one neighbour
    for column in range(4):
        neighbours = np.unique(rounded[:, column])
        assert len(neighbours) <= 2
        assert neighbours.min() <= exact[column] <= neighbours.max()
        gap = np.abs(np.spacing(down[column].astype(np.float32)) * 2**16)
        mean = rounded[:, column].astype(np.float64).mean()
        assert abs(mean - exact[column]) < 0.02 * gap  # ~6 standard errors


def adam_state_after(optimizer, steps: int) -> dict[str, np.ndarray]:
    """One gradient of 0.37, then `steps` zero gradients: m and v only decay."""
    params = optimizer.apply_gradients({"w": mx.full((20_000,), 0.37)}, {"w": mx.zeros((20_000,))})
    for _ in range(steps):
        params = optimizer.apply_gradients({"w": mx.zeros((20_000,))}, params)
        mx.eval(params, optimizer.state)
    state = optimizer.state["w"]
    moments = {k: np.array(state[k].astype(mx.float32)).astype(np.float64) for k in ("m", "v")}
    return {**moments, "w": np.array(params["w"]).astype(np.float64)}


def test_bfloat16_moments_decay_as_float32_ones_do():
    ours = adam_state_after(MomentsAdam(1e-3, "bfloat16", seed=3), 300)
    reference = adam_state_after(MomentsAdam(1e-3, "float32"), 300)
    assert ours["v"].mean() == pytest.approx(reference["v"].mean(), rel=2e-3)
    assert ours["m"].mean() == pytest.approx(reference["m"].mean(), rel=2e-3)
    assert ours["w"].mean() == pytest.approx(reference["w"].mean(), rel=2e-3)
    # rounded to nearest, v would not decay at all: 0.999 v rounds back to v
    v = mx.array(0.001 * 0.37**2, mx.bfloat16)
    for _ in range(300):
        v = (v.astype(mx.float32) * 0.999).astype(mx.bfloat16)
    assert float(v) > 1.3 * reference["v"].mean()


def test_float32_moments_are_mlx_adam_exactly():
    ours = adam_state_after(MomentsAdam(1e-3, "float32"), 20)
    theirs = adam_state_after(optim.Adam(1e-3, bias_correction=True), 20)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_a_run_with_bfloat16_moments_learns_and_resumes_bit_identically(tiny_store, tmp_path):
    result = tune(tune_config(tiny_store, tmp_path / "run", adam_moments_dtype="bfloat16"))
    assert result.best_val_loss < result.initial_val_loss
    state = mx.load(str(tmp_path / "run" / "checkpoint" / "optimizer.safetensors"))
    moments = {k: v for k, v in state.items() if k.endswith((".m", ".v"))}
    assert moments and all(v.dtype == mx.bfloat16 for v in moments.values())
    assert_kill_and_resume_is_bit_identical(tiny_store, tmp_path, adam_moments_dtype="bfloat16")


def test_each_parameter_of_each_optimizer_draws_its_own_noise_at_any_seed():
    keys = set()
    for stream in (0, 1, 255):
        optimizer = MomentsAdam(1e-3, "bfloat16", seed=2**63 - 1, stream=stream)
        optimizer.init({"w": mx.zeros((2,))})
        optimizer.state["step"] = mx.array(7, mx.uint64)
        keys |= {tuple(np.array(optimizer._key(i)).tolist()) for i in range(40)}
    assert len(keys) == 3 * 40
    adam_state_after(MomentsAdam(1e-3, "bfloat16", seed=2**63 - 1, stream=255), 2)


def test_the_moments_dtype_is_checked_and_keyed():
    assert TuneConfig().resume_key() != TuneConfig(adam_moments_dtype="bfloat16").resume_key()
    # at its default it is not in the key: checkpoints from before the setting still resume
    assert "adam_moments_dtype" not in TuneConfig().identity()
    with pytest.raises(InvalidConfig, match="adam_moments_dtype"):
        TuneConfig(adam_moments_dtype="float16")


def test_bfloat16_moments_lower_the_peak_of_an_optimizer_step():
    """Each parameter's update evaluated on its own: the step's peak falls by about what the
    moments save (MLX's count), not just their resting size."""

    def step_peak(moments_dtype: str) -> int:
        params = {f"p{i}": mx.zeros((500_000,)) for i in range(16)}
        optimizer = MomentsAdam(1e-3, moments_dtype, seed=1)
        grads = {k: mx.full(v.shape, 0.1) for k, v in params.items()}
        mx.eval(grads)
        for _ in range(2):
            mx.reset_peak_memory()
            params = optimizer.apply_gradients(grads, params)
            mx.eval(params, optimizer.state)
        return mx.get_peak_memory()

    saved = 16 * 500_000 * 2 * 2  # two moments, 2 bytes each fewer
    assert step_peak("bfloat16") < step_peak("float32") - 0.75 * saved
