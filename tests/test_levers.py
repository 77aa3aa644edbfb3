"""The quality levers of `tune` on the tiny teacher: each does what it claims, a zero-effect
setting leaves round-to-nearest, each lowers the validation loss, resume stays exact."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from stages import rounding
from stages.errors import InvalidConfig
from stages.models import load_model, quantize_student, unfreeze_scales_and_biases
from stages.tune import TuneConfig, tune
from tests import test_tune
from tests.test_tune import assert_kill_and_resume_is_bit_identical, saved_weights, tune_config

tiny_store = test_tune.tiny_store  # the store fixture of the tune tests

ALL_LEVERS = {
    "train_norms": True,
    "learned_rounding": True,
    "init": "clip_search",
    "rounding_lr": 0.02,
}
SHORT = {"max_steps": 4, "epochs": 1}


def rtn_student(teacher: Path):
    loaded = load_model(str(teacher))
    originals = rounding.full_precision_weights(loaded.model)
    model, _ = quantize_student(loaded, bits=4, group_size=32)
    return model, originals


def norm_weights(weights: dict) -> dict:
    return {k: np.array(v) for k, v in weights.items() if "norm" in k}


@pytest.mark.parametrize("train_norms", [True, False])
def test_norm_weights_move_only_with_train_norms(tiny_store, tiny_teacher, tmp_path, train_norms):
    result = tune(tune_config(tiny_store, tmp_path / "run", train_norms=train_norms, **SHORT))
    teacher = dict(tree_flatten(load_model(str(tiny_teacher)).model.parameters()))
    before, after = norm_weights(teacher), norm_weights(saved_weights(result.model_dir))
    assert before.keys() == after.keys() and len(before) == 5  # 2 layers x 2 + the final norm
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert set(moved) == (set(before) if train_norms else set())
    assert all(after[k].dtype == before[k].dtype for k in before)  # saved in float, as before


def test_norms_lever_unfreezes_norms_and_unquantized_biases():
    import mlx.nn as nn

    model = nn.Sequential(nn.Linear(64, 64, bias=True), nn.RMSNorm(64), nn.Linear(64, 32))
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p == "layers.2")
    unfreeze_scales_and_biases(model, train_norms=True)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {
        "layers.0.bias",
        "layers.1.weight",
        "layers.2.scales",
        "layers.2.biases",
        "layers.2.bias",
    }
    unfreeze_scales_and_biases(model)
    assert {k for k, _ in tree_flatten(model.trainable_parameters())} == {
        "layers.2.scales",
        "layers.2.biases",
    }


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packed_codes_are_mlx_layout_for_every_width(bits):
    weight = mx.random.normal((6, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(weight, group_size=64, bits=bits)
    codes = rounding.unpack_codes(packed, bits, 64)
    assert float(codes.max()) <= 2**bits - 1 and float(codes.min()) >= 0
    assert np.array_equal(np.array(rounding.pack_codes(codes, bits)), np.array(packed))


def test_clip_search_lowers_the_weight_error_of_every_layer(tiny_teacher):
    model, originals = rtn_student(tiny_teacher)
    rtn_errors = {}
    for path, module in model.named_modules():
        if path in originals and hasattr(module, "bits"):
            quantized = (module["weight"], module["scales"], module["biases"])
            error = rounding.group_errors(originals[path], quantized, 4, 32).sum()
            rtn_errors[path] = error.item()
    assert rounding.clip_search_init(model, originals) == len(rtn_errors) == 15
    for path, module in model.named_modules():
        if path in rtn_errors:
            quantized = (module["weight"], module["scales"], module["biases"])
            error = rounding.group_errors(originals[path], quantized, 4, 32).sum().item()
            assert error < rtn_errors[path], path


def test_rounding_offsets_fold_into_integers_that_mlx_lm_reads_back(
    tiny_store, tiny_teacher, tmp_path
):
    from mlx_lm import generate
    from mlx_lm import load as mlx_load

    settings = {"learned_rounding": True, "rounding_lr": 0.02}
    result = tune(tune_config(tiny_store, tmp_path / "run", **settings))
    # The tuned student as it was in memory: RTN + offsets, with the best checkpoint's values.
    student, originals = rtn_student(tiny_teacher)
    unfreeze_scales_and_biases(student)
    rounding.add_rounding_offsets(student, originals)
    best = mx.load(str(tmp_path / "run" / "checkpoint" / "best.safetensors"))
    student.update(tree_unflatten(list(best.items())))
    rtn, _ = rtn_student(tiny_teacher)
    loaded, tokenizer = mlx_load(str(result.model_dir))
    rtn_modules = dict(rtn.named_modules())
    loaded_modules = dict(loaded.named_modules())
    flipped = 0
    for path, module in student.named_modules():
        if not isinstance(module, rounding._RoundedWeight):
            continue
        saved = loaded_modules[path]
        codes = rounding.unpack_codes(saved["weight"], 4, 32)
        assert np.array_equal(np.array(codes), np.array(rounding.rounded_codes(module)))
        for key in ("scales", "biases"):
            assert np.array_equal(np.array(saved[key]), np.array(module[key]))
        flipped += int((saved["weight"] != rtn_modules[path]["weight"]).sum().item())
    assert flipped > 0, "no rounding changed"
    tokens = mx.array([[1, 5, 9, 42, 7, 3, 100, 11]])
    np.testing.assert_allclose(np.array(loaded(tokens)), np.array(student(tokens)), atol=1e-4)
    assert isinstance(generate(loaded, tokenizer, "The quick", max_tokens=4), str)
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"].get("mode", "affine") == "affine"
    assert not any("rounding" in k for k in saved_weights(result.model_dir))


def test_zero_effect_levers_save_the_rtn_student(tiny_store, tiny_teacher, tmp_path):
    settings = {"learned_rounding": True, "rounding_lr": 0.0, "train_norms": True}
    run = tune_config(tiny_store, tmp_path / "run", learning_rate=1e-12, **settings, **SHORT)
    saved = saved_weights(tune(run).model_dir)
    rtn, _ = rtn_student(tiny_teacher)
    expected = {k: np.array(v) for k, v in tree_flatten(rtn.parameters())}
    assert saved.keys() == expected.keys()
    assert all(np.array_equal(saved[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "levers",
    [
        {"train_norms": True},
        {"learned_rounding": True, "rounding_lr": 0.02},
        {"init": "clip_search"},
        ALL_LEVERS,
        {**ALL_LEVERS, "fast_matmul": "off"},
    ],
    ids=["norms", "rounding", "clip_search", "all", "all-without-fast-matmul"],
)
def test_each_lever_lowers_the_validation_loss(tiny_store, tmp_path, levers):
    result = tune(tune_config(tiny_store, tmp_path / "run", **levers))
    assert result.best_val_loss < result.initial_val_loss
    assert result.warning is None


def test_resume_with_every_lever_on_is_bit_identical(tiny_store, tmp_path):
    assert_kill_and_resume_is_bit_identical(tiny_store, tmp_path, **ALL_LEVERS)


def test_lever_settings_are_checked_and_keyed():
    with pytest.raises(InvalidConfig) as caught:
        TuneConfig(student="some/quantized", learned_rounding=True, init="awq", rounding_lr=-1)
    message = str(caught.value)
    assert "tune.init must be one of rtn, clip_search" in message
    assert "tune.rounding_lr must be >= 0" in message
    assert "leave tune.student unset" in message
    with pytest.raises(InvalidConfig, match="leave tune.student unset"):
        TuneConfig(student="some/quantized", init="clip_search")
    base = TuneConfig().resume_key()
    # a checkpoint of a run from before the levers resumes: levers off leave the key as it was
    assert TuneConfig(rounding_lr=0.3).resume_key() == base
    for lever in ({"train_norms": True}, {"learned_rounding": True}, {"init": "clip_search"}):
        assert TuneConfig(**lever).resume_key() != base
    assert TuneConfig(learned_rounding=True, rounding_lr=0.1).resume_key() != (
        TuneConfig(learned_rounding=True).resume_key()
    )


def test_levers_are_cli_settings():
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["config", "--set", "tune.learned_rounding=true"])
    assert shown.exit_code == 0, shown.output
    for key in ("train_norms", "learned_rounding", "rounding_lr", "init"):
        assert f"tune.{key}" in shown.output
    refused = runner.invoke(app, ["config", "--set", "tune.init=awq"])
    assert refused.exit_code == 2 and "tune.init must be one of" in refused.output
