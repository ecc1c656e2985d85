"""Datasets: built-in benchmarks, torchvision image sets read from disk, and user ``.npz``/``.csv`` files.

Every loader yields raw (unstandardised) float32 features and a train / validation / test split.
The validation split is carved from the training data with ``val_fraction`` (stratified for
classification); the test split is only for reporting. Nothing is ever downloaded.

User data rules (every violation raises a one-line ``DataError``):

* ``.npz``: arrays ``X_train``, ``y_train``, ``X_test``, ``y_test``, all numeric.
* ``.csv``: a header row; ``target`` names the label column, every other column is a numeric
  feature (blank cells count as NaN). 20% of the rows become the test split.
* Task: classification when ``y`` is a single column of integer values (integer dtype, or floats
  that are all whole numbers, or, in a CSV, any non-numeric text); regression otherwise.
* Classification labels: in a ``.npz`` they must already be ``0..C-1`` with every class present in
  ``y_train`` (class names ``"0".."C-1"``); in a CSV the sorted distinct values (numbers or text)
  are mapped to ``0..C-1`` and named after themselves.
* At least 10 training samples, at least 2 classes, at least 2 samples per class (stratified
  splits), no NaN/inf anywhere.
"""

from __future__ import annotations

import csv
import math
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sklearn.model_selection import train_test_split

from tinydeploy.errors import DataError

BUILTIN_DATASETS: tuple[str, ...] = (
    "digits",
    "mnist1d",
    "moons",
    "spirals",
    "sine",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
)
#: Built-in names read from ``data_dir`` by these ``torchvision.datasets`` classes.
_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_ARRAY_KEYS = ("X_train", "y_train", "X_test", "y_test")
MIN_TRAIN_SAMPLES = 10
#: Seed of the synthetic generators: their points never change, ``split_seed`` only moves the split.
_GENERATOR_SEED = 0


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

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else int(self.y_train.shape[1])


@dataclass(frozen=True)
class _Split:
    """Train and test arrays as a loader produced them, before validation and the validation split."""

    name: str
    task: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...] = ()


# ----- public API ----------------------------------------------------------------------------------
def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | None = None,
    target: str | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.2,
) -> Dataset:
    """Load a built-in dataset (see ``BUILTIN_DATASETS``) or a ``.npz``/``.csv`` file.

    ``data_dir`` is where the torchvision image sets live; ``target`` names the label column of a
    CSV. ``split_seed`` fixes every random split, so equal arguments give equal datasets, and the
    returned ``source`` reloads exactly this dataset via ``load_dataset(**source)``.
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
    if name in _LOCAL_LOADERS:
        split = _LOCAL_LOADERS[name](split_seed)
    elif name in _TORCHVISION_CLASSES:
        split = _load_torchvision(name, source["data_dir"])
    else:
        path = _user_file(name)
        source["name"] = str(path)
        split = _load_npz(path) if path.suffix.lower() == ".npz" else _load_csv(path, target, split_seed)
    return _finish(split, source)


def fit_standardizer(X_train: np.ndarray) -> dict[str, Any]:
    """Per-feature mean and std of the flattened training inputs (std below 1e-6 becomes 1)."""
    flat = np.asarray(X_train, dtype=np.float64).reshape(len(X_train), -1)
    std = flat.std(axis=0)
    std[std < 1e-6] = 1.0
    return {"kind": "standardize", "mean": flat.mean(axis=0).tolist(), "std": std.tolist()}


def apply_standardizer(X: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """``(X - mean) / std`` per feature, as float32 with the shape of ``X``."""
    if prep.get("kind") != "standardize":
        raise DataError(f"unknown preprocessing kind {prep.get('kind')!r}: expected 'standardize'")
    mean = np.asarray(prep["mean"], dtype=np.float32)
    std = np.asarray(prep["std"], dtype=np.float32)
    flat = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    if flat.shape[1] != mean.size:
        raise DataError(f"inputs have {flat.shape[1]} features but the standardizer was fitted on {mean.size}")
    return ((flat - mean) / std).astype(np.float32).reshape(np.shape(X))


# ----- built-in datasets available offline ---------------------------------------------------------
def _digits(split_seed: int) -> _Split:
    """sklearn's 8x8 digits: 1797 images, stratified 1437 train / 360 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = tuple(str(c) for c in digits.target_names)
    return _split_pool("digits", digits.data, digits.target, classes, 360, split_seed)


