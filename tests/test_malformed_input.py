"""Every file the tool reads, damaged every way a disk, a copy or a hand can damage it (cut short,
empty, binary garbage, JSON of the wrong shape, a folder in its place), through the real console
script: a non-zero exit, exactly one `error:` line, no traceback, and the damaged copy as well as
the finished store and run byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.report import EVAL_FILE
from stages.evaluate import EvalResult, ModelScore
from stages.targets import compute_targets
from stages.tune import tune
from store.pack import pack_store
from tests.conftest import BIN, cli_args, run_cli, small_run_overrides

KINDS = ("truncated", "empty", "binary", "wrong types", "a folder")
GARBAGE = bytes(range(256)) * 3  # NUL, control bytes and invalid UTF-8


@pytest.fixture(scope="module")
def world(tiny_teacher, tmp_path_factory) -> dict:
    """One finished store, its packed zip and one tuned run (with an eval.json), built once."""
    root = tmp_path_factory.mktemp("malformed")
    overrides = small_run_overrides(root, tiny_teacher, **{"tune.checkpoint_every": 1})
    config = load_config(None, overrides)
    compute_targets(config.targets)
    tune(config.tune)
    pack_store(root / "store.zarr", root / "store.zip")
    score = ModelScore(name="tuned", kl=0.5, perplexity=9.0, top1_agreement=0.5)
    evaluation = EvalResult({"tuned": score}, "valid", 2, 32, 1.0)
    (root / "run" / EVAL_FILE).write_text(json.dumps(evaluation.to_dict()))
    (root / "config.yaml").write_text(json.dumps({"tune": {"max_steps": 2, "seed": 3}}))
    return {
        "root": root,
        "overrides": overrides,
        "store": root / "store.zarr",
        "zip": root / "store.zip",
        "run": root / "run",
        "model": root / "run" / "model",
        "config": root / "config.yaml",
    }


def fingerprint(path: Path) -> dict[str, str]:
    """Every file's digest and every folder, below `path` (or of `path` itself)."""
    items = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {
        str(p.relative_to(path) if p != path else p.name): (
            "folder" if p.is_dir() else hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
        )
        for p in items
        if p.suffix != ".lock"
    }


def zip_holding(world: dict, manifest: bytes) -> bytes:
    """The packed store with another manifest.json inside."""
    path = world["root"] / "rewritten.zip"
    with zipfile.ZipFile(world["zip"]) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = manifest if item.filename == "manifest.json" else source.read(item)
            target.writestr(item.filename, data)
    return path.read_bytes()


def fresh_run(world: dict) -> list[str]:
    return ["--run-dir", str(world["root"] / "never-made")]


@dataclass(frozen=True)
class Readable:
    """A file the tool reads: where it lives, JSON/YAML of the wrong shape, and the command."""

    source: str  # "store", "zip", "run", "model" or "config": what is copied, then damaged
    member: str  # the file inside the copy ("" = the copy itself)
    wrong: list[bytes]  # well-formed JSON or YAML of the wrong shape
    command: Callable[[dict, Path], list[str]]
    wrap: Callable[[dict, bytes], bytes] | None = None  # how a wrong payload becomes the file
    truncate: Callable[[bytes], bytes] | None = None  # default: the first half of the file


def json_payloads(*values) -> list[bytes]:
    return [json.dumps(v).encode() for v in values]


