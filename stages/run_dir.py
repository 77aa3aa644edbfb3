"""The tune run folder: its file names, its ownership mark, checkpoints, the metrics log, the
run config file and the saved model, the way store/ owns the store's format.

A run folder is used only if it is new, empty, or carries this program's run mark (or is a run
folder from before the mark, recognised by its config file); inside it, only the entries below
are ever written or replaced, and `--overwrite` deletes only the checkpoint, the best parameters
and the metrics log.
Every replacement is written beside and swapped in, so a crash leaves the old version whole.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from stages.errors import StageError
from store.durable import (
    MARK_FILE,
    file_in_the_way,
    foreign_entries,
    has_mark,
    paths_overlap,
    read_mark_kind,
    remove_owned,
    write_json_atomic,
    write_mark,
    write_text_atomic,
)
from store.location import local_spec
from store.lock import hold_lock

RUN_MARK = "run"
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "tune_config.json"  # the run's TuneConfig, for reports
SENSITIVITY_FILE = "sensitivities.json"  # with a bits budget: each layer's estimates and choice
LOCK_FILE = "tune.lock"
# The best parameters so far, on disk rather than in memory (a copy of the trained state: as
# much as Adam's moments), written beside as BEST_PARTIAL and swapped in.
BEST_FILE = "best.safetensors"
BEST_PARTIAL = "best.partial.safetensors"
MODEL_DIR = "model"
CHECKPOINT_FILES = ("params.safetensors", "best.safetensors", "optimizer.safetensors", "state.json")
# What mlx-lm's save writes into a model folder: weights, their index, config, tokenizer files
# (save_pretrained) and the model's own *.py and generation_config.json copied over.
_MODEL_FILE = re.compile(
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|tokenizer[^/]*|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)"
    r"|spiece\.model|[^/]+\.py|README\.md"
)


def _is_model_file(key: str) -> bool:
    return bool(_MODEL_FILE.fullmatch(key))


def _is_checkpoint_file(key: str) -> bool:
    return key in CHECKPOINT_FILES


# The run folder's own subfolders (and the .partial/.old of each swap): what each may hold.
OWN_FOLDERS = {
    f"{name}{suffix}": owned
    for name, owned in ((MODEL_DIR, _is_model_file), (CHECKPOINT_DIR, _is_checkpoint_file))
    for suffix in ("", ".partial", ".old")
}
# Keys every config file of a tune run has: how a run folder from before the mark is known.
_LEGACY_CONFIG_KEYS = {"store", "run_dir", "student", "loss", "learning_rate", "batch_size"}


def is_run_dir(run_dir: Path) -> bool:
    """Did this program make `run_dir`? Its mark says so (or, for a run from before the mark,
    a config file holding a tune run's config)."""
    if has_mark(run_dir, RUN_MARK):
        return True
    try:
        config = json.loads((Path(run_dir) / RUN_CONFIG_FILE).read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and _LEGACY_CONFIG_KEYS <= set(config)


def check_run_dir(run_dir: Path, inputs: dict[str, str | None]) -> None:
    """Refuse, before anything is written, a run folder that is not new, empty or ours, or that
    is, contains or lies inside one of the run's `inputs` (name -> path)."""
    for name, path in inputs.items():
        if path and Path(local_spec(path)).exists() and paths_overlap(run_dir, path):
            raise StageError(
                f"the run folder {run_dir} and the {name} {path} overlap (one is, or is "
                "inside, the other); choose another --run-dir"
            )
    if run_dir.exists() and not run_dir.is_dir():
        raise StageError(f"{run_dir} is a file, not a run folder; choose another --run-dir")
    blocker = file_in_the_way(run_dir)
    if blocker is not None:
        raise StageError(f"{run_dir} lies under the file {blocker}; choose another --run-dir")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        kind = read_mark_kind(run_dir)
        what = (
            f"is a dwq-pipeline {kind}, not a tune run folder"
            if kind
            else f"is not empty and is not a tune run folder (it has no {MARK_FILE})"
        )
        raise StageError(f"{run_dir} {what}; choose a new or empty --run-dir")
    if run_dir.is_dir():
        check_own_folders(run_dir)


def check_own_folders(run_dir: Path) -> None:
    """Refuse a run folder whose model/checkpoint folders (or their .old/.partial) hold a file
    this program did not write: tune replaces and deletes those folders' own files only."""
    for name, owned in OWN_FOLDERS.items():
        folder = run_dir / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise StageError(
                f"{folder} is not a folder tune wrote (a link or a file); tune never replaces "
                "it: move it away or choose another --run-dir"
            )
        foreign = foreign_entries(folder, owned)
        if foreign:
            raise StageError(
                f"{folder / foreign[0]} was not written by dwq-pipeline; tune replaces only its "
                f"own files in {name}/: move it out first or choose another --run-dir"
            )


def _remove_own_folder(run_dir: Path, name: str) -> None:
    """Delete the run folder's `name` (one of OWN_FOLDERS), only its own files; a file someone
    put there meanwhile stays (and the swap that needs the name then fails, losing nothing)."""
    folder = run_dir / name
    if folder.is_dir() and not folder.is_symlink():
        remove_owned(folder, OWN_FOLDERS[name])


def writes_run_dir(function):
    """A failed write (disk full, read-only, permissions) becomes one clear StageError."""

    @functools.wraps(function)
    def wrapper(run_dir: Path, *args, **kwargs):
        try:
            return function(run_dir, *args, **kwargs)
        except OSError as exc:
            where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)
            what = f"{where}: {exc.strerror or exc}" if where else exc.strerror or exc
            raise StageError(
                f"cannot write to {run_dir} ({what}); the last checkpoint there is kept: fix "
                "the disk or permissions and re-run the same command to resume"
            ) from exc

    return wrapper


@writes_run_dir
def make_run_dir(run_dir: Path) -> None:
    """Create the folder and mark it as ours (before the lock file is the first thing in it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not has_mark(run_dir, RUN_MARK):
        write_mark(run_dir, RUN_MARK)


def lock_run_dir(run_dir: Path):
    """Held while one process tunes into `run_dir`: a second one is refused."""
    return hold_lock(run_dir / LOCK_FILE, f"tune run {run_dir}")


@writes_run_dir
def recover_checkpoint(run_dir: Path) -> None:
    """Finish a checkpoint swap a crash interrupted (call under the run folder's lock).

    Between `save_checkpoint`'s two renames only checkpoint.old exists: it becomes the checkpoint
    again. After both, a leftover checkpoint.old is stale and goes."""
    folder = run_dir / CHECKPOINT_DIR
    old = run_dir / f"{CHECKPOINT_DIR}.old"
    if _interrupted_swap(run_dir):
        os.replace(old, folder)
    elif folder.exists():
        _remove_own_folder(run_dir, old.name)


def _interrupted_swap(run_dir: Path) -> bool:
    """Whether a crash between `save_checkpoint`'s renames left only checkpoint.old."""
    folder = run_dir / CHECKPOINT_DIR
    return not folder.exists() and (run_dir / f"{CHECKPOINT_DIR}.old" / "state.json").is_file()


@writes_run_dir
def clear_run(run_dir: Path) -> None:
    """What --overwrite discards: the checkpoint, the best parameters, the metrics log and the
    layer sensitivities (a bits budget measures them again), nothing else."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old", f"{CHECKPOINT_DIR}.partial"):
        _remove_own_folder(run_dir, name)
    for name in (METRICS_FILE, BEST_FILE, BEST_PARTIAL, SENSITIVITY_FILE):
        if (run_dir / name).is_file():
            (run_dir / name).unlink()


@writes_run_dir
def write_run_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_json_atomic(run_dir / RUN_CONFIG_FILE, config)


@writes_run_dir
def write_sensitivities(run_dir: Path, record: dict[str, Any]) -> None:
    """The bits budget's per-layer estimates and chosen bits (see stages/bit_budget.py)."""
    write_json_atomic(run_dir / SENSITIVITY_FILE, record)


# ---- checkpoints -------------------------------------------------------------------------------


@writes_run_dir
def save_best(run_dir: Path, params) -> None:
    """The best parameters so far (BEST_FILE), written beside and swapped in."""
    _save_arrays(run_dir / BEST_PARTIAL, dict(tree_flatten(params)))
    os.replace(run_dir / BEST_PARTIAL, run_dir / BEST_FILE)


def load_best(run_dir: Path):
    _check_best(run_dir)
    try:
        return tree_unflatten(list(mx.load(str(run_dir / BEST_FILE)).items()))
    except Exception as exc:  # MLX raises bare RuntimeError/ValueError on unreadable files
        raise _best_lost(run_dir, type(exc).__name__) from exc


def _check_best(run_dir: Path) -> None:
    """The best file is there and whole (checked before a checkpoint copies it, so a damaged
    one never replaces the checkpoint's good copy)."""
    problem = safetensors_problem(run_dir / BEST_FILE)
    if problem:
        raise _best_lost(run_dir, problem)


def _best_lost(run_dir: Path, why: str) -> StageError:
    return StageError(
        f"the best parameters of the run in {run_dir} are lost ({BEST_FILE}: {why}); re-run the "
        "same command to resume from the last checkpoint (it holds a copy) or to start over if "
        "there is none yet, or pass --overwrite"
    )


def _save_arrays(path: Path, arrays: dict) -> None:
    """mx.save_safetensors to a path of the run folder: a link there is replaced, never written
    through; a failure (MLX raises RuntimeError) leaves no partial file and is an OSError."""
    path.unlink(missing_ok=True)
    try:
        mx.save_safetensors(str(path), arrays)
    except RuntimeError as exc:
        path.unlink(missing_ok=True)
        raise OSError(errno.EIO, f"writing it failed ({exc})", str(path)) from exc


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (missing, truncated, unreadable), or None:
    its header read and its length checked, without loading its arrays."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(size - 8, SAFETENSORS_HEADER_MAX):
                return "truncated"
            header = json.loads(f.read(length))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if not all(type(end) is int and end >= 0 for end in ends):
            return "unreadable: bad offsets"
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return f"unreadable: {type(exc).__name__}"
    return None if 8 + length + max(ends, default=0) == size else "truncated"


SAFETENSORS_HEADER_MAX = 100_000_000  # the format's own limit on its JSON header


@writes_run_dir
def save_checkpoint(run_dir: Path, params, optimizer, state: dict) -> None:
    """Write into checkpoint.partial (with a copy of the best parameters' file), then swap: a
    crash leaves the previous checkpoint whole."""
    _check_best(run_dir)
    final = run_dir / CHECKPOINT_DIR
    partial = run_dir / f"{CHECKPOINT_DIR}.partial"
    _remove_own_folder(run_dir, partial.name)
    partial.mkdir(parents=True)
    _save_arrays(partial / "params.safetensors", dict(tree_flatten(params)))
    shutil.copyfile(run_dir / BEST_FILE, partial / "best.safetensors")
    _save_arrays(partial / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
    write_json_atomic(partial / "state.json", state)
    old = run_dir / f"{CHECKPOINT_DIR}.old"
    _remove_own_folder(run_dir, old.name)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    _remove_own_folder(run_dir, old.name)


def checkpoint_state(run_dir: Path, interrupted_swap: bool = False) -> dict | None:
    """The last checkpoint's state.json, or None when there is no checkpoint (reads only).
    A damaged one is refused, never taken for "no checkpoint" (that would start over silently).
    With `interrupted_swap`, where a crash left only checkpoint.old, the state that
    `recover_checkpoint` will restore."""
    folder = run_dir / CHECKPOINT_DIR
    if interrupted_swap and _interrupted_swap(run_dir):
        folder = run_dir / f"{CHECKPOINT_DIR}.old"
    if not folder.exists():
        return None
    path = folder / "state.json"
    try:
        state = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # absent, a folder, torn, not UTF-8
        raise _damaged_checkpoint(path, type(exc).__name__) from exc
    if not isinstance(state, dict):
        raise _damaged_checkpoint(path, "not a JSON object")
    for key, types in STATE_FIELDS.items():
        if key in state and (not isinstance(state[key], types) or isinstance(state[key], bool)):
            raise _damaged_checkpoint(path, f"{key}={state[key]!r}")
    missing = [key for key in STATE_FIELDS if key not in state and key != "store"]
    if missing:
        raise _damaged_checkpoint(path, f"{missing[0]} is missing")
    chunks = state.get("train_chunks", [])
    if not (isinstance(chunks, list) and all(type(c) is int for c in chunks)):
        raise _damaged_checkpoint(path, "train_chunks is not a list of chunk numbers")
    return state


# state.json's fields and their JSON types ("store" is absent in checkpoints of earlier versions;
# train_chunks is there only with incomplete_store=use)
STATE_FIELDS = {
    "step": (int,),
    "best_step": (int,),
    "initial_val_loss": (int, float, type(None)),
    "best_val_loss": (int, float, type(None)),
    "resume_key": (str,),
    "store": (str,),
}


def _damaged_checkpoint(path: Path, why: str) -> StageError:
    return StageError(
        f"the checkpoint in {path.parent} is damaged ({path.name}: {why}); pass --overwrite to "
        "start over, or choose another --run-dir"
    )


# Keys a version bumps when it changes how a run's parameters are made (not settings a user sets)
REVISION_WORDS = {
    "start_revision": "its starting quantization (tune.init)",
    "rounding_revision": "its learned rounding",
    "budget_revision": "its bits-per-weight allocation",
}


def _first_difference(saved: Any, settings: dict[str, Any]) -> str:
    """' (tune.NAME was X, now Y)' for the first setting that differs from the saved ones; a
    revision that differs comes first and in words, since no setting resumes that run."""
    if not isinstance(saved, dict):
        return ""
    keys = [*settings, *(k for k in saved if k not in settings)]
    differs = [k for k in keys if saved.get(k, _ABSENT) != settings.get(k, _ABSENT)]
    if not differs:
        return ""
    differs.sort(key=lambda k: _telling_order(k, saved, settings))
    name = differs[0]
    was = repr(saved[name]) if name in saved else "not part of the run's key"
    now = repr(settings[name]) if name in settings else "not part of the run's key"
    if name in REVISION_WORDS:
        version = _which_version(saved.get(name), settings.get(name))
        return f" ({REVISION_WORDS[name]} was made by {version})"
    return f" (tune.{name} was {was}, now {now}{_how_to_resume(name, saved)})"


_ABSENT = object()


def _telling_order(name: str, saved: dict, settings: dict) -> int:
    """Which difference to name: a revision both runs keep (no setting resumes it), then a
    setting both keep, then one only one side keeps (another version's, or a lever on or off),
    then a revision only one side keeps (its lever's own difference says more)."""
    both = name in saved and name in settings
    if name in REVISION_WORDS:
        return 0 if both else 3
    return 1 if both else 2


def _which_version(saved: Any, now: Any) -> str:
    if saved is None:
        return f"an earlier version of this program (before revisions were kept; now {now})"
    if now is None:
        return f"another version of this program (revision {saved!r}; this one keeps none)"
    newer = isinstance(saved, int) and isinstance(now, int) and saved > now
    which = "a later" if newer else "an earlier"
    return f"{which} version of this program (revision {saved!r}, now {now!r})"


def _how_to_resume(name: str, saved: dict[str, Any]) -> str:
    """For a budget run of a version that chose bits only: the setting that resumes it."""
    if name != "allowed_group_sizes" or "group_size" not in saved:
        return ""
    size = saved["group_size"]
    return f"; that earlier run resumes with --set 'tune.allowed_group_sizes=[{size}]'"


def load_checkpoint(
    run_dir: Path, optimizer, resume_key: str, store_digest: str, settings: dict | None = None
):
    """(params, state) of the checkpoint, with the optimizer's state loaded (its best
    parameters' file is checked whole; `restore_best` makes them the run's); None without one.
    A checkpoint of other settings or made on another store is refused."""
    state = checkpoint_state(run_dir)
    if state is None:
        return None
    refuse_other_run(run_dir, state, resume_key, store_digest, settings)
    best = run_dir / CHECKPOINT_DIR / "best.safetensors"
    if problem := safetensors_problem(best):
        raise _damaged_checkpoint(best, problem)
    loaded = {}
    for name in ("params", "optimizer"):
        path = run_dir / CHECKPOINT_DIR / f"{name}.safetensors"
        try:
            loaded[name] = mx.load(str(path))
        except Exception as exc:  # MLX raises bare RuntimeError/ValueError on unreadable files
            raise _damaged_checkpoint(path, type(exc).__name__) from exc
    optimizer.state = tree_unflatten(list(loaded["optimizer"].items()))
    return tree_unflatten(list(loaded["params"].items())), state


@writes_run_dir
def restore_best(run_dir: Path) -> None:
    """The checkpoint's best parameters become the run's: a best file written after that
    checkpoint (by a run that then crashed) is of steps about to be redone."""
    (run_dir / BEST_PARTIAL).unlink(missing_ok=True)  # a link there is replaced, not written
    shutil.copyfile(run_dir / CHECKPOINT_DIR / "best.safetensors", run_dir / BEST_PARTIAL)
    os.replace(run_dir / BEST_PARTIAL, run_dir / BEST_FILE)


def refuse_other_run(
    run_dir: Path, state: dict, resume_key: str, store_digest: str, settings: dict | None = None
) -> None:
    """Refuses the checkpoint `state` when it is of another store or other settings (or from an
    earlier dwq-pipeline that did not record its store): it cannot be resumed by this run."""
    if "store" not in state:
        raise StageError(
            f"{run_dir} holds a checkpoint from an earlier dwq-pipeline that did not record its "
            "store; pass --overwrite to start over or choose another --run-dir"
        )
    if state["store"] != store_digest:
        raise StageError(
            f"{run_dir} holds a checkpoint made on another store (its manifest differs from this "
            "store's); pass --overwrite to start over or choose another --run-dir"
        )
    if state.get("resume_key") != resume_key:
        raise StageError(
            f"{run_dir} holds a checkpoint of a run with other settings"
            f"{_first_difference(state.get('settings'), settings or {})}; "
            "pass --overwrite to start over or choose another --run-dir"
        )


# ---- the metrics log ---------------------------------------------------------------------------


def _parse_metrics(path: Path, text: str) -> list[dict]:
    """One record per line. A torn last line (a crash mid-append) is dropped; any other line
    that is not a step record makes the whole file not a metrics log."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if _is_metrics_record(record):
            records.append(record)
        elif number == len(lines) and records:
            break  # torn by a crash while it was appended
        else:
            raise StageError(
                f"{path} is not a metrics log of `dwq-pipeline tune` (line {number} is not a "
                "step record)"
            )
    return records


def _is_metrics_record(record: Any) -> bool:
    """An object with a whole step and total_steps, and numbers for every measure it has."""
    if not isinstance(record, dict):
        return False
    counts = [record.get(k) for k in ("step", "total_steps")]
    measures = [v for k, v in record.items() if k not in ("step", "total_steps")]
    return all(type(v) is int for v in counts) and all(type(v) in (int, float) for v in measures)


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics log: one record per step (step 0 = validation before tuning)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not is_run_dir(run_dir):
        raise StageError(
            f"{run_dir} is not a tune run folder (no {MARK_FILE} and no {METRICS_FILE}); "
            "give the --run-dir of a `dwq-pipeline tune` run"
        )
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise StageError(f"{run_dir} has no {METRICS_FILE} yet; has its tune run started?")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise StageError(f"{path} is unreadable ({type(exc).__name__})") from exc
    return _parse_metrics(path, text)


@writes_run_dir
def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


@writes_run_dir
def trim_metrics(run_dir: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint resumed from (and a torn last line), so the log
    reads as one run."""
    path = run_dir / METRICS_FILE
    if path.exists():
        kept = [r for r in _parse_metrics(path, path.read_text()) if r["step"] <= last_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# ---- the model ---------------------------------------------------------------------------------


@writes_run_dir
def save_model(run_dir: Path, write: Callable[[Path], None]) -> Path:
    """`write(folder)` writes the model into model.partial, which is then swapped in."""
    final = run_dir / MODEL_DIR
    partial = run_dir / f"{MODEL_DIR}.partial"
    old = run_dir / f"{MODEL_DIR}.old"
    _remove_own_folder(run_dir, partial.name)
    write(partial)
    _remove_own_folder(run_dir, old.name)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    _remove_own_folder(run_dir, old.name)
    return final
