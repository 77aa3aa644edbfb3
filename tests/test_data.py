import numpy as np
import pytest

from stages.data import (
    DataSpec,
    build_held_out_sequences,
    build_sequences,
    ensure_default_data,
)
from stages.errors import DataError
from stages.models import load_model
from tests.conftest import SENTENCES, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return load_model(str(tiny_teacher)).tokenizer


def settings(source, **kw) -> DataSpec:
    base = dict(max_seq_length=16, num_samples=4, num_valid_samples=2, valid_share=0.25, seed=1)
    base.update(kw)
    return DataSpec(source=str(source), **base)


def test_default_data_is_pydoc_text_and_deterministic(tmp_path):
    first = ensure_default_data(tmp_path / "a")
    second = ensure_default_data(tmp_path / "b")
    texts = {}
    for split in ("train", "valid", "test"):
        assert (first / f"{split}.jsonl").read_bytes() == (second / f"{split}.jsonl").read_bytes()
        texts[split] = {line for line in (first / f"{split}.jsonl").read_text().splitlines()}
        assert texts[split]
    assert "Python" in (first / "train.jsonl").read_text()
    assert not (texts["train"] & texts["valid"] or texts["train"] & texts["test"])
    assert not texts["valid"] & texts["test"]


def test_text_is_packed_into_full_windows_deterministically(tokenizer, text_data):
    train, valid = build_sequences(tokenizer, settings(text_data))
    again, _ = build_sequences(tokenizer, settings(text_data))
    assert np.array_equal(train.tokens, again.tokens)
    assert (train.lengths == 16).all() and (train.prompt_offsets == 0).all()
    assert len(train) == 4 and len(valid) == 2
    other_seed, _ = build_sequences(tokenizer, settings(text_data, seed=2))
    assert not np.array_equal(train.tokens, other_seed.tokens)


def test_single_jsonl_file_holds_out_whole_records(tokenizer, tmp_path):
    records = [{"text": f"Record number {i} says: {s}"} for i, s in enumerate(SENTENCES * 4)]
    path = write_jsonl(tmp_path / "all.jsonl", records)
    train, valid = build_sequences(
        tokenizer, settings(path, num_samples=0, num_valid_samples=0, max_seq_length=8)
    )
    # 6 of 24 records are held out, so about a quarter of the windows are validation.
    assert 0.15 < len(valid) / (len(train) + len(valid)) < 0.35


def test_chat_records_keep_prompt_offsets_when_masking(tokenizer, tmp_path):
    chat = [
        {
            "messages": [
                {"role": "user", "content": "add 2 and 3"},
                {"role": "assistant", "content": "5"},
            ]
        }
    ] * 6
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    train, _ = build_sequences(
        tokenizer,
        settings(path, max_seq_length=64, num_samples=2, num_valid_samples=1, mask_prompt=True),
    )
    assert (train.prompt_offsets > 0).all()
    assert (train.prompt_offsets < train.lengths).all()
    row = train.tokens[0, : train.lengths[0]].tolist()
    assert tokenizer.decode(row[train.prompt_offsets[0] :]).startswith("5")


@pytest.mark.parametrize(
    "records, message",
    [
        ([], "empty"),
        ([{"colour": "red"}] * 3, "text"),
    ],
)
def test_unusable_records_are_data_errors(tokenizer, tmp_path, records, message):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=message):
        build_sequences(tokenizer, settings(path))


def test_too_little_data_says_how_much_there_is(tokenizer, text_data):
    with pytest.raises(DataError, match="fewer than the 100000 asked for"):
        build_sequences(tokenizer, settings(text_data, num_samples=100000))


def test_missing_path_is_a_data_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_sequences(tokenizer, settings(tmp_path / "missing.jsonl"))


def test_hugging_face_dataset_path_on_local_files(tokenizer, text_data):
    """The hub loader (`datasets.load_dataset`) given a local folder, as it is offline here."""
    pytest.importorskip("datasets")
    from stages.data import _load_hub_records, load_records

    hub, local = _load_hub_records(str(text_data)), load_records(str(text_data))
    assert set(hub) == set(local) == {"train", "valid"}
    for split in hub:
        assert [r["text"] for r in hub[split]] == [r["text"] for r in local[split]]


def test_unknown_hub_id_is_one_clear_data_error(tokenizer):
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="cannot load Hugging Face dataset"):
        build_sequences(tokenizer, settings("no-such-org/no-such-dataset"))


def _row_set(seqs) -> set[tuple[int, ...]]:
    return {tuple(row) for row in seqs.tokens.tolist()}


def test_held_out_sequences_come_from_the_test_split_when_there_is_one(tokenizer, text_data):
    train, valid = build_sequences(tokenizer, settings(text_data))
    held_out, split = build_held_out_sequences(tokenizer, settings(text_data), count=1)
    assert split == "valid"  # no test.jsonl: the validation split is all that was held out
    assert _row_set(held_out) <= _row_set(
        build_sequences(tokenizer, settings(text_data, num_valid_samples=0))[1]
    )

    write_jsonl(text_data / "test.jsonl", [{"text": " ".join(SENTENCES[::2] * 3)}])
    held_out, split = build_held_out_sequences(tokenizer, settings(text_data), count=2)
    assert split == "test" and len(held_out) == 2
    assert not _row_set(held_out) & (_row_set(train) | _row_set(valid))


def test_eval_seed_chooses_among_the_held_out_text_the_spec_seed_decides(tokenizer, text_data):
    spec = settings(text_data, max_seq_length=8)
    every, _ = build_held_out_sequences(tokenizer, spec, count=0)
    assert len(every) > 2  # so that two of them can be chosen in more than one way
    chosen = {
        seed: _row_set(build_held_out_sequences(tokenizer, spec, count=2, seed=seed)[0])
        for seed in range(6)
    }
    assert all(rows <= _row_set(every) for rows in chosen.values())
    assert len({frozenset(rows) for rows in chosen.values()}) > 1
    again, _ = build_held_out_sequences(tokenizer, spec, count=2, seed=3)
    assert _row_set(again) == chosen[3]


def test_loss_mask_counts_completion_positions_only():
    from stages.data import TokenSequences

    seqs = TokenSequences(
        tokens=np.zeros((2, 6), np.int32),
        lengths=np.array([6, 4], np.int32),
        prompt_offsets=np.array([0, 2], np.int32),
    )
    # position p predicts token p+1; row 1 counts targets 2 and 3 only
    assert seqs.loss_mask().tolist() == [[True] * 5, [False, True, True, False, False]]
