"""`tune --mode mxfp4|nvfp4|mxfp8` on the tiny teacher: latent weights tuned through the
rounding, saved as exactly what mx.quantize of that mode makes, loaded back by mlx-lm, resumed
bit for bit, scored by `eval` against RTN of the same mode; bad combinations refused."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from stages.errors import ModelError, StageError
from stages.evaluate import RTN, TUNED, EvalConfig, evaluate
from stages.float_modes import FLOAT_MODES, LATENT, add_latent_weights, untuned_float_layers
from stages.models import load_model, quantize_student
from stages.tune import TuneConfig, tune
from tests import test_tune
from tests.conftest import SENTENCES, make_text_data, run_cli, write_jsonl
from tests.test_tune import assert_kill_and_resume_is_bit_identical, saved_weights, tune_config

tiny_store = test_tune.tiny_store  # the store fixture of the tune tests

LATENT_LR = 3e-4  # lowered mxfp4's validation loss most on the tiny teacher (1e-3 overshoots)
STILL = 1e-30  # a latent step too small to move any float32 weight: the RTN student


def fp_config(store: Path, run_dir: Path, mode: str, **extra) -> TuneConfig:
    """The tune tests' settings in `mode` (their group size 32 replaced by the mode's own)."""
    extra = {"group_size": FLOAT_MODES[mode][1], "latent_lr": LATENT_LR, **extra}
    return tune_config(store, run_dir, mode=mode, **extra)


def rtn_weights(teacher: Path, mode: str) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    bits, group_size = FLOAT_MODES[mode]
    model, _ = quantize_student(load_model(str(teacher)), bits, group_size, mode)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def quantized_latents(run_dir: Path, mode: str) -> dict[str, np.ndarray]:
    """mx.quantize of the best latent weights the checkpoint holds, as the saved keys name them.
    (Not a re-quantization of the saved weights: MLX's floating-point quantize is not
    idempotent, a group whose largest weight dequantizes to 3 or 4 times its scale gets half
    that scale the second time.)"""
    bits, group_size = FLOAT_MODES[mode]
    out = {}
    for key, latent in mx.load(str(run_dir / "checkpoint" / "best.safetensors")).items():
        if key.endswith(LATENT):
            stem = key.removesuffix(LATENT)
            packed, scales = mx.quantize(latent, group_size=group_size, bits=bits, mode=mode)
            out[stem + "weight"], out[stem + "scales"] = np.array(packed), np.array(scales)
    return out


@pytest.mark.parametrize("mode", sorted(FLOAT_MODES))
def test_each_mode_tunes_and_loads_back_as_mx_quantize_makes_it(
    mode, tiny_store, tiny_teacher, tmp_path
):
    from mlx_lm import generate
    from mlx_lm import load as mlx_load

    result = tune(fp_config(tiny_store, tmp_path / "run", mode, max_steps=4))
    block = json.loads((result.model_dir / "config.json").read_text())["quantization"]
    bits, group_size = FLOAT_MODES[mode]
    assert (block["mode"], block["bits"], block["group_size"]) == (mode, bits, group_size)
    model, tokenizer = mlx_load(str(result.model_dir))
    assert isinstance(generate(model, tokenizer, "The quick", max_tokens=3), str)

    saved, rtn = saved_weights(result.model_dir), rtn_weights(tiny_teacher, mode)
    assert saved.keys() == rtn.keys()  # the same layers, no latent or bias left over
    packed = sorted(k for k in saved if saved[k].dtype == np.uint32)
    assert len(packed) == 15  # 7 Linears in each of 2 blocks, and the tied embedding
    made = quantized_latents(result.model_dir.parent, mode)
    assert sorted(k for k in made if k.endswith("weight")) == packed
    assert all(np.array_equal(made[k], saved[k]) for k in made)
    moved = [k for k in packed if not np.array_equal(saved[k], rtn[k])]
    assert len(moved) == (len(packed) if result.best_step > 0 else 0)  # the start is RTN


def test_a_step_too_small_to_move_a_latent_saves_rtn(tiny_store, tiny_teacher, tmp_path):
    """The start is round-to-nearest of the teacher's weights, in the mode's own quantization."""
    result = tune(fp_config(tiny_store, tmp_path / "run", "nvfp4", latent_lr=STILL))
    saved, rtn = saved_weights(result.model_dir), rtn_weights(tiny_teacher, "nvfp4")
    assert saved.keys() == rtn.keys()
    assert all(np.array_equal(saved[k], rtn[k]) for k in saved)


def test_tuning_an_fp_mode_lowers_the_validation_loss_below_rtn(tiny_store, tmp_path):
    """Every step is validated: the start is RTN's loss, and the best step is well below it."""
    result = tune(fp_config(tiny_store, tmp_path / "run", "mxfp4", val_every=1))
    assert result.warning is None
    assert result.best_val_loss < 0.9 * result.initial_val_loss


