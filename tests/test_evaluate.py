"""`eval`: full-vocabulary scores checked against numpy, and the tuned student beats RTN."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from pipeline.config import load_config
from stages.data import TokenSequences
from stages.errors import ModelError
from stages.evaluate import RTN, TEACHER, TUNED, evaluate, rtn_like, score_models
from stages.models import load_model, quantize_student
from stages.targets import compute_targets
from stages.tune import tune
from tests.conftest import SENTENCES, cli_args, make_text_data, run_cli, write_jsonl


def numpy_scores(teacher_logits: np.ndarray, logits: np.ndarray, seqs: TokenSequences):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(teacher_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    mask = seqs.loss_mask()
    kl = (np.exp(p) * (p - q)).sum(-1)[mask].mean()
    nll = -np.take_along_axis(q, seqs.tokens[:, 1:, None], -1)[..., 0][mask].mean()
    agree = (p.argmax(-1) == q.argmax(-1))[mask].mean()
    return kl, np.exp(nll), agree


@pytest.fixture(scope="module")
def eval_run(tiny_teacher, tmp_path_factory) -> dict:
    """Data with train/valid/test splits, a target store and a tuned 3-bit student."""
    folder = tmp_path_factory.mktemp("eval")
    data = folder / "data"
    make_text_data(data)
    write_jsonl(data / "test.jsonl", [{"text": " ".join(SENTENCES[1::2] + SENTENCES[::2])}] * 2)
    overrides = {
        "store": str(folder / "store.zarr"),
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(data),
        "targets.top_k": 64,
        "targets.max_seq_length": 17,
        "targets.num_samples": 24,
        "targets.num_valid_samples": 4,
        "tune.run_dir": str(folder / "run"),
        "tune.bits": 3,
        "tune.group_size": 32,
        "tune.epochs": 3,
        "tune.val_every": 6,
        "eval.num_sequences": 4,
    }
    config = load_config(None, overrides)
    compute_targets(config.targets)
    tune(config.tune)
    return {"overrides": overrides, "config": config, "folder": folder}


def test_scores_match_numpy_over_the_full_vocabulary(tiny_teacher):
    teacher = load_model(str(tiny_teacher))
    student, _ = quantize_student(load_model(str(tiny_teacher)), bits=2, group_size=32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 200, size=(3, 9)).astype(np.int32)
    seqs = TokenSequences(tokens, np.array([9, 7, 9], np.int32), np.array([0, 0, 3], np.int32))

    scores = score_models(teacher.model, {"rtn": student}, seqs, batch_size=2)

    inputs = mx.array(tokens[:, :-1])
    t_logits = np.array(teacher.model(inputs).astype(mx.float32))
    s_logits = np.array(student(inputs).astype(mx.float32))
    kl, ppl, agree = numpy_scores(t_logits, s_logits, seqs)
    assert scores["rtn"].kl == pytest.approx(kl, rel=1e-4)
    assert scores["rtn"].perplexity == pytest.approx(ppl, rel=1e-4)
    assert scores["rtn"].top1_agreement == pytest.approx(agree)
    assert scores["rtn"].kl > 0 and scores["rtn"].top1_agreement < 1
    _, teacher_ppl, _ = numpy_scores(t_logits, t_logits, seqs)
    assert scores[TEACHER].kl == pytest.approx(0.0, abs=1e-6)
    assert scores[TEACHER].top1_agreement == 1.0
    assert scores[TEACHER].perplexity == pytest.approx(teacher_ppl, rel=1e-4)


def test_tuned_student_closes_part_of_the_rtn_gap_on_the_test_split(eval_run):
    result = evaluate(eval_run["config"].eval)
    assert result.split == "test"
    assert set(result.scores) == {TEACHER, RTN, TUNED}
    assert result.scores[TUNED].kl < result.scores[RTN].kl
    assert 0 < result.gap_closed < 1
    assert result.num_sequences == 4 and result.num_tokens == 4 * 16


def test_fast_matmul_path_scores_like_quantized_matmul(eval_run):
    base = eval_run["config"].eval
    fast = evaluate(type(base)(**{**vars(base), "fast_matmul": "on"}))
    slow = evaluate(type(base)(**{**vars(base), "fast_matmul": "off"}))
    for name in (RTN, TUNED):
        assert fast.scores[name].kl == pytest.approx(slow.scores[name].kl, rel=1e-3)


def test_eval_cli_prints_json_and_saves_it(eval_run, tmp_path):
    saved = tmp_path / "eval.json"
    result = run_cli("eval", "--json", f"--save={saved}", *cli_args(eval_run["overrides"]))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads(saved.read_text())
    assert set(printed["models"]) == {TEACHER, RTN, TUNED}
    assert printed["gap_closed"] > 0


def test_eval_refuses_a_student_that_is_not_quantized(eval_run, tiny_teacher):
    base = eval_run["config"].eval
    with pytest.raises(ModelError, match="not quantized"):
        evaluate(type(base)(**{**vars(base), "student": str(tiny_teacher)}))


def test_eval_without_store_needs_teacher_and_data(eval_run, tmp_path):
    overrides = {**eval_run["overrides"], "store": str(tmp_path / "none.zarr")}
    result = run_cli("eval", *cli_args(overrides))
    assert result.returncode == 2
    assert "eval.teacher" in result.stderr and "Traceback" not in result.stderr
    explicit = {
        **overrides,
        "eval.teacher": overrides["targets.teacher"],
        "eval.data": overrides["targets.data"],
        "eval.max_seq_length": 17,
    }
    assert run_cli("eval", *cli_args(explicit)).returncode == 0


def test_rtn_row_of_a_mix_written_by_mlx_lm_has_its_widths(tiny_teacher, tmp_path):
    """A mix as mlx-lm's dynamic_quant saves it (one default width, only the other layers listed
    in config.json): eval's RTN row rebuilds it exactly."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model, save

    teacher = load_model(str(tiny_teacher))
    high = "model.layers.0.mlp.down_proj"

    def predicate(path, module):
        if path == high:
            return {"bits": 5, "group_size": 32}
        return hasattr(module, "to_quantized")

    model, config = quantize_model(
        teacher.model, teacher.config, group_size=32, bits=3, quant_predicate=predicate
    )
    save(tmp_path / "mixed", str(tiny_teacher), model, teacher.tokenizer, config)
    saved = load_model(str(tmp_path / "mixed"))
    rtn = rtn_like(saved, "mixed", str(tiny_teacher), trust=False, dtype="model")
    widths = {path: m.bits for path, m in rtn.named_modules() if hasattr(m, "bits")}
    assert widths[high] == 5 and set(widths.values()) == {3, 5}
    expected = dict(tree_flatten(saved.model.parameters()))
    for path, value in tree_flatten(rtn.parameters()):
        assert mx.array_equal(value, expected[path]).item(), path
