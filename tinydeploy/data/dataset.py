"""Datasets: built-in benchmarks, torchvision image sets read from disk, user ``.npz``/``.csv`` files and
image folders.

Every loader yields raw (unstandardised) float32 features and a train / validation / test split.
The validation split is carved from the training data with ``val_fraction`` (stratified for
classification); the test split is only for reporting. Nothing is ever downloaded.

User data rules (every violation raises a one-line ``DataError``):

* ``.npz``: arrays ``X_train``, ``y_train``, ``X_test``, ``y_test``, all numeric; X of shape (n, F),
  or (n, C, L) signals / (n, C, H, W) images for a CNN.
* an image folder: a directory with one sub-folder of images per class (``image_folder``).
* ``.csv``: a header row; ``target`` names the label column, every other column is a numeric
  feature (blank cells count as NaN). 20% of the rows become the test split.
* Task: classification when ``y`` is a single column of integer values (integer dtype, or floats
  that are all whole numbers, or, in a CSV, any non-numeric text); regression otherwise.
* Classification labels: in a ``.npz`` they must already be ``0..C-1`` with every class present in
  ``y_train`` (class names ``"0".."C-1"``); in a CSV the sorted distinct values (numbers or text)
  are mapped to ``0..C-1`` and named after themselves.
* ``as_images`` (a CNN's inputs): X must be (n, C, L) or (n, C, H, W); the built-in digits become
  1x8x8 images and mnist1d 1x40 signals.
* At least 10 training samples, at least 2 classes, at least 2 samples per class (stratified
  splits), no NaN/inf anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tinydeploy.data.arrays import RawSplit, check_finite, preview, stratified_split
from tinydeploy.data.builtin import CHANNEL_SHAPES, LOCAL_LOADERS
from tinydeploy.data.image_folder import is_image_folder, load_image_folder
from tinydeploy.data.torchvision_sets import TORCHVISION_CLASSES, load_torchvision
from tinydeploy.data.user_files import ARRAY_KEYS, USER_SUFFIXES, load_csv, load_npz, user_file
from tinydeploy.errors import DataError

BUILTIN_DATASETS: tuple[str, ...] = (
    "digits",
    "mnist1d",
    "mnist5k",
    "moons",
    "spirals",
    "sine",
    "sine2d",
    "quadratic2d",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
)
MIN_TRAIN_SAMPLES = 10


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: raw float32 features split into train / validation / test."""

    name: str
    task: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]
    source: dict[str, Any]
    #: Image data: {"mode": "L" | "RGB", "size": [H, W], "max_value": m}, raw value = pixel / 255 * m.
    image: dict[str, Any] | None = None

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else int(self.y_train.shape[1])


