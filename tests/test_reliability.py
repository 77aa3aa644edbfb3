"""Nothing lost: SIGKILLs, corruption, failing disks and concurrent processes, for both stages.

Every scenario ends by comparing against a store or model from an uninterrupted run: same
decoded arrays, same checksums, same weights.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from stages.run_dir import make_run_dir
from stages.targets import compute_targets
from stages.tune import tune
from store.inspect import verify_store
from store.reader import StoreReader
from store.records import record_path
from tests.conftest import ROOT, cli_args, make_text_data, run_cli, start_cli
from tests.test_targets import assert_same_store

runner = CliRunner()
KILL_SEED = 20261127


@pytest.fixture(scope="module")
def workload(tiny_teacher, tmp_path_factory) -> dict:
    """Settings for a tiny store of many small chunks, and that store made without interruption."""
    folder = tmp_path_factory.mktemp("reliability")
    make_text_data(folder / "data", repeat=12, valid=4)
    overrides = {
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(folder / "data"),
        "targets.top_k": 32,
        "targets.max_seq_length": 17,
        "targets.num_samples": 64,
        "targets.num_valid_samples": 4,
        "targets.batch_size": 2,
        "targets.chunk_size": 2,
        "tune.group_size": 32,
        "tune.batch_size": 4,
        "tune.warmup_steps": 1,
        "tune.val_every": 4,
        "tune.checkpoint_every": 1,
    }
    reference = folder / "reference.zarr"
    compute_targets(load_config(None, {**overrides, "store": str(reference)}).targets)
    return {"overrides": overrides, "reference": reference, "folder": folder}


def fresh_copy(workload: dict, tmp_path: Path) -> Path:
    copy = tmp_path / "store.zarr"
    shutil.copytree(workload["reference"], copy)
    return copy


def count_records(store: Path) -> int:
    return len(list((store / "records").glob("*/*.json"))) if store.exists() else 0


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL `proc` once ready() holds; False if it had already finished by then."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    finished = proc.poll() is not None
    proc.kill()
    proc.communicate()
    return not finished


# ---- crashes ------------------------------------------------------------------------------------


def test_targets_survives_sigkill_at_random_moments(workload, tmp_path):
    store = tmp_path / "killed.zarr"
    args = ["targets", "--store", str(store), *cli_args(workload["overrides"])]
    total = sum(s.num_chunks for s in StoreReader(workload["reference"]).manifest.splits.values())
    rng = np.random.default_rng(KILL_SEED)
    # One kill during start-up, then at growing random chunk counts (plus a random delay).
    moments = sorted(rng.choice(np.arange(1, total - 1), size=6, replace=False).tolist())
    proc = start_cli(*args)
    delay = rng.uniform(0.2, 1.0)
    kill_when(proc, lambda: time.sleep(delay) or True)  # most likely during imports: not counted
    kills = 0
    for moment in moments:
        proc = start_cli(*args)
        pause = rng.uniform(0, 0.01)
        if kill_when(
            proc, lambda m=moment, p=pause: count_records(store) >= m and not time.sleep(p)
        ):
            kills += count_records(store) >= 1  # only kills after the first chunk was written
            assert count_records(store) < total or verify_store(store) == []
    assert kills >= 5, f"only {kills} kills landed mid-run"
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert_same_store(workload["reference"], store)
    assert verify_store(store) == []


def saved_weights(model_dir: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}


def metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_tune_survives_sigkill_and_ends_with_identical_weights(workload, tmp_path):
    settings = {**workload["overrides"], "store": str(workload["reference"]), "tune.epochs": 2}
    whole = tune(load_config(None, {**settings, "tune.run_dir": str(tmp_path / "whole")}).tune)
    run_dir = tmp_path / "killed"
    args = ["tune", *cli_args({**settings, "tune.run_dir": str(run_dir)})]
    rng = np.random.default_rng(KILL_SEED + 1)
    kills = 0
    for moment in sorted(rng.choice(np.arange(2, whole.steps - 1), size=3, replace=False)):
        proc = start_cli(*args)
        kills += kill_when(proc, lambda m=moment: metric_lines(run_dir) > m)
    assert kills == 3
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    log = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log]
    assert steps == list(range(whole.steps + 1))  # each step logged once: nothing done twice
    a, b = saved_weights(whole.model_dir), saved_weights(run_dir / "model")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- corruption ---------------------------------------------------------------------------------


def chunk_file(store: Path, split: str, array: str, chunk: int) -> Path:
    return store / split / array / "c" / str(chunk) / "0" / "0"


def record_stamps(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.glob("records/*/*")}


def truncate_chunk_file(store: Path) -> str:
    truncated = chunk_file(store, "train", "topk_logits", 2)
    truncated.write_bytes(truncated.read_bytes()[:20])
    return "train/2"


def flip_a_byte(store: Path) -> str:
    flipped = chunk_file(store, "valid", "topk_indices", 1)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    return "valid/1"


def delete_chunk_file(store: Path) -> str:
    chunk_file(store, "train", "tail_logsumexp", 5).unlink()
    return "train/5"


def lose_record(store: Path) -> str:
    record_path(store, "train", 9).unlink()  # its data is whole, its record lost
    return "train/9"


DAMAGE = (truncate_chunk_file, flip_a_byte, delete_chunk_file, lose_record)


def damage(store: Path) -> dict[str, str]:
    """Four kinds of damage in one store; returns chunk -> what was done to it."""
    return {make(store): make.__name__ for make in DAMAGE}


# What tune's refusal of each damage alone must name (a lost record leaves no file to name).
REFUSAL = {
    truncate_chunk_file: "chunk train/2 cannot be decoded",
    flip_a_byte: "chunk valid/1",
    delete_chunk_file: "(first: train/5;",
    lose_record: "1 of 32 train chunks missing",
}


@pytest.mark.parametrize("make_damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_tune_refuses_each_kind_of_damage_alone(workload, tmp_path, make_damage):
    store = fresh_copy(workload, tmp_path)
    make_damage(store)
    run_dir = tmp_path / "run"
    settings = {**workload["overrides"], "store": str(store), "tune.run_dir": str(run_dir)}
    tuned = run_cli("tune", *cli_args(settings))
    assert tuned.returncode == 2, tuned.stderr
    line = tuned.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert REFUSAL[make_damage] in line and "dwq-pipeline targets" in line, line
    assert not (run_dir / "model").exists()


def test_corruption_is_named_refused_by_tune_and_repaired_exactly(workload, tmp_path):
    store = fresh_copy(workload, tmp_path)
    before = record_stamps(store)
    damaged = damage(store)

    result = run_cli("store", "verify", str(store))
    assert result.returncode == 1
    for chunk in damaged:
        assert f"{chunk}:" in result.stderr, (chunk, result.stderr)
    assert "Traceback" not in result.stderr

    tuned = run_cli("tune", "--store", str(store), "--run-dir", str(tmp_path / "run"))
    assert tuned.returncode == 2 and "dwq-pipeline targets" in tuned.stderr
    assert len(tuned.stderr.strip().splitlines()) == 1

    time.sleep(0.01)  # so that a rewritten record shows a newer mtime
    repaired = run_cli("targets", "--store", str(store), *cli_args(workload["overrides"]))
    assert repaired.returncode == 0, repaired.stderr
    after = record_stamps(store)
    rewritten = {
        key.split("/")[1] + "/" + str(int(Path(key).stem))
        for key in after
        if before.get(key) != after[key]
    }
    assert rewritten == set(damaged)  # exactly the damaged chunks were computed again
    assert_same_store(workload["reference"], store)


def test_torn_manifest_is_restored_and_nothing_recomputed(workload, tmp_path):
    store = fresh_copy(workload, tmp_path)
    manifest = store / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    before = record_stamps(store)
    result = run_cli("store", "verify", str(store))
    assert result.returncode == 2 and "manifest.json is unreadable" in result.stderr
    tuned = run_cli("tune", "--store", str(store), "--run-dir", str(tmp_path / "run"))
    assert tuned.returncode == 2 and "dwq-pipeline targets" in tuned.stderr
    repaired = run_cli("targets", "--store", str(store), *cli_args(workload["overrides"]))
    assert repaired.returncode == 0, repaired.stderr
    assert "rewritten from the config" in repaired.stderr
    assert record_stamps(store) == before
    assert_same_store(workload["reference"], store)


def test_half_copied_store_is_refused_then_completed(workload, tmp_path):
    """A copy that stopped halfway through the files (in the order a copy tool walks them)."""
    store = tmp_path / "half.zarr"
    files = sorted(p for p in workload["reference"].rglob("*") if p.is_file())
    for source in files[: len(files) // 2]:
        target = store / source.relative_to(workload["reference"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    verify = run_cli("store", "verify", str(store))
    assert verify.returncode != 0 and "Traceback" not in verify.stderr
    tuned = run_cli("tune", "--store", str(store), "--run-dir", str(tmp_path / "run"))
    assert tuned.returncode == 2 and "Traceback" not in tuned.stderr
    done = run_cli("targets", "--store", str(store), *cli_args(workload["overrides"]))
    assert done.returncode == 0, done.stderr
    assert_same_store(workload["reference"], store)


def test_damaged_token_arrays_are_detected_and_rewritten(workload, tmp_path):
    store = fresh_copy(workload, tmp_path)
    tokens = store / "train" / "tokens" / "c" / "0" / "0"
    data = bytearray(tokens.read_bytes())
    data[-3] ^= 0x01
    tokens.write_bytes(bytes(data))
    assert any(p.startswith("train tokens") for p in verify_store(store))
    overrides = {**workload["overrides"], "store": str(store)}
    assert run_cli("targets", *cli_args(overrides)).returncode == 0
    assert verify_store(store) == []
    assert_same_store(workload["reference"], store)


# ---- failing writes -----------------------------------------------------------------------------


FAILING_WRITES = ("chunk array write", "chunk file fsync", "record write")


def fail_writes_after(monkeypatch, where: str, finished: int, code: int) -> None:
    """Make the write at `where` fail with `code` once `finished` chunks are done."""
    import zarr.storage._local as zarr_local

    import store.writer
    from store.layout import TARGET_ARRAYS

    done, writes = [], []
    real_write_chunk = store.writer.StoreWriter.write_chunk

    def write_chunk(self, split, chunk, *args, **kwargs):
        real_write_chunk(self, split, chunk, *args, **kwargs)
        done.append(chunk)

    def fail(*_) -> None:
        if len(done) == finished:
            raise OSError(code, os.strerror(code))

    def put(path, *args, **kwargs):
        if any(f"/{name}/c/" in str(path) for name in TARGET_ARRAYS):
            writes.append(path)
            if len(writes) > len(TARGET_ARRAYS) * finished + 1:  # its 2nd array: half-written
                fail()
        return real_put(path, *args, **kwargs)

    def fsync_chunk(self, *args):
        fail()
        real_fsync_chunk(self, *args)

    def write_record(path, record):
        fail()
        real_write_record(path, record)

    real_put, real_fsync_chunk = zarr_local._put, store.writer.StoreWriter._fsync_chunk
    real_write_record = store.writer.write_record
    monkeypatch.setattr(store.writer.StoreWriter, "write_chunk", write_chunk)
    if where == "chunk array write":
        monkeypatch.setattr(zarr_local, "_put", put)
    elif where == "chunk file fsync":
        monkeypatch.setattr(store.writer.StoreWriter, "_fsync_chunk", fsync_chunk)
    else:
        monkeypatch.setattr(store.writer, "write_record", write_record)


@pytest.mark.parametrize("where", FAILING_WRITES)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_failed_store_write_stops_cleanly_and_resumes(workload, tmp_path, monkeypatch, code, where):
    store_path = tmp_path / "store.zarr"
    with monkeypatch.context() as patches:
        fail_writes_after(patches, where, 5, code)
        args = ["targets", "--store", str(store_path), *cli_args(workload["overrides"])]
        result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert os.strerror(code) in result.output and "re-run" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert count_records(store_path) == 5
    assert verify_store(store_path).count("train/0: not complete") == 0  # valid runs first
    assert runner.invoke(app, args).exit_code == 0
    assert_same_store(workload["reference"], store_path)


def test_failed_checkpoint_write_keeps_the_last_checkpoint(workload, tmp_path, monkeypatch):
    import mlx.core as mx

    import stages.tune

    settings = {**workload["overrides"], "store": str(workload["reference"]), "tune.max_steps": 6}
    whole = tune(load_config(None, {**settings, "tune.run_dir": str(tmp_path / "whole")}).tune)
    real_save = mx.save_safetensors
    run_dir = tmp_path / "full"
    state_file = run_dir / "checkpoint" / "state.json"

    def save_until_disk_full(path, arrays):
        # the disk fills once the step-3 checkpoint is in (how many files a step writes depends
        # on whether its validation improved)
        if state_file.exists() and json.loads(state_file.read_text())["step"] >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(path, arrays)

    monkeypatch.setattr(stages.tune.mx, "save_safetensors", save_until_disk_full)
    args = ["tune", *cli_args({**settings, "tune.run_dir": str(run_dir)})]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "No space left on device" in result.output and "resume" in result.output
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    monkeypatch.setattr(stages.tune.mx, "save_safetensors", real_save)
    assert runner.invoke(app, args).exit_code == 0
    a, b = saved_weights(whole.model_dir), saved_weights(run_dir / "model")
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ---- concurrency --------------------------------------------------------------------------------

HOLDER = """
import sys, time
from store.lock import hold_lock
with hold_lock(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_other_process(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_of_a_shard_is_refused_and_a_dead_ones_lock_taken_over(workload, tmp_path):
    store = tmp_path / "store.zarr"
    overrides = {**workload["overrides"], "store": str(store), "targets.num_samples": 8}
    assert run_cli("targets", "--shard", "1/2", *cli_args(overrides)).returncode == 0
    holder = hold_in_other_process(store / "locks" / "shard-0-of-2.lock")
    try:
        refused = run_cli("targets", "--shard", "0/2", *cli_args(overrides))
        assert refused.returncode == 2
        assert f"in use by process {holder.pid}" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()  # dies holding the lock: its lock file stays behind
        holder.communicate()
    assert (store / "locks" / "shard-0-of-2.lock").exists()
    done = run_cli("targets", "--shard", "0/2", *cli_args(overrides))
    assert done.returncode == 0, done.stderr
    assert verify_store(store) == []


def test_second_tune_into_the_same_run_dir_is_refused(workload, tmp_path):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir)  # marked, as the holder's tune made it before taking the lock
    settings = {**workload["overrides"], "store": str(workload["reference"]), "tune.max_steps": 2}
    args = ["tune", *cli_args({**settings, "tune.run_dir": str(run_dir)})]
    holder = hold_in_other_process(run_dir / "tune.lock")
    try:
        refused = run_cli(*args)
        assert refused.returncode == 2 and "in use by process" in refused.stderr
        assert not (run_dir / "checkpoint").exists()
    finally:
        holder.kill()
        holder.communicate()
    assert run_cli(*args).returncode == 0
    assert (run_dir / "model" / "model.safetensors").is_file()
