"""Image uploads on ``POST /v1/predict``: a ``multipart/form-data`` body parsed in memory, bounded first.

The server reads the whole body under ``Limits.max_upload_bytes`` (declared ``Content-Length`` first,
then the bytes streamed) and a deadline before this module sees it; nothing is written to disk. Then,
before any part is looked at, the number of boundaries bounds the part count (``max_images``); each
part's headers are at most ``MAX_PART_HEADER_BYTES`` and its content at most ``max_image_bytes``.
Every part must be a file field named ``image`` (``curl -F image=@digit.png``); its bytes go to the
image decoder unchanged. Violations are ``RequestError``s: 400 for a malformed body, 413 for too many
or too large parts, 422 for a part that is not an image field.
"""

from __future__ import annotations

import re

from tinydeploy.serving.limits import Limits, RequestError

#: The form field that carries an image.
IMAGE_FIELD = "image"
MAX_PART_HEADER_BYTES = 4096
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_DISPOSITION = re.compile(r'^content-disposition:\s*form-data(.*)$', re.IGNORECASE | re.MULTILINE)
_PARAM = re.compile(r';\s*([a-z*]+)="([^"]*)"', re.IGNORECASE)


def is_multipart(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "multipart/form-data"


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a ``multipart/form-data`` Content-Type (RFC 2046: 1-70 characters)."""
    match = _BOUNDARY.search(content_type)
    if not match:
        raise RequestError(400, "malformed_multipart", "Content-Type multipart/form-data has no boundary parameter "
                           "(1-70 characters): let the client library build the upload (curl -F image=@file.png)")
    return (match.group(1) or match.group(2)).encode("latin-1")


def image_parts(body: bytes, content_type: str, limits: Limits) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every image part of a multipart body, bounded as the module docstring says."""
    delimiter = b"--" + boundary_of(content_type)
    count = body.count(delimiter) - 1  # the closing delimiter ends the last part
    if count > limits.max_images:
        raise RequestError(413, "too_many_images", f"the upload holds {count} parts, over the limit of "
                           f"{limits.max_images} images per request: split it")
    start = body.find(delimiter)
    end = body.find(b"\r\n" + delimiter + b"--")
    if start < 0 or end < start:
        raise RequestError(400, "malformed_multipart", "the multipart body has no closing boundary: it is "
                           "truncated or not multipart/form-data")
    parts = body[start + len(delimiter):end].split(b"\r\n" + delimiter)
    images = []
    for index, part in enumerate(parts):
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator or len(head) > MAX_PART_HEADER_BYTES:
            raise RequestError(400, "malformed_multipart", f"part {index} of the upload has no header block of at "
                               f"most {MAX_PART_HEADER_BYTES} bytes ending in a blank line")
        name, filename = _disposition(head.decode("latin-1"), index)
        if name != IMAGE_FIELD or filename is None:
            shown = repr(name[:40]) if name is not None else "without a name"
            raise RequestError(422, "unknown_field", f"part {index} of the upload is the field {shown}"
                               f"{'' if filename is not None else ' (not a file)'}: send each image as a file field "
                               f"named '{IMAGE_FIELD}' (curl -F {IMAGE_FIELD}=@digit.png)")
        if len(content) > limits.max_image_bytes:
            raise RequestError(413, "image_too_large", f"image {index} ({filename[:60]!r}) has {len(content)} bytes, "
                               f"over the limit of {limits.max_image_bytes} bytes per image: send the model's "
                               "image size, compressed (PNG or JPEG)")
        images.append((filename, content))
    if not images:
        raise RequestError(422, "no_image", f"the upload holds no image: send file fields named '{IMAGE_FIELD}'")
    return images


def _disposition(head: str, index: int) -> tuple[str | None, str | None]:
    """(field name, file name or None) from a part's Content-Disposition header."""
    match = _DISPOSITION.search(head.lstrip("\r\n"))
    if not match:
        raise RequestError(400, "malformed_multipart", f"part {index} of the upload has no Content-Disposition: "
                           "form-data header")
    params = {key.lower(): value for key, value in _PARAM.findall(match.group(1))}
    return params.get("name"), params.get("filename")
