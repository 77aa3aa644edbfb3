"""The run folder's format and the ownership helpers, without a model: marks, checkpoint
recovery, the metrics log, the model swap, path overlap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.errors import StageError
from stages.run_dir import (
    BEST_FILE,
    CHECKPOINT_DIR,
    METRICS_FILE,
    MODEL_DIR,
    RUN_CONFIG_FILE,
    check_run_dir,
    checkpoint_state,
    clear_run,
    load_best,
    make_run_dir,
    read_metrics,
    recover_checkpoint,
    restore_best,
    save_best,
    save_model,
    trim_metrics,
)
from store.durable import (
    MARK_FILE,
    foreign_entries,
    has_mark,
    paths_overlap,
    remove_owned,
    write_mark,
)
from store.layout import is_store_key


def test_a_run_folder_is_new_empty_or_ours(tmp_path):
    check_run_dir(tmp_path / "new", {})
    check_run_dir(tmp_path, {})  # empty
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')  # someone else's log
    with pytest.raises(StageError, match="not a tune run folder"):
        check_run_dir(tmp_path, {})
    make_run_dir(tmp_path)  # not done by tune on such a folder; here: the mark makes it ours
    check_run_dir(tmp_path, {})
    (tmp_path / MARK_FILE).unlink()
    settings = {k: 1 for k in ("store", "run_dir", "student", "loss", "learning_rate")}
    (tmp_path / RUN_CONFIG_FILE).write_text(json.dumps({**settings, "batch_size": 4}))
    check_run_dir(tmp_path, {})  # a run folder from before the mark
    with pytest.raises(StageError, match="overlap"):
        check_run_dir(tmp_path / "run", {"store": str(tmp_path)})


def state_at(step: int) -> dict:
    return {"step": step, "best_step": step, "initial_val_loss": 1.0, "best_val_loss": 0.5}


def test_recovery_finishes_an_interrupted_checkpoint_swap(tmp_path):
    make_run_dir(tmp_path)
    old = tmp_path / f"{CHECKPOINT_DIR}.old"
    old.mkdir()
    (old / "state.json").write_text(json.dumps({**state_at(4), "resume_key": "k"}))
    assert checkpoint_state(tmp_path) is None  # reading never renames
    recover_checkpoint(tmp_path)  # crashed between the renames: the old one is the checkpoint
    assert checkpoint_state(tmp_path)["step"] == 4 and not old.exists()
    old.mkdir()
    (old / "state.json").write_text(json.dumps({**state_at(2), "resume_key": "k"}))
    recover_checkpoint(tmp_path)  # crashed after both renames: the old one is stale
    assert checkpoint_state(tmp_path)["step"] == 4 and not old.exists()


def test_metrics_log_drops_a_torn_last_line_and_refuses_garbage(tmp_path):
    with pytest.raises(StageError, match="not a tune run folder"):
        read_metrics(tmp_path)
    make_run_dir(tmp_path)
    with pytest.raises(StageError, match="no metrics.jsonl"):
        read_metrics(tmp_path)
    lines = [json.dumps({"step": s, "total_steps": 3, "loss": 1.0 / (s + 1)}) for s in range(3)]
    (tmp_path / METRICS_FILE).write_text("\n".join(lines) + '\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    trim_metrics(tmp_path, 1)
    assert (tmp_path / METRICS_FILE).read_text() == "".join(line + "\n" for line in lines[:2])
    (tmp_path / METRICS_FILE).write_text('garbage\n{"step": 1}\n')
    with pytest.raises(StageError, match="line 1 is not a step record"):
        read_metrics(tmp_path)


def test_model_is_swapped_in_and_a_failed_save_keeps_the_old_one(tmp_path):
    make_run_dir(tmp_path)
    save_model(tmp_path, lambda to: (to.mkdir(), (to / "w").write_text("one")))
    assert (tmp_path / MODEL_DIR / "w").read_text() == "one"

    def disk_full(to: Path) -> None:
        to.mkdir()
        raise OSError(28, "No space left on device")

    with pytest.raises(StageError, match="No space left"):
        save_model(tmp_path, disk_full)
    assert (tmp_path / MODEL_DIR / "w").read_text() == "one"


def test_paths_overlap_and_remove_owned(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert paths_overlap(tmp_path / "a", tmp_path / "a" / "b" / "c")
    assert paths_overlap(tmp_path / "link" / "b", tmp_path / "a")  # through the symlink
    assert not paths_overlap(tmp_path / "a", tmp_path / "ab")
    assert not paths_overlap("s3://bucket/a", tmp_path / "a")
    assert paths_overlap("s3://bucket/a", "s3://bucket/a/b")
    folder = tmp_path / "store"
    folder.mkdir()
    write_mark(folder, "store")
    (folder / "records").mkdir()
    (folder / "notes.txt").write_text("mine")
    assert has_mark(folder, "store") and not has_mark(folder, "run")
    assert remove_owned(folder, ["records"]) == ["notes.txt"]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert paths_overlap(f"file://{tmp_path}/a", tmp_path / "a" / "b")  # a file:// URL: local


def test_a_store_folder_is_known_to_its_chunk_files(tmp_path):
    own = ["manifest.json", "zarr.json", "train/zarr.json", "train/tokens/zarr.json"]
    own += ["train/tokens/c/0/0", "records/train/00000003.json", "locks/shard-0-of-1.lock"]
    users = ["train/my.txt", "records/notes.txt", "train/tokens/c/extra/f", "valid/x/zarr.json"]
    for key in own + users:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_text(key)
    assert foreign_entries(tmp_path, is_store_key) == [
        "records/notes.txt",
        "train/my.txt",
        "train/tokens/c/extra/",
        "valid/x/",
    ]
    remove_owned(tmp_path, is_store_key)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == (
        sorted(users)
    )
    link = tmp_path.parent / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(OSError):
        remove_owned(link, is_store_key)  # never through a symlink


def test_tune_keeps_a_users_files_in_model_and_checkpoint(tmp_path):
    make_run_dir(tmp_path)
    (tmp_path / CHECKPOINT_DIR).mkdir()
    (tmp_path / CHECKPOINT_DIR / "state.json").write_text("{}")
    check_run_dir(tmp_path, {})
    clear_run(tmp_path)  # only its own files: the folder goes
    assert not (tmp_path / CHECKPOINT_DIR).exists()
    save_model(tmp_path, lambda to: (to.mkdir(), (to / "config.json").write_text("{}")))
    (tmp_path / MODEL_DIR / "my_notes.txt").write_text("mine")
    with pytest.raises(StageError, match="my_notes.txt was not written by dwq-pipeline"):
        check_run_dir(tmp_path, {})
    with pytest.raises(StageError):  # the swap cannot finish without deleting it: refused
        save_model(tmp_path, lambda to: (to.mkdir(), (to / "config.json").write_text("{}")))
        save_model(tmp_path, lambda to: (to.mkdir(), (to / "config.json").write_text("{}")))
    kept = [p.read_text() for p in tmp_path.rglob("my_notes.txt")]
    assert kept == ["mine"]  # (moved aside into model.old by the first swap)


def test_a_refused_resume_names_a_setting_only_one_run_keys(tmp_path):
    """A checkpoint whose key holds a setting this run's does not (another version's) is refused
    naming it, not with a bare "other settings"."""
    from stages.run_dir import refuse_other_run

    state = {
        "store": "s",
        "resume_key": "old",
        "settings": {"mode": "mxfp4", "learning_rate": 1e-4},
    }
    with pytest.raises(StageError, match=r"tune.learning_rate was 0.0001, now not part of the run"):
        refuse_other_run(tmp_path, state, "new", "s", {"mode": "mxfp4"})
    with pytest.raises(StageError, match=r"tune.mode was 'mxfp4', now 'nvfp4'"):
        refuse_other_run(tmp_path, state, "new", "s", {"mode": "nvfp4"})


def test_a_checkpoint_of_an_earlier_revision_is_refused_in_words_not_as_a_setting(tmp_path):
    """A revision key is not a setting a user can change: the line says an earlier version
    made that part of the run, whether its key held an older revision or none."""
    from stages.run_dir import refuse_other_run

    state = {"store": "s", "resume_key": "old", "settings": {"init": "gptq", "start_revision": 2}}
    settings = {"init": "gptq", "start_revision": 3}
    with pytest.raises(StageError) as refused:
        refuse_other_run(tmp_path, state, "new", "s", settings)
    assert "starting quantization (tune.init) was made by an earlier version" in str(refused.value)
    assert "revision 2, now 3" in str(refused.value)
    assert "tune.start_revision" not in str(refused.value)
    state["settings"] = {"init": "gptq"}
    with pytest.raises(StageError, match="before revisions were kept; now 3"):
        refuse_other_run(tmp_path, state, "new", "s", settings)
    # An earlier default rate as well: the revision is named, since no --learning-rate resumes it
    state["settings"] = {"init": "gptq", "learning_rate": 5e-5, "start_revision": 2}
    with pytest.raises(StageError, match=r"earlier version of this program \(revision 2, now 3"):
        refuse_other_run(tmp_path, state, "new", "s", settings | {"learning_rate": 1.5e-5})
    state["settings"] = {"init": "gptq", "start_revision": 4}
    with pytest.raises(StageError, match=r"a later version of this program \(revision 4, now 3"):
        refuse_other_run(tmp_path, state, "new", "s", settings)
    # A revision only one side keeps follows its lever's own difference
    state["settings"] = {"init": "rtn"}
    with pytest.raises(StageError, match=r"tune.init was 'rtn', now 'gptq'"):
        refuse_other_run(tmp_path, state, "new", "s", settings)


def test_the_best_parameters_live_on_disk_and_a_resume_takes_the_checkpoints(tmp_path):
    """Best parameters written after the last checkpoint (then a crash) give way to the
    checkpoint's on resume; --overwrite discards them with the checkpoint."""
    import mlx.core as mx
    import numpy as np

    make_run_dir(tmp_path)
    save_best(tmp_path, {"w": mx.ones((3,))})
    (tmp_path / CHECKPOINT_DIR).mkdir()
    mx.save_safetensors(str(tmp_path / CHECKPOINT_DIR / "best.safetensors"), {"w": mx.ones((3,))})
    save_best(tmp_path, {"w": mx.full((3,), 2.0)})  # a later step's, then the crash
    assert np.array_equal(np.array(load_best(tmp_path)["w"]), [2.0, 2.0, 2.0])
    restore_best(tmp_path)
    assert np.array_equal(np.array(load_best(tmp_path)["w"]), [1.0, 1.0, 1.0])
    assert sorted(p.name for p in tmp_path.iterdir() if "best" in p.name) == [BEST_FILE]
    clear_run(tmp_path)
    assert not (tmp_path / BEST_FILE).exists()
    with pytest.raises(StageError, match="best parameters of the run .* are lost .*missing"):
        load_best(tmp_path)
    (tmp_path / BEST_FILE).write_text("not safetensors")
    with pytest.raises(StageError, match="lost .*(truncated|unreadable)"):
        load_best(tmp_path)


