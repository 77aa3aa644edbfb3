"""`report`: a tune run's metrics as a summary and a readable PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.report import PLOT_FILE, SUMMARY_FILE, build_figure, summarize
from stages.run_dir import METRICS_FILE
from stages.targets import compute_targets
from stages.tune import tune
from tests.conftest import make_text_data, run_cli


@pytest.fixture(scope="module")
def run_dir(tiny_teacher, tmp_path_factory) -> Path:

    folder = tmp_path_factory.mktemp("report")
    make_text_data(folder / "data")
    overrides = {
        "store": str(folder / "store.zarr"),
        "targets.teacher": str(tiny_teacher),
        "targets.data": str(folder / "data" / "train.jsonl"),
        "targets.top_k": 32,
        "targets.max_seq_length": 17,
        "targets.num_samples": 16,
        "targets.num_valid_samples": 2,
        "tune.run_dir": str(folder / "run"),
        "tune.group_size": 32,
        "tune.epochs": 2,
        "tune.val_every": 2,
    }
    config = load_config(None, overrides)
    compute_targets(config.targets)
    tune(config.tune)
    return folder / "run"


def test_summary_reads_the_metrics_log(run_dir):
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    validation = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    summary = summarize(run_dir)
    assert summary.steps == summary.total_steps == 8  # 16 sequences / 4 x 2 epochs
    assert summary.start_val_loss == validation[0]
    assert summary.best_val_loss == min(validation.values())
    assert validation[summary.best_step] == summary.best_val_loss
    assert summary.final_val_loss == validation[8]
    assert [s for s, _ in summary.validation] == [0, 2, 4, 6, 8]
    assert len(summary.train) == 8
    assert summary.loss == "kl_tail (T=2.0)"
    assert summary.start == "GPTQ"  # tune.init auto, the teacher quantized by tune


@pytest.mark.parametrize(
    ("init", "student", "label"),
    [
        ("rtn", None, "RTN"),
        ("auto", "some/q4", "given student"),
        ("rtn", "some/q4", "given student"),
        ("clip_search", None, "clip search"),
    ],
)
def test_the_start_is_named_as_the_run_made_it(init, student, label):
    from pipeline.report import starting_student

    assert starting_student({"init": init, "student": student}) == label
    assert starting_student({}) == "RTN"  # run folders from before tune.init
    assert starting_student({"init": "auto", "mode": "nvfp4"}) == "RTN nvfp4"  # GPTQ is affine


def test_figure_has_labelled_axes_and_a_legend_for_every_line(run_dir):
    figure = build_figure(summarize(run_dir))
    (ax,) = figure.axes
    assert ax.get_xlabel() == "optimizer step"
    assert "kl_tail" in ax.get_ylabel()
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [
        "train (per step)",
        "validation",
        "before tuning (GPTQ start)",  # the default init, run by the fixture
        "teacher (loss 0)",
    ]


def test_report_cli_writes_a_png_and_the_summary(run_dir):
    import matplotlib.image

    (run_dir / "eval.json").write_text(
        json.dumps(
            {
                "split": "test",
                "num_tokens": 64,
                "gap_closed": 0.5,
                "models": {
                    name: {"kl": kl, "perplexity": ppl}
                    for name, kl, ppl in [
                        ("teacher", 0.0, 9.0),
                        ("rtn", 0.2, 11.0),
                        ("tuned", 0.1, 10.0),
                    ]
                },
            }
        )
    )
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    image = matplotlib.image.imread(run_dir / PLOT_FILE)
    assert image.shape[:2] == (540, 960)
    assert image.std() > 0.05  # drawn, not blank
    summary = (run_dir / SUMMARY_FILE).read_text()
    assert "tuning closed 50.0% of RTN's KL gap" in summary
    assert "rtn 0.2000" in summary and "validation" in result.stderr


def test_report_of_a_folder_without_metrics_is_one_line(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2
    assert "no metrics.jsonl" in result.stderr and "Traceback" not in result.stderr