def _mnist1d(split_seed: int) -> _Split:
    """MNIST-1D generated locally (4000 train / 1000 test as the generator splits it)."""
    from mnist1d.data import get_dataset_args, make_dataset

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:  # make_dataset reseeds the global RNGs: restore them so loading has no side effects
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    classes = tuple(str(c) for c in range(10))
    return _Split("mnist1d", "classification", data["x"], data["y"], data["x_test"], data["y_test"], classes)


def _moons(split_seed: int) -> _Split:
    """Two interleaved half-moons with noise 0.2: 1000 train / 500 test."""
    from sklearn.datasets import make_moons

    X, y = make_moons(n_samples=1500, noise=0.2, random_state=_GENERATOR_SEED)
    return _split_pool("moons", X, y, ("0", "1"), 500, split_seed)


def _spirals(split_seed: int) -> _Split:
    """Two interleaved 1.5-turn spirals in [-1, 1]^2 with a little noise: 1000 train / 500 test."""
    rng = np.random.default_rng(_GENERATOR_SEED)
    y = np.repeat([0, 1], 750)
    radius = np.sqrt(rng.uniform(0.02, 1.0, y.size))
    angle = 3 * np.pi * radius + np.pi * y
    X = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    X += rng.normal(0.0, 0.02, X.shape)
    return _split_pool("spirals", X, y, ("0", "1"), 500, split_seed)


def _sine(split_seed: int) -> _Split:
    """TINY paper App. A.4 regression y = 2 sin(x) + x on [0, 2 pi], noise 0.05: 1000 / 250."""
    rng = np.random.default_rng(_GENERATOR_SEED)
    x = rng.uniform(0.0, 2 * np.pi, (1250, 1))
    y = 2 * np.sin(x) + x + rng.normal(0.0, 0.05, x.shape)
    return _split_pool("sine", x, y, (), 250, split_seed)


_LOCAL_LOADERS: dict[str, Callable[[int], _Split]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "moons": _moons,
    "spirals": _spirals,
    "sine": _sine,
}


def _split_pool(
    name: str, X: np.ndarray, y: np.ndarray, classes: tuple[str, ...], test_size: int, seed: int
) -> _Split:
    """Split one pool of samples into train and test (stratified when ``classes`` is given)."""
    X_train, X_test, y_train, y_test = _split(X, y, test_size, seed, classes, "y")
    task = "classification" if classes else "regression"
    return _Split(name, task, X_train, y_train, X_test, y_test, classes)


# ----- torchvision image sets ---------------------------------------------------------------------------
def _load_torchvision(name: str, data_dir: str | None) -> _Split:
    """MNIST / FashionMNIST / CIFAR-10 / CIFAR-100 from ``data_dir`` as (n, C, H, W) in [0, 1]."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION_CLASSES[name])
    expected = _torchvision_files(cls)
    if data_dir is None:
        raise DataError(
            f"dataset '{name}' is read from disk: pass --data-dir DIR holding torchvision's files "
            f"({', '.join(expected)}); nothing is downloaded"
        )
    root = Path(data_dir)
    missing = [f for f in expected if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"dataset '{name}' not found in {root}: torchvision expects {', '.join(missing)} there "
            "(nothing is downloaded)"
        )
    X_train, y_train, classes = _read_torchvision(cls, name, root, train=True)
    X_test, y_test, _ = _read_torchvision(cls, name, root, train=False)
    return _Split(name, "classification", X_train, y_train, X_test, y_test, classes)


def _torchvision_files(cls: type) -> list[str]:
    """Paths, relative to the root, that ``cls(root, download=False)`` reads."""
    from torchvision.datasets import MNIST

    if issubclass(cls, MNIST):  # the uncompressed idx files of ``resources``
        return [f"{cls.__name__}/raw/{Path(gz).stem}" for gz, _ in cls.resources]
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [f"{cls.base_folder}/{f}" for f in names]


def _read_torchvision(
    cls: type, name: str, root: Path, train: bool
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One split of a torchvision dataset as float32 (n, C, H, W) images, int64 labels, class names."""
    try:
        dataset = cls(str(root), train=train, download=False)
    except Exception as exc:  # torchvision reports corrupt files with many exception types
        raise DataError(
            f"cannot read dataset '{name}' from {root}: the files are corrupt or not the originals "
            f"(torchvision: {_first_line(exc)}); replace them with the official files"
        ) from exc
    images = np.asarray(dataset.data, dtype=np.uint8)  # MNIST (n, H, W); CIFAR (n, H, W, C)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return images.astype(np.float32) / 255.0, labels, tuple(str(c) for c in dataset.classes)


# ----- user files -------------------------------------------------------------------------------------------
def _user_file(name: str) -> Path:
    """The absolute path of a user ``.npz``/``.csv`` file, checked to exist."""
    if Path(name).suffix.lower() not in (".npz", ".csv"):
        raise DataError(
            f"unknown dataset '{name}': use one of {', '.join(BUILTIN_DATASETS)}, or a path to a .npz or .csv file"
        )
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def _load_npz(path: Path) -> _Split:
    """A ``.npz`` holding X_train, y_train, X_test, y_test; the task is inferred from y."""
    arrays = _read_npz(path)
    missing = [key for key in _ARRAY_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{path} is missing array(s) {', '.join(missing)}: a .npz dataset needs {', '.join(_ARRAY_KEYS)}"
        )
    for key in _ARRAY_KEYS:
        if arrays[key].dtype.kind not in "biuf":
            raise DataError(f"{key} in {path} must be numeric, got dtype {arrays[key].dtype}: store numbers")
    integer = _is_integer_column(arrays["y_train"]) and _is_integer_column(arrays["y_test"])
    task = "classification" if integer else "regression"
    return _Split(path.name, task, *(arrays[key] for key in _ARRAY_KEYS))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a ``.npz`` archive (no pickled objects)."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not a .npz archive")
        with archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz ({_first_line(exc)}): save it with numpy.savez") from exc


def _load_csv(path: Path, target: str | None, split_seed: int) -> _Split:
    """A CSV with a header; ``target`` is the label column, 20% of the rows become the test split."""
    header, columns = _read_csv(path)
    if target is None:
        raise DataError(f"{path} needs a label column: pass --target COLUMN (columns: {', '.join(header)})")
    if target not in header:
        raise DataError(f"target column '{target}' not in {path}: columns are {', '.join(header)}")
    features = [column for column in header if column != target]
    if not features:
        raise DataError(f"{path} has no feature column besides '{target}': add numeric feature columns")
    X = np.stack([_feature_column(path, column, columns[column]) for column in features], axis=1)
    y, classes = _csv_labels(columns[target])
    _check_finite("X", X)
    _check_finite("y", y)
    X_train, X_test, y_train, y_test = _split(X, y, 0.2, split_seed, classes, "y")
    task = "classification" if classes else "regression"
    return _Split(path.name, task, X_train, y_train, X_test, y_test, classes)


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The header and the cells of each column (blank lines skipped)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as CSV ({_first_line(exc)}): save it as UTF-8 text") from exc
    if len(rows) < 2:
        raise DataError(f"{path} has no data rows: a .csv dataset needs a header row and one row per sample")
    header = [cell.strip() for cell in rows[0]]
    if len(set(header)) != len(header):
        raise DataError(f"{path} has duplicate column names: make every header cell unique")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path} row {line} has {len(row)} fields but the header has {len(header)}")
    return header, {column: list(cells) for column, cells in zip(header, zip(*rows[1:]))}


