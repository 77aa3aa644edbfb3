"""Tiny random models of mlx-lm's architecture families, saved as mlx-lm folders in their real
dtype (bfloat16 by default): llama with tied embeddings, qwen3 with q/k norms and an untied head,
qwen3_moe with switch (mixture-of-experts) layers. Optionally with a vocabulary above 65,536, so
that the store keeps its top-k indices as uint32."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import mlx.core as mx

from tests.conftest import make_tokenizer_files

HIDDEN = 64  # the smallest width whose every layer quantizes at group size 32 (and the MoE
# router at mlx-lm's 8-bit, group-64)

_COMMON = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "intermediate_size": 2 * HIDDEN,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
}
ARCHITECTURES = {
    "llama": {"tie_word_embeddings": True},
    "qwen3": {"tie_word_embeddings": False},
    "qwen3_moe": {
        "tie_word_embeddings": False,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
    },
}


def pad_vocabulary(folder: Path, size: int) -> int:
    """Grow the folder's byte-level BPE vocabulary to `size` entries with tokens no merge makes
    (strings of the byte alphabet, so each still decodes): a model's head is as wide as a real
    one's while the text still tokenizes into the few hundred trained tokens."""
    from tokenizers import pre_tokenizers

    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for letters in itertools.product(alphabet, repeat=3):
        if len(vocab) >= size:
            break
        vocab.setdefault("".join(letters), len(vocab))
    path.write_text(json.dumps(spec))
    return len(vocab)


def make_arch_model_folder(
    folder: Path,
    model_type: str,
    dtype: mx.Dtype = mx.bfloat16,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """A random `model_type` model (see ARCHITECTURES) saved as an mlx-lm folder in `dtype`;
    `vocab_size` pads the tokenizer to that many tokens (default: the trained few hundred)."""
    import importlib

    from mlx_lm.utils import save_config, save_model

    folder.mkdir(parents=True, exist_ok=True)
    size = make_tokenizer_files(folder)
    if vocab_size:
        size = pad_vocabulary(folder, vocab_size)
    config = {
        "model_type": model_type,
        **_COMMON,
        **ARCHITECTURES[model_type],
        "vocab_size": size,
        "torch_dtype": {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, "float32"),
    }
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return folder
