"""tinydeploy: grow compact networks with TINY and ship them to edge devices.

``tinydeploy.GrowingClassifier`` and ``tinydeploy.GrowingRegressor`` (scikit-learn estimators, in
``tinydeploy.estimators``) are imported on first use, so ``import tinydeploy`` needs neither torch nor
scikit-learn.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["GrowingClassifier", "GrowingRegressor", "__version__"]
_ESTIMATORS = ("GrowingClassifier", "GrowingRegressor")


def __getattr__(name: str) -> Any:
    if name in _ESTIMATORS:
        from tinydeploy import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'tinydeploy' has no attribute {name!r}")