def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | None = None,
    target: str | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.2,
    as_images: bool = False,
) -> Dataset:
    """Load a built-in dataset (see ``BUILTIN_DATASETS``), a ``.npz``/``.csv`` file or an image folder.

    ``data_dir`` is where the torchvision image sets live; ``target`` names the label column of a
    CSV. ``split_seed`` fixes every random split, so equal arguments give equal datasets, and the
    returned ``source`` reloads exactly this dataset via ``load_dataset(**source)``. ``as_images``
    asks for CNN inputs, (n, C, L) or (n, C, H, W) (see the module docstring).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    source = {
        "name": name,
        "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None,
        "target": target,
        "split_seed": int(split_seed),
        "val_fraction": float(val_fraction),
    }
    if as_images:
        source["as_images"] = True
    if name in LOCAL_LOADERS:
        split = LOCAL_LOADERS[name](split_seed)
    elif name in TORCHVISION_CLASSES:
        split = load_torchvision(name, source["data_dir"])
    elif is_image_folder(name):
        source["name"] = str(Path(name).expanduser().resolve())
        split = load_image_folder(name, split_seed)
    else:
        if Path(name).suffix.lower() not in USER_SUFFIXES:
            raise DataError(
                f"unknown dataset '{name}': use one of {', '.join(BUILTIN_DATASETS)}, a path to a .npz or .csv "
                "file, or an image folder"
            )
        path = user_file(name)
        source["name"] = str(path)
        split = load_npz(path) if path.suffix.lower() == ".npz" else load_csv(path, target, split_seed)
    if as_images:
        split = _as_images(split)
    return _finish(split, source)


def _as_images(split: RawSplit) -> RawSplit:
    """The split as CNN inputs: built-in flat sets reshaped (``CHANNEL_SHAPES``), others checked."""
    if split.name in CHANNEL_SHAPES and split.X_train.ndim == 2:
        shape, image = CHANNEL_SHAPES[split.name]
        return replace(split, X_train=split.X_train.reshape(-1, *shape), X_test=split.X_test.reshape(-1, *shape),
                       image=image)
    X = split.X_train
    if X.ndim not in (3, 4):
        layout = "flat features" if X.ndim == 2 else f"{X.ndim - 1} axes per sample"
        raise DataError(
            f"X_train of '{split.name}' has shape {X.shape} ({layout}): a CNN needs signals (n, C, L) or images "
            "(n, C, H, W); reshape X or use --arch mlp"
        )
    return split


def _finish(split: RawSplit, source: dict[str, Any]) -> Dataset:
    """Validate a loader's arrays, normalise dtypes and carve the validation split from train."""
    _check_arrays(split)
    if split.task == "classification":
        y_train, y_test, classes = _class_labels(split)
    else:
        y_train, y_test, classes = _targets("y_train", split.y_train), _targets("y_test", split.y_test), ()
    X_train, X_val, y_train, y_val = stratified_split(
        split.X_train.astype(np.float32), y_train, source["val_fraction"], source["split_seed"], classes, "y_train"
    )
    return Dataset(
        name=split.name,
        task=split.task,
        X_train=X_train,
        y_train=y_train,
        X_val=X_val,
        y_val=y_val,
        X_test=split.X_test.astype(np.float32),
        y_test=y_test,
        classes=classes,
        input_shape=tuple(int(s) for s in X_train.shape[1:]),
        source=source,
        image=split.image,
    )


def _check_arrays(split: RawSplit) -> None:
    """Shapes agree, there are enough samples and every value is finite."""
    for part in ("train", "test"):
        X, y = getattr(split, f"X_{part}"), getattr(split, f"y_{part}")
        if X.ndim < 2 or 0 in X.shape[1:]:
            raise DataError(f"X_{part} must have shape (samples, features...), got {X.shape}")
        n_labels = y.shape[0] if y.ndim else 0
        if n_labels != len(X):
            raise DataError(f"X_{part} has {len(X)} samples but y_{part} has {n_labels}: they must match")
    if split.X_test.shape[1:] != split.X_train.shape[1:]:
        raise DataError(
            f"X_test samples have shape {split.X_test.shape[1:]} but X_train samples have "
            f"{split.X_train.shape[1:]}: they must match"
        )
    if len(split.X_train) < MIN_TRAIN_SAMPLES:
        raise DataError(f"only {len(split.X_train)} training samples: need at least {MIN_TRAIN_SAMPLES}")
    if len(split.X_test) == 0:
        raise DataError("the test split is empty: provide at least one test sample")
    for key in ARRAY_KEYS:
        check_finite(key, getattr(split, key))


def _class_labels(split: RawSplit) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """int64 labels and class names; labels must be 0..C-1 with every class present in y_train."""
    y_train, y_test = (y.reshape(-1).astype(np.int64) for y in (split.y_train, split.y_test))
    found = np.union1d(y_train, y_test)
    n_classes = len(split.classes) or int(found.max()) + 1
    if found.min() < 0 or found.max() >= n_classes or len(np.unique(y_train)) != n_classes:
        raise DataError(
            f"classification labels must be 0..C-1 with every class in y_train (found {preview(found)}): relabel them"
        )
    if n_classes < 2:
        raise DataError("y_train has a single class: classification needs at least 2 classes")
    return y_train, y_test, split.classes or tuple(str(c) for c in range(n_classes))


def _targets(name: str, y: np.ndarray) -> np.ndarray:
    """Regression targets as float32 (n, d_out)."""
    if y.ndim > 2:
        raise DataError(f"{name} must have shape (samples,) or (samples, outputs), got {y.shape}")
    y = y.astype(np.float32)
    return y[:, None] if y.ndim == 1 else y
