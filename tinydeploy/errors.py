"""User-facing errors: one line naming the problem and the fix; the CLI exits non-zero on them.

Exit codes (the same in every command and in the edge entry point): an ``IntegrityError`` (a model
directory that is tampered, incomplete, malformed or unsafe to load) exits 1 like any other check
that ran and failed; every other ``TinyDeployError`` (bad input: options, paths, data) exits 2.
"""

#: Exit code for a check that ran and failed (parity gate, integrity of a model directory).
EXIT_CHECK_FAILED = 1
#: Exit code for bad input (unknown option values, missing files, malformed data).
EXIT_BAD_INPUT = 2


class TinyDeployError(Exception):
    """Base class of every error the CLI reports as a one-line message."""


class DataError(TinyDeployError):
    """The dataset cannot be read or fails validation."""


class SpecError(TinyDeployError):
    """The architecture spec is malformed or asks for something unsupported."""


class IntegrityError(TinyDeployError):
    """A model directory is refused: a file is missing, changed, unlisted, a symbolic link, or would
    make a loader read outside the directory or run code; or its manifest is missing or malformed."""


def exit_code(error: TinyDeployError) -> int:
    """The process exit code for ``error`` (see the module docstring)."""
    return EXIT_CHECK_FAILED if isinstance(error, IntegrityError) else EXIT_BAD_INPUT
