import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime import OPT_OUT_ENV, REEXEC_MARK_ENV, find_openblas, plan_blas

LIB = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def test_linux_with_openblas_plans_a_preload():
    assert plan_blas({}, "Linux", LIB).preload == LIB


def test_no_second_reexec_and_opt_out_and_macos_do_nothing():
    assert plan_blas({"LD_PRELOAD": LIB}, "Linux", LIB).preload is None
    assert plan_blas({REEXEC_MARK_ENV: "1"}, "Linux", LIB).preload is None
    assert plan_blas({OPT_OUT_ENV: "1"}, "Linux", LIB).preload is None
    assert plan_blas({}, "Darwin", None).preload is None
    assert plan_blas({}, "Darwin", None).warning is None


def test_missing_openblas_gives_a_warning_with_the_install_command():
    plan = plan_blas({}, "Linux", None)
    assert plan.preload is None
    assert "apt-get install libopenblas0-pthread" in plan.warning


@pytest.mark.skipif(find_openblas() is None, reason="OpenBLAS is not installed on this machine")
def test_cli_reexecs_itself_with_openblas():
    env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert "OpenBLAS" in done.stdout
    assert "GFLOPS" in done.stdout
