"""Batch files of ``tinydeploy predict``: inputs from .npy / .npz / .csv tables, a .json request body
or image files, and predictions written as .npy / .csv / .json (numpy and the standard library;
Pillow for images).

Tables may name their columns (a CSV header, ``feature_names`` in an .npz): ``read_table`` returns
the names, and ``OnnxModel.match_columns`` puts the columns in the model's order or refuses the file.
A .json file holds what ``POST /v1/predict`` takes (``{"inputs": ...}``: rows, rows by name, or
tensors [C, H, W] / [B, C, H, W] for a CNN), bounded like a request: at most ``MAX_JSON_FILE_BYTES``,
nested no deeper than the model's input, no overlong numbers. Images are one file or a folder of
files, converted as the model's spec says (``images.py``). ``load_inputs`` picks the reader.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tinydeploy.errors import TinyDeployError
from tinydeploy.serving.images import IMAGE_SUFFIXES, decode_image

if TYPE_CHECKING:
    from tinydeploy.serving.runtime import OnnxModel, Prediction

TABLE_SUFFIXES = (".npy", ".npz", ".csv")
INPUT_SUFFIXES = (*TABLE_SUFFIXES, ".json")
OUTPUT_SUFFIXES = (".npy", ".csv", ".json")
#: Array of an .npz input holding its column names.
FEATURE_NAMES_KEY = "feature_names"
#: Largest image file ``read_images`` reads (its pixel size is checked from the header as well).
MAX_IMAGE_FILE_BYTES = 64 << 20
#: Largest .json input file (parsed in memory: about 10x its size as Python objects).
MAX_JSON_FILE_BYTES = 64 << 20


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_inputs(path: str | os.PathLike[str], model: OnnxModel, key: str | None = None) -> tuple[Any, list[str] | None]:
    """What ``--input`` names, ready for ``model.validate``: (inputs, the name of each row for image files,
    else None). Image files and folders are decoded; a table's named columns are put in the model's order."""
    path = Path(path)
    files = image_files(path)
    if files is not None:
        names = [str(p.relative_to(path)) if path.is_dir() else p.name for p in files]
        return read_images(files, model.image if model.input_space == "raw" else None), names
    if path.suffix.lower() == ".json":
        return read_json(path, len(model.input_shape)), None
    values, header = read_table(path, key)
    return model.match_columns(values, header, f"--input {path}"), None


def read_json(path: str | os.PathLike[str], input_ndim: int) -> Any:
    """The ``inputs`` of a .json file holding a predict request body, checked like a request (module
    docstring) before it is parsed; one-line ``TinyDeployError`` naming the file otherwise."""
    from tinydeploy.serving.limits import Limits, RequestError, parse_predict_body

    path = Path(path)
    if not path.is_file():
        raise TinyDeployError(f"--input {path} does not exist")
    size = path.stat().st_size
    if size > MAX_JSON_FILE_BYTES:
        raise TinyDeployError(f"--input {path} has {size} bytes, over the limit of {MAX_JSON_FILE_BYTES >> 20} MiB "
                              "for .json inputs: split it, or save the batch as .npy")
    limits = Limits(max_batch=size, max_body_bytes=MAX_JSON_FILE_BYTES, max_depth=2 + max(1, input_ndim),
                    max_numbers=size)
    try:
        return parse_predict_body(path.read_bytes(), limits)
    except RequestError as exc:
        raise TinyDeployError(f"--input {path}: {exc.message}") from None


def read_inputs(path: str | os.PathLike[str], key: str | None = None) -> np.ndarray:
    """The batch of inputs in a table file (``read_table`` without the column names)."""
    return read_table(path, key)[0]


def read_table(path: str | os.PathLike[str], key: str | None = None) -> tuple[np.ndarray, list[str] | None]:
    """A batch of inputs from .npy, .npz (array ``key`` or the first one that is not ``feature_names``)
    or numeric .csv, and the names of its columns when the file gives them (None otherwise).

    A CSV may start with one header row (detected: a first row that is not all numbers); every other
    cell must be a number. Errors are one-line ``TinyDeployError``s naming the file and the problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise TinyDeployError(f"--input {path}: unsupported file type '{suffix}': use {', '.join(INPUT_SUFFIXES)}, "
                              f"an image ({', '.join(IMAGE_SUFFIXES[:3])}, ...) or a folder of images")
    if not path.is_file():
        raise TinyDeployError(f"--input {path} does not exist")
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False), None
        except (ValueError, OSError) as exc:
            raise TinyDeployError(f"--input {path} is not a readable .npy array ({_first_line(exc)})") from exc
    if suffix == ".npz":
        return _read_npz(path, key)
    return _read_csv(path)


