"""Helpers of the serving tests: a real export directory and a real uvicorn server on loopback.

The export directory is the export engineers' shared fixture (``export_fixtures.exported``: a real
digits MLP trained with torch, exported by ``tinydeploy.export.export_run`` to ONNX, TorchScript
and torch.export, built once per test process). Tests that modify files work on a copy.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from export_fixtures import exported, trained_run  # noqa: F401  (re-exported fixtures)


@pytest.fixture(scope="session")
def export_dir(exported) -> Path:  # noqa: F811
    """The shared export directory. Do not modify it: copy it with ``copy_export``."""
    return exported.out_dir


def copy_export(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


@contextlib.contextmanager
def running_server(app, timeout: float = 20.0) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn server on a free loopback port in a thread; yield its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
