"""One contract for every kind of store location: a folder, a zip made by `store pack`, and an
fsspec URL (S3 on moto's real server). Each shows the same keys and bytes, opens as the same
zarr group, and a reader over it gives the same manifest, records and decoded targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import load_config
from stages.targets import compute_targets
from store.layout import MANIFEST_FILE, SEQUENCE_ARRAYS, TARGET_ARRAYS, record_key, records_dir
from store.location import FolderLocation, FsspecLocation, ZipLocation, open_location
from store.pack import pack_store
from store.reader import StoreReader, stream_batches
from tests.conftest import make_text_data

KINDS = {"folder": FolderLocation, "zip": ZipLocation, "s3": FsspecLocation}


@pytest.fixture(scope="module")
def folder_store(tiny_teacher, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("locations")
    make_text_data(folder / "data")
    overrides = {
        "store": str(folder / "store.zarr"),
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(folder / "data"),
        "targets.top_k": 8,
        "targets.max_seq_length": 9,
        "targets.num_samples": 6,
        "targets.num_valid_samples": 2,
        "targets.chunk_size": 4,
    }
    config = load_config(None, overrides)
    compute_targets(config.targets)
    return Path(config.targets.store)


@pytest.fixture(scope="module")
def zip_store(folder_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "store.zip"
    pack_store(folder_store, out)
    return out


@pytest.fixture(params=list(KINDS))
def location(request, folder_store, zip_store):
    """(kind, the store opened at a location of that kind)."""
    if request.param == "folder":
        return request.param, open_location(folder_store)
    if request.param == "zip":
        return request.param, open_location(zip_store)
    import s3fs

    endpoint = request.getfixturevalue("s3_endpoint")
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("stores")
    fs.put(str(folder_store), "stores/store.zarr", recursive=True)
    return request.param, open_location("s3://stores/store.zarr", {"endpoint_url": endpoint})


def test_each_kind_has_its_own_class(location):
    kind, opened = location
    assert type(opened) is KINDS[kind]


def test_keys_and_bytes_are_those_of_the_folder(location, folder_store):
    _, opened = location
    folder = FolderLocation(folder_store)
    assert opened.exists() and opened.exists(MANIFEST_FILE)
    assert not opened.exists("no/such/key")
    assert opened.read_bytes(MANIFEST_FILE) == (folder_store / MANIFEST_FILE).read_bytes()
    absent = record_key("train", 999)
    assert opened.read_bytes(absent) is None
    present = record_key("train", 0)
    assert opened.read_many([present, absent]) == {
        present: (folder_store / present).read_bytes(),
        absent: None,
    }
    for prefix in (records_dir("train"), "valid/topk_logits"):
        assert opened.keys_under(prefix) == folder.keys_under(prefix) != {}
    assert opened.keys_under("no/such/prefix") == {}


def test_zarr_store_reads_the_same_arrays(location, folder_store):
    _, opened = location
    ours = zarr.open_group(opened.zarr_store(), mode="r")
    reference = zarr.open_group(FolderLocation(folder_store).zarr_store(), mode="r")
    for split in ("train", "valid"):
        for name in (*SEQUENCE_ARRAYS, *TARGET_ARRAYS):
            assert np.array_equal(ours[split][name][...], reference[split][name][...])


def test_a_reader_gives_the_same_manifest_records_and_targets(location, folder_store):
    _, opened = location
    ours, reference = StoreReader(opened), StoreReader(folder_store)
    assert ours.manifest == reference.manifest
    assert ours.records() == reference.records() and ours.records()["train"]
    for split, shape in reference.manifest.splits.items():
        assert ours.missing_chunks(split) == reference.missing_chunks(split) == []
        batches = [[row] for row in range(shape.num_sequences)]
        for a, b in zip(
            stream_batches(ours, split, batches),
            stream_batches(reference, split, batches),
            strict=True,
        ):
            assert a.keys() == b.keys()
            assert all(np.array_equal(a[name], b[name]) for name in a)
