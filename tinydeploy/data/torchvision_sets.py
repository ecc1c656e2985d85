"""torchvision image sets (MNIST, FashionMNIST, CIFAR-10/100) read from a local directory, never downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinydeploy.data.arrays import RawSplit, first_line
from tinydeploy.errors import DataError

#: Built-in names read from ``data_dir`` by these ``torchvision.datasets`` classes.
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def load_torchvision(name: str, data_dir: str | None) -> RawSplit:
    """MNIST / FashionMNIST / CIFAR-10 / CIFAR-100 from ``data_dir`` as (n, C, H, W) in [0, 1]."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, TORCHVISION_CLASSES[name])
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
    image = {"mode": "L" if X_train.shape[1] == 1 else "RGB", "size": list(X_train.shape[2:]), "max_value": 1.0}
    return RawSplit(name, "classification", X_train, y_train, X_test, y_test, classes, image)


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
            f"(torchvision: {first_line(exc)}); replace them with the official files"
        ) from exc
    images = np.asarray(dataset.data, dtype=np.uint8)  # MNIST (n, H, W); CIFAR (n, H, W, C)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return images.astype(np.float32) / 255.0, labels, tuple(str(c) for c in dataset.classes)


