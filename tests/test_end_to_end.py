"""The real default teacher through the real console script (marked slow; CI runs it)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from stages.models import DEFAULT_TEACHER_DIR, load_model
from store.inspect import store_info, verify_store
from store.reader import StoreReader
from tests.conftest import ROOT, run_cli
from tests.tail_mass import stored_bucket_logprobs, true_bucket_logprobs


def assert_head_and_tail_are_the_teachers_distribution(store) -> None:
    """bf16 head + stored tail: a distribution at every position and temperature (numpy over
    the stored arrays), with the exact tail mass (one teacher forward over the valid split)."""
    reader = StoreReader(store)
    temperatures = reader.manifest.settings["lse_temperatures"]
    teacher = load_model(str(ROOT / DEFAULT_TEACHER_DIR)).model
    for split, shape in reader.manifest.splits.items():
        parts = [reader.read_targets(split, c) for c in range(shape.num_chunks)]
        head = reader.logits_as_float32(split, np.concatenate([p["topk_logits"] for p in parts]))
        tails = np.concatenate([p["tail_logsumexp"] for p in parts])
        indices = np.concatenate([p["topk_indices"] for p in parts])
        if split == "valid":
            tokens = reader.sequences(split)["tokens"]
            logits = np.array(teacher(mx.array(tokens[:, :-1])).astype(mx.float32))
        for i, t in enumerate(temperatures):
            buckets = stored_bucket_logprobs(head, tails[..., i], t)
            assert np.abs(np.exp(buckets).sum(-1) - 1).max() <= 1e-3, (split, t)
            if split == "valid":
                exact = true_bucket_logprobs(logits, indices, t)[..., -1]
                np.testing.assert_allclose(buckets[..., -1], exact, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_targets_tune_eval_report_on_the_default_teacher_via_the_console_script(tmp_path):
    store, run_dir = tmp_path / "tiny.zarr", tmp_path / "run"
    done = run_cli("targets", "--config", "configs/tiny.yaml", "--store", str(store))
    assert done.returncode == 0, done.stderr
    info = store_info(store)
    assert info.complete and info.top_k == 64
    assert verify_store(store) == []
    assert_head_and_tail_are_the_teachers_distribution(store)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["teacher"]["name"] == "default"
    assert manifest["tokenizer"]["vocab_size"] == 49152

    done = run_cli(
        "tune", "-c", "configs/tiny.yaml", "--store", str(store), "--run-dir", str(run_dir)
    )
    assert done.returncode == 0, done.stderr
    assert "tuned 2 steps" in done.stderr
    from mlx_lm import generate, load

    model, tokenizer = load(str(run_dir / "model"))
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    # Two tuning steps cannot repair 4-bit RTN's answer; this checks mlx-lm generates from it.
    assert len(tokenizer.encode(generate(model, tokenizer, prompt, max_tokens=8))) > 0
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2] and all("val_loss" in s for s in steps)

    evaluated = run_cli(
        "eval",
        "-c",
        "configs/tiny.yaml",
        "--store",
        str(store),
        "--set",
        f"eval.student={run_dir / 'model'}",
        "--json",
        f"--save={run_dir / 'eval.json'}",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout)
    assert scores["split"] == "test" and scores["num_sequences"] == 4
    assert scores["models"]["teacher"]["kl"] < 1e-6 < scores["models"]["rtn"]["kl"]
    reported = run_cli("report", str(run_dir))
    assert reported.returncode == 0, reported.stderr
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert "held-out test" in (run_dir / "report.md").read_text()
