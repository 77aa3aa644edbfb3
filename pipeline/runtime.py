"""Process setup: fast BLAS on Linux, the distributed rank.

The mlx-cpu wheel links a reference BLAS (~5 GFLOPS float32 GEMM here). Debian's OpenBLAS, when
preloaded, serves the same symbols at ~50x the speed. LD_PRELOAD is read only at exec time, so the
CLI re-executes itself once with it set.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
OPT_OUT_ENV = "DWQ_NO_BLAS_PRELOAD"
REEXEC_MARK_ENV = "DWQ_BLAS_REEXEC"
OPENBLAS_INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"


@dataclass(frozen=True)
class BlasPlan:
    """What to do about BLAS in this process: re-exec with `preload`, warn, or nothing."""

    preload: str | None = None
    warning: str | None = None


def find_openblas() -> str | None:
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def plan_blas(env: dict[str, str], system: str, openblas: str | None) -> BlasPlan:
    if system != "Linux" or env.get(OPT_OUT_ENV) or env.get(REEXEC_MARK_ENV):
        return BlasPlan()
    if openblas is None:
        return BlasPlan(
            warning=f"MLX is using its slow reference BLAS; for ~50x faster CPU runs: "
            f"{OPENBLAS_INSTALL_HINT} (set {OPT_OUT_ENV}=1 to silence)"
        )
    if openblas in env.get("LD_PRELOAD", "").split(":"):
        return BlasPlan()
    return BlasPlan(preload=openblas)


def ensure_fast_blas() -> str | None:
    """Re-exec this process with OpenBLAS preloaded if needed; returns a warning to show, if any."""
    plan = plan_blas(dict(os.environ), platform.system(), find_openblas())
    if plan.preload:
        env = dict(os.environ)
        env["LD_PRELOAD"] = ":".join(filter(None, [plan.preload, env.get("LD_PRELOAD")]))
        env[REEXEC_MARK_ENV] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return plan.warning


def loaded_blas_libraries() -> list[str]:
    """Shared libraries with 'blas' in their name mapped into this process (Linux only)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    found = {line.split()[-1] for line in maps.read_text().splitlines() if "blas" in line.lower()}
    return sorted(p for p in found if p.startswith("/"))


def describe_blas() -> str:
    if platform.system() == "Darwin":
        return "Accelerate (macOS)"
    libs = loaded_blas_libraries()
    openblas = [p for p in libs if "openblas" in p]
    if openblas:
        return f"OpenBLAS ({openblas[0]})"
    return "MLX bundled reference BLAS (slow)"


def measure_gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of float32 n x n GEMM throughput on MLX's default device."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, size) of the mx.distributed group; (0, 1) when not launched by mlx.launch."""
    from stages.distributed import Distributed

    group = Distributed()
    return group.rank, group.size


def quiet_library_logs() -> None:
    """Tokenizing whole documents before packing them into windows makes transformers warn about
    sequences longer than the model's context; that is expected here, so only errors are shown.
    (MLX needs no PyTorch either, which transformers also announces on import.)"""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.set_verbosity_error()
