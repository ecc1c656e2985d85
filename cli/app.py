"""The shared Typer application object, its lazily loaded commands, and the error boundary of every command.

Start-up stays short because nothing heavy is imported before it is needed: ``tinydeploy --help``
lists the commands from ``COMMANDS`` without importing any of their modules, and running a command
imports only the module that defines it. Command modules import torch, onnxruntime and the like
inside the command functions, so ``serve``, ``predict``, ``verify --hashes-only`` and ``report`` of an
export directory never import torch.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import sys
from typing import Any, Callable, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from tinydeploy import __version__
from tinydeploy.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, TinyDeployError, exit_code

__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "EXIT_CHECK_FAILED", "app", "fail", "reports_errors"]

#: Command name -> (module that registers it, the first line of its docstring for ``tinydeploy --help``).
#: ``tests/test_cli_startup.py`` checks that this table matches the commands the modules register.
COMMANDS: dict[str, tuple[str, str]] = {
    "grow": ("cli.grow", "Start at width 1 and grow a compact MLP or CNN with TINY while it trains; write a run directory."),
    "export": ("cli.export",
               "Freeze a grown run, export it, check every artifact's parity, write reports and a manifest."),
    "verify": ("cli.export",
               "Check the manifest hashes, reload every safe artifact from the hashed bytes and re-run the parity gate."),
    "report": ("cli.export", "Print the per-layer width report."),
    "serve": ("cli.serve", "Serve an exported model over HTTP with onnxruntime (no torch needed)."),
    "predict": ("cli.serve", "Batch inference on a file of raw inputs, in chunks, with a progress bar on large inputs."),
    "bench": ("cli.serve", "Latency p50/p95/p99 and throughput: onnxruntime vs PyTorch eager vs TorchScript "
                           "(vs int8), side by side."),
}


class PlainHelp:
    """Help that shows switches as switches (``--onnx``, not ``--onnx <bool>``, which suggests a value)
    and required arguments as ``RUN_DIR`` in the usage line (not ``{run_dir}``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece[1:-1].upper() if piece.startswith("{") and piece.endswith("}") else piece
                for piece in super().collect_usage_pieces(ctx)]  # type: ignore[misc]


class PlainCommand(PlainHelp, TyperCommand):
    """A command with ``PlainHelp``."""


class LazyGroup(PlainHelp, TyperGroup):
    """A command group that imports a command's module only when that command is used."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return [*COMMANDS, *(name for name in self.commands if name not in COMMANDS)]

    def get_command(self, ctx: Any, name: str) -> Any:
        if name in self.commands:
            return self.commands[name]
        if name not in COMMANDS:
            return None
        module, short_help = COMMANDS[name]
        if self._listing:  # the group's help needs one line per command, not the command itself
            return TyperCommand(name, help=short_help, short_help=short_help)
        importlib.import_module(module)
        for info in app.registered_commands:
            if (info.name or typer.main.get_command_name(info.callback.__name__)) == name:
                command = typer.main.get_command_from_info(
                    info, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=app.rich_markup_mode
                )
                self.commands[name] = command
                return command
        return None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name = args[0]
        command = self.get_command(ctx, name)
        if command is None and not ctx.resilient_parsing:
            if name.startswith("-"):
                self.parse_args(ctx, args)
            close = difflib.get_close_matches(name, self.list_commands(ctx))
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            ctx.fail(f"No such command {name!r}.{hint}")
        return (name if command else None), command, args[1:]


class App(typer.Typer):
    """The Typer application whose commands default to ``PlainCommand``."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or PlainCommand, **kwargs)


app = App(
    name="tinydeploy",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tinydeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _tinydeploy(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version, metavar="",
                                 help="Print the version and exit."),
) -> None:
    """Grow compact neural networks with TINY and ship them to edge devices.

    Example: tinydeploy grow --dataset data.csv --target label --out runs/mine && tinydeploy export runs/mine
    """


F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print a one-line error to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def reports_errors(func: F) -> F:
    """Turn a ``TinyDeployError`` raised by library code into a one-line error: exit 1 for a refused
    model directory (``IntegrityError``), 2 for other bad input (see ``tinydeploy.errors``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TinyDeployError as exc:
            fail(str(exc), exit_code(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
