"""User data files: ``.npz`` arrays and ``.csv`` tables (rules in ``tinydeploy.data.dataset``)."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tinydeploy.data.arrays import RawSplit, check_finite, first_line, infer_task, is_integer_column, stratified_split
from tinydeploy.errors import DataError

ARRAY_KEYS = ("X_train", "y_train", "X_test", "y_test")
#: Optional array of a .npz: one name per feature column (strings), kept in the spec.
FEATURE_NAMES_KEY = "feature_names"


#: Suffixes of the user data files ``user_file`` accepts.
USER_SUFFIXES = (".npz", ".csv")


def is_user_file(name: str) -> bool:
    """Whether ``name`` names a user data file (by its suffix, ``USER_SUFFIXES``)."""
    return Path(name).suffix.lower() in USER_SUFFIXES


def user_file(name: str) -> Path:
    """The absolute path of a user ``.npz``/``.csv`` file, checked to exist."""
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def load_npz(path: Path, task: str | None = None) -> RawSplit:
    """A ``.npz`` holding X_train, y_train, X_test, y_test (and optionally feature_names); the task is
    ``task``, or inferred from y (``infer_task``)."""
    arrays = _read_npz(path)
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{path} is missing array(s) {', '.join(missing)}: a .npz dataset needs {', '.join(ARRAY_KEYS)}"
        )
    for key in ARRAY_KEYS:
        if arrays[key].dtype.kind not in "biuf":
            raise DataError(f"{key} in {path} must be numeric, got dtype {arrays[key].dtype}: store numbers")
    ys = (arrays["y_train"], arrays["y_test"])
    if task == "classification" and not all(is_integer_column(y) for y in ys):
        raise DataError(f"--task classification: y_train/y_test in {path} are not one column of whole numbers, so "
                        "they cannot be class labels: store labels 0..C-1 or pass --task regression")
    task = task or infer_task(*ys)
    names = _npz_feature_names(path, arrays)
    return RawSplit(path.name, task, *(arrays[key] for key in ARRAY_KEYS), feature_names=names)


def _npz_feature_names(path: Path, arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The optional ``feature_names`` array: one distinct string per column of a 2-D X_train."""
    if FEATURE_NAMES_KEY not in arrays:
        return ()
    names, X = arrays[FEATURE_NAMES_KEY], arrays["X_train"]
    if names.dtype.kind != "U" or names.ndim != 1 or X.ndim != 2 or len(names) != X.shape[1]:
        raise DataError(f"{FEATURE_NAMES_KEY} in {path} must be a 1-D array of {X.shape[1] if X.ndim == 2 else 'F'} "
                        f"strings (one per column of a 2-D X_train), got dtype {names.dtype} and shape {names.shape}")
    return _checked_names(path, [str(n) for n in names])


def _checked_names(path: Path, names: list[str]) -> tuple[str, ...]:
    empty = [i for i, name in enumerate(names) if not name.strip()]
    if empty:
        raise DataError(f"feature {empty[0]} of {path} has an empty name: name every column")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path} names feature(s) {', '.join(repr(n) for n in twice[:5])} twice: make every name unique")
    return tuple(names)


def _npz_array(path: Path, archive: Any, key: str) -> np.ndarray:
    """One array of an archive; an array of Python objects (pickled: pandas columns saved as they are)
    is refused by name, never unpickled."""
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise DataError(f"{key} in {path} is an array of Python objects (pickled), which tinydeploy never loads: "
                        f"save it as numbers or strings, e.g. np.asarray({key}, dtype=float) or dtype=str") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a ``.npz`` archive (no pickled objects)."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not a .npz archive")
        with archive:
            return {key: _npz_array(path, archive, key) for key in archive.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz ({first_line(exc)}): save it with numpy.savez") from exc


def load_csv(path: Path, target: str | None, split_seed: int, task: str | None = None) -> RawSplit:
    """A CSV with a header; ``target`` is the label column, 20% of the rows become the test split. The
    task is ``task``, or text labels -> classification, numbers -> ``infer_task``."""
    header, columns, lines = _read_csv(path)
    if target is None:
        raise DataError(f"{path} needs a label column: pass --target COLUMN (columns: {', '.join(header)})")
    if target not in header:
        raise DataError(f"target column '{target}' not in {path}: columns are {', '.join(header)}")
    features = [column for column in header if column != target]
    if not features:
        raise DataError(f"{path} has no feature column besides '{target}': add numeric feature columns")
    X = np.stack([_feature_column(path, column, columns[column], lines) for column in features], axis=1)
    y, classes = _csv_labels(path, target, columns[target], lines, task)
    check_finite("X", X)
    check_finite("y", y)
    X_train, X_test, y_train, y_test = stratified_split(X, y, 0.2, split_seed, classes, "y")
    task = "classification" if classes else "regression"
    return RawSplit(path.name, task, X_train, y_train, X_test, y_test, classes,
                    feature_names=_checked_names(path, features))


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[str]], list[int]]:
    """The header, the cells of each column (blank lines skipped) and each data row's line number."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            rows, lines = [], []
            for row in reader:
                if row:
                    rows.append(row)
                    lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as CSV ({first_line(exc)}): save it as UTF-8 text") from exc
    if len(rows) < 2:
        raise DataError(f"{path} has no data rows: a .csv dataset needs a header row and one row per sample")
    header = [cell.strip() for cell in rows[0]]
    if len(set(header)) != len(header):
        raise DataError(f"{path} has duplicate column names: make every header cell unique")
    for line, row in zip(lines[1:], rows[1:]):
        if len(row) != len(header):
            raise DataError(f"{path} row {line} has {len(row)} fields but the header has {len(header)}")
    return header, {column: list(cells) for column, cells in zip(header, zip(*rows[1:]))}, lines[1:]


def _blank_rows(path: Path, column: str, cells: list[str], lines: list[int], what: str) -> None:
    """Refuse blank cells of ``column``, naming the first row (its line in the file)."""
    blank = [line for line, cell in zip(lines, cells) if not cell.strip()]
    if blank:
        more = f" (and {len(blank) - 1} more row(s))" if len(blank) > 1 else ""
        raise DataError(f"{path} row {blank[0]}: the {what} column '{column}' is blank{more}: fill it in or drop the row")


def _feature_column(path: Path, column: str, cells: list[str], lines: list[int]) -> np.ndarray:
    """One numeric feature column as float64."""
    _blank_rows(path, column, cells, lines, "feature")
    values = _parse_floats(cells)
    if values is None:
        raise DataError(f"feature column '{column}' in {path} is not numeric: encode it as numbers or drop it")
    return values


def _csv_labels(path: Path, target: str, cells: list[str], lines: list[int],
                task: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Regression targets (float, no classes), or labels 0..C-1 mapped from sorted distinct values."""
    _blank_rows(path, target, cells, lines, "label")
    numbers = _parse_floats(cells)
    if numbers is None and task == "regression":
        text = next(cell for cell in cells if _parse_floats([cell]) is None)
        raise DataError(f"--task regression: label column '{target}' of {path} holds text ({text.strip()[:40]!r}): "
                        "regression needs numbers; drop --task to classify")
    if numbers is not None and task == "classification" and not is_integer_column(numbers):
        raise DataError(f"--task classification: label column '{target}' of {path} holds fractions, which cannot be "
                        "class labels: encode the classes as whole numbers or text, or pass --task regression")
    if numbers is not None and (task or infer_task(numbers)) == "regression":
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


