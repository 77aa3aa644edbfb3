"""GEMM and teacher-forward throughput with and without OpenBLAS preloaded, as ratios from one run.

Each measurement runs in a child process (LD_PRELOAD is read only at process start); both sides
take the best of the same number of repeats.
Run: `make bench` or `.venv/bin/python -m bench.blas`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench.common import FullTime, Ratio, by_scale, report

# (repeats, batch, tokens per row) of the timed forward; the same for both sides.
QUICK, FULL = (2, 1, 64), (3, 4, 256)
REPEATS, BATCH, LENGTH = by_scale(QUICK, FULL)

CHILD = r"""
import json, time, sys
import mlx.core as mx
from pipeline.runtime import measure_gemm_gflops, describe_blas
from stages.models import load_model
repeats, batch, length = map(int, sys.argv[1:4])
gflops = measure_gemm_gflops(1024, repeats)
model = load_model("default").model
x = mx.random.randint(0, 49152, (batch, length))
mx.eval(model(x[:1, :16]))
best, spent = float("inf"), 0.0
for _ in range(repeats):
    t = time.perf_counter(); mx.eval(model(x)); took = time.perf_counter() - t
    best, spent = min(best, took), spent + took
print(json.dumps({"blas": describe_blas(), "gflops": gflops, "forward_tok_s": x.size / best,
                  "forward_s": spent}))
"""


def measure(preload: str | None) -> dict:
    env = dict(os.environ, DWQ_NO_BLAS_PRELOAD="1", LD_PRELOAD=preload or "")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPEATS), str(BATCH), str(LENGTH)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from pipeline.runtime import find_openblas

    openblas = find_openblas()
    if openblas is None:
        raise SystemExit("OpenBLAS not installed: sudo apt-get install libopenblas0-pthread")
    clock = FullTime("blas")
    start = time.time()
    fast, slow = measure(openblas), measure(None)
    full_work = FULL[0] * FULL[1] * FULL[2]
    for side in (fast, slow):
        clock.add(side["forward_s"], REPEATS * BATCH * LENGTH, full_work)
    rows = [
        Ratio(
            "blas",
            "float32 GEMM 1024^3 GFLOPS, bundled BLAS -> OpenBLAS",
            slow["gflops"],
            fast["gflops"],
        ),
        Ratio(
            "blas",
            f"SmolLM2 forward {BATCH}x{LENGTH} tok/s, bundled BLAS -> OpenBLAS",
            slow["forward_tok_s"],
            fast["forward_tok_s"],
        ),
    ]
    caption = (
        f"{fast['blas']}; {os.cpu_count()} CPUs; best of {REPEATS} each side; "
        f"{time.time() - start:.0f}s"
    )
    report("BLAS: OpenBLAS preload vs MLX's bundled BLAS (one run)", rows, caption)
    clock.write()


if __name__ == "__main__":
    main()
