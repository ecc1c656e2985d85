"""A folder of images in class sub-folders (the ImageFolder layout), read with Pillow.

Layouts: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (the given split), or ``ROOT/<class>/*``
(20% of each class becomes the test split, stratified). Class names are the sorted sub-folder
names, the same in train and test. Image files are recognised by their suffix; hidden files and
other files are skipped. Every image must have the same size. Grey images (modes 1, L, LA) give one
channel; if any image is in colour (RGB, RGBA, P) every image is converted to RGB (alpha dropped).
Pixels become float32 in [0, 1] (8-bit value / 255). Every violation is a one-line ``DataError``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tinydeploy.data.arrays import RawSplit, first_line, stratified_split
from tinydeploy.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
GREY_MODES = ("1", "L", "LA")
COLOUR_MODES = ("RGB", "RGBA", "P")
#: Largest image accepted (pixels), checked from the header before decoding.
MAX_PIXELS = 4096 * 4096
#: Largest decoded dataset accepted (float32 bytes).
MAX_BYTES = 8 * 1024**3
TEST_FRACTION = 0.2


def is_image_folder(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def load_image_folder(name: str, split_seed: int) -> RawSplit:
    """Read ``name`` as an image folder (layouts in the module docstring)."""
    root = Path(name).expanduser().resolve()
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, classes = _class_files(root / "train")
        test_files, test_classes = _class_files(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataError(f"{root / 'test'} has class folder(s) {', '.join(unknown)} that {root / 'train'} lacks: "
                            "use the same class folders in both")
        test_files = [(path, classes.index(test_classes[label])) for path, label in test_files]
        X, mode = _read_images([p for p, _ in train_files + test_files])
        n = len(train_files)
        y = np.array([label for _, label in train_files + test_files], dtype=np.int64)
        split = (X[:n], y[:n], X[n:], y[n:])
    else:
        files, classes = _class_files(root)
        X, mode = _read_images([p for p, _ in files])
        y = np.array([label for _, label in files], dtype=np.int64)
        X_train, X_test, y_train, y_test = stratified_split(X, y, TEST_FRACTION, split_seed, classes, root.name)
        split = (X_train, y_train, X_test, y_test)
    image = {"mode": mode, "size": list(X.shape[2:]), "max_value": 1.0}
    return RawSplit(root.name, "classification", *split, classes=classes, image=image)


def _class_files(folder: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """(image path, class index) for every image under ``folder/<class>/``, and the class names."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    classes: list[str] = []
    for class_dir in class_dirs:
        images = sorted(p for p in class_dir.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"class folder {class_dir} has no image files ({', '.join(IMAGE_SUFFIXES[:3])}, ...): "
                            "add images or remove the folder")
        files += [(path, len(classes)) for path in images]
        classes.append(class_dir.name)
    if len(classes) < 2:
        raise DataError(f"{folder} has {len(classes)} class sub-folder(s) with images: an image folder needs one "
                        "sub-folder per class (at least 2), e.g. DIR/cat/*.png and DIR/dog/*.png")
    return files, tuple(classes)


def _open(path: Path) -> Any:
    """The decoded Pillow image at ``path`` with its size checked before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(f"image {path} is {width}x{height}, larger than {MAX_PIXELS:,} pixels: downscale it")
            image.load()
            return image
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({first_line(exc)}): replace or remove it") from exc


def _read_images(paths: list[Path]) -> tuple[np.ndarray, str]:
    """All images as float32 (n, C, H, W) in [0, 1], and the mode they were converted to (L or RGB)."""
    images, first = [], None
    for path in paths:
        image = _open(path)
        if image.mode not in GREY_MODES + COLOUR_MODES:
            raise DataError(f"image {path} has mode '{image.mode}': save it as 8-bit grey or RGB (PNG or JPEG)")
        if first is None:
            first = (path, image.size)
        elif image.size != first[1]:
            raise DataError(
                f"image {path} is {image.size[0]}x{image.size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}: "
                "every image must have the same size; resize them"
            )
        if len(images) * first[1][0] * first[1][1] * 3 * 4 > MAX_BYTES:
            raise DataError(f"the image folder decodes to more than {MAX_BYTES / 1024**3:.0f} GiB: use fewer or "
                            "smaller images")
        images.append(image)
    mode = "RGB" if any(image.mode in COLOUR_MODES for image in images) else "L"
    arrays = [np.asarray(image.convert(mode), dtype=np.uint8) for image in images]
    X = np.stack(arrays).astype(np.float32) / 255.0
    return (X[:, None] if mode == "L" else X.transpose(0, 3, 1, 2)), mode
