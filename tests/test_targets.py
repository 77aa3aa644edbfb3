"""Stage one on a tiny teacher: correctness, resume, shards, merge, verify, bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from stages.models import load_model
from stages.targets import Progress, Shard, compute_targets, topk_targets
from store.errors import StoreMismatchError, StoreOutdatedError
from store.inspect import store_info, verify_store
from store.layout import (
    MANIFEST_FILE,
    TARGET_ARRAYS,
    bfloat16_bits_to_float32,
    decode_logits,
    encode_logits,
)
from store.reader import StoreReader, stream_batches
from store.writer import merge_stores
from tests.conftest import cli_args, make_tiny_model_folder, run_cli, start_cli
from tests.tail_mass import (
    logsumexp64,
    old_head_mass,
    sharpen,
    stored_bucket_logprobs,
    true_bucket_logprobs,
    true_tail_logsumexp,
)

runner = CliRunner()


def config_for(overrides: dict, **extra):
    return load_config(None, {**overrides, **extra}).targets


def stored_arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {f"{s}/{a}": group[s][a][...] for s in ("train", "valid") for a in group[s].array_keys()}


def assert_same_store(a: Path, b: Path) -> None:
    left, right = stored_arrays(a), stored_arrays(b)
    assert left.keys() == right.keys()
    for key in left:
        assert np.array_equal(left[key], right[key]), key
    assert StoreReader(a).records().keys() == StoreReader(b).records().keys()
    for split, records in StoreReader(a).records().items():
        theirs = StoreReader(b).records()[split]
        assert {c: r.checksums for c, r in records.items()} == {
            c: r.checksums for c, r in theirs.items()
        }


def test_stored_topk_matches_independent_recomputation(tiny_targets_overrides, tiny_teacher):
    config = config_for(tiny_targets_overrides)
    manifest = compute_targets(config)
    reader = StoreReader(Path(config.store))
    teacher = load_model(str(tiny_teacher)).model
    for split, shape in manifest.splits.items():
        tokens = reader.sequences(split)["tokens"]
        logits = np.array(teacher(mx.array(tokens[:, :-1])).astype(mx.float32))
        stored = {
            n: np.concatenate([reader.read_targets(split, c)[n] for c in range(shape.num_chunks)])
            for n in TARGET_ARRAYS
        }
        expected_idx = np.sort(np.argsort(-logits, axis=-1)[..., : config.top_k], axis=-1)
        assert np.array_equal(stored["topk_indices"], expected_idx)
        np.testing.assert_allclose(
            stored["topk_logits"],
            np.take_along_axis(logits, expected_idx, -1),
            rtol=1e-6,
            atol=1e-6,
        )
        for i, t in enumerate(config.lse_temperatures):  # float32 logits: no rounding shift
            tail = true_tail_logsumexp(logits, expected_idx, t)
            np.testing.assert_allclose(stored["tail_logsumexp"][..., i], tail, rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_round_trip_exactly(tiny_targets_overrides, tiny_teacher):
    config = config_for(tiny_targets_overrides, **{"targets.logits_dtype": "bfloat16"})
    compute_targets(config)
    reader = StoreReader(Path(config.store))
    teacher = load_model(str(tiny_teacher)).model
    tokens = reader.sequences("valid")["tokens"][:3]
    values = reader.read_targets("valid", 0)
    logits = teacher(mx.array(tokens[:, :-1])).astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.array(values["topk_indices"].astype(np.int32)), -1)
    as_bf16_bits = np.array(picked.astype(mx.bfloat16).view(mx.uint16))
    assert values["topk_logits"].dtype == np.uint16
    assert np.array_equal(values["topk_logits"], as_bf16_bits)
    np.testing.assert_allclose(
        reader.logits_as_float32("valid", values["topk_logits"]), np.array(picked), rtol=1e-2
    )
    assert bfloat16_bits_to_float32(np.array([0x3F80], np.uint16))[0] == 1.0


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory) -> Path:
    return sharpen(make_tiny_model_folder(tmp_path_factory.mktemp("sharp") / "teacher"))


def all_targets(reader: StoreReader, split: str) -> dict[str, np.ndarray]:
    chunks = range(reader.manifest.splits[split].num_chunks)
    parts = [reader.read_targets(split, c) for c in chunks]
    return {name: np.concatenate([p[name] for p in parts]) for name in TARGET_ARRAYS}


def test_bfloat16_head_and_stored_tail_are_the_teachers_exact_distribution(
    tiny_targets_overrides, sharp_teacher
):
    """The rounded head plus the stored tail sum to 1 at every position and temperature, and the
    tail's mass is the teacher's exact one; on the same store, schema 1's construction (rounded
    head against the full logsumexp) was not a distribution at a good share of positions."""
    config = config_for(
        tiny_targets_overrides,
        **{"targets.teacher": str(sharp_teacher), "targets.logits_dtype": "bfloat16"},
    )
    assert config.lse_temperatures == [1.0, 2.0]
    compute_targets(config)
    reader = StoreReader(Path(config.store))
    teacher = load_model(str(sharp_teacher)).model
    old_not_a_distribution = []
    for split in ("train", "valid"):
        tokens = reader.sequences(split)["tokens"]
        logits = np.array(teacher(mx.array(tokens[:, :-1])).astype(mx.float32))
        stored = all_targets(reader, split)
        indices = stored["topk_indices"]
        head = reader.logits_as_float32(split, stored["topk_logits"])
        exact_head = np.take_along_axis(logits, indices.astype(np.int64), -1)
        for i, t in enumerate(config.lse_temperatures):
            tail = stored["tail_logsumexp"][..., i]
            buckets = np.exp(stored_bucket_logprobs(head, tail, t))
            assert np.abs(buckets.sum(-1) - 1).max() <= 1e-3
            # the stored value: the tail's own log-sum-exp, shifted by the head's rounding
            shift = logsumexp64(head / t) - logsumexp64(exact_head / t)
            reference = true_tail_logsumexp(logits, indices, t) + shift
            np.testing.assert_allclose(tail, reference, rtol=0, atol=1e-4)
            true_tail = true_bucket_logprobs(logits, indices, t)[..., -1]
            np.testing.assert_allclose(np.log(buckets[..., -1]), true_tail, rtol=0, atol=1e-4)
            old_not_a_distribution.append(old_head_mass(head, logits, t) > 1 + 1e-6)
    share = np.concatenate([a.ravel() for a in old_not_a_distribution]).mean()
    print(f"schema 1's head mass exceeded 1 at {share:.1%} of positions")
    assert share > 0.05


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "uint8"])
def test_extracted_tail_gives_the_exact_mass_for_every_dtype_and_k(dtype):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 3, 50)) * 8).astype(np.float32)
    step = 0.1 if dtype == "uint8" else None  # uint8 over the whole vocabulary: some clipped
    for k in (5, 50):  # 50: the whole vocabulary, an empty tail
        out = topk_targets(logits, k, [1.0, 2.0], dtype, step)
        head = decode_logits(encode_logits(out["topk_logits"], dtype, step), dtype, step)
        for i, t in enumerate([1.0, 2.0]):
            ours = stored_bucket_logprobs(head, out["tail_logsumexp"][..., i], t)[..., -1]
            exact = true_bucket_logprobs(logits, out["topk_indices"], t)[..., -1]
            np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-5)


STEP = 0.1


def test_uint8_logits_read_back_within_half_a_step_and_the_buckets_are_exact(
    tiny_targets_overrides, sharp_teacher
):
    """What tune streams from a uint8 store: each position's logits relative to its largest,
    within step/2 of the teacher's (at the last code where they lie beyond the range), buckets
    summing to 1 with the teacher's exact tail mass at every temperature, and head buckets off
    by at most one step's worth of log-probability."""
    config = config_for(
        tiny_targets_overrides,
        **{
            "targets.teacher": str(sharp_teacher),
            "targets.logits_dtype": "uint8",
            "targets.logit_step": STEP,
        },
    )
    compute_targets(config)
    reader = StoreReader(Path(config.store))
    assert reader.manifest.splits["train"].logit_step == STEP
    assert reader.manifest.settings["logit_step"] == STEP
    teacher = load_model(str(sharp_teacher)).model
    last = -255 * STEP
    beyond_range, checked_unclipped = [], 0
    for split, shape in reader.manifest.splits.items():
        streamed = next(stream_batches(reader, split, [list(range(shape.num_sequences))]))
        tokens = reader.sequences(split)["tokens"]
        logits = np.array(teacher(mx.array(tokens[:, :-1])).astype(mx.float32))
        indices, head = streamed["topk_indices"], streamed["topk_logits"]
        exact_head = np.take_along_axis(logits, indices, -1)
        below_largest = exact_head - logits.max(-1, keepdims=True)
        at_last = head == np.float32(last)
        assert np.abs(head - below_largest)[~at_last].max() <= STEP / 2 + 1e-5
        assert below_largest[at_last].max(initial=last) <= last + STEP / 2 + 1e-5
        beyond_range.append(below_largest < last - STEP)
        for i, t in enumerate(config.lse_temperatures):
            buckets = stored_bucket_logprobs(head, streamed["tail_logsumexp"][..., i], t)
            assert np.abs(np.exp(buckets).sum(-1) - 1).max() <= 1e-4
            exact = true_bucket_logprobs(logits, indices, t)
            np.testing.assert_allclose(buckets[..., -1], exact[..., -1], rtol=0, atol=1e-4)
            # where nothing was clipped, each head bucket is off by its own rounding and the
            # renormalisation, each at most step/2 (clipped logits, raised, take some head mass)
            unclipped = ~at_last.any(-1)
            head_error = np.abs(buckets[..., :-1] - exact[..., :-1])[unclipped]
            assert head_error.max(initial=0) <= STEP / t + 1e-4
            checked_unclipped += unclipped.sum()
    share = np.concatenate([b.ravel() for b in beyond_range]).mean()
    assert 0 < share < 0.5 and checked_unclipped > 0  # every case was met


