"""Image files (PNG, JPEG, ...) as the raw input tensors of a CNN, converted as its spec says (Pillow).

A model grown on images records their format in its spec (``extra.image``): ``mode`` ("L" grey or
"RGB"), ``size`` [H, W] and ``max_value`` (raw value = 8-bit pixel / 255 * max_value: 1 for images
read from files and mnist5k, 16 for sklearn's digits). An image is accepted when

* Pillow can decode it (anything else: ``undecodable_image``);
* its size is exactly the model's (checked from the header, before any pixel is decoded, so a
  decompression bomb is never expanded): ``image_size``;
* its mode fits: grey images (1, L, LA) for a grey model, grey or colour (RGB, RGBA, P; alpha
  dropped, grey replicated) for an RGB model, as the training loader converts them; a colour image
  for a grey model, or any other mode (CMYK, 16-bit, float...), is refused: ``image_mode``.

Each refusal is an ``ImageError`` with that code and a message naming the image and the fix; the
server answers it with a 4xx. Pillow is imported on first use (the serving stage stays torch-free); a
server without Pillow refuses uploads with a 415 saying so and still takes JSON tensors.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from tinydeploy.errors import TinyDeployError

GREY_MODES = ("1", "L", "LA")
COLOUR_MODES = ("RGB", "RGBA", "P")
#: File suffixes read as images by ``tinydeploy predict --input``.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


class ImageError(TinyDeployError):
    """An image cannot be used as an input of the model; ``code`` says why (module docstring)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def pillow_available() -> bool:
    """Whether Pillow can be imported (an edge install may leave it out: image uploads are then refused)."""
    try:
        import PIL  # noqa: F401  (the package only: its image modules load on first use)
    except ImportError:
        return False
    return True


def image_format(spec: dict[str, Any] | None, input_shape: tuple[int, ...]) -> dict[str, Any] | None:
    """The image format a model's spec records, checked against its input shape; None for non-image models."""
    image = ((spec or {}).get("extra") or {}).get("image")
    if not isinstance(image, dict) or len(input_shape) != 3:
        return None
    mode, size, max_value = image.get("mode"), image.get("size"), image.get("max_value", 1.0)
    channels = {"L": 1, "RGB": 3}.get(mode)
    if channels is None or not isinstance(size, list) or [channels, *size] != list(input_shape):
        return None
    if not isinstance(max_value, (int, float)) or isinstance(max_value, bool) or not max_value > 0:
        return None
    return {"mode": mode, "size": [int(s) for s in size], "max_value": float(max_value)}


def decode_image(data: bytes, image: dict[str, Any], name: str = "the image") -> np.ndarray:
    """``data`` (an encoded image file) as a float32 (C, H, W) tensor of raw values for a model whose
    image format is ``image`` (see ``image_format``); ImageError otherwise."""
    from PIL import Image, UnidentifiedImageError

    height, width = image["size"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            decoded = Image.open(io.BytesIO(data))
            if decoded.size != (width, height):
                raise ImageError(f"{name} is {decoded.size[0]}x{decoded.size[1]} pixels but the model takes "
                                 f"{width}x{height}: resize it", "image_size")
            _check_mode(decoded.mode, image["mode"], name)
            decoded.load()
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(f"{name} is over {Image.MAX_IMAGE_PIXELS:,} pixels (not decoded) but the model takes "
                         f"{width}x{height}: resize it", "image_size") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} cannot be decoded as an image (not a format Pillow recognises): use a PNG or JPEG "
                         "file", "undecodable_image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ImageError(f"{name} cannot be decoded as an image ({reason}): use a PNG or JPEG file",
                         "undecodable_image") from None
    pixels = np.asarray(decoded.convert(image["mode"]), dtype=np.float32)
    tensor = pixels[None] if image["mode"] == "L" else pixels.transpose(2, 0, 1)
    # the training loader's arithmetic (data/image_folder.py: 8-bit value / 255 in float32), bit for bit
    scaled = tensor / np.float32(255.0)
    return np.ascontiguousarray(scaled if image["max_value"] == 1.0 else scaled * np.float32(image["max_value"]))


def _check_mode(mode: str, wanted: str, name: str) -> None:
    if mode in GREY_MODES or (wanted == "RGB" and mode in COLOUR_MODES):
        return
    kind = "grey (L)" if wanted == "L" else "grey or RGB"
    fix = "convert it to grey" if mode in COLOUR_MODES else "save it as 8-bit grey or RGB (PNG or JPEG)"
    raise ImageError(f"{name} has mode {mode} but the model takes {kind} images: {fix}", "image_mode")
