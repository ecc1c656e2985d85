"""Alias kept for ``python -m tinydeploy.serve_edge``: the entry point lives in ``tinydeploy.serving.edge``."""

import sys

from tinydeploy.serving.edge import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
