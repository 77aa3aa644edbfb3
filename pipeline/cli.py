"""The `dwq-pipeline` command: thin typer commands over pipeline/ and stages/."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

try:  # newer typer vendors click: the usage errors it raises are its copy's
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from pipeline import ui
from pipeline.errors import PipelineError

app = typer.Typer(
    help="Distilled weight quantization for MLX: teacher targets into a Zarr store, then tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
store_app = typer.Typer(help="Inspect, verify, pack and merge target stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (see configs/).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key: section.key=value (repeatable)."),
]
StoreOption = Annotated[str | None, typer.Option(help="Target store path (overrides config).")]
StorageOption = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        help="fsspec option for a URL store, key=value (repeatable), e.g. endpoint_url=...",
    ),
]
StoreArgument = Annotated[
    str, typer.Argument(help="Store: folder, .zip from `store pack`, or URL.")
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow Python code shipped in a model folder to run (off by default).",
    ),
]


EXIT_UNEXPECTED = 1  # not a known bad input: a failure we did not foresee (or a bug)
DEBUG_ENV = "DWQ_DEBUG"
_debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
_is_console = False  # run as the console command (not in-process, as tests do)
_interrupt_reported = False  # a command said what its Ctrl-C left behind

# What Ctrl-C leaves behind, per command (default: nothing was written).
INTERRUPTED = {
    "targets": "finished chunks are kept; re-run the same command to resume",
    "tune": "the last checkpoint in the run folder is kept; re-run the same command to resume",
    "store_merge": "chunks merged so far are kept; re-run the same command to finish",
    "store_pack": "the zip was not written",
}


@app.callback()
def main_options(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Show an error's full traceback (or {DEBUG_ENV}=1).")
    ] = False,
) -> None:
    global _debug
    _debug = _debug or debug


def _unexpected(action: str, exc: BaseException) -> str:
    """One line for a failure no floor turned into a message: what ran, on which file, why."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    path = getattr(exc, "filename", None)  # OSError knows its file; its message may not say it
    where = f" on {path}" if path and str(path) not in detail else ""
    hint = "" if _debug else f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
    return f"{action} failed{where}: {type(exc).__name__}{': ' + detail if detail else ''}{hint}"


def _left_behind(name: str) -> str:
    """What the command `name` leaves when it stops early."""
    return INTERRUPTED.get(name, "nothing was written or changed")


def _peer_lost_error(name: str) -> None:
    """A rank knows only that the connection broke, not why: the other process's own error
    line, or mlx.launch's warning with its exit code (a process killed prints nothing), says.
    mlx.launch's SIGTERM follows at once and must not cut the line short; after it the SIGTERM
    may end the process again (mlx.launch waits for it with no timeout)."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if _is_console else None
    ui.error(
        "lost the connection to another process of this launch (its error line or mlx.launch's "
        f"warning says why, unless the network failed); {_left_behind(name)}"
    )
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def guarded(command):
    """Every error becomes one red line: known bad input exits 2, anything unforeseen exits 1
    (the traceback only with --debug)."""
    from stages.distributed import peer_lost
    from stages.errors import StageError
    from stages.tune import TuneInterrupted
    from store.errors import StoreError

    name = command.__name__
    action = {"evaluate": "eval", "show_config": "config"}.get(name, name)
    action = action.replace("_", " ")

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TuneInterrupted as exc:
            _report_interrupt(str(exc))
        except (PipelineError, StageError, StoreError) as exc:
            _show_traceback_if_debug()
            ui.error(str(exc))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            _report_interrupt(f"interrupted; {_left_behind(name)}")
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            _show_traceback_if_debug()
            if not peer_lost(exc):
                ui.error(_unexpected(action, exc))
            else:
                _peer_lost_error(name)
            raise typer.Exit(EXIT_UNEXPECTED) from None

    return wrapper


def _report_interrupt(message: str) -> None:
    """One line and exit 130; a second Ctrl-C no longer cuts it short, and the async reads the
    interrupt abandoned (zarr's event loop) are not reported as pending tasks at exit."""
    global _interrupt_reported
    _finished()
    _quiet_abandoned_async_work()
    ui.error(message)
    _interrupt_reported = True
    raise typer.Exit(EXIT_INTERRUPTED) from None


def _quiet_abandoned_async_work() -> None:
    import logging
    import warnings

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task was destroyed but ..."
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)


