"""The real default teacher through the real console script (marked slow; CI runs it)."""

import json
import subprocess
from pathlib import Path

import pytest

from store.inspect import store_info, verify_store

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_targets_on_the_default_teacher_via_the_console_script(tmp_path):
    store = tmp_path / "tiny.zarr"
    script = Path(__import__("sys").executable).parent / "dwq-pipeline"
    done = subprocess.run(
        [str(script), "targets", "--config", "configs/tiny.yaml", "--store", str(store)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    info = store_info(store)
    assert info.complete and info.top_k == 64
    assert verify_store(store) == []
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["teacher"]["name"] == "default"
    assert manifest["tokenizer"]["vocab_size"] == 49152
