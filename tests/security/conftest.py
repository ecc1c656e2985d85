"""The hostile-input suite: real malicious artifacts and real hostile HTTP clients (see README, Security model).

The shared fixtures of the other test modules live one directory up; this makes them importable."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from serving_fixtures import export_dir, exported, trained_run  # noqa: E402,F401  (fixtures of every module here)
