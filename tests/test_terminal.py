"""What a person sees at a terminal: every command's progress bars, tables and error line drawn
for real, on a pseudo-terminal (the real console script) and on rich's forced terminal (each
display callback fed the way the stages feed it, starting with totals not known yet)."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import time

import pytest
from rich.console import Console

from pipeline import ui
from stages.targets import Progress as TargetsProgress
from stages.tune import StepReport
from tests.conftest import BIN, ROOT, cli_args, small_run_overrides

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(*args: str, timeout: float = 600, columns: int = 160) -> tuple[int, str]:
    """The console script with stdin, stdout and stderr on a pseudo-terminal; (exit code, screen
    text without colour codes)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "50", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [str(BIN / "dwq-pipeline"), *args],
        cwd=ROOT,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the process closed its end
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
    code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return code, ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def terminal_world(tiny_teacher, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("terminal")
    more = {"tune.val_every": 1, "eval.num_sequences": 2}
    overrides = small_run_overrides(root, tiny_teacher, **more)
    return {"root": root, "args": cli_args(overrides)}


def assert_clean(code: int, screen: str) -> None:
    assert code == 0, screen[-3000:]
    assert "Traceback" not in screen and "error:" not in screen, screen[-3000:]


def test_every_command_draws_on_a_real_terminal(terminal_world):
    """targets -> tune -> eval -> store info -> report, each on a pseudo-terminal, as `make tune`
    runs for a user; then a mistake, whose one error line is drawn on the same terminal."""
    args, root = terminal_world["args"], terminal_world["root"]

    code, screen = run_in_terminal("targets", *args)
    assert_clean(code, screen)
    assert re.search(r"targets .*100%.* [\d,]+/[\d,]+ tok", screen), screen[-2000:]
    assert "tok/s" in screen and "targets done" in screen

    code, screen = run_in_terminal("tune", *args)
    assert_clean(code, screen)
    assert re.search(r"tune .*step 2/2 +loss [\d.]+ +val [\d.]+", screen), screen[-2000:]
    assert "tuned 2 steps" in screen

    code, screen = run_in_terminal("eval", *args)
    assert_clean(code, screen)
    assert re.search(r"eval .*batch 1/1", screen), screen[-2000:]
    for name in ("KL(teacher||model)/token", "teacher", "rtn", "tuned", "tuning closed"):
        assert name in screen

    code, screen = run_in_terminal("store", "info", str(root / "store.zarr"))
    assert_clean(code, screen)
    assert "bytes/token" in screen and "complete" in screen

    code, screen = run_in_terminal("report", str(root / "run"))
    assert code == 0 and "Traceback" not in screen, screen[-2000:]

    code, screen = run_in_terminal("tune", *args, "--set=tune.loss=nonsense")
    assert code == 2 and "Traceback" not in screen, screen
    assert screen.count("error:") == 1 and "tune.loss must be one of" in screen


def test_a_60_column_terminal_keeps_counts_losses_headers_and_errors_whole(terminal_world):
    args, root = terminal_world["args"], terminal_world["root"]
    narrow = [*args, f"--set=tune.run_dir={root / 'narrow-run'}", "--set=tune.max_steps=1"]
    code, screen = run_in_terminal("targets", *args, columns=60)
    assert_clean(code, screen)
    code, screen = run_in_terminal("tune", *narrow, columns=60)
    assert_clean(code, screen)
    assert re.search(r"tune .*step 1/1 +loss [\d.]+ +val [\d.]+", screen), screen[-2000:]
    assert "tuned 1 step:" in screen
    for command in (["eval", *narrow], ["store", "info", str(root / "store.zarr")]):
        code, screen = run_in_terminal(*command, columns=60)
        assert_clean(code, screen)
        assert "\u2026" not in screen, screen  # no header or value cut short with an ellipsis
    code, screen = run_in_terminal("tune", *narrow, "--set=tune.loss=nonsense", columns=60)
    assert code == 2 and screen.count("error:") == 1, screen
    assert "tune.loss must be one of kl_topk, kl_tail, reverse_kl, js (got 'nonsense')" in (
        screen.replace("\r\n", "")
    )


@pytest.fixture
def forced_terminal(monkeypatch) -> io.StringIO:
    """ui's consoles replaced by rich terminals that write into a buffer."""
    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=120, color_system="truecolor")
    monkeypatch.setattr(ui, "console", terminal)
    monkeypatch.setattr(ui, "out", terminal)
    return buffer


def test_targets_bar_before_and_after_its_total_is_known(forced_terminal):
    with ui.targets_progress() as update:
        time.sleep(0.15)  # the live display refreshes while the total is still unknown
        update(TargetsProgress(tokens_done=512, tokens_total=2048, chunks_done=1, chunks_total=4))
        update(TargetsProgress(tokens_done=2048, tokens_total=2048, chunks_done=4, chunks_total=4))
    screen = ANSI.sub("", forced_terminal.getvalue())
    assert "2,048/2,048 tok" in screen and "tok/s" in screen


def test_tune_bar_shows_loss_validation_rate_and_memory(forced_terminal):
    with ui.tune_progress() as display:
        time.sleep(0.15)
        display.on_step(StepReport(0, 3, val_loss=0.5))
        display.on_step(StepReport(1, 3, loss=0.41, tokens_per_s=1234.0, peak_memory_gb=1.5))
    screen = ANSI.sub("", forced_terminal.getvalue())
    assert re.search(r"step 1/3 +loss 0\.4100 +val 0\.5000 +1,234 tok/s +1\.50 GB", screen), screen


def test_tune_bar_names_what_runs_before_the_first_step(forced_terminal):
    with ui.tune_progress() as display:
        display.on_phase("GPTQ start: block 3/30")
        time.sleep(0.15)  # drawn by the live refresh, as a user sees it during the minutes
        first = ANSI.sub("", forced_terminal.getvalue())
        display.on_step(StepReport(0, 3, val_loss=0.5))
        time.sleep(0.15)
        validated = ANSI.sub("", forced_terminal.getvalue())
        display.on_step(StepReport(1, 3, loss=0.41))
    screen = ANSI.sub("", forced_terminal.getvalue())
    assert re.search(r"step 0/\? +GPTQ start: block 3/30", first), first
    # the start's validation, with no rate or memory yet (they would read "0 tok/s 0.00 GB")
    last_frame = validated.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"step 0/3 +val 0\.5000", last_frame) and "tok/s" not in last_frame, last_frame
    assert "step 1/3" in screen and "loss 0.4100" in screen


def test_batch_bar_and_error_line(forced_terminal):
    with ui.batch_progress("eval") as update:
        time.sleep(0.15)
        update(1, 4)
        update(4, 4)
    # A path or a value in a message is text, never rich markup (a "[/x]" in it used to raise).
    ui.error("cannot read /tmp/[/x]/[red]odd[/] store")
    ui.warn("a [bold]folder[/bold]")
    screen = ANSI.sub("", forced_terminal.getvalue())
    assert "batch 4/4" in screen
    assert "error: cannot read /tmp/[/x]/[red]odd[/] store" in screen
    assert "warning: a [bold]folder[/bold]" in screen


def test_no_bar_when_not_a_terminal(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=buffer, force_terminal=False))
    with ui.tune_progress() as display:
        display.on_phase("loading the student")
        display.on_step(StepReport(1, 2, loss=0.1))
    assert buffer.getvalue() == ""
