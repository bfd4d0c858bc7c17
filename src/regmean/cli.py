"""The `regmean` command: measure, fisher, merge, evaluate, stats show/audit/combine, convert-gguf, and the commands
other packages add through the `regmean.commands` entry points (the benchmark harness adds `bench`)."""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import click
import torch
import typer

from regmean.cli_audit import stats_audit
from regmean.cli_common import console
from regmean.cli_show import convert_gguf, stats_show
from regmean.cli_show import evaluate as evaluate_command
from regmean.errors import RegmeanError, RegmeanWarning, one_line
from regmean.io.outputs import no_room
from regmean.launch import relaunch_with_torchrun
from regmean.measure import STATISTICS
from regmean.merge.config import MAX_LORA_RANK

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dataless knowledge fusion with RegMean.")
stats_app = typer.Typer(no_args_is_help=True, help="Inspect, audit and combine statistics files.")
app.add_typer(stats_app, name="stats")


def _print_version(asked: bool) -> None:
    if asked:
        from regmean import __version__

        print(f"regmean {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Dataless knowledge fusion with RegMean."""


def _fail(problems: list[str], code: int = 2) -> NoReturn:
    for line in problems:
        print(f"error: {one_line(line)}", file=sys.stderr)
    raise typer.Exit(code)


MEMORY_HINTS = {
    "batch_size": "lower --batch-size",
    "max_memory": "lower --max-memory",
    "dry_run": "see the plan with --dry-run",
}
"""What a command that ran out of memory advises, for the options it has."""


def _reports_errors(command: Callable) -> Callable:
    """Every failure of a command as one line per problem and a non-zero exit, never a traceback: the tool's own
    errors (exit 2), the operating system's (a full disk, a folder made read-only during the run), memory, an
    interrupt, and, as a last resort, a defect of ours (exit 3; REGMEAN_DEBUG=1 shows its traceback)."""

    options = inspect.signature(command).parameters
    hints = [hint for option, hint in MEMORY_HINTS.items() if option in options]
    advice = f" ({', or '.join(hints)})" if hints else ""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except RegmeanError as exc:
            _fail(exc.problems)
        except OSError as exc:
            full = no_room(exc)
            why = f"{full}; free space or choose another output" if full else exc.strerror or exc
            _fail([f"{exc.filename or 'a file'}: {why}; nothing was written"])
        except (MemoryError, torch.OutOfMemoryError):
            _fail([f"out of memory; nothing was written{advice}"])
        except KeyboardInterrupt:
            _fail(["interrupted; nothing was written"], 130)
        except Terminated:
            _fail(["terminated; nothing was written"], 143)
        except Exception as exc:
            if os.environ.get("REGMEAN_DEBUG"):
                raise
            _fail([f"internal error ({type(exc).__name__}: {exc}); please report it (REGMEAN_DEBUG=1 for details)"], 3)

    return run


for _statistic in STATISTICS.values():  # each statistic's measuring command: measure (Grams), fisher
    app.command(_statistic.command)(_reports_errors(_statistic.load_command()))


@app.command()
@_reports_errors
def merge(
    config: Annotated[Path, typer.Argument(help="Merge recipe (YAML)")],
    out_dir: Annotated[Path, typer.Argument(help="Output model folder")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the plan (bytes, peak memory); merge nothing")
    ] = False,
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 2GB")] = "5GB",
    max_memory: Annotated[str | None, typer.Option(help="Refuse if the peak memory estimate exceeds this")] = None,
    device: Annotated[str, typer.Option(help="Where the steps compute: cpu, cuda, cuda:1 (regmean, average)")] = "cpu",
    nproc: Annotated[int, typer.Option(min=1, help="Processes on this machine (runs torchrun for you)")] = 1,
    lora_rank: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_LORA_RANK, help="Write one LoRA adapter of this rank over the base (output.lora)"),
    ] = None,
) -> None:
    """Merge fine-tuned models (and their statistics) into one Hugging Face model folder (or one LoRA adapter).

    Across processes: `torchrun --nproc_per_node N -m regmean merge ...` or `--nproc N`; the steps are divided
    among the ranks, which write into the same output shards (one folder every rank sees); rank 0 finishes it."""
    from regmean import distributed
    from regmean.merge import merge as run_merge
    from regmean.merge.parallel import check_divisible
    from regmean.merge.report import diagnostic

    if nproc > 1 and not distributed.launched():
        relaunch_with_torchrun(nproc, check=lambda: check_divisible(config))

    result = run_merge(
        config,
        out_dir,
        force=force,
        dry_run=dry_run,
        shard_size=shard_size,
        max_memory=max_memory,
        device=device,
        log=console.print,
        lora_rank=lora_rank,
    )
    if dry_run or result is None:  # (a rank other than 0 reports nothing)
        return
    from regmean.methods.coverage import matrices

    s = result.summary()
    detail = ""
    if s.solved_layers:
        detail = (
            f"; {s.solved_layers} {result.title} layers, {s.ridge_layers} with ridge, "
            f"mean relative error {diagnostic(s.mean_relative_error)}"
        )
    if result.averaged:
        detail += f"; {matrices(len(result.averaged))} averaged (why: merge_report.json)"
    console.print(f"wrote {out_dir} ({result.method}{detail})")
    for line in result.adapter_lines():
        console.print(line)
    for warning in result.warnings:
        console.print(warning)


