"""Tuning from a store that is still being filled or copied: `use` what is done, or `wait`."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pipeline.config import load_config
from stages.targets import compute_targets
from stages.tune import tune
from store.errors import StoreCorruptError
from tests.conftest import cli_args, make_text_data, start_cli


@pytest.fixture(scope="module")
def full(tiny_teacher, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("partial")
    make_text_data(folder / "data")
    overrides = {
        "store": str(folder / "full.zarr"),
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(folder / "data"),
        "targets.top_k": 16,
        "targets.max_seq_length": 17,
        "targets.num_samples": 16,
        "targets.num_valid_samples": 2,
        "targets.chunk_size": 2,
        "tune.group_size": 32,
        "tune.batch_size": 2,
        "tune.epochs": 1,
        "tune.val_every": 4,
        "tune.checkpoint_every": 2,
    }
    compute_targets(load_config(None, overrides).targets)
    return {"folder": folder, "overrides": overrides, "store": folder / "full.zarr"}


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}


def with_train_records_held_back(
    full: dict, tmp_path: Path, chunks: list[int]
) -> tuple[Path, Path]:
    """A copy of the store whose records of `chunks` are not there yet (moved aside)."""
    store = tmp_path / "arriving.zarr"
    shutil.copytree(full["store"], store)
    aside = tmp_path / "aside"
    aside.mkdir()
    for chunk in chunks:
        name = f"{chunk:08d}.json"
        shutil.move(store / "records" / "train" / name, aside / name)
    return store, aside


def config(full: dict, store: Path, run_dir: Path, **tune_settings):
    overrides = {**full["overrides"], "store": str(store), "tune.run_dir": str(run_dir)}
    overrides.update({f"tune.{k}": v for k, v in tune_settings.items()})
    return load_config(None, overrides).tune


def test_incomplete_store_is_refused_by_default_with_the_options(full, tmp_path):
    store, _ = with_train_records_held_back(full, tmp_path, [5, 6])
    with pytest.raises(StoreCorruptError, match="incomplete_store=use or wait"):
        tune(config(full, store, tmp_path / "run"))


def test_use_trains_on_the_chunks_done_at_start_and_resumes_with_the_same(full, tmp_path):
    store, aside = with_train_records_held_back(full, tmp_path, [5, 6, 7])
    run_dir = tmp_path / "run"

    class Killed(Exception):
        pass

    def die_at_step_3(report):
        if report.step == 3:
            raise Killed()

    with pytest.raises(Killed):
        tune(config(full, store, run_dir, incomplete_store="use"), on_step=die_at_step_3)
    for record in aside.iterdir():  # the rest arrives meanwhile: the resumed run ignores it
        shutil.move(record, store / "records" / "train" / record.name)
    resumed = tune(config(full, store, run_dir, incomplete_store="use"))
    assert resumed.steps == 5  # chunks 0-4 of 2 rows, batches of 2: 5 steps
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["train_chunks"] == [0, 1, 2, 3, 4]

    only_done = tmp_path / "only-done.zarr"
    shutil.copytree(full["store"], only_done)
    whole = tune(config(full, store, tmp_path / "whole", incomplete_store="use"))
    assert whole.steps == 8  # a fresh run sees every chunk done
    for chunk in (5, 6, 7):
        (only_done / "records" / "train" / f"{chunk:08d}.json").unlink()
    uninterrupted = tune(config(full, only_done, tmp_path / "plain", incomplete_store="use"))
    a, b = weights(uninterrupted.model_dir), weights(resumed.model_dir)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_wait_picks_up_chunks_as_they_arrive_and_matches_a_complete_store(full, tmp_path):
    complete = tune(config(full, full["store"], tmp_path / "complete"))
    store, aside = with_train_records_held_back(full, tmp_path, [0, 3, 7])
    run_dir = tmp_path / "waiting"
    args = ["tune", *cli_args({**full["overrides"], "store": str(store)})]
    args += ["--run-dir", str(run_dir), "--set", "tune.incomplete_store=wait"]
    proc = start_cli(*args)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not metrics.exists():
        time.sleep(0.1)
    time.sleep(2)  # the loop is now waiting for a chunk that is not there
    assert proc.poll() is None
    for record in sorted(aside.iterdir()):
        shutil.move(record, store / "records" / "train" / record.name)
        time.sleep(0.5)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    a, b = weights(complete.model_dir), weights(run_dir / "model")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_wait_gives_up_after_its_timeout_with_one_line(full, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    store, _ = with_train_records_held_back(full, tmp_path, [0, 1, 2, 3, 4, 5, 6, 7])
    overrides = {**full["overrides"], "store": str(store), "tune.run_dir": str(tmp_path / "r")}
    overrides.update({"tune.incomplete_store": "wait", "tune.wait_timeout_s": 1.5})
    result = CliRunner().invoke(app, ["tune", *cli_args(overrides)])
    assert result.exit_code == 2
    assert "waited 2s for chunk train/" in result.output and "re-run" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_stream_closed_while_waiting_for_a_chunk_stops_at_once(full, tmp_path):
    """When the loop stops (an error, another rank gone) while the prefetch waits for a chunk
    that is not there, closing the stream ends the wait instead of sitting out its timeout."""
    from store.reader import StoreReader, stream_batches

    store, _ = with_train_records_held_back(full, tmp_path, [1])
    reader = StoreReader(str(store))
    rows = reader.manifest.splits["train"].chunk_rows
    stream = stream_batches(reader, "train", [[0], [rows]], wait_s=30)  # chunk 1 is missing
    assert next(stream)["topk_logits"].shape[0] == 1
    time.sleep(1.5)  # the prefetch is now polling for chunk 1
    tic = time.monotonic()
    stream.close()
    assert time.monotonic() - tic < 5
