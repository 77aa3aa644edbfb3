"""tune.grad_checkpoint: each transformer block recomputed in the backward pass gives the same
loss and gradients with a lower peak memory, and touches only the model it is applied to."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model

from stages.models import (
    checkpoint_blocks,
    output_layer,
    unfreeze_scales_and_biases,
    use_dequantized_matmul,
)
from stages.tune import TuneConfig

LAYERS, SEQ_LEN = 12, 512
MOE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_intermediate_size": 64,
    "norm_topk_prob": True,
}


def deep_student(
    model_type: str = "qwen3", tied: bool = False, fast_path: bool = True, dtype=mx.float32
):
    """A random 4-bit student with many thin layers, on the CPU fast path (whose dequantized
    float32 weights are kept for the backward pass unless checkpointed)."""
    config = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": LAYERS,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": SEQ_LEN,
        "rope_theta": 10000.0,
        "vocab_size": 256,
        "tie_word_embeddings": tied,
        **(MOE if model_type == "qwen3_moe" else {}),
    }
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    quantize_model(model, config, group_size=32, bits=4)
    if fast_path:
        use_dequantized_matmul(model)
    unfreeze_scales_and_biases(model)
    return model


def step(model) -> tuple[float, dict[str, np.ndarray], int]:
    """Loss, gradients and MLX's peak memory of one training step."""
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (2, SEQ_LEN + 1)))

    def loss(params):
        model.update(params)
        return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()

    params = model.trainable_parameters()
    mx.eval(params)
    mx.reset_peak_memory()
    value, grads = mx.value_and_grad(loss)(params)
    mx.eval(value, grads)
    peak = mx.get_peak_memory()
    return value.item(), {k: np.array(v) for k, v in tree_flatten(grads)}, peak


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients_in_less_memory(model_type):
    plain_loss, plain_grads, plain_peak = step(deep_student(model_type))
    model = deep_student(model_type)
    assert checkpoint_blocks(model) == LAYERS
    loss, grads, peak = step(model)
    assert loss == plain_loss
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, plain_grads[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert peak < 0.6 * plain_peak, (peak, plain_peak)


def test_checkpointing_changes_only_that_model_and_only_once():
    checkpointed, plain = deep_student(), deep_student()
    checkpoint_blocks(checkpointed)
    checkpoint_blocks(checkpointed)  # a second call does not nest
    block = type(checkpointed.layers[0])
    assert block.__bases__ == (type(plain.layers[0]),)
    assert type(plain.layers[0]).__call__ is not block.__call__
    # Saving sees the same parameter names either way.
    names = lambda m: [k for k, _ in tree_flatten(m.parameters())]  # noqa: E731
    assert names(checkpointed) == names(plain)


def test_grad_checkpoint_is_not_part_of_the_resume_key():
    assert TuneConfig(grad_checkpoint=True).resume_key() == TuneConfig().resume_key()


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied embedding"])
@pytest.mark.parametrize("fast_path", [True, False], ids=["dequantized", "quantized_matmul"])
def test_the_model_splits_before_its_output_layer(model_type, tied, fast_path):
    model = deep_student(model_type, tied, fast_path)
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (2, 9)))
    output = output_layer(model, tokens)
    assert output is not None
    assert output.module is (model.model.embed_tokens if tied else model.lm_head)
    split = output.project(output.backbone(tokens), output.weight())
    np.testing.assert_allclose(np.array(split), np.array(model(tokens)), rtol=1e-4, atol=1e-5)


def test_a_bfloat16_model_off_the_fast_path_splits_to_its_rounding():
    """quantized_matmul in bfloat16 against the dequantized weight's matmul (as on a GPU)."""
    model = deep_student(fast_path=False, dtype=mx.bfloat16)
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (2, 9)))
    assert output_layer(model, tokens) is not None
    model.__class__ = type("ScaledLogits", (type(model),), {"__call__": _scaled_call})
    assert output_layer(model, tokens) is None  # still fine enough to see a scaled output


def test_a_model_whose_output_is_not_its_head_is_only_called_whole():
    """A model that changes its head's output (a logit scale, a soft cap) is not split."""
    tokens = mx.array([[1, 2, 3]])
    model = deep_student()
    model.__class__ = type("ScaledLogits", (type(model),), {"__call__": _scaled_call})
    assert output_layer(model, tokens) is None
    assert output_layer(deep_student().model, tokens) is None  # no backbone called `model`
    untied = deep_student()
    del untied.lm_head  # neither an lm_head nor a tied embedding to call
    untied.model.embed_tokens = None
    assert output_layer(untied, tokens) is None
    odd = deep_student()
    odd.model = lambda tokens: (tokens, None)  # a backbone that returns more than states
    assert output_layer(odd, tokens) is None
    biased = deep_student()
    biased.lm_head = nn.Linear(64, 256, bias=True)  # its bias would get no gradient
    assert output_layer(biased, tokens) is None


def _scaled_call(self, inputs, *args, **kwargs):
    return 0.5 * self.lm_head(self.model(inputs))


@pytest.mark.parametrize("head_trained", [True, False])
def test_chunked_output_gives_the_whole_heads_loss_and_gradients(head_trained, monkeypatch):
    """Chunks of 3 positions and weight blocks of 24 rows against one value_and_grad of
    hidden @ W.T and a loss; a head that is not trained gets no weight gradient at all."""
    from stages.chunked_output import ChunkedOutput
    from stages.models import OutputLayer

    monkeypatch.setattr("stages.chunked_output.LOGITS_PER_CHUNK", 2 * 3 * 256)
    model = deep_student()
    rng = np.random.default_rng(2)
    hidden = mx.array(rng.standard_normal((2, 10, 64)).astype(np.float32))
    target = mx.array(rng.integers(0, 256, (2, 10)))

    def loss(logits, target):
        return nn.losses.cross_entropy(logits.astype(mx.float32), target).sum()

    if not head_trained:
        model.lm_head.freeze()
    chunked = ChunkedOutput(OutputLayer(model.model, model.lm_head, "lm_head"), loss)
    assert chunked.head_trained == head_trained
    weights = chunked.weight_blocks()
    assert [w.shape[0] for w in weights] == [24] * 10 + [16]  # 1536 logits / 64 columns
    whole_weight = mx.concatenate(weights)
    value, (h_grad, w_grad) = mx.value_and_grad(lambda h, w: loss(h @ w.T, target), argnums=(0, 1))(
        hidden, whole_weight
    )
    found, found_h_grad, found_w_grads = chunked.loss_and_grads(hidden, weights, [target])
    np.testing.assert_allclose(found.item(), value.item(), rtol=1e-6)
    np.testing.assert_allclose(np.array(found_h_grad), np.array(h_grad), rtol=1e-5, atol=1e-6)
    if head_trained:
        np.testing.assert_allclose(
            np.array(mx.concatenate(found_w_grads)), np.array(w_grad), rtol=1e-5, atol=1e-6
        )
    else:
        assert found_w_grads == []