def _show_traceback_if_debug() -> None:
    if _debug:
        ui.console.print_exception()


def _overrides(pairs: dict[str, object], sets: list[str] | None) -> dict[str, object]:
    from pipeline.config import parse_override

    # Precedence: a named flag beats --set, which beats the file.
    merged = dict(parse_override(text) for text in sets or [])
    merged.update({key: value for key, value in pairs.items() if value is not None})
    return merged


def _stage_config(section: str, config: Path | None, sets: list[str] | None, flags: dict):
    """One stage's config from the file, --set and the command's own flags (`flags`: the
    command's locals, its parameters by name; the config's fields say which flag sets what)."""
    from pipeline.config import flag_overrides, load_config

    flags = {**flags, "storage_option": _storage_options(flags["storage_option"])}
    overrides = _overrides(flag_overrides(section, flags), sets)
    return getattr(load_config(config, overrides), section)


def _storage_options(pairs: list[str] | None) -> dict | None:
    from store.location import parse_storage_options

    return parse_storage_options(pairs) or None


def _parse_shard(text: str | None, ranks_are_shards: bool = True):
    from pipeline.runtime import distributed_rank_and_size
    from stages.targets import Shard

    if text is None:
        # a launch that splits the teacher across its ranks computes one shard together
        rank, size = distributed_rank_and_size() if ranks_are_shards else (0, 1)
        return Shard(rank, size)
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise PipelineError(f"--shard must look like i/N (got {text!r})")
    return Shard(int(index), int(count))


@app.command()
@guarded
def targets(
    config: ConfigOption = None,
    teacher: Annotated[
        str | None, typer.Option(help="Teacher: 'default', folder or HF id.")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Data: 'default', jsonl, folder or HF id.")
    ] = None,
    store: StoreOption = None,
    top_k: Annotated[int | None, typer.Option(help="Logits kept per position.")] = None,
    tail_samples: Annotated[
        int | None, typer.Option(help="Ids sampled per position from outside the top-k.")
    ] = None,
    num_samples: Annotated[int | None, typer.Option(help="Training sequences.")] = None,
    max_seq_length: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="Compute only shard i of N (i/N); automatic under mlx.launch."),
    ] = None,
    pipeline: Annotated[
        bool,
        typer.Option(
            "--pipeline",
            help="Under mlx.launch, split the teacher's layers across the ranks (mlx-lm's "
            "pipeline); the launch computes one shard (--shard i/N picks it).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace a store made with other settings (only its own files)."),
    ] = False,
    trust_remote_code: TrustOption = False,
    storage_option: StorageOption = None,
    set_: SetOption = None,
) -> None:
    """Run the teacher over the data and write its top-k logits into the store (resumable)."""
    from stages.targets import compute_targets

    cfg = _stage_config("targets", config, set_, locals())
    which = _parse_shard(shard, ranks_are_shards=not cfg.pipeline)
    with ui.targets_progress() as on_progress:
        manifest = compute_targets(
            cfg,
            shard=which,
            overwrite=overwrite,
            on_progress=on_progress,
            on_repair=lambda what: ui.warn(f"repairing: {what}"),
        )
        _finished()
    if manifest is None:  # a rank that ran some of the teacher's layers; rank 0 wrote
        ui.info(f"teacher layers run for shard {which}; rank 0 wrote {cfg.store}")
        return
    sizes = ", ".join(f"{n}: {s.num_sequences} seq" for n, s in manifest.splits.items())
    samples = f", {cfg.tail_samples} tail samples" if cfg.tail_samples else ""
    ui.info(f"targets done for shard {which} -> {cfg.store} ({sizes}, top-k {cfg.top_k}{samples})")


