"""Torch-free edge entry point: ``python -m tinydeploy.serving.edge DIR [options]``.

It imports only the standard library, numpy, onnxruntime and uvicorn (via
``tinydeploy.serving.server``), so it runs on an image with ``requirements-edge.txt`` and no torch.
Options are the same as ``tinydeploy serve``. Errors are one line on stderr; the exit code is 1 for a
refused model directory (integrity) and 2 for other bad input, as in the CLI.
"""

from __future__ import annotations

import argparse
import sys

from tinydeploy.errors import TinyDeployError, exit_code
from tinydeploy.serving.limits import DEFAULT_BODY_TIMEOUT_S
from tinydeploy.serving.providers import DEFAULT_PROVIDER, PROVIDER_CHOICES, PROVIDER_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tinydeploy.serving.edge",
        description="Serve a tinydeploy export directory over HTTP with onnxruntime (no torch needed).",
    )
    parser.add_argument("export_dir", help="export directory written by 'tinydeploy export --onnx' (or a .onnx file)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--provider", choices=PROVIDER_CHOICES, default=DEFAULT_PROVIDER, help=PROVIDER_HELP)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch per request (default 1024)")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help=f"seconds a client gets to send a request body (default {DEFAULT_BODY_TIMEOUT_S:g})")
    parser.add_argument("--no-verify", action="store_true",
                        help="serve without checking manifest.json (unsafe: tampered files go undetected)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from tinydeploy.serving.server import serve

        serve(args.export_dir, host=args.host, port=args.port, provider=args.provider, workers=args.workers,
              max_batch=args.max_batch, log_level=args.log_level, verify=not args.no_verify,
              body_timeout_s=args.body_timeout)
    except TinyDeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