def make_schema_1(store: Path) -> None:
    """Turn a store into what dwq-pipeline wrote before the exact tail (manifest schema 1)."""
    manifest = json.loads((store / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 1
    for split, arrays in manifest["arrays"].items():
        arrays["logsumexp"] = arrays.pop("tail_logsumexp")
        (store / split / "tail_logsumexp").rename(store / split / "logsumexp")
    (store / MANIFEST_FILE).write_text(json.dumps(manifest))
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["dwq_pipeline_schema"] = 1


def test_a_store_of_the_old_schema_is_refused_with_the_rebuild_command(
    tiny_targets_overrides, tmp_path
):
    config = config_for(tiny_targets_overrides)
    compute_targets(config)
    store = Path(config.store)
    make_schema_1(store)
    before = stored_arrays(store)
    with pytest.raises(StoreOutdatedError, match="older dwq-pipeline"):
        StoreReader(store)
    for args in (["store", "verify", str(store)], ["store", "info", str(store)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "`dwq-pipeline targets --overwrite`" in result.output
        assert len(result.output.strip().splitlines()) == 1
    tuned = runner.invoke(app, ["tune", "--store", str(store), "--run-dir", str(tmp_path / "r")])
    assert tuned.exit_code == 2 and "targets --overwrite" in tuned.output, tuned.output
    resumed = cli_targets(tiny_targets_overrides)
    assert resumed.exit_code == 2 and "targets --overwrite" in resumed.output, resumed.output
    after = stored_arrays(store)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert cli_targets(tiny_targets_overrides, "--overwrite").exit_code == 0
    assert verify_store(store) == []


class Crash(Exception):
    pass


@pytest.mark.parametrize("samples", [0, 4])
def test_interrupted_run_resumes_to_the_same_store(tiny_targets_overrides, tmp_path, samples):
    tiny_targets_overrides = {**tiny_targets_overrides, "targets.tail_samples": samples}
    whole = config_for(tiny_targets_overrides, store=str(tmp_path / "whole.zarr"))
    compute_targets(whole)
    broken = config_for(tiny_targets_overrides, store=str(tmp_path / "broken.zarr"))

    def crash_after_three(progress: Progress) -> None:
        if progress.chunks_done == 3:
            raise Crash()

    with pytest.raises(Crash):
        compute_targets(broken, on_progress=crash_after_three)
    done = sum(len(r) for r in StoreReader(Path(broken.store)).records().values())
    assert 1 <= done <= 3
    seen = []
    compute_targets(broken, on_progress=seen.append)
    assert seen[-1].chunks_total == len(seen)
    total = sum(s.num_chunks for s in StoreReader(Path(broken.store)).manifest.splits.values())
    assert len(seen) == total - done  # nothing done twice
    assert_same_store(Path(whole.store), Path(broken.store))


def test_rerun_of_a_complete_store_computes_nothing(tiny_targets_overrides):
    config = config_for(tiny_targets_overrides)
    compute_targets(config)
    seen = []
    compute_targets(config, on_progress=seen.append)
    assert seen == []


def test_two_shard_processes_equal_one_process(tiny_targets_overrides, tmp_path):
    single = config_for(tiny_targets_overrides, store=str(tmp_path / "single.zarr"))
    compute_targets(single)
    shared = tmp_path / "shared.zarr"
    args = cli_args({k: v for k, v in tiny_targets_overrides.items() if k != "store"})
    procs = [
        start_cli("targets", "--store", str(shared), "--shard", f"{i}/2", *args) for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert_same_store(Path(single.store), shared)


@pytest.mark.parametrize("dtype, samples", [("float32", 0), ("uint8", 0), ("uint8", 4)])
def test_shard_stores_merge_into_the_same_store(tiny_targets_overrides, tmp_path, dtype, samples):
    tiny_targets_overrides = {
        **tiny_targets_overrides,
        "targets.logits_dtype": dtype,
        "targets.tail_samples": samples,
    }
    single = config_for(tiny_targets_overrides, store=str(tmp_path / "single.zarr"))
    compute_targets(single)
    parts = []
    for i in range(2):
        part = config_for(tiny_targets_overrides, store=str(tmp_path / f"part{i}.zarr"))
        compute_targets(part, shard=Shard(i, 2))
        parts.append(Path(part.store))
    assert not store_info(parts[0]).complete
    merge_stores(tmp_path / "merged.zarr", parts)
    assert_same_store(Path(single.store), tmp_path / "merged.zarr")
    assert verify_store(tmp_path / "merged.zarr") == []


@pytest.mark.parametrize(
    "dtype, array",
    [("float32", "topk_logits"), ("uint8", "topk_logits"), ("uint8", "tail_samples")],
)
def test_verify_catches_a_flipped_byte(tiny_targets_overrides, dtype, array):
    samples = 4 if array == "tail_samples" else 0
    config = config_for(
        tiny_targets_overrides,
        **{"targets.logits_dtype": dtype, "targets.tail_samples": samples},
    )
    compute_targets(config)
    store = Path(config.store)
    assert runner.invoke(app, ["store", "verify", str(store)]).exit_code == 0
    chunk = store / "train" / array / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    problems = verify_store(store)
    assert len(problems) == 1 and problems[0].startswith("train/1")
    result = runner.invoke(app, ["store", "verify", str(store)])
    assert result.exit_code == 1
    assert "train/1" in result.output


def test_store_info_reports_sizes(tiny_targets_overrides):
    config = config_for(tiny_targets_overrides)
    compute_targets(config)
    info = store_info(Path(config.store))
    assert info.complete and info.top_k == config.top_k
    assert info.splits["train"].sequences == config.num_samples
    assert info.splits["train"].tokens == config.num_samples * config.max_seq_length
    assert 0 < info.splits["train"].stored_bytes < info.splits["train"].raw_bytes
    result = runner.invoke(app, ["store", "info", config.store])
    assert result.exit_code == 0 and "train" in result.output


def test_a_packed_uint8_store_verifies_and_reads_like_the_folder(tiny_targets_overrides, tmp_path):
    config = config_for(
        tiny_targets_overrides, **{"targets.logits_dtype": "uint8", "targets.tail_samples": 4}
    )
    compute_targets(config)
    packed = tmp_path / "store.zip"
    assert runner.invoke(app, ["store", "pack", config.store, str(packed)]).exit_code == 0
    assert verify_store(packed) == []
    folder, zipped = StoreReader(Path(config.store)), StoreReader(packed)
    for split, shape in folder.manifest.splits.items():
        for chunk in range(shape.num_chunks):
            ours, theirs = folder.read_targets(split, chunk), zipped.read_targets(split, chunk)
            assert set(ours) == set(shape.target_arrays) == set(theirs)
            assert all(np.array_equal(ours[n], theirs[n]) for n in ours)
    assert store_info(packed).logits == "uint8 (step 0.1)"
    assert runner.invoke(app, ["store", "info", str(packed)]).exit_code == 0


def test_the_logit_step_is_part_of_a_uint8_store_only(tiny_targets_overrides, tmp_path):
    """Resuming a float32 store under another step computes nothing (its logits have none); a
    uint8 store made with another step is refused as made differently."""
    compute_targets(config_for(tiny_targets_overrides))
    seen = []
    other_step = config_for(tiny_targets_overrides, **{"targets.logit_step": 0.5})
    compute_targets(other_step, on_progress=seen.append)
    assert seen == []
    uint8 = {
        **tiny_targets_overrides,
        "store": str(tmp_path / "uint8.zarr"),
        "targets.logits_dtype": "uint8",
    }
    compute_targets(config_for(uint8))
    with pytest.raises(StoreMismatchError, match="logit_step: 0.1 != 0.5"):
        compute_targets(config_for(uint8, **{"targets.logit_step": 0.5}))


def set_in_manifest(store: Path, **fields) -> None:
    """Give every split of the store's manifest these fields (None: drop the field)."""
    manifest = json.loads((store / MANIFEST_FILE).read_text())
    for split in manifest["splits"].values():
        split.update(fields)
        for name in [k for k, v in split.items() if v is None]:
            del split[name]
    (store / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "dtype, fields, message",
    [
        ("float32", {"logits_dtype": "int4"}, "unknown logits dtype 'int4'"),
        ("uint8", {"logit_step": None}, "logit_step=None is out of range"),
        ("uint8", {"logit_step": -0.1}, "logit_step=-0.1 is out of range"),
        ("float32", {"logit_step": 0.1}, "float32 logits have no logit_step"),
    ],
)
def test_a_store_of_an_unknown_logit_encoding_is_refused_with_one_line(
    tiny_targets_overrides, dtype, fields, message
):
    config = config_for(tiny_targets_overrides, **{"targets.logits_dtype": dtype})
    compute_targets(config)
    store = Path(config.store)
    manifest = json.loads((store / MANIFEST_FILE).read_text())
    recorded = "logit_step" in manifest["settings"] and "logit_step" in manifest["splits"]["train"]
    assert recorded == (dtype == "uint8")  # other stores' manifests are as before the setting
    set_in_manifest(store, **fields)
    for command in (["store", "info"], ["store", "verify"]):
        result = runner.invoke(app, [*command, str(store)])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def cli_targets(overrides: dict, *extra: str):
    args = ["targets"] + [f"--set={k}={v}" for k, v in overrides.items()] + list(extra)
    return runner.invoke(app, args)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"targets.top_k": 100000}, "exceeds the teacher's vocabulary"),
        ({"targets.top_k": 0}, "top_k must be >= 1"),
        ({"targets.num_samples": 1, "targets.batch_size": 2}, "fewer than one batch"),
        ({"targets.teacher": "/nonexistent/teacher"}, "does not exist"),
        ({"targets.data": "/nonexistent/data.jsonl"}, "does not exist"),
        ({"targets.max_seq_length": 100000}, "no train sequences"),
        ({"targets.seed": 99}, "made differently"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_store_intact(tiny_targets_overrides, change, message):
    assert cli_targets(tiny_targets_overrides).exit_code == 0
    store = Path(tiny_targets_overrides["store"])
    before = stored_arrays(store)
    result = cli_targets({**tiny_targets_overrides, **change})
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    after = stored_arrays(store)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert verify_store(store) == []


def test_a_teacher_whose_logits_are_not_finite_is_refused_before_anything_is_stored(
    tiny_targets_overrides, tmp_path
):
    broken = make_tiny_model_folder(tmp_path / "broken-teacher")
    weights = mx.load(str(broken / "model.safetensors"))
    weights["model.norm.weight"] = mx.full(weights["model.norm.weight"].shape, mx.nan)
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    for dtype in ("bfloat16", "uint8"):  # uint8 would have stored a NaN as the top logit
        store = tmp_path / f"{dtype}.zarr"
        change = {"targets.teacher": str(broken), "targets.logits_dtype": dtype}
        result = cli_targets({**tiny_targets_overrides, **change, "store": str(store)})
        assert result.exit_code == 2, result.output
        assert re.search(
            r"logits for rows 0-2 of the (train|valid) split are not fin", result.output
        )
        assert len(result.output.strip().splitlines()) == 1
        assert not any(StoreReader(store).records(refresh=True).values())


def test_empty_data_and_unwritable_output_are_refused(tiny_targets_overrides, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = cli_targets({**tiny_targets_overrides, "targets.data": str(empty)})
    assert result.exit_code == 2 and "empty" in result.output
    # A regular file where a folder should be: unwritable even for root, which CI runs as.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cli_targets({**tiny_targets_overrides, "store": str(blocker / "sub" / "s.zarr")})
    assert result.exit_code == 2 and "not a writable folder" in result.output
    assert blocker.read_text() == "not a folder"


def test_overwrite_replaces_a_store_made_differently(tiny_targets_overrides):
    assert cli_targets(tiny_targets_overrides).exit_code == 0
    result = cli_targets({**tiny_targets_overrides, "targets.top_k": 8}, "--overwrite")
    assert result.exit_code == 0, result.output
    assert StoreReader(Path(tiny_targets_overrides["store"])).manifest.splits["train"].top_k == 8


def test_store_opens_with_plain_zarr(tiny_targets_overrides):
    config = config_for(tiny_targets_overrides)
    compute_targets(config)
    group = zarr.open_group(config.store, mode="r")
    assert group["train"]["topk_logits"].shape == (20, 16, 16)
    assert group["train"]["topk_indices"].dtype == np.uint16
    shutil.rmtree(config.store)


def test_mlx_launch_ranks_become_shards(tiny_targets_overrides, tmp_path):
    single = config_for(tiny_targets_overrides, store=str(tmp_path / "single.zarr"))
    compute_targets(single)
    shared = tmp_path / "launched.zarr"
    args = cli_args({k: v for k, v in tiny_targets_overrides.items() if k != "store"})
    done = run_cli("targets", "--store", str(shared), *args, ranks=2)
    assert done.returncode == 0, done.stderr
    assert "shard 0/2" in done.stderr and "shard 1/2" in done.stderr, done.stderr + done.stdout
    shards = {
        r.shard for records in StoreReader(shared).records().values() for r in records.values()
    }
    assert shards == {"0/2", "1/2"}
    assert_same_store(Path(single.store), shared)


@pytest.mark.parametrize(
    "vocab, k", [(151_936, 1024), (100_000, 64), (98_403, 1000), (60_000, 8000), (50, 50)]
)
def test_top_k_of_a_wide_vocabulary_by_group_maxima_is_the_top_k(vocab, k):
    """The bound from the groups' maxima, with leftover columns, with the largest logits in one
    group or tied with the bound, and the plain partition of a narrow vocabulary."""
    from stages.targets import _top_k_indices

    logits = np.random.default_rng(vocab).standard_normal((6, vocab), dtype=np.float32)
    logits[0, -3:] = 50.0  # the largest among the leftover columns
    logits[1, : k * 4 : 4] += 30.0  # with more than 4k groups, several in one group
    logits[2] = np.round(logits[2])  # a few distinct values: many ties at the bound
    logits[3, ::7] = 9.0  # ties among the largest themselves
    found = _top_k_indices(logits, k)
    assert found.shape == (6, k)
    assert all(len(np.unique(row)) == k for row in found)
    expected = np.sort(logits, axis=-1)[:, ::-1][:, :k]
    chosen = np.sort(np.take_along_axis(logits, found, -1), axis=-1)[:, ::-1]
    assert np.array_equal(chosen, expected)  # the k largest values, whichever of equal ones
    distinct = [4, 5]
    assert np.array_equal(
        np.sort(found[distinct], -1), np.sort(np.argsort(-logits[distinct], -1)[:, :k], -1)
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_logit_anywhere_is_seen(bad):
    from stages.targets import _all_finite

    logits = np.random.default_rng(0).standard_normal((2, 3, 50), dtype=np.float32)
    assert _all_finite(logits)
    logits[1, 2, 17] = bad
    assert not _all_finite(logits)


def test_a_tail_far_below_the_head_keeps_its_log_mass():
    """A gap of 100 between the head and the tail: exp underflows float32 at the head's shift."""
    from stages.targets import _tail_logsumexp

    logits = np.random.default_rng(0).standard_normal((2, 4, 300)).astype(np.float32)
    logits[0, 1, :5] += 100.0
    indices = np.argpartition(logits, -5, axis=-1)[..., -5:]
    temperatures = [0.25, 1.0, 2.0]
    head = np.take_along_axis(logits, indices, axis=-1)
    found = _tail_logsumexp(logits, indices, head, temperatures)
    rest = logits.astype(np.float64)
    np.put_along_axis(rest, indices, -np.inf, axis=-1)
    for i, t in enumerate(temperatures):
        top = rest.max(-1, keepdims=True)
        expected = top[..., 0] / t + np.log(np.exp((rest - top) / t).sum(-1))
        np.testing.assert_allclose(found[..., i], expected, rtol=1e-5)
    assert np.isfinite(found).all()


def test_tails_at_doubled_temperatures_from_square_roots_match_float64():
    """Temperatures each twice the one before share one exp; gaps between head and tail from
    none to past float32's normal range (95: terms at T=1 are subnormal, imprecise to root)."""
    from stages.targets import _tail_logsumexp

    logits = (np.random.default_rng(1).standard_normal((6, 2000)) * 3).astype(np.float32)
    for position, gap in enumerate([0.0, 5.0, 16.0, 40.0, 95.0, 120.0]):
        logits[position, :8] = logits[position, 8:].max() + gap + np.arange(8)
    indices = np.argpartition(logits, -8, axis=-1)[:, -8:]
    temperatures = [1.0, 2.0, 4.0, 3.0, 0.5]
    head = np.take_along_axis(logits, indices, axis=-1)
    found = _tail_logsumexp(logits, indices, head, temperatures)
    rest = logits.astype(np.float64)
    np.put_along_axis(rest, indices, -np.inf, axis=-1)
    top = rest.max(-1, keepdims=True)
    for i, t in enumerate(temperatures):
        expected = top[:, 0] / t + np.log(np.exp((rest - top) / t).sum(-1))
        np.testing.assert_allclose(found[:, i], expected, rtol=1e-6)


@pytest.mark.parametrize("temperatures", [[1.0, 2.0, 4.0, 8.0], [0.5, 1.0, 2.0, 4.0]])
def test_a_chain_of_doubled_temperatures_keeps_a_tail_that_underflowed_at_the_first(temperatures):
    """One tail logit well below the head and the rest far below it: at T=1 the rest underflow,
    at T=8 they hold nearly half the tail's mass."""
    from stages.targets import _tail_logsumexp

    logits = np.full((2, 151_936), -110.0, np.float32)
    logits[:, :1024] = 0.0
    logits[0, 2000], logits[1, 2000] = -13.8, -6.9
    logits[1, 1024:2000] = -60.0
    indices = np.broadcast_to(np.arange(1024), (2, 1024))
    found = _tail_logsumexp(logits, indices, logits[:, :1024], temperatures)
    rest = logits[:, 1024:].astype(np.float64)
    for i, t in enumerate(temperatures):
        top = rest.max(-1, keepdims=True)
        expected = top[:, 0] / t + np.log(np.exp((rest - top) / t).sum(-1))
        np.testing.assert_allclose(found[:, i], expected, rtol=1e-6)