def test_a_damaged_best_file_never_replaces_the_checkpoints_copy(tmp_path):
    """Truncated, a directory in its place, a link at its partial name: one line each, the
    checkpoint and the user's file untouched."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from stages.run_dir import BEST_PARTIAL, save_checkpoint

    make_run_dir(tmp_path)
    save_best(tmp_path, {"w": mx.ones((1000,))})
    optimizer = optim.Adam(1e-3)
    optimizer.init({"w": mx.ones((1000,))})
    save_checkpoint(tmp_path, {"w": mx.ones((1000,))}, optimizer, {"step": 1})
    good = (tmp_path / CHECKPOINT_DIR / "best.safetensors").read_bytes()
    data = (tmp_path / BEST_FILE).read_bytes()
    (tmp_path / BEST_FILE).write_bytes(data[:-100])
    with pytest.raises(StageError, match="best parameters .* lost .*truncated"):
        save_checkpoint(tmp_path, {"w": mx.ones((1000,))}, optimizer, {"step": 2})
    assert (tmp_path / CHECKPOINT_DIR / "best.safetensors").read_bytes() == good
    restore_best(tmp_path)  # what a re-run does
    assert (tmp_path / BEST_FILE).read_bytes() == good
    users = tmp_path.parent / f"{tmp_path.name}-users-file"
    users.write_text("keep me")
    (tmp_path / BEST_PARTIAL).symlink_to(users)
    save_best(tmp_path, {"w": mx.zeros((3,))})
    assert users.read_text() == "keep me"
    (tmp_path / BEST_PARTIAL).symlink_to(users)
    restore_best(tmp_path)
    assert users.read_text() == "keep me"
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,"4"]}}'
    (tmp_path / BEST_FILE).write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(StageError, match="lost .*unreadable"):
        load_best(tmp_path)
    (tmp_path / BEST_FILE).unlink()
    (tmp_path / BEST_FILE).mkdir()
    with pytest.raises(StageError, match=f"cannot write to .*{BEST_FILE}"):
        save_best(tmp_path, {"w": mx.zeros((3,))})
