"""Tuning from object storage vs from a local folder, as a ratio from one run (goal >= 0.9).

The object store is moto's standalone S3 server on 127.0.0.1 (a real HTTP server speaking the
S3 API, as the tests use), holding a copy of a default-teacher store.
Run: `make bench` or `.venv/bin/python -m bench.remote`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import FullTime, Ratio, report
from bench.tune import (
    FULL,
    LOOP_SETTINGS,
    SEQ_LEN,
    STEPS,
    make_store,
    setup_seconds,
    tokens_per_s,
)
from stages.tune import TuneConfig, tune

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_moto(port: int) -> subprocess.Popen:
    from tests.conftest import wait_for_port

    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return server


def main() -> None:
    import s3fs

    from tests.conftest import free_ports

    os.environ.update(CREDENTIALS)
    clock = FullTime("remote")
    setup = setup_seconds()
    port = free_ports(1)
    server = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            store = make_store(tmp / "s.zarr", 4 * STEPS)
            fs = s3fs.S3FileSystem(endpoint_url=endpoint)
            fs.mkdir("bench")
            fs.put(str(store), "bench/s.zarr", recursive=True)
            settings = dict(max_steps=STEPS, **LOOP_SETTINGS)
            tic = time.perf_counter()
            tune(TuneConfig(store=str(store), run_dir=str(tmp / "warm"), **settings))
            tune(TuneConfig(store=str(store), run_dir=str(tmp / "local"), **settings))
            local = tokens_per_s(tmp / "local")
            remote_store = TuneConfig(
                store="s3://bench/s.zarr",
                storage_options={"endpoint_url": endpoint},
                run_dir=str(tmp / "s3"),
                **settings,
            )
            tune(remote_store)
            remote = tokens_per_s(tmp / "s3")
            tuned = time.perf_counter() - tic - 3 * setup
            clock.add(max(tuned, 0.0), STEPS * SEQ_LEN, FULL[1] * FULL[0])
    finally:
        server.kill()
        server.wait()
    rows = [
        Ratio(
            "remote",
            "tune tokens/s from S3 (moto, 127.0.0.1) vs local folder",
            local,
            remote,
            ">= 0.9",
        )
    ]
    report(f"remote store, default teacher, {STEPS} steps of 4x{SEQ_LEN} (one run)", rows)
    clock.write()


if __name__ == "__main__":
    main()
