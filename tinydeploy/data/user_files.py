"""User data files: ``.npz`` arrays and ``.csv`` tables (rules in ``tinydeploy.data.dataset``)."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

from tinydeploy.data.arrays import RawSplit, check_finite, first_line, is_integer_column, stratified_split
from tinydeploy.errors import DataError

ARRAY_KEYS = ("X_train", "y_train", "X_test", "y_test")


#: Suffixes of the user data files ``user_file`` accepts.
USER_SUFFIXES = (".npz", ".csv")


def user_file(name: str) -> Path:
    """The absolute path of a user ``.npz``/``.csv`` file, checked to exist."""
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def load_npz(path: Path) -> RawSplit:
    """A ``.npz`` holding X_train, y_train, X_test, y_test; the task is inferred from y."""
    arrays = _read_npz(path)
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{path} is missing array(s) {', '.join(missing)}: a .npz dataset needs {', '.join(ARRAY_KEYS)}"
        )
    for key in ARRAY_KEYS:
        if arrays[key].dtype.kind not in "biuf":
            raise DataError(f"{key} in {path} must be numeric, got dtype {arrays[key].dtype}: store numbers")
    integer = is_integer_column(arrays["y_train"]) and is_integer_column(arrays["y_test"])
    task = "classification" if integer else "regression"
    return RawSplit(path.name, task, *(arrays[key] for key in ARRAY_KEYS))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a ``.npz`` archive (no pickled objects)."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not a .npz archive")
        with archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz ({first_line(exc)}): save it with numpy.savez") from exc


def load_csv(path: Path, target: str | None, split_seed: int) -> RawSplit:
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
    check_finite("X", X)
    check_finite("y", y)
    X_train, X_test, y_train, y_test = stratified_split(X, y, 0.2, split_seed, classes, "y")
    task = "classification" if classes else "regression"
    return RawSplit(path.name, task, X_train, y_train, X_test, y_test, classes)


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The header and the cells of each column (blank lines skipped)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as CSV ({first_line(exc)}): save it as UTF-8 text") from exc
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
    if numbers is not None and not is_integer_column(numbers):
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


