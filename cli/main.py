"""Entry point of ``tinydeploy``: the commands are registered lazily (see ``cli.app.COMMANDS``)."""

from __future__ import annotations

from cli.app import app


def main() -> None:
    """Console-script entry point of ``tinydeploy``."""
    app()


if __name__ == "__main__":
    main()
