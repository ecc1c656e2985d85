"""Shared pieces of every loader: the raw train/test split, stratified splitting, array checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from tinydeploy.errors import DataError


class LabelError(DataError):
    """Class labels cannot be used as given (a class too rare to split, labels not 0..C-1, one class)."""


@dataclass(frozen=True)
class RawSplit:
    """Train and test arrays as a loader produced them, before validation and the validation split."""

    name: str
    task: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...] = ()
    #: For image data: {"mode": "L" | "RGB", "size": [H, W], "max_value": m} with raw value = pixel / 255 * m.
    image: dict[str, Any] | None = None
    #: Names of the features (a CSV header, ``feature_names`` in a .npz), in column order; () if unknown.
    feature_names: tuple[str, ...] = ()


def split_pool(
    name: str, X: np.ndarray, y: np.ndarray, classes: tuple[str, ...], test_size: int, seed: int
) -> RawSplit:
    """Split one pool of samples into train and test (stratified when ``classes`` is given)."""
    X_train, X_test, y_train, y_test = stratified_split(X, y, test_size, seed, classes, "y")
    task = "classification" if classes else "regression"
    return RawSplit(name, task, X_train, y_train, X_test, y_test, classes)


def stratified_split(
    X: np.ndarray, y: np.ndarray, test_size: float | int, seed: int, classes: tuple[str, ...], what: str
) -> list[np.ndarray]:
    """``train_test_split``, stratified when ``classes`` is given; impossible splits raise DataError."""
    if classes:
        check_stratifiable(y, test_size, classes, what)
    return train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y if classes else None)


def check_stratifiable(y: np.ndarray, test_size: float | int, classes: tuple[str, ...], what: str) -> None:
    """Every class has 2+ samples and both parts of the split can hold one sample of each class."""
    counts = np.bincount(y, minlength=len(classes))
    rarest = int(np.argmin(counts))
    if counts[rarest] < 2:
        raise LabelError(
            f"class '{classes[rarest]}' has {counts[rarest]} sample(s) in {what}: a stratified split needs "
            "at least 2 per class (add samples or drop the class)"
        )
    n_test = test_size if isinstance(test_size, int) else math.ceil(test_size * len(y))
    if min(n_test, len(y) - n_test) < len(classes):
        raise LabelError(
            f"{what} has {len(y)} samples: too few to split into {len(y) - n_test} + {n_test} with each of "
            f"the {len(classes)} classes on both sides (add samples)"
        )


def check_finite(name: str, values: np.ndarray) -> None:
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise DataError(f"{name} has {bad} NaN/inf value(s): remove or impute them")


def is_integer_column(y: np.ndarray) -> bool:
    """Whether ``y`` is one column of integer values (integer dtype or whole-number floats)."""
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        return False
    if y.dtype.kind in "biu":
        return True
    return bool(np.all(np.isfinite(y)) and np.all(y == np.round(y)))


#: Integer-valued targets with at most this many distinct values are always taken for class labels.
FEW_LABELS = 10
#: Otherwise they are class labels only with at least this many samples per distinct value on average.
MIN_SAMPLES_PER_LABEL = 5


def infer_task(*ys: np.ndarray) -> str:
    """The task of targets ``ys`` (e.g. y_train and y_test), when the user did not say (``--task``).

    Rule: "classification" when every y is one column of integer values (integer dtype, or floats
    that are all whole numbers) taking at most ``max(FEW_LABELS, n / MIN_SAMPLES_PER_LABEL)``
    distinct values over the n samples (at most 10 values, or on average at least 5 samples per
    value); "regression" otherwise. Fractions and several columns are regression; so are whole numbers
    with many distinct values, such as sklearn's diabetes target (214 values among 442 samples).
    """
    if not all(is_integer_column(y) for y in ys):
        return "regression"
    values = np.concatenate([np.asarray(y).reshape(-1) for y in ys])
    distinct = len(np.unique(values))
    return "classification" if distinct <= max(FEW_LABELS, len(values) / MIN_SAMPLES_PER_LABEL) else "regression"


def preview(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