def _read_npz(path: Path, key: str | None) -> tuple[np.ndarray, list[str] | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = [name for name in archive.files if name != FEATURE_NAMES_KEY]
            if not names:
                raise TinyDeployError(f"--input {path} holds no arrays")
            if key is not None and key not in names:
                raise TinyDeployError(f"--input {path} has no array '{key}': it holds {', '.join(names)}")
            values = _npz_array(path, archive, key if key is not None else names[0])
            columns = _npz_array(path, archive, FEATURE_NAMES_KEY) if FEATURE_NAMES_KEY in archive.files else None
    except TinyDeployError:
        raise
    except (ValueError, OSError) as exc:
        raise TinyDeployError(f"--input {path} is not a readable .npz archive ({_first_line(exc)})") from exc
    if columns is not None and (columns.dtype.kind != "U" or columns.ndim != 1):
        raise TinyDeployError(f"--input {path}: {FEATURE_NAMES_KEY} must be a 1-D array of strings")
    return values, None if columns is None else [str(c) for c in columns]


def _npz_array(path: Path, archive: Any, key: str) -> np.ndarray:
    """One array of an .npz input; an array of Python objects is refused by name, never unpickled."""
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise TinyDeployError(f"--input {path}: array '{key}' holds Python objects (pickled), which are never "
                              f"loaded: save it as numbers or strings, e.g. np.asarray({key}, dtype=float) or "
                              "dtype=str") from None


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise TinyDeployError(f"--input {path} has no rows")
    first = 0 if all(_is_float(cell) for cell in rows[0]) else 1
    header = [cell.strip() for cell in rows[0]] if first else None
    body = rows[first:]
    if not body:
        raise TinyDeployError(f"--input {path} has a header but no data rows")
    width = len(body[0])
    if header is not None and len(header) != width:
        raise TinyDeployError(f"--input {path}: the header has {len(header)} names but the rows have {width} values")
    values = np.empty((len(body), width), dtype=np.float64)
    for i, row in enumerate(body):
        line = i + first + 1
        if len(row) != width:
            raise TinyDeployError(f"--input {path}: row {line} has {len(row)} values, expected {width} like the first data row")
        try:
            values[i] = [float(cell) for cell in row]
        except ValueError:
            bad = next(cell for cell in row if not _is_float(cell))
            raise TinyDeployError(f"--input {path}: row {line} has a non-numeric value {bad!r}") from None
    return values, header


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ----- images --------------------------------------------------------------------------------------
def image_files(path: str | os.PathLike[str]) -> list[Path] | None:
    """The image files ``--input`` names (one image file, or every image in a folder, sorted by name),
    or None when it names a table file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise TinyDeployError(f"--input {path} is a folder without image files ({', '.join(IMAGE_SUFFIXES[:3])}, "
                                  "...): pass a folder of images or a table file")
        return files
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if not path.is_file():
            raise TinyDeployError(f"--input {path} does not exist")
        return [path]
    return None


def read_images(files: list[Path], image: dict[str, Any] | None) -> np.ndarray:
    """The images in ``files`` as a float32 batch (n, C, H, W) for a model whose image format is
    ``image`` (``images.image_format``; None: the model does not take images)."""
    if image is None:
        raise TinyDeployError(f"--input {files[0]} is an image, but this model was not grown on images (its spec "
                              "records no image format): pass a table of inputs (.npy, .npz, .csv)")
    tensors = []
    for path in files:
        if path.stat().st_size > MAX_IMAGE_FILE_BYTES:
            raise TinyDeployError(f"--input {path} is larger than {MAX_IMAGE_FILE_BYTES >> 20} MiB: not an image the "
                                  "model can take")
        tensors.append(decode_image(path.read_bytes(), image, str(path)))
    return np.stack(tensors)


# ----- predictions ---------------------------------------------------------------------------------
def write_predictions(path: str | os.PathLike[str], prediction: Prediction, model: OnnxModel,
                      names: list[str] | None = None) -> Path:
    """Write predictions atomically: .npy (raw outputs), .csv (label + probabilities, or outputs), .json;
    ``names`` (e.g. the image files) label the rows of .csv and .json."""
    from tinydeploy.atomic import atomic_path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise TinyDeployError(f"--output {path}: unsupported file type '{suffix}': use {', '.join(OUTPUT_SUFFIXES)}")
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as handle:
                np.save(handle, prediction.outputs)
        elif suffix == ".json":
            document = {"model_sha256": model.sha256, "task": model.task, "classes": model.classes,
                        **({"inputs": names} if names is not None else {}), **prediction.to_dict()}
            tmp.write_text(json.dumps(document, allow_nan=False) + "\n", encoding="utf-8")
        else:
            tmp.write_text("".join(csv_lines(prediction, model, names)), encoding="utf-8")
    return path


def csv_lines(prediction: Prediction, model: OnnxModel, names: list[str] | None = None) -> list[str]:
    """CSV text lines: ``label,p_<class>...`` for classifiers, ``output_0,...`` otherwise; with ``names``
    a first column ``input`` naming each row."""
    if prediction.labels is not None and prediction.probabilities is not None:
        header = ["label", *(f"p_{c}" for c in model.classes)]
        rows = [[_csv_cell(label), *(f"{p:.6g}" for p in probs)]
                for label, probs in zip(prediction.labels, prediction.probabilities.tolist())]
    else:
        header = [f"output_{i}" for i in range(prediction.outputs.shape[1])]
        rows = [[f"{v:.9g}" for v in row] for row in prediction.outputs.tolist()]
    if names is not None:
        header = ["input", *header]
        rows = [[_csv_cell(name), *row] for name, row in zip(names, rows)]
    return [",".join(_csv_cell(h) for h in header) + "\n", *(",".join(row) + "\n" for row in rows)]


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text
