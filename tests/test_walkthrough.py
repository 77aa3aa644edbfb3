"""The README's two-machine walk-through, run line by line as written (marked slow)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import BIN, ROOT


def walkthrough_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walkthrough -->\n```sh\n(.*?)```\n<!-- /walkthrough -->", readme, re.S)
    assert block, "README lost its walk-through block"
    lines = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    return lines


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    (tmp_path / "machine-a").mkdir()
    (tmp_path / "machine-b").mkdir()
    env = {**os.environ, "WALK": str(tmp_path), "PATH": f"{BIN}:{os.environ['PATH']}"}
    lines = walkthrough_lines()
    assert len(lines) == 7
    for line in lines:
        done = subprocess.run(
            ["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{line}\n{done.stderr}"
    assert (tmp_path / "machine-b" / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "machine-b" / "run" / "report.png").is_file()
