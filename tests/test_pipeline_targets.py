"""A teacher split across ranks (`targets --pipeline`, mlx-lm's pipeline) under mlx.launch: two
ranks on localhost (ring backend) write the same store as one process holding the whole teacher."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from pipeline.config import load_config
from stages.errors import ModelError
from stages.models import load_model, weights_digest, whole_weights_digest
from stages.targets import Shard, compute_targets
from store.reader import StoreReader
from tests.conftest import cli_args, make_text_data, run_cli
from tests.test_targets import assert_same_store
from tests.tiny_models import make_arch_model_folder


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory) -> Path:
    # bfloat16 as stored: on CPU it computes in float32, and the store records the digest of the
    # weights as stored, which the rank reading them one by one must give as well
    return make_arch_model_folder(tmp_path_factory.mktemp("models") / "moe", "qwen3_moe")


def overrides(teacher: Path, root: Path) -> dict:
    return {
        "targets.teacher": str(teacher),
        "targets.data": str(make_text_data(root / "data")),
        "targets.top_k": 16,
        "targets.max_seq_length": 17,
        "targets.num_samples": 8,
        "targets.num_valid_samples": 2,
        "targets.batch_size": 2,
        "targets.chunk_size": 3,
    }


class FakeGroup:
    """What mlx-lm's pipeline asks of a group: this process's rank and the group's size."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def layer_numbers(model) -> set[int]:
    names = [name for name, _ in tree_flatten(model.parameters())]
    return {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}


def test_each_rank_holds_only_its_layers_and_records_the_whole_teachers_digest(moe_teacher):
    whole = load_model(str(moe_teacher), compute_dtype="auto")
    assert layer_numbers(whole.model) == {0, 1}
    last = load_model(str(moe_teacher), compute_dtype="auto", pipeline_group=FakeGroup(0, 2))
    first = load_model(str(moe_teacher), compute_dtype="auto", pipeline_group=FakeGroup(1, 2))
    assert layer_numbers(last.model) == {1} and layer_numbers(first.model) == {0}
    assert weights_digest(last.model, last.dtypes) != weights_digest(whole.model, whole.dtypes)
    assert whole_weights_digest(str(moe_teacher)) == weights_digest(whole.model, whole.dtypes)


def test_the_whole_teachers_digest_is_read_one_parameter_at_a_time(moe_teacher):
    stored_bytes = sum(f.stat().st_size for f in moe_teacher.glob("*.safetensors"))
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    whole_weights_digest(str(moe_teacher))
    # the largest parameter (the embedding) is about a fifth of this teacher
    assert mx.get_peak_memory() - before < stored_bytes / 2


def test_two_ranks_splitting_a_moe_teacher_write_the_one_process_store(moe_teacher, tmp_path):
    settings = overrides(moe_teacher, tmp_path)
    single = load_config(None, {**settings, "store": str(tmp_path / "single.zarr")}).targets
    compute_targets(single)
    split = tmp_path / "split.zarr"
    done = run_cli("targets", "--pipeline", "--store", str(split), *cli_args(settings), ranks=2)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "rank 0 wrote" in done.stderr + done.stdout  # rank 1 ran layers and wrote nothing
    # Exactly equal, not within a tolerance: each layer runs the same ops on the same inputs as
    # in one process, and the hidden state only moves between ranks.
    assert_same_store(Path(single.store), split)
    assert StoreReader(split).manifest == StoreReader(Path(single.store)).manifest
    shards = {
        r.shard for records in StoreReader(split).records().values() for r in records.values()
    }
    assert shards == {"0/1"}  # the launch is one shard, not one per rank


def test_split_teacher_launches_take_their_own_shards_of_one_store(moe_teacher, tmp_path):
    """Groups of machines each split the teacher and compute a shard: here one launch of two
    ranks takes shard 0/2, one process shard 1/2 of the same store."""
    settings = {**overrides(moe_teacher, tmp_path), "store": str(tmp_path / "shared.zarr")}
    done = run_cli("targets", "--pipeline", "--shard", "0/2", *cli_args(settings), ranks=2)
    assert done.returncode == 0, done.stderr + done.stdout
    shared = load_config(None, settings).targets
    compute_targets(shared, shard=Shard(1, 2))  # refused if the manifests differed
    single = load_config(None, {**settings, "store": str(tmp_path / "single.zarr")}).targets
    compute_targets(single)
    assert_same_store(Path(single.store), Path(shared.store))
    shards = {
        r.shard for recs in StoreReader(shared.store).records().values() for r in recs.values()
    }
    assert shards == {"0/2", "1/2"}


def test_pipeline_in_one_process_runs_the_whole_teacher_as_without(moe_teacher, tmp_path):
    settings = overrides(moe_teacher, tmp_path)
    plain = load_config(None, {**settings, "store": str(tmp_path / "plain.zarr")}).targets
    compute_targets(plain)
    piped = {**settings, "store": str(tmp_path / "piped.zarr"), "targets.pipeline": True}
    assert compute_targets(load_config(None, piped).targets) is not None  # rank 0 of 1 writes
    assert_same_store(Path(plain.store), tmp_path / "piped.zarr")


def test_pipeline_on_a_model_without_mlx_lms_pipeline_is_one_clear_line(tiny_teacher, tmp_path):
    store = tmp_path / "store.zarr"
    settings = overrides(tiny_teacher, tmp_path)  # a llama: mlx-lm has no pipeline for it
    done = run_cli("targets", "--pipeline", "--store", str(store), *cli_args(settings))
    assert done.returncode == 2, done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be split across ranks" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not store.exists()


def test_more_ranks_than_layers_is_refused(moe_teacher):
    with pytest.raises(ModelError, match="2 layers, fewer than the 3 ranks"):
        load_model(str(moe_teacher), pipeline_group=FakeGroup(0, 3))


class FakeRanks:
    """Two ranks seen from one of them: rank 0 sent `sent`; the other rank's flag is `theirs`."""

    def __init__(self, sent: list[int], theirs: int = 0):
        self.sent, self.theirs, self.size = sent, theirs, 2

    def from_root(self, values: list[int]) -> list[int]:
        return self.sent

    def sum(self, value):
        return value + self.theirs


def test_a_rank_reading_other_token_rows_stops_every_rank_with_one_line(tmp_path):
    """The first layers run on the last rank's tokens: its rows must be rank 0's, or rank 0's
    store would hold targets of other text under its own tokens."""
    from stages.data import TokenSequences
    from stages.errors import StageError
    from stages.targets import SPLIT_ORDER, RowsPlan, rows_digest

    def splits(first_token: int) -> dict:
        tokens = np.full((2, 5), 7, dtype=np.int32)
        tokens[0, 0] = first_token
        rows = TokenSequences(tokens, np.array([5, 5], np.int32), np.zeros(2, np.int32))
        return {"train": rows, "valid": rows}

    plan = [*rows_digest(splits(1)), SPLIT_ORDER.index("train"), 0, 2]  # rank 0's, rows 0..2
    assert RowsPlan.receive(FakeRanks(plan), splits(1)) == [("train", 0, 2)]
    with pytest.raises(StageError, match="read different token rows"):
        RowsPlan.receive(FakeRanks(plan), splits(2))
    sending = RowsPlan(FakeRanks([], theirs=1), splits(1))  # rank 0, told another rank differs
    with pytest.raises(StageError, match="read different token rows"):
        sending.send(None, [])
