"""The `dwq-pipeline` console entry. It imports only the standard library until it can catch a
Ctrl-C, so one pressed while rich, transformers and MLX load (the first second or so) is one
line and exit 130, never a traceback; the process re-executed with OpenBLAS preloaded runs
this same entry."""

from __future__ import annotations

import os
import sys
import traceback

EXIT_INTERRUPTED = 130


def main() -> None:
    try:
        from pipeline.runtime import ensure_fast_blas

        warning = ensure_fast_blas()  # re-executes before the heavy imports, not after them
        from pipeline.cli import main as run_cli

        run_cli(warning)
    except KeyboardInterrupt:
        if os.environ.get("DWQ_DEBUG", "") not in ("", "0") or "--debug" in sys.argv:
            traceback.print_exc()
        # rich may not be loaded yet: plain text, as ui.error would print it without colour
        print(
            "error: interrupted before the command started; nothing was written or changed",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERRUPTED)
