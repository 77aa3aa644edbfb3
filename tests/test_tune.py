"""Stage two on a tiny teacher: it learns, resumes exactly, refuses bad input, saves for mlx-lm."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from stages.errors import ModelError, StageError
from stages.models import load_model, quantize_student, use_dequantized_matmul
from stages.targets import compute_targets
from stages.tune import tune
from store.errors import StoreCorruptError
from store.records import record_path
from tests.conftest import cli_args, run_cli, start_cli

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_store(tiny_teacher, tmp_path_factory) -> Path:
    return make_tune_store(tiny_teacher, tmp_path_factory)


def make_tune_store(tiny_teacher: Path, tmp_path_factory, **targets) -> Path:
    """24 + 4 sequences of 17 tokens, top-32 (bfloat16 logits and no tail samples unless
    `targets` say otherwise)."""
    from tests.conftest import make_text_data

    folder = make_text_data(tmp_path_factory.mktemp("tune-data"))
    store = tmp_path_factory.mktemp("tune-store") / "store.zarr"  # not inside its own data
    overrides = {
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(folder),
        "store": str(store),
        "targets.top_k": 32,
        "targets.max_seq_length": 17,
        "targets.num_samples": 24,
        "targets.num_valid_samples": 4,
        "targets.chunk_size": 3,
        "targets.tail_samples": 0,
        **{f"targets.{k}": v for k, v in targets.items()},
    }
    compute_targets(load_config(None, overrides).targets)
    return store


TUNE_SETTINGS = {
    "tune.group_size": 32,
    "tune.learning_rate": 1e-4,
    "tune.warmup_steps": 1,
    "tune.batch_size": 4,
    "tune.val_every": 3,
    "tune.checkpoint_every": 2,
    "tune.init": "rtn",  # the loop's tests start where DWQ does; tests/test_levers.py has gptq
}


def tune_config(store: Path, run_dir: Path, **extra):
    overrides = {"store": str(store), "tune.run_dir": str(run_dir), "tune.epochs": 2}
    overrides |= TUNE_SETTINGS
    overrides.update({f"tune.{k}": v for k, v in extra.items()})
    return load_config(None, overrides).tune


def saved_weights(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}


@pytest.mark.parametrize("loss", ["kl_tail", "kl_topk", "reverse_kl", "js"])
def test_tuning_lowers_validation_loss_for_every_loss(tiny_store, tmp_path, loss):
    result = tune(tune_config(tiny_store, tmp_path / "run", loss=loss))
    assert result.steps == 12  # 24 sequences / 4 per batch x 2 epochs
    assert result.best_val_loss < result.initial_val_loss
    assert result.warning is None


def test_a_uint8_store_tunes_like_the_bfloat16_one(tiny_store, tiny_teacher, tmp_path_factory):
    """The same rows with 8-bit logits: tune reads the same distributions to the format's
    precision (the start's validation loss within 1%; the tiny teacher's logits span a few nats,
    so a fine step) and lowers the validation loss."""
    uint8 = make_tune_store(tiny_teacher, tmp_path_factory, logits_dtype="uint8", logit_step=0.02)
    run_dir = tmp_path_factory.mktemp("runs")
    ours = tune(tune_config(uint8, run_dir / "uint8"))
    theirs = tune(tune_config(tiny_store, run_dir / "bfloat16", max_steps=1))
    assert ours.initial_val_loss == pytest.approx(theirs.initial_val_loss, rel=0.01)
    assert ours.best_val_loss < ours.initial_val_loss and ours.warning is None


def test_output_is_an_mlx_lm_model_with_tuned_scales(tiny_store, tiny_teacher, tmp_path):
    from mlx_lm import generate
    from mlx_lm import load as mlx_load

    result = tune(tune_config(tiny_store, tmp_path / "run"))
    model, tokenizer = mlx_load(str(result.model_dir))
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert isinstance(generate(model, tokenizer, "The quick", max_tokens=5), str)
    rtn, _ = quantize_student(load_model(str(tiny_teacher)), bits=4, group_size=32)
    tuned = saved_weights(result.model_dir)
    rtn_weights = dict(tree_flatten(rtn.parameters()))
    changed = [
        k
        for k in tuned
        if k.endswith("scales") and not np.array_equal(tuned[k], np.array(rtn_weights[k]))
    ]
    assert changed, "no scales moved"
    packed = [k for k in tuned if k.endswith(".weight") and tuned[k].dtype == np.uint32]
    assert all(np.array_equal(tuned[k], np.array(rtn_weights[k])) for k in packed)
    log = (result.model_dir.parent / "metrics.jsonl").read_text().splitlines()
    lines = [json.loads(line) for line in log]
    assert [line["step"] for line in lines] == list(range(13))
    assert {"loss", "learning_rate", "tokens_per_s", "peak_memory_gb"} <= set(lines[-1])


def assert_kill_and_resume_is_bit_identical(tiny_store, tmp_path, **settings) -> None:
    """A run killed at step 5 and resumed ends with the weights of an uninterrupted one, each
    step done once."""
    whole = tune(tune_config(tiny_store, tmp_path / "whole", **settings))

    class Killed(Exception):
        pass

    def die_at_step_5(report):
        if report.step == 5:
            raise Killed()  # like SIGKILL: no checkpoint beyond the one at step 4

    with pytest.raises(Killed):
        tune(tune_config(tiny_store, tmp_path / "resumed", **settings), on_step=die_at_step_5)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    seen = []
    resumed = tune(tune_config(tiny_store, tmp_path / "resumed", **settings), on_step=seen.append)
    assert seen[0].step == 5  # nothing done twice
    assert resumed.best_val_loss == whole.best_val_loss
    a, b = saved_weights(whole.model_dir), saved_weights(resumed.model_dir)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_interrupted_and_resumed_run_ends_with_identical_weights(tiny_store, tmp_path):
    assert_kill_and_resume_is_bit_identical(tiny_store, tmp_path)


def test_dequantized_matmul_gives_the_same_loss_and_gradients(tiny_teacher):
    def loss_and_grads(fast: bool):
        model, _ = quantize_student(load_model(str(tiny_teacher)), bits=4, group_size=32)
        if fast:
            assert use_dequantized_matmul(model) > 0
        model.freeze()
        model.apply_to_modules(
            lambda _, m: (
                m.unfreeze(keys=["scales", "biases"], recurse=False) if hasattr(m, "bits") else None
            )
        )
        tokens = mx.array(np.arange(40).reshape(2, 20) % 300)

        def loss(params):
            model.update(params)
            return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()

        value, grads = mx.value_and_grad(loss)(model.trainable_parameters())
        return value.item(), dict(tree_flatten(grads))

    slow_loss, slow = loss_and_grads(False)
    fast_loss, fast = loss_and_grads(True)
    assert abs(fast_loss - slow_loss) / abs(slow_loss) < 1e-4
    for name in slow:
        # Each element against its own size; the small absolute floor is float32 round-off of
        # a sum of O(1) terms (an element near 0 is a cancellation), far below the gradients.
        np.testing.assert_allclose(fast[name], slow[name], rtol=2e-3, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "levers",
    [{}, {"learned_rounding": True, "train_norms": True}, {"loss": "kl_topk"}, {"mode": "mxfp4"}],
)
@pytest.mark.parametrize(
    "logits_per_chunk", [None, 3200], ids=["one chunk", "2 positions, 50 weight rows a chunk"]
)
def test_grad_checkpoint_tunes_the_same_weights(
    tiny_store, tmp_path, levers, logits_per_chunk, monkeypatch
):
    """Blocks recomputed, and the output layer and loss run a chunk of positions at a time."""
    import stages.chunked_output
    import stages.tune

    if logits_per_chunk:
        monkeypatch.setattr(stages.chunked_output, "LOGITS_PER_CHUNK", logits_per_chunk)
    plain = tune(tune_config(tiny_store, tmp_path / "plain", max_steps=2, **levers))
    chunked_steps = []
    by_chunks = stages.tune._Trainer.chunked_loss_and_grads
    monkeypatch.setattr(
        stages.tune._Trainer,
        "chunked_loss_and_grads",
        lambda *args: chunked_steps.append(1) or by_chunks(*args),
    )
    checkpointed = tune(
        tune_config(tiny_store, tmp_path / "ckpt", max_steps=2, grad_checkpoint=True, **levers)
    )
    assert len(chunked_steps) == 2  # the split model ran its output layer by chunks
    a, b = saved_weights(plain.model_dir), saved_weights(checkpointed.model_dir)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=0, err_msg=name)


def test_unquantized_student_is_refused(tiny_store, tiny_teacher, tmp_path):
    with pytest.raises(ModelError, match="not quantized"):
        tune(tune_config(tiny_store, tmp_path / "run", student=str(tiny_teacher)))


def test_student_with_another_tokenizer_is_refused(tiny_store, tmp_path):
    from tests.conftest import make_tiny_model_folder

    other = make_tiny_model_folder(tmp_path / "other", hidden_size=64)
    (other / "tokenizer_config.json").write_text(
        (other / "tokenizer_config.json").read_text().replace("<|im_end|>", "<|endoftext|>")
    )
    model = load_model(str(other))
    quantized, config = quantize_student(model, bits=4, group_size=32)
    from mlx_lm.utils import save

    save(tmp_path / "q", other, quantized, model.tokenizer, config)
    with pytest.raises(ModelError, match="tokenizer differs"):
        tune(tune_config(tiny_store, tmp_path / "run", student=str(tmp_path / "q")))


def test_incomplete_or_corrupt_store_is_refused(tiny_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    record_path(copy, "train", 2).unlink()
    with pytest.raises(StoreCorruptError, match="incomplete"):
        tune(tune_config(copy, tmp_path / "run"))
    shutil.rmtree(copy)
    shutil.copytree(tiny_store, copy)
    chunk = copy / "train" / "topk_logits" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="train/0"):
        tune(tune_config(copy, tmp_path / "run2"))


def test_loss_needing_a_temperature_the_store_lacks_is_refused(tiny_store, tmp_path):
    with pytest.raises(StageError, match="logsumexp at that temperature"):
        tune(tune_config(tiny_store, tmp_path / "run", temperature=3.0))
    assert (
        tune(
            tune_config(tiny_store, tmp_path / "ok", temperature=3.0, loss="kl_topk", max_steps=1)
        ).steps
        == 1
    )


def test_checkpoint_from_other_settings_is_refused_then_overwritten(tiny_store, tmp_path):
    tune(tune_config(tiny_store, tmp_path / "run", max_steps=2))
    phases = []
    with pytest.raises(StageError, match=r"other settings \(tune.learning_rate was 0.0001, now"):
        other = tune_config(tiny_store, tmp_path / "run", max_steps=2, learning_rate=2e-4)
        tune(other, on_phase=phases.append)
    assert phases == []  # refused before the student loads (GPTQ, a budget: minutes)
    # a crash between a checkpoint swap's renames left only checkpoint.old: refused as early
    (tmp_path / "run" / "checkpoint").rename(tmp_path / "run" / "checkpoint.old")
    with pytest.raises(StageError, match=r"other settings \(tune.learning_rate was 0.0001, now"):
        tune(other, on_phase=phases.append)
    assert phases == []
    assert (
        tune(
            tune_config(tiny_store, tmp_path / "run", max_steps=2, learning_rate=2e-4),
            overwrite=True,
        ).steps
        == 2
    )


def test_a_ctrl_c_while_the_model_is_saved_waits_for_it(tiny_store, tmp_path, monkeypatch):
    """Every step is done: the interrupt no longer turns a finished run into a failure."""
    import os
    import signal

    from stages import run_dir as run_folder

    save_model = run_folder.save_model

    def interrupted_save(run_dir, write):
        os.kill(os.getpid(), signal.SIGINT)  # lands while the model is being written
        return save_model(run_dir, write)

    monkeypatch.setattr(run_folder, "save_model", interrupted_save)
    result = tune(tune_config(tiny_store, tmp_path / "run", max_steps=1))
    assert result.steps == 1 and (result.model_dir / "config.json").is_file()


def test_cli_tune_bad_input_is_one_line(tiny_store, tmp_path):
    result = runner.invoke(
        app, ["tune", "--store", str(tmp_path / "missing.zarr"), "--run-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["tune", "--store", str(tiny_store), "--set", "tune.loss=l2"])
    assert result.exit_code == 2 and "tune.loss must be one of" in result.output


@pytest.mark.parametrize("grad_checkpoint", [False, True], ids=["whole", "output layer by chunks"])
def test_two_ranks_match_one_process(tiny_store, tmp_path, grad_checkpoint):
    single = tune(tune_config(tiny_store, tmp_path / "single", max_steps=4))
    settings = {"tune.max_steps": 4, "tune.grad_checkpoint": grad_checkpoint}
    args = cli_args({**TUNE_SETTINGS, **settings})
    run_dir = tmp_path / "ranks"
    done = run_cli("tune", "--store", str(tiny_store), "--run-dir", str(run_dir), *args, ranks=2)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("tuned 4 steps") == 2, done.stderr + done.stdout
    a, b = saved_weights(single.model_dir), saved_weights(run_dir / "model")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_a_write_failing_on_rank_0_stops_every_rank_with_an_error_line_each(tiny_store, tmp_path):
    """Rank 0 alone writes the run folder; when that fails the other rank's next collective
    fails too, and it says it lost the other process instead of MLX's bare RuntimeError."""
    run_dir = tmp_path / "ranks"
    tune(tune_config(tiny_store, run_dir, max_steps=1))  # a folder this program made
    for made in ("checkpoint", "model"):
        shutil.rmtree(run_dir / made)
    (run_dir / "best.safetensors").unlink()  # so the next run starts over, and writes it first
    (run_dir / "best.partial.safetensors" / "in the way").mkdir(parents=True)
    args = cli_args({**TUNE_SETTINGS, "tune.max_steps": 1})
    run = ("tune", "--store", str(tiny_store), "--run-dir", str(run_dir), *args)
    done = run_cli(*run, ranks=2, timeout=240)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, done.stderr
    assert any(f"cannot write to {run_dir}" in line for line in errors), done.stderr
    lost = "lost the connection to another process of this launch"
    assert any(lost in line for line in errors), done.stderr
    assert "RuntimeError" not in done.stderr and "Traceback" not in done.stderr
    assert not (run_dir / "model").exists()


