"""No traceback, no hang, no segfault: the CLI edge, a student of another vocabulary, a run of
10**9 steps, a loss that becomes NaN, and object storage that fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import store.location
from pipeline import cli
from pipeline.config import load_config
from stages.errors import StageError
from stages.targets import compute_targets
from stages.tune import tune
from store.errors import StoreError
from store.inspect import verify_store
from store.manifest import read_manifest
from store.reader import StoreReader
from tests.conftest import make_text_data, run_cli

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tiny_teacher, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("no-crash")
    make_text_data(root / "data")
    overrides = {
        "store": str(root / "store.zarr"),
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(root / "data"),
        "targets.top_k": 16,
        "targets.max_seq_length": 17,
        "targets.num_samples": 8,
        "targets.num_valid_samples": 2,
        "tune.group_size": 32,
        "tune.batch_size": 2,
    }
    compute_targets(load_config(None, overrides).targets)
    return {"root": root, "overrides": overrides, "store": root / "store.zarr"}


def tune_overrides(made: dict, run_dir: Path, **extra) -> dict:
    return {**made["overrides"], "tune.run_dir": str(run_dir), **extra}


# ---- the CLI edge ------------------------------------------------------------------------------


def failing(exc: BaseException):
    def command(*args, **kwargs):
        raise exc

    return command


def test_an_unforeseen_error_is_one_line_naming_the_command_and_file(monkeypatch):
    error = IsADirectoryError(21, "Is a directory", "/some/where/file.json")
    monkeypatch.setattr("store.inspect.store_info", failing(error))
    result = runner.invoke(cli.app, ["store", "info", "x"])
    assert result.exit_code == cli.EXIT_UNEXPECTED
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: store info failed: IsADirectoryError: ")
    assert "/some/where/file.json" in line
    assert "--debug" in line and "Traceback" not in result.output


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr("store.inspect.store_info", failing(RuntimeError("boom")))
    monkeypatch.setattr(cli, "_debug", False)
    result = runner.invoke(cli.app, ["--debug", "store", "info", "x"])
    assert result.exit_code == cli.EXIT_UNEXPECTED
    assert "Traceback" in result.output and "error: store info failed: RuntimeError: boom" in (
        result.output
    )


@pytest.mark.parametrize(
    "args, stage, expected",
    [
        (["targets"], "stages.targets.compute_targets", "finished chunks are kept"),
        (["tune"], "stages.tune.tune", "the last checkpoint in the run folder is kept"),
        (["eval"], "stages.evaluate.evaluate", "nothing was written or changed"),
        (["store", "verify", "x"], "store.inspect.verify_store", "nothing was written"),
        (["report", "x"], "pipeline.report.write_report", "nothing was written"),
        (["store", "merge", "o", "i"], "store.writer.merge_stores", "chunks merged so far"),
    ],
)
def test_ctrl_c_says_what_each_command_keeps(monkeypatch, args, stage, expected):
    monkeypatch.setattr(stage, failing(KeyboardInterrupt()))
    result = runner.invoke(cli.app, args)
    assert result.exit_code == cli.EXIT_INTERRUPTED
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: interrupted;") and expected in line


# ---- a student of another vocabulary ------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vocabulary(tiny_teacher, tmp_path_factory) -> Path:
    """The teacher's tokenizer files, but 512 output logits instead of the tokenizer's size."""
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import quantize_model, save_config, save_model

    folder = tmp_path_factory.mktemp("other-vocabulary") / "student"
    shutil.copytree(tiny_teacher, folder)
    config = {**json.loads((folder / "config.json").read_text()), "vocab_size": 512}
    model = Model(ModelArgs.from_dict(config))
    model, config = quantize_model(model, config, group_size=32, bits=4)
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return folder


def test_a_student_of_another_vocabulary_is_refused_before_any_step(made, other_vocabulary):
    run_dir = made["root"] / "never"
    student = ["--student", str(other_vocabulary)]
    tuned = run_cli("tune", "--store", str(made["store"]), "--run-dir", str(run_dir), *student)
    assert tuned.returncode == 2, tuned.stderr
    assert "gives 512 logits per position but the store's vocabulary has" in tuned.stderr
    assert not run_dir.exists()
    evaluated = run_cli("eval", "--store", str(made["store"]), *student)
    assert evaluated.returncode == 2, evaluated.stderr
    assert "do not share one vocabulary" in evaluated.stderr and "the student: 512" in (
        evaluated.stderr
    )


# ---- a run of 10**9 steps; a loss that becomes NaN ---------------------------------------------


class _Reached(Exception):
    pass


def test_a_billion_steps_start_at_once(made, tmp_path):
    """The plan is made as the loop goes: step 1 comes without planning 10**9 steps first."""
    config = load_config(None, tune_overrides(made, tmp_path / "run", **{"tune.max_steps": 10**9}))

    def stop_after_first_step(report):
        if report.step == 1:
            raise _Reached

    with pytest.raises(_Reached):
        tune(config.tune, on_step=stop_after_first_step)


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_good_checkpoint(made, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"tune.learning_rate": 1e30, "tune.max_steps": 6, "tune.checkpoint_every": 1}
    extra["tune.warmup_steps"] = 0
    config = load_config(None, tune_overrides(made, run_dir, **extra))
    with pytest.raises(StageError, match=r"became NaN/inf at step (\d+)") as caught:
        tune(config.tune)
    message = str(caught.value)
    assert "lower tune.learning_rate" in message
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert f"at step {state['step'] + 1};" in message
    assert f"the last good checkpoint (step {state['step']})" in message
    saved = mx.load(str(run_dir / "checkpoint" / "params.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in saved.values())
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r.get("loss", 0.0)) for r in logged)


def test_nan_weights_are_refused_before_tuning(made, tmp_path):
    """A student whose weights hold NaN: refused before any step, by the GPTQ start (the NaN
    reaches the first block's inputs) or by the validation of the start."""
    from stages import tune as tune_module

    original = tune_module._load_student

    def poisoned(config, inputs):
        student = original(config, inputs)
        student.model.update(_nan_scales(student.model))
        return student

    config = load_config(None, tune_overrides(made, tmp_path / "run"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tune_module, "_load_student", poisoned)
        with pytest.raises(StageError, match="NaN/inf before any step|NaN/inf weight before it"):
            tune(config.tune)


def _nan_scales(model):
    from mlx.utils import tree_unflatten

    flat = [(k, v * float("nan")) for k, v in tree_flatten(model.parameters()) if "scales" in k]
    return tree_unflatten(flat)


# ---- object storage that fails -----------------------------------------------------------------


@pytest.fixture
def memory_store(made):
    """The store on fsspec's in-memory filesystem, read through the same URL code as s3://."""
    fs = fsspec.filesystem("memory")
    fs.put(str(made["store"]), "/stores/store.zarr", recursive=True)
    yield "memory://stores/store.zarr"
    fs.rm("/stores", recursive=True)


def failing_reads(monkeypatch, exc: Exception, times: int) -> list[int]:
    """The next `times` reads of the memory filesystem raise `exc`; returns the call count."""
    calls = [0]
    cls = fsspec.implementations.memory.MemoryFileSystem
    original = cls.cat_file

    def cat_file(self, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] <= times:
            raise exc
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(cls, "cat_file", cat_file)
    monkeypatch.setattr(store.location, "BACKOFF_S", 0.0)
    return calls


def test_a_transient_remote_failure_is_retried(memory_store, monkeypatch):
    assert verify_store(memory_store) == []
    calls = failing_reads(monkeypatch, ConnectionResetError(104, "Connection reset"), times=3)
    assert StoreReader(memory_store).manifest == read_manifest(memory_store)
    assert calls[0] >= 4  # three failures, then the read that worked


@pytest.mark.parametrize(
    "exc, expected",
    [
        (ConnectionRefusedError(111, "Connection refused"), "could not reach"),
        (TimeoutError("timed out"), "could not reach"),
        (PermissionError(13, "AccessDenied"), "access denied"),
        (OSError(5, "SlowDown: please reduce your request rate"), "kept failing"),
    ],
)
def test_a_remote_failure_is_reported_as_what_it_is(memory_store, monkeypatch, exc, expected):
    calls = failing_reads(monkeypatch, exc, times=10**6)
    with pytest.raises(StoreError, match=expected) as caught:
        StoreReader(memory_store)
    assert "does not exist" not in str(caught.value) and "decoded" not in str(caught.value)
    assert calls[0] == (1 if expected == "access denied" else store.location.REMOTE_TRIES)
    result = runner.invoke(cli.app, ["store", "verify", memory_store])
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert expected in result.output


def test_a_remote_failure_while_reading_chunks_is_not_called_damage(memory_store, monkeypatch):
    reader = StoreReader(memory_store)
    failing_reads(monkeypatch, ConnectionRefusedError(111, "Connection refused"), times=10**6)
    with pytest.raises(StoreError, match="could not reach") as caught:
        reader.read_targets("train", 0)
    assert "decoded" not in str(caught.value) and "re-run" in str(caught.value)


def test_an_unreachable_http_server_is_not_a_missing_store():
    from tests.conftest import free_ports

    url = f"http://127.0.0.1:{free_ports(1)}/store.zarr"  # nothing listens there
    done = run_cli("store", "info", url)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "could not reach" in done.stderr and "does not exist" not in done.stderr


def test_a_host_that_does_not_resolve_is_could_not_reach(monkeypatch):
    monkeypatch.setattr(store.location, "BACKOFF_S", 0.0)
    result = runner.invoke(cli.app, ["store", "info", "ftp://nowhere.invalid/x.zarr"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: could not reach ftp://nowhere.invalid/x.zarr")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["targets", "--top-k", "nan"], "Invalid value for '--top-k'"),
        (["targets", "--top-k", "1e3"], "Invalid value for '--top-k'"),
        (["store", "merge", "m5.zarr"], "Missing argument 'inputs'"),
        (["tune", "--bogus"], "No such option: --bogus"),
    ],
)
def test_a_usage_mistake_is_one_error_line(args, expected):
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line and "--help" in line


@pytest.mark.parametrize("preloaded", [True, False], ids=["no-reexec", "reexec"])
def test_ctrl_c_while_the_program_loads_is_one_line(tmp_path, preloaded):
    """The first second goes to imports (rich, transformers, MLX) and, without OpenBLAS
    preloaded, a re-exec: a Ctrl-C there is one line and exit 130, no traceback."""
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import BIN, ROOT

    env = dict(os.environ)
    if not preloaded:
        env.pop("LD_PRELOAD", None)
    for delay in (0.3, 0.8):
        with subprocess.Popen(
            [str(BIN / "dwq-pipeline"), "targets", "--store", str(tmp_path / "s.zarr")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Ctrl-C as at a terminal: a suite started in the background (`make test &`) has
            # SIGINT ignored, and an ignored signal stays ignored in every child it starts
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        ) as proc:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=120)
            finally:
                proc.kill()  # nothing left running into the next test when it hangs
        assert proc.returncode == cli.EXIT_INTERRUPTED, err
        (line,) = err.strip().splitlines()
        assert line.startswith("error: interrupted") and "Traceback" not in err


# ---- what differs between two manifests --------------------------------------------------------


def test_a_manifest_difference_names_the_field_and_shows_where_values_differ(made):
    from dataclasses import replace

    manifest = read_manifest(made["store"])
    shape = manifest.splits["train"]
    other = replace(
        manifest,
        splits={**manifest.splits, "train": replace(shape, vocab_size=shape.vocab_size + 1)},
        settings={**manifest.settings, "data": manifest.settings["data"] + "-other"},
    )
    differences = manifest.differences(other)
    assert f"splits.train.vocab_size: {shape.vocab_size} != {shape.vocab_size + 1}" in differences
    data = next(d for d in differences if d.startswith("settings.data:"))
    assert "-other" in data  # a long path is cut after, never before, where the two differ
