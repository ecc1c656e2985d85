"""torchvision's on-disk image sets (MNIST, FashionMNIST, CIFAR-10/100) read from a local directory with
numpy alone: never downloaded, torchvision not needed.

The files are those torchvision's ``datasets`` classes read with ``download=False``, at the same paths:

* MNIST / FashionMNIST: ``<Name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, uncompressed IDX
  files (a big-endian header: magic 0x0000 08 <ndim>, the dimensions, then unsigned bytes);
* CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; CIFAR-100:
  ``cifar-100-python/{train,test,meta}``. Each is a Python pickle of a dict holding a uint8 numpy array
  ``data`` (n, 3072: the red, green and blue 32x32 planes of each image) and lists of labels / names.

Unpickling can run arbitrary code (a pickle names any importable callable), and torchvision's reader
uses plain ``pickle.load``. These files are read with ``RestrictedUnpickler`` instead: the only callables
a file may name are numpy's array reconstructor (``_reconstruct``, wrapped to build only plain
``ndarray``s of at most ``MAX_ARRAY_VALUES`` values) and ``numpy.dtype`` (refusing object dtypes, whose
elements would be arbitrary objects); anything else (``os.system``, ``builtins.eval``, ...) is refused
by name before it is called. Dicts, lists, strings and numbers are plain pickle opcodes that call
nothing. A file larger than ``MAX_FILE_BYTES`` is refused before it is read. The arrays found are then
checked (dtype, shape, label range) like any other user data.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tinydeploy.data.arrays import RawSplit, first_line
from tinydeploy.errors import DataError

#: Built-in names read from ``data_dir``, with torchvision's class name (the folder of the MNIST family).
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}

MNIST_CLASSES = ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
                 "8 - eight", "9 - nine")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
#: CIFAR layout: folder, training files, test file, meta file, label key, class-name key.
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}
#: The largest CIFAR file accepted (the official ones are 31 MB (CIFAR-10 batch) and 155 MB (CIFAR-100 train)).
MAX_FILE_BYTES = 1 << 28
#: The largest array a CIFAR pickle may reconstruct (50,000 images of 3,072 bytes, with room to spare).
MAX_ARRAY_VALUES = 1 << 28


def expected_files(name: str) -> list[str]:
    """Paths, relative to ``data_dir``, of the files of dataset ``name`` (as torchvision lays them out)."""
    if name in _CIFAR:
        folder, train, test, meta, _, _ = _CIFAR[name]
        return [f"{folder}/{f}" for f in (*train, test, meta)]
    folder = TORCHVISION_CLASSES[name]
    return [f"{folder}/raw/{prefix}-{kind}-ubyte" for prefix in ("train", "t10k")
            for kind in ("images-idx3", "labels-idx1")]


def load_torchvision(name: str, data_dir: str | None) -> RawSplit:
    """MNIST / FashionMNIST / CIFAR-10 / CIFAR-100 from ``data_dir`` as (n, C, H, W) in [0, 1]."""
    expected = expected_files(name)
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
    try:
        X_train, y_train, X_test, y_test, classes = (_read_cifar if name in _CIFAR else _read_mnist)(name, root)
    except (DataError, pickle.UnpicklingError, ValueError, KeyError, TypeError, EOFError, IndexError,
            AttributeError, OverflowError) as exc:
        raise DataError(
            f"cannot read dataset '{name}' from {root}: the files are corrupt or not the originals "
            f"({first_line(exc)}); replace them with the official files"
        ) from None
    image = {"mode": "L" if X_train.shape[1] == 1 else "RGB", "size": list(X_train.shape[2:]), "max_value": 1.0}
    return RawSplit(name, "classification", X_train, y_train, X_test, y_test, classes, image)


# ----- MNIST family: IDX files -------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x00000801 / 0x00000803 ...) as a numpy array."""
    data = path.read_bytes()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path.name} is not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise DataError(f"{path.name} has a truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != math.prod(shape):
        raise DataError(f"{path.name} holds {len(data) - header} bytes for shape {list(shape)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_mnist(name: str, root: Path):
    files = [root / f for f in expected_files(name)]
    splits = []
    for images_path, labels_path in (files[:2], files[2:]):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) > 9:
            raise DataError(f"{images_path.name} / {labels_path.name} hold images {list(images.shape)} and "
                            f"labels {list(labels.shape)}, not n 2-D images with n labels in 0..9")
        splits += [images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64)]
    return (*splits, MNIST_CLASSES if name == "mnist" else FASHION_CLASSES)


# ----- CIFAR: pickled dicts of numpy arrays, read without running code ------------------------------------
#: numpy's array reconstructor (``numpy._core.multiarray._reconstruct``), as its pickles name it.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]


def _bounded_reconstruct(reconstruct: Callable[..., Any]) -> Callable[..., Any]:
    def build(subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError(f"the pickle builds a {getattr(subtype, '__name__', subtype)!r}, not an ndarray")
        if math.prod(shape if isinstance(shape, tuple) else (shape,)) > MAX_ARRAY_VALUES:
            raise pickle.UnpicklingError(f"the pickle asks for an array of shape {shape}")
        return reconstruct(subtype, shape, dtype)

    return build


def _plain_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("the pickle builds an array of Python objects")
    return dtype


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array reconstructor (bounded) and plain dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _bounded_reconstruct(_RECONSTRUCT)
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return _plain_dtype
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR file holds only numpy arrays, "
                                     "lists, strings and numbers")


def load_restricted_pickle(path: Path) -> Any:
    """Unpickle ``path`` with ``RestrictedUnpickler`` (Python 2 strings decoded as latin-1, as CIFAR's files need)."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path.name} is {size} bytes, more than any CIFAR file")
    return RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    entry = load_restricted_pickle(path)
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        raise DataError(f"{path.name} is not a dict with 'data' and '{label_key}'")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path.name}: 'data' is not a uint8 array of shape (n, 3072)")
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path.name} holds {len(data)} images but {labels.size} labels")
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels


def _read_cifar(name: str, root: Path):
    folder, train, test, meta, label_key, names_key = _CIFAR[name]
    parts = [_cifar_batch(root / folder / f, label_key) for f in train]
    X_test, y_test = _cifar_batch(root / folder / test, label_key)
    names = load_restricted_pickle(root / folder / meta)
    if not isinstance(names, dict) or not isinstance(names.get(names_key), list):
        raise DataError(f"{meta} has no list '{names_key}'")
    classes = tuple(str(c) for c in names[names_key])
    X_train, y_train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if max(y_train.max(initial=0), y_test.max(initial=0)) >= len(classes) or min(y_train.min(), y_test.min()) < 0:
        raise DataError(f"labels outside 0..{len(classes) - 1}")
    return X_train, y_train, X_test, y_test, classes
