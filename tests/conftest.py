"""Tiny models and data built in code: a byte-level BPE trained on a few sentences and a 2-layer
llama saved as a real mlx-lm folder, so tests go through the same loading path as users."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import pytest

# Tests never reach a model or dataset hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs, then count to 12345.",
    "def add(a, b):\n    return a + b\n",
    "Zarr stores chunked, compressed, N-dimensional arrays.",
    "MLX is an array framework for machine learning on Apple silicon.",
    "Distillation makes a small student match a large teacher.",
]


def make_tokenizer_files(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "bos_token": "<|im_start|>",
                "pad_token": "<|endoftext|>",
                "chat_template": template,
            }
        )
    )
    return tokenizer.get_vocab_size()


def make_tiny_model_folder(folder: Path, seed: int = 0, hidden_size: int = 64) -> Path:
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_config, save_model

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = make_tokenizer_files(folder)
    config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-teacher")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_text_data(folder: Path, repeat: int = 4, valid: int = 2) -> Path:
    """A folder in mlx-lm text format: train.jsonl (rotations of SENTENCES) and valid.jsonl."""
    rotations = [{"text": " ".join(SENTENCES[i:] + SENTENCES[:i])} for i in range(6)]
    write_jsonl(folder / "train.jsonl", rotations * repeat)
    write_jsonl(folder / "valid.jsonl", [{"text": " ".join(reversed(SENTENCES))}] * valid)
    return folder


def small_run_overrides(root: Path, teacher: Path, **more) -> dict:
    """Config overrides for a store and a tune run in `root` that take seconds: the tiny
    teacher on text data made in `root / "data"`, 8 + 2 sequences of 17 tokens, top-16 without
    tail samples (a random tiny teacher's tail is nearly flat: with 64 samples a 12-step run
    did not improve its validation, with 512 it did; tests/test_tail_samples.py has them), and
    2 tuning steps at group size 32; `more` adds or replaces keys."""
    data = make_text_data(root / "data")
    return {
        "store": str(root / "store.zarr"),
        "targets.teacher": str(teacher),
        "targets.data": str(data),
        "targets.top_k": 16,
        "targets.tail_samples": 0,  # the exact store; tests/test_tail_samples.py has the sampled
        "targets.max_seq_length": 17,
        "targets.num_samples": 8,
        "targets.num_valid_samples": 2,
        "tune.run_dir": str(root / "run"),
        "tune.group_size": 32,
        "tune.max_steps": 2,
        **more,
    }


@pytest.fixture
def text_data(tmp_path) -> Path:
    return make_text_data(tmp_path / "data")


@pytest.fixture
def tiny_targets_overrides(tiny_teacher, text_data, tmp_path) -> dict:
    return {
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(text_data),
        "store": str(tmp_path / "store.zarr"),
        "targets.top_k": 16,
        "targets.tail_samples": 0,
        "targets.max_seq_length": 17,
        "targets.num_samples": 20,
        "targets.num_valid_samples": 4,
        "targets.batch_size": 2,
        "targets.chunk_size": 3,
        "targets.logits_dtype": "float32",
    }


ROOT = Path(__file__).parent.parent
BIN = Path(__import__("sys").executable).parent


def cli_args(overrides: dict) -> list[str]:
    return [f"--set={key}={value}" for key, value in overrides.items()]


def free_ports(count: int) -> int:
    """A port p such that p .. p+count-1 are free on 127.0.0.1 now (for mlx.launch's ring)."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count >= 65536:
            continue
        try:
            sockets = []
            for offset in range(count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", first + offset))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free port range")


def wait_for_port(port: int, timeout: float = 30) -> None:
    """Block until something listens on 127.0.0.1:port (a server a test started)."""
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def local_server(command: list[str], port: int, env: dict | None = None) -> Iterator[str]:
    """Run the server `command` listening on 127.0.0.1:`port`; yields its http URL."""
    import subprocess

    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 server (moto's standalone one) on 127.0.0.1, with test credentials in the
    environment; yields its endpoint URL."""
    pytest.importorskip("s3fs")
    if not (BIN / "moto_server").exists():
        pytest.skip("moto[server] is not installed")
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    port = free_ports(1)
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with local_server(command, port, env={**os.environ, **credentials}) as endpoint:
        yield endpoint


def run_cli(*args: str, ranks: int = 1, port: int = 0, timeout: int = 600, **popen):
    """The real console script in a subprocess; with ranks > 1 under `mlx.launch` (ring).
    `popen` goes to subprocess.run (cwd, user, env, ...)."""
    import subprocess

    command = [str(BIN / "dwq-pipeline"), *args]
    if ranks > 1:
        port = port or free_ports(ranks)
        launch = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", str(ranks)]
        command = [*launch, "--starting-port", str(port), "--", *command]
    popen.setdefault("cwd", ROOT)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **popen)


def start_cli(*args: str):
    import subprocess

    command = [str(BIN / "dwq-pipeline"), *args]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
