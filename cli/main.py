"""Entry point: importing the command modules registers their commands on ``app``."""

from __future__ import annotations

from cli import grow  # noqa: F401  (registers `grow`)
from cli import export  # noqa: F401  (registers `export`, `verify`, `report`)
from cli import serve  # noqa: F401
from cli.app import app


def main() -> None:
    """Console-script entry point of ``tinydeploy``."""
    app()


if __name__ == "__main__":
    main()
