"""Stores read from a zip (`store pack`), over HTTP and from S3 (moto's real server on
127.0.0.1): verify, info and tune work on each, and tuning gives the same weights as from the
folder."""

from __future__ import annotations

import errno
import os
import sys
import time
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pipeline.config import load_config
from stages.targets import compute_targets
from stages.tune import tune
from store.inspect import store_info, verify_store
from store.reader import StoreReader
from tests.conftest import cli_args, free_ports, local_server, make_text_data, run_cli


@pytest.fixture(scope="module")
def made(tiny_teacher, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("remote")
    make_text_data(folder / "data")
    overrides = {
        "store": str(folder / "served" / "store.zarr"),
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(folder / "data"),
        "targets.top_k": 16,
        "targets.tail_samples": 4,  # every target array a store may hold
        "targets.max_seq_length": 17,
        "targets.num_samples": 12,
        "targets.num_valid_samples": 2,
        "targets.chunk_size": 3,
        "tune.group_size": 32,
        "tune.max_steps": 3,
    }
    config = load_config(None, overrides)
    compute_targets(config.targets)
    local = tune(load_config(None, {**overrides, "tune.run_dir": str(folder / "local")}).tune)
    return {
        "folder": folder,
        "store": Path(config.targets.store),
        "overrides": overrides,
        "local_weights": weights(local.model_dir),
    }


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}


def tune_from(made: dict, store: str, run_dir: Path, **storage_options) -> dict[str, np.ndarray]:
    overrides = {**made["overrides"], "store": store, "tune.run_dir": str(run_dir)}
    if storage_options:
        overrides["storage_options"] = storage_options
    return weights(tune(load_config(None, overrides).tune).model_dir)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- zip -------------------------------------------------------------------------------------


def test_packed_store_verifies_and_tunes_like_the_folder(made, tmp_path):
    packed = tmp_path / "store.zip"
    done = run_cli("store", "pack", str(made["store"]), str(packed))
    assert done.returncode == 0, done.stderr
    assert verify_store(packed) == []
    info = store_info(packed)
    assert info.complete and info.splits["train"].sequences == 12
    assert run_cli("store", "verify", str(packed)).returncode == 0
    assert_same_weights(made["local_weights"], tune_from(made, str(packed), tmp_path / "run"))