READABLE: dict[str, Readable] = {
    "config YAML": Readable(
        "config",
        "",
        [b"[1, 2]", b"tune: [1]", b"tune: {max_steps: x}", b"tune: {seed: .nan}"],
        lambda w, copy: ["config", "-c", str(copy)],
    ),
    "manifest.json": Readable(
        "store",
        "manifest.json",
        json_payloads([], {"schema_version": "1"}, {"schema_version": 1, "splits": []}),
        lambda w, copy: ["store", "info", str(copy)],
    ),
    "chunk record": Readable(
        "store",
        "records/train/00000000.json",
        json_payloads([], {"split": "train", "chunk": "zero"}),
        lambda w, copy: ["tune", "--store", str(copy), *fresh_run(w)],
    ),
    "store zarr.json": Readable(
        "store",
        "zarr.json",
        json_payloads([], {"zarr_format": "three", "node_type": 5}),
        lambda w, copy: ["store", "info", str(copy)],
    ),
    "array zarr.json": Readable(
        "store",
        "train/topk_logits/zarr.json",
        json_payloads([], {"zarr_format": 3, "node_type": "array", "shape": "big"}),
        lambda w, copy: ["tune", "--store", str(copy), *fresh_run(w)],
    ),
    "packed zip": Readable(
        "zip",
        "",
        json_payloads([], {"schema_version": 1}),
        lambda w, copy: ["store", "info", str(copy)],
        wrap=zip_holding,
    ),
    "tune_config.json": Readable(
        "run",
        "tune_config.json",
        json_payloads([], "kl_tail"),
        lambda w, copy: ["report", str(copy)],
    ),
    "checkpoint state.json": Readable(
        "run",
        "checkpoint/state.json",
        json_payloads([], {"step": "two", "resume_key": 1}),
        lambda w, copy: ["tune", *cli_args({**w["overrides"], "tune.run_dir": str(copy)})],
    ),
    "metrics.jsonl": Readable(
        "run",
        "metrics.jsonl",
        [b"[1, 2]\n", b'{"step": "one", "total_steps": 2}\n'],
        lambda w, copy: ["report", str(copy)],
        # A torn *last* line is a crash mid-append and is dropped (tests/test_run_dir.py); a log
        # that is nothing but a torn line is not a metrics log.
        truncate=lambda good: good[: good.index(b"\n") // 2],
    ),
    "student config.json": Readable(
        "model",
        "config.json",
        json_payloads([], {"model_type": 5}),
        lambda w, copy: ["eval", "--store", str(w["store"]), "--student", str(copy)],
    ),
    "eval.json": Readable(
        "run",
        EVAL_FILE,
        json_payloads([], {"models": {"tuned": {"kl": "low"}}, "split": "test", "num_tokens": 1}),
        lambda w, copy: ["report", str(copy)],
    ),
}


def damaged_copy(world: dict, readable: Readable, payload: bytes | None, folder: Path) -> Path:
    """A copy of the readable's source with its file replaced by `payload` (None: a folder)."""
    source = world[readable.source]
    copy = folder / source.name
    if source.is_dir():
        shutil.copytree(source, copy)
    else:
        shutil.copy2(source, copy)
    target = copy / readable.member if readable.member else copy
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    if payload is None:
        target.mkdir()
        (target / "stray.txt").write_text("a folder where a file should be")
    else:
        target.write_bytes(payload)
    return copy


def payload_of(world: dict, readable: Readable, kind: str, index: int) -> bytes | None:
    source = world[readable.source]
    good = (source / readable.member if readable.member else source).read_bytes()
    return {
        "truncated": lambda: (readable.truncate or (lambda g: g[: len(g) // 2]))(good),
        "empty": lambda: b"",
        "binary": lambda: GARBAGE,
        "wrong types": lambda: (readable.wrap or (lambda w, p: p))(world, readable.wrong[index]),
        "a folder": lambda: None,
    }[kind]()


CASES = [
    (name, kind, index)
    for name, readable in READABLE.items()
    for kind in KINDS
    for index in range(len(readable.wrong) if kind == "wrong types" else 1)
]


def assert_one_clear_line(done) -> None:
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert done.returncode not in (0, 130) and done.returncode < 128, output  # no crash, signal
    assert "Traceback" not in output, output
    assert len(errors) == 1, output
    assert len(done.stderr.strip().splitlines()) == 1, output


@pytest.mark.parametrize(
    "name, kind, index", CASES, ids=[f"{n}: {k}{f' {i}' if i else ''}" for n, k, i in CASES]
)
def test_damaged_file_is_one_clear_line_and_changes_nothing(world, tmp_path, name, kind, index):
    readable = READABLE[name]
    before = {key: fingerprint(world[key]) for key in ("store", "run")}
    copy = damaged_copy(world, readable, payload_of(world, readable, kind, index), tmp_path)
    damaged = fingerprint(copy)
    done = run_cli(*readable.command(world, copy))
    assert_one_clear_line(done)
    assert fingerprint(copy) == damaged
    assert {key: fingerprint(world[key]) for key in ("store", "run")} == before


def test_a_quantization_block_of_the_wrong_shape_is_one_clear_line(world, tmp_path):
    blocks = [5, {"bits": "four", "group_size": 32}, {"bits": 4}, {"bits": 0, "group_size": 32}]
    for block in blocks:
        copy = tmp_path / f"student-{blocks.index(block)}"
        shutil.copytree(world["model"], copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "quantization": block}))
        damaged = fingerprint(copy)
        for command in (
            ["eval", "--store", str(world["store"]), "--student", str(copy)],
            ["tune", "--store", str(world["store"]), "--student", str(copy), *fresh_run(world)],
        ):
            assert_one_clear_line(run_cli(*command))
        assert fingerprint(copy) == damaged


def test_a_store_path_that_is_a_regular_file_is_one_clear_line(world):
    for command in (["store", "info"], ["store", "verify"], ["tune", "--store"]):
        done = run_cli(*command, str(world["config"]))
        assert_one_clear_line(done)
        assert "is a file, not a store" in done.stderr


def test_store_dot_inside_a_store_is_that_store(world, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(world["store"], copy)
    before = fingerprint(copy)
    done = run_cli("targets", *cli_args({**world["overrides"], "store": "."}), cwd=copy)
    assert done.returncode == 0, done.stderr  # the same settings: resumed, nothing to compute
    assert fingerprint(copy) == before
    assert run_cli("store", "verify", ".", cwd=copy).returncode == 0


def test_a_run_folder_that_is_a_file_says_so(world):
    args = cli_args({**world["overrides"], "tune.run_dir": str(world["config"])})
    done = run_cli("tune", *args)
    assert_one_clear_line(done)
    assert "is a file, not a run folder" in done.stderr and "permissions" not in done.stderr


@pytest.fixture
def unwritable_folder():
    folder = Path(tempfile.mkdtemp(prefix="dwq-unwritable-"))
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)
    shutil.rmtree(folder)


def run_cli_unprivileged(*args: str, cwd: Path):
    """The console script as run_cli runs it, but without root's power to write anywhere."""
    if os.geteuid() != 0:
        return run_cli(*args, cwd=cwd)
    if not shutil.which("setpriv"):
        pytest.skip("root, and no setpriv to drop the capability to override permissions")
    caps = "-dac_override,-dac_read_search"
    command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]
    return subprocess.run(
        [*command, str(BIN / "dwq-pipeline"), *args], cwd=cwd, capture_output=True, text=True
    )


def test_an_unwritable_working_folder_is_one_clear_line(world, unwritable_folder):
    folder = unwritable_folder
    # tune's run folder and the default teacher's conversion are relative to the working folder
    tuned = run_cli_unprivileged("tune", "--store", str(world["store"]), cwd=folder)
    assert_one_clear_line(tuned)
    assert "artifacts/runs/default" in tuned.stderr
    converted = run_cli_unprivileged("targets", "--store", str(folder / "s.zarr"), cwd=folder)
    assert_one_clear_line(converted)
    assert "a folder you can write to" in converted.stderr
    assert list(folder.iterdir()) == []