@pytest.mark.parametrize("mode", sorted(FLOAT_MODES))
def test_an_fp_mode_run_killed_and_resumed_is_bit_identical(mode, tiny_store, tmp_path):
    settings = {"group_size": FLOAT_MODES[mode][1], "latent_lr": LATENT_LR}
    assert_kill_and_resume_is_bit_identical(
        tiny_store, tmp_path, mode=mode, train_norms=True, **settings
    )


def test_eval_scores_rtn_of_the_students_own_mode(tiny_store, tiny_teacher, tmp_path):
    """A student that is RTN of nvfp4 scores exactly as eval's RTN row: that row is nvfp4 too."""
    run = tune(fp_config(tiny_store, tmp_path / "run", "nvfp4", latent_lr=STILL))
    data = make_text_data(tmp_path / "data")
    write_jsonl(data / "test.jsonl", [{"text": " ".join(SENTENCES[1::2] + SENTENCES[::2])}] * 2)
    config = EvalConfig(
        store=str(tmp_path / "none.zarr"),
        student=str(run.model_dir),
        teacher=str(tiny_teacher),
        data=str(data),
        max_seq_length=17,
        num_sequences=2,
    )
    scores = evaluate(config).scores
    assert scores[RTN].kl > 0 and scores[TUNED].kl == scores[RTN].kl


def test_identity_names_the_mode_only_when_not_affine():
    """Checkpoints from before the modes (affine) keep their resume key."""
    affine, mxfp8 = TuneConfig(), TuneConfig(mode="mxfp8", bits=8)
    assert "mode" not in affine.identity() and "latent_lr" not in affine.identity()
    assert mxfp8.identity()["mode"] == "mxfp8" and mxfp8.start == "rtn"  # GPTQ is affine
    assert (mxfp8.identity()["bits"], mxfp8.identity()["group_size"]) == (8, 32)
    assert TuneConfig(mode="mxfp8").resume_key() == mxfp8.resume_key()  # bits 4 = left unset
    assert TuneConfig(mode="nvfp4").quantization == (4, 16)


def test_the_learning_rate_keys_an_fp_mode_run_only_when_norms_train():
    """In a floating-point mode the latents train at tune.latent_lr; tune.learning_rate moves
    only the norms, so a resume with another one is refused only when they train."""
    plain = TuneConfig(mode="mxfp4")
    assert "learning_rate" not in plain.identity()
    assert TuneConfig(mode="mxfp4", learning_rate=1e-3).resume_key() == plain.resume_key()
    assert TuneConfig(mode="mxfp4", latent_lr=1e-3).resume_key() != plain.resume_key()
    norms = TuneConfig(mode="mxfp4", train_norms=True)
    assert (
        norms.resume_key()
        != TuneConfig(mode="mxfp4", train_norms=True, learning_rate=1e-3).resume_key()
    )
    assert TuneConfig(learning_rate=1e-3).resume_key() != TuneConfig().resume_key()  # affine


