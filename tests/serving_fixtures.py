"""Helpers of the serving tests: a real export directory and a real uvicorn server on loopback.

The export directory is the export engineers' shared fixture (``export_fixtures.exported``: a real
digits MLP trained with torch, exported by ``tinydeploy.export.export_run`` to ONNX, TorchScript
and torch.export, built once per test process). Tests that modify files work on a copy. Tests that need no
trained model use ``serving_fast_fixtures`` instead (about 0.1 s instead of 25 s).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from export_fixtures import exported, trained_run  # noqa: F401  (re-exported fixtures)
from serving_fast_fixtures import running_server  # noqa: F401  (re-exported)


@pytest.fixture(scope="session")
def export_dir(exported) -> Path:  # noqa: F811
    """The shared export directory. Do not modify it: copy it with ``copy_export``."""
    return exported.out_dir


def copy_export(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest
