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
* ``.npz`` may also hold ``feature_names`` (one string per column of a 2-D X); a CSV's header names
  its feature columns. The names go into the spec, so ``predict`` and the server can match inputs by name.
* Task: ``task`` ("classification" | "regression", ``--task``) when given; otherwise text labels
  are classes, and numbers are class labels when they are one column of whole numbers with at most
  max(10, n / 5) distinct values over the n samples (``arrays.infer_task``), a regression target
  otherwise (fractions, several columns, or many distinct whole numbers like sklearn's diabetes).
* Classification labels: in a ``.npz`` they must already be ``0..C-1`` with every class present in
  ``y_train`` (class names ``"0".."C-1"``); in a CSV the sorted distinct values (numbers or text)
  are mapped to ``0..C-1`` and named after themselves.
* ``as_images`` (a CNN's inputs): X must be (n, C, L) or (n, C, H, W); the built-in digits become
  1x8x8 images and mnist1d 1x40 signals.
* At least 10 training samples, at least 2 classes, at least 2 samples per class (stratified
  splits), no NaN/inf anywhere; in a CSV no blank cell (refused with its row number).
* ``arrays_dataset`` builds the same ``Dataset`` from arrays in memory (the scikit-learn estimators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tinydeploy.data.arrays import LabelError, RawSplit, check_finite, preview, stratified_split
from tinydeploy.data.builtin import CHANNEL_SHAPES, LOCAL_LOADERS
from tinydeploy.data.image_folder import is_image_folder, load_image_folder
from tinydeploy.data.torchvision_sets import TORCHVISION_CLASSES, load_torchvision
from tinydeploy.data.user_files import ARRAY_KEYS, is_user_file, load_csv, load_npz, user_file
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
TASKS = ("classification", "regression")


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
    #: One name per feature column (CSV header, ``feature_names`` of a .npz, DataFrame columns), or ().
    feature_names: tuple[str, ...] = ()

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
    as_images: bool | None = False,
    task: str | None = None,
    stratify: bool = True,
) -> Dataset:
    """Load a built-in dataset (see ``BUILTIN_DATASETS``), a ``.npz``/``.csv`` file or an image folder.

    ``data_dir`` is where the torchvision image sets live; ``target`` names the label column of a
    CSV. ``split_seed`` fixes every random split, so equal arguments give equal datasets, and the
    returned ``source`` reloads exactly this dataset via ``load_dataset(**source)``. ``as_images``
    asks for CNN inputs, (n, C, L) or (n, C, H, W) (see the module docstring); None leaves the choice to a
    user file's rows: images when they are flat square pixels (``flat_image_side``), recorded in
    ``source`` as ``as_images``. ``task`` overrides the
    task inferred from a user file's targets (``--task``); ``stratify=False`` carves the validation split
    at random rather than per class (``arrays_dataset`` falls back to it for classes too rare to stratify).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if task is not None and task not in TASKS:
        raise DataError(f"unknown --task '{task}': use classification or regression")
    source = {
        "name": name,
        "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None,
        "target": target,
        "split_seed": int(split_seed),
        "val_fraction": float(val_fraction),
    }
    if as_images:
        source["as_images"] = True
    if task is not None:
        source["task"] = task
    if not stratify:
        source["stratify"] = False
    if name in LOCAL_LOADERS:
        split = LOCAL_LOADERS[name](split_seed)
    elif name in TORCHVISION_CLASSES:
        split = load_torchvision(name, source["data_dir"])
    elif is_image_folder(name):
        source["name"] = str(Path(name).expanduser().resolve())
        split = load_image_folder(name, split_seed)
    else:
        if not is_user_file(name):
            raise DataError(
                f"unknown dataset '{name}': use one of {', '.join(BUILTIN_DATASETS)}, a path to a .npz or .csv "
                "file, or an image folder"
            )
        path = user_file(name)
        source["name"] = str(path)
        try:
            split = load_npz(path, task) if path.suffix.lower() == ".npz" else load_csv(path, target, split_seed, task)
            if as_images is None and _pixel_side(split) is not None:
                as_images = source["as_images"] = True
            return _finish(_as_images(split) if as_images else split, source)
        except LabelError as exc:
            if task is not None:
                raise
            raise LabelError(f"{exc}; if y is a quantity rather than a class label, pass --task regression") from None
    if task is not None and task != split.task:
        raise DataError(f"--task {task}: '{name}' is a {split.task} dataset; --task applies to your .npz/.csv files: "
                        "drop it")
    if as_images:
        split = _as_images(split)
    return _finish(split, source)


def arrays_dataset(
    X: np.ndarray,
    y: np.ndarray,
    *,
    task: str,
    classes: tuple[str, ...] = (),
    feature_names: tuple[str, ...] = (),
    split_seed: int = 0,
    val_fraction: float = 0.2,
    name: str = "arrays",
) -> Dataset:
    """A ``Dataset`` from arrays in memory (labels 0..C-1 for ``classes``), validated like a file.

    The validation split is carved from ``X`` as for every dataset, per class where every class has
    enough samples, else at random (``source["stratify"]`` False). There is no separate test split:
    the test split *is* the validation split. ``source`` names no file: a run grown on arrays records
    the file it saves them to (``GrowingClassifier.save``)."""
    if task not in TASKS:
        raise DataError(f"unknown task '{task}': use classification or regression")
    placeholder = RawSplit(name, task, X, y, X[:1], y[:1], classes, feature_names=tuple(feature_names))
    source: dict[str, Any] = {"name": name, "data_dir": None, "target": None, "split_seed": int(split_seed),
                              "val_fraction": float(val_fraction), "task": task}
    try:
        data = _finish(placeholder, source)
    except LabelError:
        if task != "classification" or len(np.unique(y)) < 2:
            raise
        data = _finish(placeholder, {**source, "stratify": False})
    return replace(data, X_test=data.X_val, y_test=data.y_val)


#: Smallest side of the square images ``flat_image_side`` recognises in flat rows (sklearn's digits: 8).
MIN_IMAGE_SIDE = 8


def flat_image_side(X: np.ndarray) -> int | None:
    """s when the rows of a 2-D ``X`` are square grayscale images flattened: s x s features (s >= 8) whose
    values are all pixel intensities, either in [0, 1] or whole numbers in [0, 255]; else None."""
    if X.ndim != 2 or X.shape[0] == 0:
        return None
    side = math.isqrt(X.shape[1])
    if side < MIN_IMAGE_SIDE or side * side != X.shape[1] or not np.isfinite(X).all() or X.min() < 0:
        return None
    top = float(X.max())
    return side if top <= 1.0 or (top <= 255.0 and bool((X == np.round(X)).all())) else None


def _pixel_side(split: RawSplit) -> int | None:
    """The side s when both splits' rows are flat s x s pixels (``flat_image_side``), else None."""
    side = flat_image_side(split.X_train)
    return side if side is not None and flat_image_side(split.X_test) == side else None


def _as_images(split: RawSplit) -> RawSplit:
    """The split as CNN inputs: built-in flat sets reshaped (``CHANNEL_SHAPES``), flat square pixels as
    1 x s x s images (``flat_image_side``), others checked."""
    if split.name in CHANNEL_SHAPES and split.X_train.ndim == 2:
        shape, image = CHANNEL_SHAPES[split.name]
        return replace(split, X_train=split.X_train.reshape(-1, *shape), X_test=split.X_test.reshape(-1, *shape),
                       image=image)
    side = _pixel_side(split)
    if side is not None:
        top = 1.0 if max(float(split.X_train.max()), float(split.X_test.max())) <= 1.0 else 255.0
        return replace(split, X_train=split.X_train.reshape(-1, 1, side, side),
                       X_test=split.X_test.reshape(-1, 1, side, side),
                       image={"mode": "L", "size": [side, side], "max_value": top})
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
        split.X_train.astype(np.float32), y_train, source["val_fraction"], source["split_seed"],
        classes if source.get("stratify", True) else (), "y_train"
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
        feature_names=split.feature_names,
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
        raise LabelError(
            f"classification labels must be 0..C-1 with every class in y_train (found {preview(found)}): relabel them"
        )
    if n_classes < 2:
        raise LabelError("y_train has a single class: classification needs at least 2 classes")
    return y_train, y_test, split.classes or tuple(str(c) for c in range(n_classes))


def _targets(name: str, y: np.ndarray) -> np.ndarray:
    """Regression targets as float32 (n, d_out)."""
    if y.ndim > 2:
        raise DataError(f"{name} must have shape (samples,) or (samples, outputs), got {y.shape}")
    y = y.astype(np.float32)
    return y[:, None] if y.ndim == 1 else y