@pytest.mark.parametrize("stuck", [True, False], ids=["stuck", "stops in time"])
def test_a_launched_rank_still_running_after_sigterm_exits_with_one_line(tmp_path, stuck):
    """mlx.launch SIGTERMs the other ranks when one fails; a rank blocked in a collective on
    the dead one never reads the stop flag (MLX's ring can wait for good): after the grace it
    exits on its own, and a rank that stops in time is left alone."""
    import signal
    import subprocess
    import sys

    # Stuck: never reads the flag; in time: stops once the flag is up, as the loop does.
    blocked = "threading.Event().wait()" if stuck else "while not asked: time.sleep(0.01)"
    script = (
        "import threading, time\n"
        "import stages.tune as T\n"
        "T.LAUNCH_STOP_GRACE_S = 1.0\n"
        "class Launched: size = 2\n"
        "with T._stop_requests(Launched()) as asked:\n"
        "    print('ready', flush=True)\n"
        f"    {blocked}\n"
        "time.sleep(2)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()  # still there only when the test fails
    if stuck:
        assert proc.returncode == 1, err
        assert err.startswith("error: still running 1 s after it was asked to stop"), err
        assert len(err.strip().splitlines()) == 1
    else:
        assert proc.returncode == 0 and err == "", err


def test_sigterm_checkpoints_and_the_rerun_finishes_identically(tiny_store, tmp_path):
    import signal
    import time

    long_run = {"epochs": 30, "val_every": 1000, "checkpoint_every": 1000}
    whole = tune(tune_config(tiny_store, tmp_path / "whole", **long_run))
    run_dir = tmp_path / "signalled"
    args = ["tune", "--store", str(tiny_store), "--run-dir", str(run_dir)]
    args += cli_args({**TUNE_SETTINGS, **{f"tune.{k}": v for k, v in long_run.items()}})
    proc = start_cli(*args)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 4
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err
    stopped_at = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
    assert 3 <= stopped_at < 180
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    a, b = saved_weights(whole.model_dir), saved_weights(run_dir / "model")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_grad_checkpoint_by_chunks_off_the_fast_path(tiny_store, tmp_path, monkeypatch):
    """With MLX's quantized_matmul (as on a GPU) the chunks use the head's dequantized weight,
    which rounds differently: the tuned weights agree to that rounding."""
    import stages.chunked_output

    monkeypatch.setattr(stages.chunked_output, "LOGITS_PER_CHUNK", 3200)
    plain = tune(tune_config(tiny_store, tmp_path / "plain", max_steps=2, fast_matmul="off"))
    checkpointed = tune(
        tune_config(
            tiny_store, tmp_path / "ckpt", max_steps=2, fast_matmul="off", grad_checkpoint=True
        )
    )
    a, b = saved_weights(plain.model_dir), saved_weights(checkpointed.model_dir)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=0, err_msg=name)
    assert checkpointed.best_val_loss == pytest.approx(plain.best_val_loss, rel=1e-4)


def test_a_3_bit_student_at_the_4_bit_default_rate_gets_a_note_naming_the_3_bit_rate():
    """The default rate was chosen for 4 bits; a 3-bit run left at it is told the rate that
    validated better there, which configs/default-3bit.yaml sets (and the benches read)."""
    from stages.tune import NARROW_RATE, rate_note

    three_bit = load_config(Path("configs/default-3bit.yaml")).tune
    assert three_bit.learning_rate == NARROW_RATE and rate_note(three_bit) is None
    default = load_config(Path("configs/default.yaml")).tune
    assert rate_note(default) is None
    at_default = dataclasses.replace(three_bit, learning_rate=default.learning_rate)
    assert f"--learning-rate {NARROW_RATE:g}" in rate_note(at_default)
    assert rate_note(dataclasses.replace(at_default, bits_per_weight=4.0)) is None  # a mix
    assert "2-bit was not measured" in rate_note(dataclasses.replace(at_default, bits=2))
    assert "not measured" not in rate_note(at_default)
