"""User-facing errors: one line naming the problem and the fix; the CLI exits non-zero on them."""


class TinyDeployError(Exception):
    """Base class of every error the CLI reports as a one-line message."""


class DataError(TinyDeployError):
    """The dataset cannot be read or fails validation."""


class SpecError(TinyDeployError):
    """The architecture spec is malformed or asks for something unsupported."""