@pytest.mark.parametrize(
    "args, says",
    [
        (["--mode", "mxfp4", "--set", "tune.group_size=128"], "tune.mode=mxfp4 quantizes 4-bit"),
        (["--mode", "nvfp4", "--set", "tune.bits=3"], "leave tune.bits and tune.group_size"),
        (["--mode", "mxfp8", "--set", "tune.init=gptq"], "affine-only"),
        (["--mode", "mxfp4", "--set", "tune.learned_rounding=true"], "affine-only"),
        (["--mode", "fp16"], "tune.mode must be one of affine, mxfp4, nvfp4, mxfp8"),
        (["--mode", "nvfp4", "--student", "some/model"], "need the teacher's full-precision"),
        (["--mode", "mxfp4", "--bits-per-weight", "4.5"], "leave it unset with tune.mode=mxfp4"),
    ],
)
def test_bad_mode_combinations_are_refused_with_one_line(args, says, tiny_store, tmp_path):
    result = run_cli("tune", "--store", str(tiny_store), "--run-dir", str(tmp_path / "r"), *args)
    assert result.returncode == 2, result.stderr
    output = (result.stdout + result.stderr).strip()
    assert says in " ".join(output.split()) and "Traceback" not in output
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_switch_layers_would_stay_rtn_so_a_float_mode_moe_is_refused(tmp_path):
    """Mixture-of-experts switch layers get no latent weight (not built): they are found, and
    tune refuses the run rather than leave most of a MoE model's weights round-to-nearest."""
    from stages.rounding import full_precision_weights
    from stages.tune import _add_latents, _Student
    from tests.tiny_models import make_arch_model_folder

    folder = make_arch_model_folder(tmp_path / "moe", "qwen3_moe", dtype=mx.float32)
    loaded = load_model(str(folder))
    originals = full_precision_weights(loaded.model)
    model, config = quantize_student(loaded, 4, 32, "mxfp4")
    assert add_latent_weights(model, originals) > 0
    untuned = untuned_float_layers(model)
    assert untuned and all("switch_mlp" in path for path in untuned)
    fresh, _ = quantize_student(load_model(str(folder)), 4, 32, "mxfp4")
    student = _Student(fresh, None, {}, folder, originals)
    with pytest.raises(ModelError, match=r"cannot be tuned in a floating-point mode yet"):
        _add_latents(TuneConfig(mode="mxfp4"), student)


def test_eval_refuses_a_student_of_an_unknown_mode(tiny_store, tmp_path):
    run = tune(fp_config(tiny_store, tmp_path / "run", "mxfp4", max_steps=1))
    config_file = run.model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization"]["mode"] = 7
    config_file.write_text(json.dumps(config))
    with pytest.raises(StageError, match=r"names quantization mode '7', not one of affine"):
        evaluate(EvalConfig(store=str(tiny_store), student=str(run.model_dir)))


@pytest.mark.parametrize(
    "mode, bits, group_size", [("mxfp8", 8, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16)]
)
def test_mxfp8_latents_start_off_the_rounding_ties(mode, bits, group_size):
    """Weights with few significant bits sit on the grid's ties. An mxfp8 latent starts a little
    toward its quantized value: the same RTN student, and a first step of 1e-6 no longer flips
    codes; the 4-bit modes start on the teacher's weight (their first flips helped)."""
    from types import SimpleNamespace

    from stages.float_modes import _off_the_ties, fake_quantized

    weight = (mx.random.normal((64, 256), key=mx.random.key(3)) * 0.05).astype(mx.bfloat16)
    weight = weight.astype(mx.float32)
    start = _off_the_ties(weight, SimpleNamespace(bits=bits, group_size=group_size, mode=mode))
    if mode != "mxfp8":
        assert start is weight
        return
    rtn = fake_quantized(weight, bits, group_size, mode)
    assert bool(mx.all(fake_quantized(start, bits, group_size, mode) == rtn))
    sign = mx.where(mx.random.uniform(shape=weight.shape, key=mx.random.key(4)) < 0.5, -1.0, 1.0)

    def flipped(latent):
        return float((fake_quantized(latent + 1e-6 * sign, bits, group_size, mode) != rtn).mean())

    assert flipped(weight) > 0.002  # ties exist
    assert flipped(start) < 0.1 * flipped(weight)
