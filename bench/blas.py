"""GEMM and teacher-forward throughput with and without OpenBLAS preloaded, as ratios from one run.

Each measurement runs in a child process (LD_PRELOAD is read only at process start).
Run: `make bench` or `.venv/bin/python bench/blas.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench.common import Ratio, report

CHILD = r"""
import json, time, sys
import mlx.core as mx
from pipeline.runtime import measure_gemm_gflops, describe_blas
from stages.models import load_model
gflops = measure_gemm_gflops(1024, 3)
model = load_model("default").model
x = mx.random.randint(0, 49152, (4, 256))
mx.eval(model(x[:1, :16]))
best = float("inf")
for _ in range(int(sys.argv[1])):
    t = time.perf_counter(); mx.eval(model(x)); best = min(best, time.perf_counter() - t)
print(json.dumps({"blas": describe_blas(), "gflops": gflops, "forward_tok_s": x.size / best}))
"""


def measure(preload: str | None, repeats: int) -> dict:
    env = dict(os.environ, DWQ_NO_BLAS_PRELOAD="1", LD_PRELOAD=preload or "")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(repeats)], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from pipeline.runtime import find_openblas

    openblas = find_openblas()
    if openblas is None:
        raise SystemExit("OpenBLAS not installed: sudo apt-get install libopenblas0-pthread")
    start = time.time()
    fast = measure(openblas, 3)
    slow = measure(None, 1)
    rows = [
        Ratio(
            "blas",
            "float32 GEMM 1024^3 GFLOPS, bundled BLAS -> OpenBLAS",
            slow["gflops"],
            fast["gflops"],
        ),
        Ratio(
            "blas",
            "SmolLM2 forward 4x256 tok/s, bundled BLAS -> OpenBLAS",
            slow["forward_tok_s"],
            fast["forward_tok_s"],
        ),
    ]
    caption = f"{fast['blas']}; {os.cpu_count()} CPUs; {time.time() - start:.0f}s"
    report("BLAS: OpenBLAS preload vs MLX's bundled BLAS (one run)", rows, caption)


if __name__ == "__main__":
    main()
