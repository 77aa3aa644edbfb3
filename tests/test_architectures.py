"""mlx-lm's architecture families at their real dtype: tiny random bfloat16 llama (tied
embeddings), qwen3 (q/k norms, untied head, a 70,000-token vocabulary) and qwen3_moe (switch
layers) each go targets -> tune -> eval -> mlx_lm.load/generate, computing in float32 on CPU and
saving in bfloat16; the CPU fast path covers switch layers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from pipeline.config import load_config
from stages.errors import InvalidConfig, ModelError
from stages.evaluate import RTN, TEACHER, TUNED, evaluate
from stages.models import load_model, quantize_student, to_compute_dtype, use_dequantized_matmul
from stages.targets import compute_targets, teacher_logits
from stages.tune import tune
from store.errors import StoreMismatchError
from store.reader import StoreReader
from tests.conftest import small_run_overrides
from tests.tiny_models import make_arch_model_folder

FAMILIES = {"llama": None, "qwen3": 70_000, "qwen3_moe": None}  # name -> vocabulary (None: 384)


@pytest.fixture(scope="module")
def bf16_teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch-models")
    return {
        name: make_arch_model_folder(root / name, name, mx.bfloat16, vocab)
        for name, vocab in FAMILIES.items()
    }


def run_config(root: Path, teacher: Path, **more):
    overrides = {
        "tune.warmup_steps": 0,
        # the loop must move every family's scales (switch layers too) from DWQ's start; the
        # GPTQ start of the default is checked on its own below
        "tune.init": "rtn",
        # two steps must move bf16 scales past their rounding: the tune tests' rate, not the
        # default (chosen for 24 steps from the GPTQ start)
        "tune.learning_rate": 1e-4,
        "eval.num_sequences": 2,
        **more,
    }
    return load_config(None, small_run_overrides(root, teacher, **overrides))


def float_dtypes(folder: Path) -> dict[str, mx.Dtype]:
    """name -> dtype of every floating-point tensor saved in a model folder."""
    weights = mx.load(str(folder / "model.safetensors"))
    return {k: v.dtype for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_family_runs_targets_tune_eval_and_loads_in_mlx_lm(bf16_teachers, tmp_path, family):
    from mlx_lm import generate
    from mlx_lm import load as mlx_load

    teacher = bf16_teachers[family]
    config = run_config(tmp_path, teacher)

    manifest = compute_targets(config.targets)
    assert manifest.settings["compute_dtype"] == "float32"  # the cast is part of the store
    reader = StoreReader(config.targets.store)
    indices = reader.read_targets("valid", 0)["topk_indices"]
    vocab = FAMILIES[family] or 384
    assert manifest.splits["train"].vocab_size == vocab
    assert indices.dtype == (np.uint32 if vocab > 65_536 else np.uint16)

    result = tune(config.tune)
    assert result.best_step > 0 and result.best_val_loss < result.initial_val_loss
    saved = float_dtypes(result.model_dir)
    assert set(saved.values()) == {mx.bfloat16}  # scales, biases, norms: the teacher's dtype
    assert any(k.endswith(".scales") for k in saved)
    rtn, _ = quantize_student(load_model(str(teacher)), 4, 32)
    tuned_weights, rtn_weights = (
        mx.load(str(result.model_dir / "model.safetensors")),
        dict(tree_flatten(rtn.parameters())),
    )
    moved = [
        k
        for k in saved
        if k.endswith(".scales") and not mx.array_equal(tuned_weights[k], rtn_weights[k]).item()
    ]
    assert moved and (family != "qwen3_moe" or any(".switch_mlp." in k for k in moved))
    saved_config = json.loads((result.model_dir / "config.json").read_text())
    teacher_config = json.loads((teacher / "config.json").read_text())
    assert saved_config["torch_dtype"] == teacher_config["torch_dtype"] == "bfloat16"
    assert saved_config["quantization"]["group_size"] == 32

    scores = evaluate(config.eval).scores
    assert scores[TEACHER].kl == 0
    assert all(np.isfinite(s.kl) and s.kl >= 0 for s in scores.values())
    assert scores[RTN].kl > 0 and scores[TUNED].kl > 0

    model, tokenizer = mlx_load(str(result.model_dir))
    assert {v.dtype for _, v in tree_flatten(model.parameters())} <= {mx.bfloat16, mx.uint32}
    text = generate(model, tokenizer, "The quick brown", max_tokens=4)
    assert isinstance(text, str) and len(tokenizer.encode(text)) >= 1


def test_stored_logits_are_the_float32_forward_of_the_bf16_teacher(bf16_teachers, tmp_path):
    config = run_config(tmp_path, bf16_teachers["qwen3_moe"], **{"targets.logits_dtype": "float32"})
    compute_targets(config.targets)
    reader = StoreReader(config.targets.store)
    tokens = reader.sequences("valid")["tokens"]
    stored = reader.read_targets("valid", 0)
    as_float32 = load_model(str(bf16_teachers["qwen3_moe"]), compute_dtype="float32").model
    logits = teacher_logits(as_float32, tokens[: len(stored["topk_indices"])])
    expected = np.take_along_axis(logits, stored["topk_indices"].astype(np.int64), -1)
    np.testing.assert_allclose(stored["topk_logits"], expected, rtol=1e-5, atol=1e-5)


def test_a_store_computed_in_the_teachers_dtype_is_not_resumed_in_float32(bf16_teachers, tmp_path):
    teacher = bf16_teachers["llama"]
    made = compute_targets(run_config(tmp_path, teacher, compute_dtype="model").targets)
    assert "compute_dtype" not in made.settings  # as stored: recorded as every older store
    with pytest.raises(StoreMismatchError, match="compute_dtype"):
        compute_targets(run_config(tmp_path, teacher, compute_dtype="auto").targets)


def test_bf16_experts_in_their_own_dtype_on_cpu_are_refused_in_one_line(bf16_teachers, tmp_path):
    if mx.default_device() != mx.cpu:
        pytest.skip("MLX's gather_mm takes bfloat16 off CPU")
    config = run_config(tmp_path, bf16_teachers["qwen3_moe"], compute_dtype="model")
    with pytest.raises(ModelError, match="compute_dtype to auto or float32"):
        compute_targets(config.targets)


def test_switch_fast_path_gives_the_quantized_kernels_loss_and_gradients(bf16_teachers):
    def student():
        model, _ = quantize_student(load_model(str(bf16_teachers["qwen3_moe"])), 4, 32)
        to_compute_dtype(model, "float32")
        model.freeze()
        for _, module in model.named_modules():
            if type(module).__name__.endswith("SwitchLinear"):
                module.unfreeze(keys=["scales", "biases"], recurse=False)
        return model

    def loss_and_grads(model):
        tokens = mx.array([[5, 17, 42, 7, 99, 3]])

        def loss(params):
            model.update(params)
            return model(tokens).astype(mx.float32).square().mean()

        value, grads = mx.value_and_grad(loss)(model.trainable_parameters())
        return value.item(), dict(tree_flatten(grads))

    slow_model, fast_model = student(), student()
    swapped = use_dequantized_matmul(fast_model)
    switches = [m for _, m in fast_model.named_modules() if "SwitchLinear" in type(m).__name__]
    assert len(switches) == 6 and all(type(m).__name__.startswith("Dequantized") for m in switches)
    assert swapped > len(switches)
    slow_loss, slow_grads = loss_and_grads(slow_model)
    fast_loss, fast_grads = loss_and_grads(fast_model)
    assert fast_loss == pytest.approx(slow_loss, rel=1e-4)
    assert slow_grads.keys() == fast_grads.keys() and len(fast_grads) == 12  # 6 x scales, biases
    for name, grad in fast_grads.items():
        assert mx.abs(grad).sum().item() > 0, name
        np.testing.assert_allclose(
            np.array(grad),
            np.array(slow_grads[name]),
            rtol=1e-3,
            atol=1e-5 * float(mx.abs(slow_grads[name]).max().item()),
        )


def test_compute_dtype_is_one_key_for_every_stage_and_checked():
    config = load_config(None, {"compute_dtype": "float32", "eval.compute_dtype": "model"})
    assert (config.targets.compute_dtype, config.tune.compute_dtype) == ("float32", "float32")
    assert config.eval.compute_dtype == "model"
    assert load_config(None).tune.compute_dtype == "auto"
    # a run's float32 parameters mean the same under any: it resumes on another device
    assert config.tune.resume_key() == load_config(None).tune.resume_key()
    with pytest.raises(InvalidConfig, match="tune.compute_dtype must be one of auto, float32"):
        load_config(None, {"tune.compute_dtype": "bfloat16"})


@pytest.mark.parametrize("family", FAMILIES)
def test_default_gptq_start_on_each_family_is_closer_than_rtn_and_loads(
    bf16_teachers, tmp_path, family
):
    from mlx_lm import load as mlx_load

    config = run_config(tmp_path, bf16_teachers[family], **{"tune.init": "auto"})
    compute_targets(config.targets)
    phases: list[str] = []
    gptq = tune(config.tune, on_phase=phases.append)
    rtn = tune(dataclasses.replace(config.tune, init="rtn", run_dir=str(tmp_path / "rtn")))
    assert gptq.initial_val_loss < rtn.initial_val_loss  # the default start is closer
    teacher_config = json.loads((bf16_teachers[family] / "config.json").read_text())
    blocks = teacher_config["num_hidden_layers"]
    tied = ["GPTQ start: the tied output layer, validating"] if family == "llama" else []
    assert phases == [  # what the bar shows during the minutes before step 1 on a real model
        "loading and quantizing the teacher",
        *(f"GPTQ start: block {i}/{blocks}" for i in range(1, blocks + 1)),
        *tied,
        "validating the start",
    ]
    model, _ = mlx_load(str(gptq.model_dir))
    saved = json.loads((gptq.model_dir / "config.json").read_text())["quantization"]
    assert (saved["bits"], saved["group_size"]) == (4, 32)
    assert mx.isfinite(model(mx.array([[1, 2, 3]]))).all().item()


def test_a_bits_budget_on_a_bf16_moe_teacher_measures_in_float32_and_saves_bf16(
    bf16_teachers, tmp_path
):
    """The sensitivities run the teacher in the compute dtype (MLX's CPU gather_mm takes only
    float32: in bfloat16 the measurement died), then it is quantized in its own dtype."""
    config = run_config(tmp_path, bf16_teachers["qwen3_moe"], **{"tune.bits_per_weight": 6.0})
    compute_targets(config.targets)
    result = tune(config.tune)
    assert set(float_dtypes(result.model_dir).values()) == {mx.bfloat16}
    saved = json.loads((result.model_dir / "config.json").read_text())["quantization"]
    assert {entry["bits"] for entry in saved.values() if isinstance(entry, dict)} > {4}
    # the budget counted the scales as stored, in bfloat16, not as the float32 measurement
    from mlx_lm import load as mlx_load
    from mlx_lm.utils import compute_bits_per_weight

    record = json.loads((Path(config.tune.run_dir) / "sensitivities.json").read_text())
    stored = compute_bits_per_weight(mlx_load(str(result.model_dir))[0])
    assert record["bits_per_weight"] == pytest.approx(stored, rel=1e-6)
    assert stored <= 6.0


@pytest.mark.parametrize(
    "family, compute_dtype",
    [(family, "float32") for family in FAMILIES]
    + [("llama", "model"), ("qwen3", "model")],  # MLX's CPU gather_mm takes float32 only
)
def test_grad_checkpoint_by_chunks_tunes_each_family_the_same(
    bf16_teachers, tmp_path, family, compute_dtype, monkeypatch
):
    """Tied embeddings, an untied head over 70,000 tokens, switch layers: the output layer and
    loss a few positions at a time give the weights of the whole-batch step."""
    from stages.chunked_output import ChunkedOutput

    monkeypatch.setattr("stages.chunked_output.LOGITS_PER_CHUNK", 3 * (FAMILIES[family] or 384))
    config = run_config(tmp_path, bf16_teachers[family], compute_dtype=compute_dtype)
    compute_targets(config.targets)
    plain = tune(dataclasses.replace(config.tune, run_dir=str(tmp_path / "plain")))
    chunks = []
    by_chunks = ChunkedOutput.loss_and_grads
    monkeypatch.setattr(
        ChunkedOutput, "loss_and_grads", lambda *a: chunks.append(1) or by_chunks(*a)
    )
    chunked = tune(
        dataclasses.replace(config.tune, run_dir=str(tmp_path / "chunked"), grad_checkpoint=True)
    )
    assert chunks  # the model was split before its output layer
    a = mx.load(str(plain.model_dir / "model.safetensors"))
    b = mx.load(str(chunked.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    # in bfloat16 the hidden states' gradient is summed in float32 by the chunks, in bfloat16
    # by the whole step's matmul
    rtol = 1e-5 if compute_dtype == "float32" else 1e-2
    for name in a:
        np.testing.assert_allclose(
            np.array(a[name].astype(mx.float32)),
            np.array(b[name].astype(mx.float32)),
            rtol=rtol,
            atol=0,
            err_msg=name,
        )
