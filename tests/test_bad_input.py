"""User mistakes across every command: one line that says what to do, a non-zero exit, no
traceback, and nothing already written harmed (a finished store and tune run are fingerprinted
before each mistake and compared after)."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from mlx_lm.utils import save
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from stages.errors import StageError
from stages.evaluate import check_save_path
from stages.models import load_model, quantize_student
from stages.run_dir import METRICS_FILE, MODEL_DIR
from stages.targets import compute_targets
from stages.tune import tune
from store.durable import MARK_FILE, has_mark
from store.pack import pack_store
from store.reader import StoreReader
from store.writer import owns_store
from tests.conftest import cli_args, make_tiny_model_folder, small_run_overrides

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tiny_teacher, tmp_path_factory) -> dict:
    """A finished store and tune run (the things a mistake must not harm), plus odd inputs."""
    root = tmp_path_factory.mktemp("bad-input")
    overrides = small_run_overrides(root, tiny_teacher)
    data = root / "data"
    config = load_config(None, overrides)
    compute_targets(config.targets)
    tune(config.tune)
    other_store = root / "other-store.zarr"  # complete, but of other targets
    compute_targets(
        load_config(None, {**overrides, "store": str(other_store), "targets.seed": 7}).targets
    )
    pack_store(root / "store.zarr", root / "packed.zip")

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
    users = root / "users"  # things a user made that look like ours
    (users / "web-app").mkdir(parents=True)
    (users / "web-app" / "manifest.json").write_text(json.dumps({"name": "my web app"}))
    (users / "web-app" / "index.html").write_text("<h1>mine</h1>")
    (users / "own-run" / MODEL_DIR).mkdir(parents=True)
    (users / "own-run" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "acc": 0.9}) + "\n")
    (users / "own-run" / MODEL_DIR / "weights.bin").write_bytes(b"\x00" * 8)
    with zipfile.ZipFile(users / "photos.zip", "w") as archive:
        archive.writestr("holiday.txt", "mine")
    (users / "results.json").write_text(json.dumps({"accuracy": 0.9}))
    (users / "garbage-run").mkdir()
    (users / "garbage-run" / MARK_FILE).write_text(
        json.dumps({"program": "dwq-pipeline", "kind": "run"})
    )
    (users / "garbage-run" / "metrics.jsonl").write_text("not json\nnor this\n")
    with_notes = root / "store-with-notes.zarr"  # a store in which a user keeps a file
    shutil.copytree(root / "store.zarr", with_notes)
    (with_notes / "notes.txt").write_text("mine")
    deep_notes = root / "store-with-deep-notes.zarr"  # ... files of a user inside its folders
    shutil.copytree(root / "store.zarr", deep_notes)
    (deep_notes / "train" / "my.txt").write_text("mine")
    (deep_notes / "records" / "notes.txt").write_text("mine")
    (deep_notes / "train" / "tokens" / "c" / "extra").mkdir()
    (deep_notes / "train" / "tokens" / "c" / "extra" / "f").write_text("mine")
    runs = root / "runs"  # copies of the run in which a user keeps files
    for name, file in (
        ("model-notes", f"{MODEL_DIR}/my_notes.txt"),
        ("checkpoint-notes", "checkpoint/mine.txt"),
        ("model-old", f"{MODEL_DIR}.old/keep.txt"),
        ("own-report", "report.md"),
        ("own-plot", "report.png"),
    ):
        shutil.copytree(root / "run", runs / name)
        (runs / name / file).parent.mkdir(exist_ok=True)
        (runs / name / file).write_text("mine")
    return {
        "root": root,
        "overrides": overrides,
        "store": root / "store.zarr",
        "run": root / "run",
        "teacher": tiny_teacher,
        "other_quantized": other_quantized,
        "not_store": root / "not-a-store",
        "other_store": other_store,
        "packed": root / "packed.zip",
        "users": users,
        "with_notes": with_notes,
        "deep_notes": deep_notes,
        "runs": runs,
        "data": data,
        "shipped_code": shipped_code,
        "marker": marker,
    }


def fingerprint(path: Path) -> dict[str, str]:
    """Digest of every file (a folder's, or the one file), lock files aside."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {
        str(p.relative_to(path)): hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
        for p in files
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


def resume_args(world, *extra: str) -> list[str]:
    """Tune into the finished run again, with its own settings unless `extra` changes them."""
    tune_keys = {k: v for k, v in world["overrides"].items() if k.startswith(("tune.", "store"))}
    return ["tune", *cli_args(tune_keys), *extra]


def user(world, name: str) -> str:
    return str(world["users"] / name)


def run_copy(world, name: str) -> str:
    return str(world["runs"] / name)


def file_url(path: Path) -> str:
    return f"file://{path}"


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
    # Nothing lost: a command replaces or deletes only what this program wrote.
    (
        "targets --overwrite on a folder with its own manifest.json",
        lambda w: targets(w, "--store", user(w, "web-app"), "--overwrite"),
        "is not a dwq-pipeline store",
    ),
    (
        "targets --overwrite on a split inside a store",
        lambda w: targets(w, "--store", str(w["store"] / "train"), "--overwrite"),
        "lies inside the store",
    ),
    (
        "targets --overwrite on a store holding a user's file",
        lambda w: targets(w, "--store", str(w["with_notes"]), "--overwrite"),
        "notes.txt, which dwq-pipeline did not write",
    ),
    (
        "targets store inside the teacher's folder",
        lambda w: targets(w, "--store", str(w["teacher"] / "s.zarr")),
        "overlap",
    ),
    (
        "targets store is the data folder",
        lambda w: targets(w, "--store", str(w["data"])),
        "overlap",
    ),
    (
        "store pack of a zip onto itself",
        lambda w: ["store", "pack", str(w["packed"]), str(w["packed"]), "--overwrite"],
        "is the store",
    ),
    (
        "store pack into the store",
        lambda w: ["store", "pack", str(w["store"]), str(w["store"] / "s.zip")],
        "lies inside it",
    ),
    (
        "store pack over an existing zip",
        lambda w: ["store", "pack", str(w["store"]), str(w["packed"])],
        "pass --overwrite",
    ),
    (
        "store pack --overwrite over a user's zip",
        lambda w: ["store", "pack", str(w["store"]), user(w, "photos.zip"), "--overwrite"],
        "not written by `dwq-pipeline store pack`",
    ),
    (
        "store merge into one of its inputs",
        lambda w: ["store", "merge", str(w["store"]), str(w["store"])],
        "must not be, contain or lie inside",
    ),
    (
        "store merge into a folder inside an input",
        lambda w: ["store", "merge", str(w["store"] / "merged"), str(w["store"])],
        "must not be, contain or lie inside",
    ),
    (
        "store merge into a user's folder",
        lambda w: ["store", "merge", user(w, "web-app"), str(w["store"])],
        "is not a dwq-pipeline store",
    ),
    (
        "tune into a folder with its own metrics.jsonl and model/",
        lambda w: tune_args(w, "--run-dir", user(w, "own-run"), "--overwrite"),
        "is not a tune run folder",
    ),
    (
        "tune run folder is a file",
        lambda w: tune_args(w, "--run-dir", str(w["root"] / "a-file")),
        "is a file",
    ),
    (
        "tune run folder under a file",
        lambda w: tune_args(w, "--run-dir", str(w["root"] / "a-file" / "run")),
        "lies under the file",
    ),
    (
        "store pack under a file",
        lambda w: ["store", "pack", str(w["store"]), str(w["root"] / "a-file" / "s.zip")],
        "lies under the file",
    ),
    (
        "tune run folder inside the store",
        lambda w: tune_args(w, "--run-dir", str(w["store"] / "run")),
        "overlap",
    ),
    (
        "tune resume with other settings (settings file kept)",
        lambda w: resume_args(w, "--learning-rate", "0.5"),
        "other settings",
    ),
    (
        "tune resume on another store",
        lambda w: resume_args(w, "--store", str(w["other_store"])),
        "made on another store",
    ),
    (
        "eval --save over a user's file",
        lambda w: ["eval", *cli_args(w["overrides"]), "--save", user(w, "results.json")],
        "is not an eval JSON",
    ),
    (
        "eval --save into the store",
        lambda w: ["eval", *cli_args(w["overrides"]), "--save", str(w["store"] / "eval.json")],
        "overlap",
    ),
    (
        "eval --save into the student",
        lambda w: [
            "eval",
            *cli_args(w["overrides"]),
            "--save",
            str(w["run"] / MODEL_DIR / "e.json"),
        ],
        "overlap",
    ),
    (
        "targets --overwrite on a store holding a user's file in a split",
        lambda w: targets(w, "--store", str(w["deep_notes"]), "--overwrite"),
        "records/notes.txt, which dwq-pipeline did not write",
    ),
    (
        "targets --overwrite on a tune run folder",
        lambda w: targets(w, "--store", str(w["run"]), "--overwrite"),
        "is a tune run folder, not a store",
    ),
    (
        "targets store in memory (gone at exit)",
        lambda w: targets(w, "--store", "memory://x.zarr"),
        "lost at exit",
    ),
    ("targets with an empty teacher", lambda w: targets(w, "--teacher", ""), "must not be empty"),
    ("store pack of an empty path", lambda w: ["store", "pack", "", "x.zip"], "must not be empty"),
    ("store info of an empty path", lambda w: ["store", "info", ""], "must not be empty"),
    (
        "tune --overwrite with a user's file in model/",
        lambda w: resume_args(w, "--run-dir", run_copy(w, "model-notes"), "--overwrite"),
        "my_notes.txt was not written by dwq-pipeline",
    ),
    (
        "tune --overwrite with a user's file in checkpoint/",
        lambda w: resume_args(w, "--run-dir", run_copy(w, "checkpoint-notes"), "--overwrite"),
        "mine.txt was not written by dwq-pipeline",
    ),
    (
        "tune with a user's model.old/",
        lambda w: resume_args(w, "--run-dir", run_copy(w, "model-old")),
        "keep.txt was not written by dwq-pipeline",
    ),
    (
        "tune into a store",
        lambda w: tune_args(w, "--run-dir", str(w["other_store"])),
        "is a dwq-pipeline store, not a tune run folder",
    ),
    (
        "tune run folder inside the store named by a file:// URL",
        lambda w: tune_args(w, "--store", file_url(w["store"]), "--run-dir", str(w["store"] / "x")),
        "overlap",
    ),
    (
        "store pack into the store named by a file:// URL",
        lambda w: ["store", "pack", file_url(w["store"]), str(w["store"] / "in.zip")],
        "lies inside it",
    ),
    (
        "eval --save into the store named by a file:// URL",
        lambda w: [
            "eval",
            *cli_args({**w["overrides"], "store": file_url(w["store"])}),
            "--save",
            str(w["store"] / "e.json"),
        ],
        "overlap",
    ),
    (
        "store merge into its input named by a file:// URL",
        lambda w: ["store", "merge", str(w["store"]), file_url(w["store"])],
        "must not be, contain or lie inside",
    ),
    (
        "store merge into a URL",
        lambda w: ["store", "merge", "s3://bucket/merged.zarr", str(w["store"])],
        "writes a local folder",
    ),
    (
        "store merge into a tune run folder",
        lambda w: ["store", "merge", str(w["run"]), str(w["store"])],
        "is a tune run folder, not a store",
    ),
    (
        "report over a user's report.md",
        lambda w: ["report", run_copy(w, "own-report")],
        "not written by `dwq-pipeline report`",
    ),
    (
        "report over a user's report.png",
        lambda w: ["report", run_copy(w, "own-plot")],
        "not written by `dwq-pipeline report`",
    ),
    (
        "report of a user's folder",
        lambda w: ["report", user(w, "own-run")],
        "not a tune run folder",
    ),
    (
        "report of a metrics log that is garbage throughout",
        lambda w: ["report", user(w, "garbage-run")],
        "is not a metrics log",
    ),
]


