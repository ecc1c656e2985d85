"""Stage 7, estimators: the scikit-learn API (``GrowingClassifier``, ``GrowingRegressor``) over the grow
job and the export pipeline, the same code the CLI runs. Imports torch and scikit-learn; ``import
tinydeploy`` reaches these classes lazily, so it stays free of both."""

from tinydeploy.estimators.growing import GrowingClassifier, GrowingRegressor

__all__ = ["GrowingClassifier", "GrowingRegressor"]