@app.command()
@guarded
def tune(
    config: ConfigOption = None,
    store: StoreOption = None,
    student: Annotated[
        str | None,
        typer.Option(help="Quantized student (folder or HF id); default: quantize the teacher."),
    ] = None,
    run_dir: Annotated[
        str | None, typer.Option(help="Checkpoints, metrics and model/ go here.")
    ] = None,
    loss: Annotated[str | None, typer.Option(help="kl_topk, kl_tail, reverse_kl or js.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak Adam learning rate.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (0 = by epochs).")] = None,
    mode: Annotated[
        str | None, typer.Option(help="Student's quantization: affine, mxfp4, nvfp4 or mxfp8.")
    ] = None,
    bits_per_weight: Annotated[
        float | None,
        typer.Option(
            help="Budget as stored (scales included); each layer's bits and group size by "
            "sensitivity."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Discard the checkpoint and metrics of an earlier run in run-dir."),
    ] = False,
    trust_remote_code: TrustOption = False,
    storage_option: StorageOption = None,
    set_: SetOption = None,
) -> None:
    """Tune the student's quantization scales and biases on the store's targets (resumable)."""
    from stages.tune import rate_note
    from stages.tune import tune as run_tune

    cfg = _stage_config("tune", config, set_, locals())
    if note := rate_note(cfg):
        ui.info(f"note: {note}")
    with ui.tune_progress() as display:
        result = run_tune(
            cfg, overwrite=overwrite, on_step=display.on_step, on_phase=display.on_phase
        )
        _finished()
    ui.info(
        f"tuned {result.steps} step{'' if result.steps == 1 else 's'}: validation loss "
        f"{result.initial_val_loss:.4f} -> "
        f"{result.best_val_loss:.4f} (best at step {result.best_step}); model in {result.model_dir}"
    )
    if result.warning:
        ui.warn(result.warning)


@app.command("eval")
@guarded
def evaluate(
    config: ConfigOption = None,
    store: StoreOption = None,
    student: Annotated[
        str | None, typer.Option(help="Tuned student folder (default: tune.run_dir/model).")
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Teacher (default: the one that made the store).")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Data (default: the store's); its test split is used.")
    ] = None,
    num_sequences: Annotated[int | None, typer.Option(help="Held-out sequences (0 = all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    save: Annotated[
        Path | None,
        typer.Option(help="Also write the JSON here (replaces only an eval JSON written by eval)."),
    ] = None,
    trust_remote_code: TrustOption = False,
    storage_option: StorageOption = None,
    set_: SetOption = None,
) -> None:
    """Teacher vs plain RTN vs tuned student on held-out text: KL, perplexity, top-1 agreement."""
    import json

    from stages.evaluate import check_save_path, save_result
    from stages.evaluate import evaluate as run_eval

    cfg = _stage_config("eval", config, set_, locals())
    if save:
        check_save_path(save, cfg)  # before the models run
    with ui.batch_progress("eval", enabled=not as_json) as on_batch:
        result = run_eval(cfg, on_batch=on_batch)
        _finished()  # the --save below is written whole, Ctrl-C or not
    if save:
        save_result(save, result)
    if as_json:
        ui.out.print_json(json.dumps(result.to_dict()))
    else:
        ui.out.print(ui.eval_table(result))


@app.command()
@guarded
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="A tune run_dir (holds metrics.jsonl), or several.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="With several runs: the comparison plot to write (a .png)."),
    ] = None,
) -> None:
    """Summary of a tune run and a PNG plot of its losses (report.md, report.png in RUN_DIR);
    with several runs, a table and one plot comparing them (--out), their folders only read."""
    from pipeline.report import differing_settings, write_comparison, write_report

    if len(run_dirs) > 1:
        if out is None:
            raise PipelineError("several runs are compared in one plot: give --out FILE.png")
        summaries, plot = write_comparison(run_dirs, out)
        ui.out.print(ui.comparison_table(summaries, differing_settings(summaries)))
    else:
        if out is not None:
            raise PipelineError(
                "--out is for comparing several runs; one run's report goes into its folder"
            )
        summary, plot = write_report(run_dirs[0])
        for line in summary.lines():
            ui.info(line)
    if plot is None:
        written = "" if len(run_dirs) > 1 else f" (summary written to {run_dirs[0] / 'report.md'})"
        raise PipelineError(f"the plot needs matplotlib: pip install 'dwq-pipeline[plot]'{written}")
    ui.info(f"plot: {plot}")


@store_app.command("info")
@guarded
def store_info(store: StoreArgument, storage_option: StorageOption = None) -> None:
    """Teacher, k, sequences, tokens, chunks done, bytes/token and compression ratio."""
    from store.inspect import store_info as collect

    ui.out.print(ui.store_info_table(collect(store, _storage_options(storage_option))))