@pytest.mark.parametrize("name, make_args, expected", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_clear_line_and_harms_nothing(world, name, make_args, expected):
    guarded = ("store", "run", "not_store", "other_store", "packed", "users", "with_notes")
    guarded += ("deep_notes", "runs")
    guarded += ("teacher", "data")
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


def test_overwrite_replaces_our_store_also_one_from_before_the_mark(world, tmp_path):
    legacy = tmp_path / "legacy.zarr"  # a store written before the mark file: the zarr attribute
    shutil.copytree(world["store"], legacy)
    (legacy / MARK_FILE).unlink()
    assert not has_mark(legacy, "store") and owns_store(legacy)
    result = runner.invoke(app, targets(world, "--store", str(legacy)))
    assert result.exit_code == 0, result.output
    assert has_mark(legacy, "store")  # resumed (nothing to compute), and marked from now on
    (legacy / MARK_FILE).unlink()
    seven = ("--set", "targets.seed=7", "--overwrite")
    result = runner.invoke(app, targets(world, "--store", str(legacy), *seven))
    assert result.exit_code == 0, result.output
    assert StoreReader(legacy).manifest.settings["seed"] == 7 and has_mark(legacy, "store")
    assert [p.name for p in tmp_path.iterdir()] == ["legacy.zarr"]  # nothing left beside it


def test_pack_overwrite_replaces_a_zip_it_wrote(world, tmp_path):
    packed = tmp_path / "store.zip"
    shutil.copy(world["packed"], packed)
    args = ["store", "pack", str(world["other_store"]), str(packed), "--overwrite"]
    assert runner.invoke(app, args).exit_code == 0
    assert StoreReader(packed).manifest.settings["seed"] == 7


def test_resume_drops_a_torn_metrics_line_and_overwrite_keeps_a_users_file(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    logged = (run / METRICS_FILE).read_text()
    with open(run / METRICS_FILE, "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a crash in the middle of an append
    (run / MARK_FILE).unlink()  # a run folder from before the mark: known by its settings file
    config = load_config(None, {**world["overrides"], "tune.run_dir": str(run)}).tune
    assert tune(config).steps == 2
    assert (run / METRICS_FILE).read_text() == logged and has_mark(run, "run")
    (run / "notes.txt").write_text("mine")
    assert tune(config, overwrite=True).steps == 2  # deletes the checkpoint and metrics only
    assert (run / "notes.txt").read_text() == "mine"


def test_eval_save_replaces_only_an_eval_json(world, tmp_path):
    config = load_config(None, world["overrides"]).eval
    ours = tmp_path / "eval.json"
    ours.write_text(json.dumps({"program": "dwq-pipeline", "kind": "eval", "models": {}}))
    check_save_path(ours, config)  # an eval JSON this program wrote may be replaced
    ours.write_text(json.dumps({"models": {}}))
    with pytest.raises(StageError, match="not an eval JSON"):
        check_save_path(ours, config)


def test_overwrite_through_a_symlink_replaces_the_store_it_points_to(world, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(world["store"], store)
    (tmp_path / "link").symlink_to(store)
    seven = ("--set", "targets.seed=7", "--overwrite")
    result = runner.invoke(app, targets(world, "--store", str(tmp_path / "link"), *seven))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == store
    assert StoreReader(store).manifest.settings["seed"] == 7 and has_mark(store, "store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "store.zarr"]


def test_pack_of_a_packed_store_holds_the_same_files(world, tmp_path):
    again = tmp_path / "again.zip"
    result = runner.invoke(app, ["store", "pack", str(world["packed"]), str(again)])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(world["packed"]) as first, zipfile.ZipFile(again) as second:
        assert sorted(first.namelist()) == sorted(second.namelist())
        assert all(first.read(n) == second.read(n) for n in first.namelist())
    assert StoreReader(again).manifest == StoreReader(world["packed"]).manifest


def test_a_file_url_names_the_local_folder(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, targets(world, "--store", file_url(tmp_path / "url.zarr")))
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged.zarr"
    result = runner.invoke(app, ["store", "merge", file_url(merged), str(tmp_path / "url.zarr")])
    assert result.exit_code == 0, result.output
    assert StoreReader(merged).manifest == StoreReader(world["store"]).manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.zarr", "url.zarr"]


def test_report_replaces_only_its_own_report(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for _ in range(2):  # the second run replaces what the first wrote
        result = runner.invoke(app, ["report", str(run)])
        assert result.exit_code == 0, result.output
    assert (run / "report.md").read_text().startswith("<!-- written by dwq-pipeline report")
    assert b"dwq-pipeline report" in (run / "report.png").read_bytes()  # the PNG's Software text
