"""`report`: a tune run's metrics as a summary and a readable PNG."""

from __future__ import annotations

import json
import os
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


def _copy_with(run_dir: Path, to: Path, scale: float, **settings) -> Path:
    """A copy of the run with other settings and its validation losses scaled (a second run)."""
    import shutil

    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("report.*", "eval.json"))
    config = json.loads((to / "tune_config.json").read_text()) | settings
    (to / "tune_config.json").write_text(json.dumps(config))
    records = [json.loads(line) for line in (to / METRICS_FILE).read_text().splitlines()]
    for record in records:
        if "val_loss" in record:
            record["val_loss"] *= scale
    (to / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return to


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_several_runs_are_compared_on_one_plot_and_only_read(run_dir, tmp_path):
    import matplotlib.image

    from pipeline.report import _is_our_plot, build_comparison, differing_settings

    other = _copy_with(run_dir, tmp_path / "lower-lr", 0.5, learning_rate=3e-5, train_norms=True)
    before = {run: _files(run) for run in (run_dir, other)}
    summaries = [summarize(run_dir), summarize(other)]
    assert differing_settings(summaries) == ["learning_rate", "train_norms"]

    out = tmp_path / "compare.png"
    wide = dict(os.environ, COLUMNS="250")  # the table's rows unfolded
    result = run_cli("report", str(run_dir), str(other), "--out", str(out), env=wide)
    assert result.returncode == 0, result.stderr
    assert {run: _files(run) for run in (run_dir, other)} == before  # the runs are only read
    assert _is_our_plot(out.read_bytes())
    assert matplotlib.image.imread(out).std() > 0.05
    assert "2 runs compared" in result.stdout and "lower-lr" in result.stdout
    assert "learning_rate 3e-05, train_norms True" in result.stdout

    ax = build_comparison(summaries).axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    rate = json.loads((run_dir / "tune_config.json").read_text())["learning_rate"]
    assert labels[:2] == [
        f"{run_dir}: learning_rate {rate:g}, train_norms False",
        f"{other}: learning_rate 3e-05, train_norms True",
    ]
    (first, second) = [line.get_ydata() for line in ax.get_lines()[:2]]
    assert list(second) == pytest.approx([0.5 * y for y in first])

    rerun = run_cli("report", str(run_dir), str(other), "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr  # its own plot is replaced


def test_a_setting_an_older_run_did_not_record_counts_as_it_ran(run_dir, tmp_path):
    """At its default; a lever (tune.init among them) off: before the levers runs started
    from RTN."""
    from pipeline.report import differing_settings, setting_values

    older = _copy_with(run_dir, tmp_path / "older", 1.0)
    config = json.loads((older / "tune_config.json").read_text())
    for newer_setting in ("mode", "bits_per_weight", "allowed_bits", "latent_lr"):
        del config[newer_setting]
    (older / "tune_config.json").write_text(json.dumps(config))
    assert differing_settings([summarize(run_dir), summarize(older)]) == []
    del config["init"]
    (older / "tune_config.json").write_text(json.dumps(config))
    runs = [summarize(run_dir), summarize(older)]
    assert differing_settings(runs) == ["init"]
    assert setting_values(runs[1], ["init"]) == "init rtn"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --out FILE.png"),
        (["--out", "{tmp}/notes.txt"], "give a path ending in .png"),
        (["--out", "{tmp}/mine.png"], "was not written by `dwq-pipeline report`"),
        (["--out", "{tmp}/no/such/folder/c.png"], "does not exist"),
        (["{run}", "--out", "{tmp}/c.png"], "is given twice"),
        (["--out", "{tmp}/runs/other/report.png"], "inside the run folder"),
        (["--out", "{tmp}/runs/other/checkpoint/c.png"], "inside the run folder"),
        (["--out", "{tmp}/runs"], "give a path ending in .png"),
        (["--out", "{tmp}/folder.png"], "is a folder"),
    ],
)
def test_a_comparison_that_cannot_be_written_is_refused_in_one_line(
    run_dir, tmp_path, extra, message
):
    other = _copy_with(run_dir, tmp_path / "runs" / "other", 1.0, seed=7)
    (other / "report.png").write_bytes(b"\x89PNG Software\x00dwq-pipeline report: its own plot")
    (tmp_path / "folder.png").mkdir()
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG the user's own picture")
    before = {run: _files(run) for run in (run_dir, other, tmp_path)}
    args = [a.format(tmp=tmp_path, run=run_dir) for a in extra]
    result = run_cli("report", str(run_dir), str(other), *args)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert {run: _files(run) for run in (run_dir, other, tmp_path)} == before


def test_out_with_one_run_is_refused(run_dir, tmp_path):
    result = run_cli("report", str(run_dir), "--out", str(tmp_path / "c.png"))
    assert result.returncode == 2
    assert "--out is for comparing several runs" in result.stderr
    assert not (tmp_path / "c.png").exists()