@store_app.command("verify")
@guarded
def store_verify(store: StoreArgument, storage_option: StorageOption = None) -> None:
    """Re-check every chunk against its checksum; exit 1 on any problem."""
    from store.inspect import verify_store

    problems = verify_store(store, _storage_options(storage_option))
    for problem in problems:
        ui.error(problem)
    if problems:
        ui.error(f"{len(problems)} problem(s) in {store}; re-run `dwq-pipeline targets` to repair")
        raise typer.Exit(1)
    ui.info(f"{store}: every chunk verified")


@store_app.command("pack")
@guarded
def store_pack(
    store: StoreArgument,
    out: Annotated[str, typer.Argument(help="The .zip file to write (outside the store).")],
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace OUT if it is a zip written by store pack (nothing else is)."),
    ] = False,
    storage_option: StorageOption = None,
) -> None:
    """Pack a store into one zip file that tune, eval, info and verify read directly."""
    from store.pack import pack_store

    result = pack_store(store, out, _storage_options(storage_option), overwrite=overwrite)
    _finished()
    ui.info(f"packed {result.files} files, {result.bytes / 1e6:.1f} MB into {result.path}")
    if result.chunks_missing:
        ui.warn(f"the store is incomplete: {result.chunks_missing} chunks are not in the zip")


@store_app.command("merge")
@guarded
def store_merge(
    out: Annotated[
        str,
        typer.Argument(help="Store to merge into: new, empty or a store; not one of the inputs."),
    ],
    inputs: Annotated[list[str], typer.Argument(help="Stores made with the same settings.")],
) -> None:
    """Join shard stores computed on several machines into one."""
    from store.writer import merge_stores

    copied = merge_stores(out, inputs)
    _finished()
    ui.info(f"merged into {out}: " + ", ".join(f"{k} +{v} chunks" for k, v in copied.items()))


@app.command("config")
@guarded
def show_config(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Every config key with its resolved value (file and --set applied) and its help."""
    from pipeline.config import load_config

    ui.out.print(ui.config_table(load_config(config, _overrides({}, set_))))


@app.command()
@guarded
def doctor() -> None:
    """MLX version and device, the BLAS in use, and measured float32 GEMM GFLOPS."""
    import mlx.core as mx

    from pipeline.runtime import describe_blas, measure_gemm_gflops

    table = ui.Table(title="dwq-pipeline doctor", show_header=False)
    table.add_row("MLX", mx.__version__)
    table.add_row("device", str(mx.default_device()))
    table.add_row("BLAS", describe_blas())
    table.add_row("float32 GEMM 1024^3", f"{measure_gemm_gflops():.1f} GFLOPS")
    ui.out.print(table)


def _finished() -> None:
    """The command's work is done: a Ctrl-C from now on (while the result is printed, at exit)
    would only turn a success into a failure, so the console command ignores it; in-process
    callers (tests) keep their handler."""
    if _is_console:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _usage_error(exc: click_errors.ClickException) -> int:
    """Click's usage errors (missing argument, unknown option, a value of the wrong type) as
    one red line instead of a box; exit 2."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command group: its help
        text = exc.ctx.get_help() if exc.ctx else ""  # rich help prints itself, returns ""
        if text.strip():
            print(text, file=sys.stderr)
        return exc.exit_code
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click_errors.UsageError) and ctx is not None:
        message += f" (see {ctx.command_path} --help)"
    ui.error(message)
    return exc.exit_code


def main(blas_warning: str | None = None) -> None:
    """Run the app; pipeline/entry.py's main is the console entry that calls this."""
    from pipeline.runtime import quiet_library_logs

    global _is_console
    _is_console = True
    if blas_warning:
        ui.warn(blas_warning)
    quiet_library_logs()
    try:
        code = app(standalone_mode=False)
    except click_errors.ClickException as exc:
        code = _usage_error(exc)
    except typer.Abort:  # click's word for a Ctrl-C outside any command
        raise KeyboardInterrupt from None
    if code == EXIT_INTERRUPTED and not _interrupt_reported:  # typer's, before the command
        raise KeyboardInterrupt
    _finished()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    from pipeline.entry import main as console_main

    console_main()