@stats_app.command("combine")
@_reports_errors
def stats_combine(
    paths: Annotated[list[Path], typer.Argument(help="Statistics of one model on disjoint data")],
    out: Annotated[Path, typer.Option(help="Folder for the combined statistics")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing statistics file")] = False,
) -> None:
    """Add statistics measured separately: the result equals measuring the union of the data."""
    from regmean.combine import combine
    from regmean.stats import BlockWriter

    with BlockWriter(out, force, [("statistics", p) for p in paths], console.print) as writer:
        writer.write(combine(paths), 0, 1)
        (path,) = writer.commit()
    console.print(f"wrote {path}")


class Terminated(BaseException):
    """SIGTERM (e.g. `kill`), raised where the program is, so that every clean-up runs as for Ctrl-C."""


app.command("convert-gguf")(_reports_errors(convert_gguf))
app.command("evaluate")(_reports_errors(evaluate_command))


def _add_plugin_commands() -> dict[str, str]:
    """Add the commands installed packages add: each `regmean.commands` entry point is a `register(app,
    reports_errors)` (benchmarks/pyproject.toml registers the harness's `bench`). Returns those that failed to
    import, with why (said only when one of them is asked for)."""
    from importlib.metadata import entry_points

    broken = {}
    for entry in entry_points(group="regmean.commands"):
        try:  # another package's code: whatever it raises must not break regmean's own commands
            entry.load()(app, _reports_errors)
        except Exception as exc:
            broken[entry.name] = f"its package {entry.value.split(':')[0]} does not load ({one_line(str(exc))})"
    return broken


stats_app.command("show")(_reports_errors(stats_show))
stats_app.command("audit")(_reports_errors(stats_audit))
BROKEN_COMMANDS = _add_plugin_commands()


def _interrupt(signum: int, frame: object) -> None:
    """The first Ctrl-C or SIGTERM stops the run; later ones are ignored, so that its clean-up finishes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


UsageError = typer.BadParameter.__mro__[1]
"""typer's own click UsageError: a command line that does not parse (unknown option, value out of range)."""


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """regmean's own warnings as one `warning:` line on stderr; others as Python shows them."""
    if issubclass(category, RegmeanWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _python_warning(message, category, filename, lineno, file, line)


_python_warning = warnings.showwarning


def main() -> None:
    warnings.showwarning = _show_warning
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = app(standalone_mode=False, prog_name="regmean")
    except UsageError as exc:  # click would print a usage box: one line instead, and where to look
        message = exc.format_message()
        if sys.argv[1:2] == ["bench"] and "No such command" in message:
            why = BROKEN_COMMANDS.get("bench", "the benchmark harness is installed apart")
            message = f"regmean bench: {why}; pip install -e benchmarks/ (from a source checkout)"
        if message:  # (no message: help was printed because no arguments were given)
            command = exc.ctx.command_path if exc.ctx else "regmean"
            print(f"error: {one_line(message)} (see {command} --help)", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("error: aborted; nothing was written", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before a command started (_reports_errors reports the rest)
        print("error: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated; nothing was written", file=sys.stderr)
        sys.exit(143)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
