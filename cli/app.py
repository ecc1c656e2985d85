"""The shared Typer application object and the error boundary of every command."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import typer

from tinydeploy.errors import TinyDeployError

app = typer.Typer(
    name="tinydeploy",
    help="Grow compact neural networks with TINY and ship them to edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code for bad input (unknown option values, missing files, malformed data).
EXIT_BAD_INPUT = 2
#: Exit code for a check that ran and failed (parity gate, hash mismatch).
EXIT_CHECK_FAILED = 1


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print a one-line error to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def reports_errors(func: F) -> F:
    """Turn a ``TinyDeployError`` raised by library code into a one-line error and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TinyDeployError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
