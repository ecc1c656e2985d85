"""Image files as a served CNN sees them: ``decode_image`` gives, bit for bit, the tensor the training
loader (``data/image_folder.py``) made of the same file, for grey and colour models and every mode the
loader converts; other modes, sizes and formats are refused with their code and a message naming the fix."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinydeploy.data.image_folder import load_image_folder
from tinydeploy.serving.images import ImageError, decode_image, image_format

SIZE = (6, 5)  # width, height


def _save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _folder(root: Path, colour: bool) -> list[Path]:
    """Two classes of 5 images; a colour folder mixes RGB, RGBA, palette and grey files."""
    rng = np.random.default_rng(7)
    files = []
    for label in ("a", "b"):
        for i in range(5):
            grey = rng.integers(0, 256, size=(SIZE[1], SIZE[0]), dtype=np.uint8)
            rgb = rng.integers(0, 256, size=(SIZE[1], SIZE[0], 3), dtype=np.uint8)
            if not colour:
                image = Image.fromarray(grey, mode="L")
            else:
                image = [Image.fromarray(rgb, mode="RGB"), Image.fromarray(rgb, mode="RGB").convert("RGBA"),
                         Image.fromarray(rgb, mode="RGB").convert("P"), Image.fromarray(grey, mode="L"),
                         Image.fromarray(rgb, mode="RGB")][i]
            suffix = ".jpg" if (colour and i == 4) else ".png"
            files.append(_save(root / label / f"{i}{suffix}", image))
    return files


@pytest.mark.parametrize("colour", [False, True])
def test_a_served_image_is_the_tensor_training_made_of_it(tmp_path: Path, colour: bool) -> None:
    files = _folder(tmp_path / "images", colour)
    split = load_image_folder(str(tmp_path / "images"), split_seed=0)
    assert split.image == {"mode": "RGB" if colour else "L", "size": [SIZE[1], SIZE[0]], "max_value": 1.0}
    training = np.concatenate([split.X_train, split.X_test])
    served = np.stack([decode_image(path.read_bytes(), split.image, path.name) for path in files])
    assert served.dtype == np.float32 and served.shape == (10, 3 if colour else 1, SIZE[1], SIZE[0])
    # the split shuffles the files: every served tensor is exactly one of the training tensors
    matches = [[int(np.array_equal(s, t)) for t in training] for s in served]
    assert sorted(map(sum, matches)) == [1] * 10 and sorted(row.index(1) for row in matches) == list(range(10))


def _encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


GREY = {"mode": "L", "size": [5, 6], "max_value": 1.0}
RGB = {"mode": "RGB", "size": [5, 6], "max_value": 1.0}


@pytest.mark.parametrize(("image", "kind", "spec", "code", "message"), [
    (Image.new("RGB", SIZE), "PNG", GREY, "image_mode",
     "x.png has mode RGB but the model takes grey (L) images: convert it to grey"),
    (Image.new("CMYK", SIZE), "JPEG", RGB, "image_mode",
     "x.png has mode CMYK but the model takes grey or RGB images: save it as 8-bit grey or RGB (PNG or JPEG)"),
    (Image.new("I;16", SIZE), "PNG", GREY, "image_mode",
     "x.png has mode I;16 but the model takes grey (L) images: save it as 8-bit grey or RGB (PNG or JPEG)"),
    (Image.new("L", (5, 6)), "PNG", GREY, "image_size", "x.png is 5x6 pixels but the model takes 6x5: resize it"),
])
def test_other_modes_and_sizes_are_refused_by_name(image, kind: str, spec: dict, code: str, message: str) -> None:
    with pytest.raises(ImageError) as refused:
        decode_image(_encoded(image, kind), spec, "x.png")
    assert (refused.value.code, str(refused.value)) == (code, message)


def test_digits_scale_and_the_spec_checks() -> None:
    """digits count 0..16: a white pixel is 16, a black one 0; a spec that disagrees with the input is no format."""
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[0, 0] = 255
    digits = {"mode": "L", "size": [8, 8], "max_value": 16.0}
    decoded = decode_image(_encoded(Image.fromarray(pixels, mode="L")), digits)
    assert decoded[0, 0, 0] == 16.0 and decoded.sum() == 16.0
    assert image_format({"extra": {"image": digits}}, (1, 8, 8)) == digits
    assert image_format({"extra": {"image": digits}}, (3, 8, 8)) is None
    assert image_format({"extra": {"image": {**digits, "max_value": 0}}}, (1, 8, 8)) is None
    assert image_format({"extra": {}}, (1, 8, 8)) is None