def test_a_damaged_member_of_a_packed_store_is_named(made, tmp_path):
    packed = tmp_path / "store.zip"
    assert run_cli("store", "pack", str(made["store"]), str(packed)).returncode == 0
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(packed) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "train/topk_logits/c/1/0/0":
                data = (
                    data[: len(data) // 2]
                    + bytes([data[len(data) // 2] ^ 0x20])
                    + data[len(data) // 2 + 1 :]
                )
            target.writestr(item, data)
    problems = verify_store(damaged)
    assert len(problems) == 1 and problems[0].startswith("train/1:")


def test_targets_refuses_to_write_into_a_zip(made, tmp_path):
    done = run_cli("targets", *cli_args({**made["overrides"], "store": str(tmp_path / "s.zip")}))
    assert done.returncode == 2 and "not " + str(tmp_path / "s.zip") in done.stderr


# ---- http ------------------------------------------------------------------------------------


@pytest.fixture
def http_server(made):
    port = free_ports(1)
    folder = str(made["store"].parent)
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with local_server([*command, "--directory", folder], port) as url:
        yield url


def test_store_served_over_http_verifies_and_tunes_like_the_folder(made, http_server, tmp_path):
    url = f"{http_server}/store.zarr"
    assert verify_store(url) == []
    assert store_info(url).complete
    assert_same_weights(made["local_weights"], tune_from(made, url, tmp_path / "run"))


# ---- s3 (moto's standalone server) -----------------------------------------------------------


@pytest.fixture
def s3_store(made, s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("stores")
    fs.put(str(made["store"]), "stores/store.zarr", recursive=True)
    return {"url": "s3://stores/store.zarr", "endpoint": s3_endpoint}


def test_store_on_s3_verifies_and_tunes_like_the_folder(made, s3_store, tmp_path):
    options = {"endpoint_url": s3_store["endpoint"]}
    assert verify_store(s3_store["url"], options) == []
    assert_same_weights(
        made["local_weights"], tune_from(made, s3_store["url"], tmp_path / "run", **options)
    )
    done = run_cli(
        "store",
        "verify",
        s3_store["url"],
        "--storage-option",
        f"endpoint_url={s3_store['endpoint']}",
    )
    assert done.returncode == 0, done.stderr
    missing = run_cli(
        "store",
        "info",
        "s3://stores/nothing.zarr",
        "--storage-option",
        f"endpoint_url={s3_store['endpoint']}",
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_unknown_url_scheme_is_one_clear_line(tmp_path):
    done = run_cli("store", "verify", "nosuch://bucket/store.zarr")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def remote_records(fs, url: str) -> dict[str, str]:
    """record key -> its ETag-like identity (modification time and size) on the server."""
    root = url.removeprefix("s3://")
    return {
        path: f"{info.get('LastModified')}/{info['size']}"
        for path, info in fs.find(f"{root}/records", detail=True).items()
    }


def assert_same_records_as(url: str, endpoint: str, reference_store) -> None:
    """The store at `url` verifies and holds the reference store's chunks, checksum for checksum."""
    options = {"endpoint_url": endpoint}
    assert verify_store(url, options) == []
    ours, reference = StoreReader(url, options), StoreReader(reference_store)
    for split, records in reference.records().items():
        assert {c: r.checksums for c, r in ours.records()[split].items()} == {
            c: r.checksums for c, r in records.items()
        }


def test_targets_writes_to_s3_and_resumes_from_what_is_there(made, s3_store, tmp_path):
    import s3fs

    url, endpoint = "s3://stores/written.zarr", s3_store["endpoint"]

    def targets_on(machine: str):
        overrides = {
            **made["overrides"],
            "store": url,
            "targets.staging_dir": str(tmp_path / machine),
        }
        return run_cli(
            "targets", *cli_args(overrides), "--storage-option", f"endpoint_url={endpoint}"
        )

    done = targets_on("a")
    assert done.returncode == 0, done.stderr
    assert_same_records_as(url, endpoint, made["store"])
    options = {"endpoint_url": endpoint}

    # Another machine (no staging folder) resumes after two records vanished remotely.
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    before = remote_records(fs, url)
    lost = sorted(before)[:2]
    for key in lost:
        fs.rm(key)
    time.sleep(1.1)  # S3 modification times have one-second resolution
    again = targets_on("b")
    assert again.returncode == 0, again.stderr
    after = remote_records(fs, url)
    assert after.keys() == before.keys()
    changed = {key for key in after if after[key] != before[key]}
    assert changed == set(lost)  # exactly the lost chunks were computed and uploaded again
    assert verify_store(url, options) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_failed_upload_stops_cleanly_and_resumes(made, s3_store, tmp_path, monkeypatch, code):
    """An upload failing after two chunks: one line, those two kept remotely, a re-run ends
    with the same store as one uninterrupted run."""
    import s3fs
    from typer.testing import CliRunner

    from pipeline.cli import app
    from store.publish import Publisher

    url, endpoint = "s3://stores/failing.zarr", s3_store["endpoint"]
    overrides = {**made["overrides"], "store": url, "targets.staging_dir": str(tmp_path / "stage")}
    args = ["targets", *cli_args(overrides), "--storage-option", f"endpoint_url={endpoint}"]
    uploaded: list[str] = []

    def failing(put_file):
        def put(lpath, rpath, *rest, **kwargs):
            if len(uploaded) == 2 and "/c/" in str(rpath):  # the third chunk's first array
                raise OSError(code, os.strerror(code))
            done = put_file(lpath, rpath, *rest, **kwargs)
            if "/records/" in str(rpath):
                uploaded.append(rpath)
            return done

        return put

    with monkeypatch.context() as patches:
        real_init = Publisher.__init__

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            patches.setattr(self.fs, "put_file", failing(self.fs.put_file))

        patches.setattr(Publisher, "__init__", init)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert os.strerror(code) in result.output and "re-run" in result.output
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    assert len(remote_records(fs, url)) == 2  # the chunks uploaded before are kept

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert_same_records_as(url, endpoint, made["store"])
