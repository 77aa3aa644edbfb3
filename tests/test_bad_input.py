"""User mistakes across every command: one line that says what to do, a non-zero exit, no
traceback, and nothing already written harmed (a finished store and tune run are fingerprinted
before each mistake and compared after)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from mlx_lm.utils import save
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from stages.models import load_model, quantize_student
from stages.targets import compute_targets
from stages.tune import tune
from tests.conftest import cli_args, make_text_data, make_tiny_model_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tiny_teacher, tmp_path_factory) -> dict:
    """A finished store and tune run (the things a mistake must not harm), plus odd inputs."""
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    make_text_data(data)
    overrides = {
        "store": str(root / "store.zarr"),
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(data),
        "targets.top_k": 16,
        "targets.max_seq_length": 17,
        "targets.num_samples": 8,
        "targets.num_valid_samples": 2,
        "tune.run_dir": str(root / "run"),
        "tune.group_size": 32,
        "tune.max_steps": 2,
    }
    config = load_config(None, overrides)
    compute_targets(config.targets)
    tune(config.tune)

    other = make_tiny_model_folder(root / "other-tokenizer")
    tokenizer_config = other / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text().replace("<|im_end|>", "<|endoftext|>"))
    other_quantized = root / "other-tokenizer-4bit"
    loaded = load_model(str(other))
    quantized, quantized_config = quantize_student(loaded, bits=4, group_size=32)
    save(other_quantized, other, quantized, loaded.tokenizer, quantized_config)
    shipped_code = root / "ships-code"
    shutil.copytree(tiny_teacher, shipped_code)
    config_json = json.loads((shipped_code / "config.json").read_text())
    (shipped_code / "config.json").write_text(json.dumps({**config_json, "model_file": "evil.py"}))
    marker = root / "evil-ran"
    (shipped_code / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    (root / "empty.jsonl").write_text("")
    (root / "broken.yaml").write_text("targets: [unclosed\n")
    (root / "not-a-store").mkdir()
    (root / "not-a-store" / "notes.txt").write_text("mine")
    (root / "a-file").write_text("not a folder")
    return {
        "root": root,
        "overrides": overrides,
        "store": root / "store.zarr",
        "run": root / "run",
        "teacher": tiny_teacher,
        "other_quantized": other_quantized,
        "not_store": root / "not-a-store",
        "shipped_code": shipped_code,
        "marker": marker,
    }


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".lock"
    }


def store_copy_with(world: dict, edit: Callable[[dict], None], name: str) -> str:
    """A copy of the finished store whose manifest is edited (JSON in, JSON out)."""
    copy = world["root"] / name
    if not copy.exists():
        shutil.copytree(world["store"], copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return str(copy)


def newer_schema(m: dict) -> None:
    m["schema_version"] = 99


def sizes_disagree(m: dict) -> None:
    m["splits"]["train"]["num_sequences"] += 1  # the array table still says the old size


def huge_sizes(m: dict) -> None:
    m["splits"]["train"]["num_sequences"] = 2**40
    m["arrays"]["train"]["tokens"]["shape"][0] = 2**40


def escaping_split(m: dict) -> None:
    m["splits"]["../../escape"] = m["splits"].pop("valid")


def targets(world, *extra: str) -> list[str]:
    return ["targets", *cli_args(world["overrides"]), *extra]


def tune_args(world, *extra: str) -> list[str]:
    run = str(world["root"] / "other-run")
    return ["tune", "--store", str(world["store"]), "--run-dir", run, *extra]


# (name, args from world, expected words in the one line)
CASES: list[tuple[str, Callable[[dict], list[str]], str]] = [
    ("config file missing", lambda w: ["targets", "-c", "nope.yaml"], "does not exist"),
    ("config not YAML", lambda w: ["tune", "-c", str(w["root"] / "broken.yaml")], "not valid YAML"),
    ("unknown config key", lambda w: targets(w, "--set", "targets.topk=3"), "unknown key"),
    ("unknown section", lambda w: targets(w, "--set", "train.lr=3"), "unknown section"),
    ("wrong type", lambda w: targets(w, "--set", "targets.top_k=many"), "must be int"),
    ("k = 0", lambda w: targets(w, "--top-k", "0"), "top_k must be >= 1"),
    ("k > vocabulary", lambda w: targets(w, "--top-k", "100000"), "exceeds the teacher's"),
    ("teacher missing", lambda w: targets(w, "--teacher", "/no/such/model"), "does not exist"),
    ("data missing", lambda w: targets(w, "--data", "/no/such.jsonl"), "does not exist"),
    ("data empty", lambda w: targets(w, "--data", str(w["root"] / "empty.jsonl")), "empty"),
    ("data too short", lambda w: targets(w, "--max-seq-length", "5000"), "no train sequences"),
    ("bad shard", lambda w: targets(w, "--shard", "3/2"), "shard 3/2 is invalid"),
    ("shard not i/N", lambda w: targets(w, "--shard", "half"), "must look like i/N"),
    ("store made differently", lambda w: targets(w, "--set", "targets.seed=7"), "made differently"),
    (
        "store path is someone's folder",
        lambda w: targets(w, "--store", str(w["root"] / "not-a-store"), "--overwrite"),
        "is not a dwq-pipeline store",
    ),
    (
        "store under a file",
        lambda w: targets(w, "--store", str(w["root"] / "a-file" / "s.zarr")),
        "not a writable folder",
    ),
    (
        "model ships code",
        lambda w: targets(w, "--teacher", str(w["shipped_code"]), "--store", str(w["root"] / "x")),
        "--trust-remote-code",
    ),
    ("tune store missing", lambda w: ["tune", "--store", "/no/store.zarr"], "does not exist"),
    (
        "student not quantized",
        lambda w: tune_args(w, "--student", str(w["teacher"])),
        "not quantized",
    ),
    (
        "student tokenizer differs",
        lambda w: tune_args(w, "--student", str(w["other_quantized"])),
        "tokenizer differs",
    ),
    ("unknown loss", lambda w: tune_args(w, "--loss", "l2"), "tune.loss must be one of"),
    ("negative lr", lambda w: tune_args(w, "--learning-rate", "-1"), "must be > 0"),
    ("bits >= 8", lambda w: tune_args(w, "--set", "tune.bits=8"), "below 8"),
    (
        "temperature not in store",
        lambda w: tune_args(w, "--set", "tune.temperature=3.5"),
        "logsumexp at that temperature",
    ),
    (
        "store from a newer schema",
        lambda w: ["store", "info", store_copy_with(w, newer_schema, "newer.zarr")],
        "upgrade dwq-pipeline",
    ),
    (
        "manifest sizes disagree with arrays",
        lambda w: tune_args(w, "--store", store_copy_with(w, sizes_disagree, "sizes.zarr")),
        "does not match its split sizes",
    ),
    (
        "manifest sizes beyond any real store",
        lambda w: ["store", "verify", store_copy_with(w, huge_sizes, "huge.zarr")],
        "out of range",
    ),
    (
        "manifest names a path outside the store",
        lambda w: ["store", "verify", store_copy_with(w, escaping_split, "escape.zarr")],
        "unknown split",
    ),
    ("verify a missing store", lambda w: ["store", "verify", "/no/store.zarr"], "does not exist"),
    (
        "info on a plain folder",
        lambda w: ["store", "info", str(w["root"] / "not-a-store")],
        "not a dwq-pipeline store",
    ),
    (
        "merge stores made differently",
        lambda w: [
            "store",
            "merge",
            str(w["root"] / "merged.zarr"),
            str(w["store"]),
            store_copy_with(w, lambda m: m["settings"].update(seed=9), "seed9.zarr"),
        ],
        "differs from",
    ),
    (
        "eval of an unquantized student",
        lambda w: ["eval", "--store", str(w["store"]), "--student", str(w["teacher"])],
        "not quantized",
    ),
    ("report without metrics", lambda w: ["report", str(w["root"])], "no metrics.jsonl"),
]


@pytest.mark.parametrize("name, make_args, expected", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_clear_line_and_harms_nothing(world, name, make_args, expected):
    guarded = ("store", "run", "not_store")
    before = {key: fingerprint(world[key]) for key in guarded}
    result = runner.invoke(app, make_args(world))
    lines = result.output.strip().splitlines()
    assert result.exit_code not in (0, None), result.output
    assert not isinstance(result.exception, AssertionError)
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and expected in lines[0], lines[0]
    assert {key: fingerprint(world[key]) for key in guarded} == before
    assert not world["marker"].exists()  # code shipped in a model folder never ran