def _feature_column(path: Path, column: str, cells: list[str]) -> np.ndarray:
    """One numeric feature column as float64."""
    values = _parse_floats(cells)
    if values is None:
        raise DataError(f"feature column '{column}' in {path} is not numeric: encode it as numbers or drop it")
    return values


def _csv_labels(cells: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Regression targets (float, no classes), or labels 0..C-1 mapped from sorted distinct values."""
    numbers = _parse_floats(cells)
    if numbers is not None and not _is_integer_column(numbers):
        return numbers, ()
    keys = np.array([cell.strip() for cell in cells]) if numbers is None else numbers
    distinct, labels = np.unique(keys, return_inverse=True)
    names = tuple(str(v) for v in distinct) if numbers is None else tuple(str(int(v)) for v in distinct)
    return labels.astype(np.int64), names


def _parse_floats(cells: list[str]) -> np.ndarray | None:
    """Cells as float64 (blank cells become NaN), or None when a cell is not a number."""
    try:
        return np.array([float(cell) if cell.strip() else np.nan for cell in cells], dtype=np.float64)
    except ValueError:
        return None


# ----- validation and the validation split ---------------------------------------------------------------
def _finish(split: _Split, source: dict[str, Any]) -> Dataset:
    """Validate a loader's arrays, normalise dtypes and carve the validation split from train."""
    _check_arrays(split)
    if split.task == "classification":
        y_train, y_test, classes = _class_labels(split)
    else:
        y_train, y_test, classes = _targets("y_train", split.y_train), _targets("y_test", split.y_test), ()
    X_train, X_val, y_train, y_val = _split(
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
    )


def _check_arrays(split: _Split) -> None:
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
    for key in _ARRAY_KEYS:
        _check_finite(key, getattr(split, key))


def _check_finite(name: str, values: np.ndarray) -> None:
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise DataError(f"{name} has {bad} NaN/inf value(s): remove or impute them")


def _is_integer_column(y: np.ndarray) -> bool:
    """Whether ``y`` is one column of integer values (integer dtype or whole-number floats)."""
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        return False
    if y.dtype.kind in "biu":
        return True
    return bool(np.all(np.isfinite(y)) and np.all(y == np.round(y)))


def _class_labels(split: _Split) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """int64 labels and class names; labels must be 0..C-1 with every class present in y_train."""
    y_train, y_test = (y.reshape(-1).astype(np.int64) for y in (split.y_train, split.y_test))
    found = np.union1d(y_train, y_test)
    n_classes = len(split.classes) or int(found.max()) + 1
    if found.min() < 0 or found.max() >= n_classes or len(np.unique(y_train)) != n_classes:
        raise DataError(
            f"classification labels must be 0..C-1 with every class in y_train (found {_preview(found)}): relabel them"
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


def _split(
    X: np.ndarray, y: np.ndarray, test_size: float | int, seed: int, classes: tuple[str, ...], what: str
) -> list[np.ndarray]:
    """``train_test_split``, stratified when ``classes`` is given; impossible splits raise DataError."""
    if classes:
        _check_stratifiable(y, test_size, classes, what)
    return train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y if classes else None)


def _check_stratifiable(y: np.ndarray, test_size: float | int, classes: tuple[str, ...], what: str) -> None:
    """Every class has 2+ samples and both parts of the split can hold one sample of each class."""
    counts = np.bincount(y, minlength=len(classes))
    rarest = int(np.argmin(counts))
    if counts[rarest] < 2:
        raise DataError(
            f"class '{classes[rarest]}' has {counts[rarest]} sample(s) in {what}: a stratified split needs "
            "at least 2 per class (add samples or drop the class)"
        )
    n_test = test_size if isinstance(test_size, int) else math.ceil(test_size * len(y))
    if min(n_test, len(y) - n_test) < len(classes):
        raise DataError(
            f"{what} has {len(y)} samples: too few to split into {len(y) - n_test} + {n_test} with each of "
            f"the {len(classes)} classes on both sides (add samples)"
        )


def _preview(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
