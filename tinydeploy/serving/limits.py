"""Bounds on a predict request, checked on the raw bytes before any JSON is parsed.

Every request is untrusted. Before ``json.loads`` sees a body, ``check_json`` measures it in linear
time with C-speed bytes operations (strings blanked out first, so their contents never count):

* its nesting depth (``[`` and ``{``) against ``max_depth``, which a valid request reaches exactly
  (object, batch, then one level per input dimension): no recursion limit is ever approached;
* the number of values against ``max_numbers`` (``max_batch`` rows of ``n_features``);
* the length of every value against ``max_number_chars``: no integer with thousands of digits
  reaches Python's int conversion (which raises past 4,300 digits);
* integers with more digits than any float32 (|x| <= 3.4e38, 39 digits): refused before conversion.

The body is then parsed by ``json.loads`` (numbers by its C scanner, all of them short by now); NaN
and Infinity literals are refused, and values beyond float32 are refused by the model's input
validation. Each violation is a ``RequestError`` with a 4xx status, a stable ``code`` and a message
naming the limit.

Rows sent by name (``{"inputs": [{"mean radius": 17.99, ...}]}``) fit the same bounds: the object of
a row is the row's nesting level, names are strings (blanked, never counted as values), and the body
limit grows by the bytes of the names (``name_bytes``). Image uploads (multipart, ``multipart.py``)
have their own bounds: ``max_images`` parts of at most ``max_image_bytes`` each, ``max_upload_bytes``
in all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Digits of the largest integer float32 holds (3.4e38): an integer token with more is out of range.
FLOAT32_DIGITS = 39
#: Longest numeric token accepted: far more than any float32 needs (about 9 significant digits).
MAX_NUMBER_CHARS = 64
#: Bytes of request body allowed per input value (JSON text of a float plus separator), and a floor.
BYTES_PER_VALUE = 32
MIN_BODY_BYTES = 1 << 20
#: Images per upload at most (and at most --max-batch), and bytes per encoded image: a floor, plus 4
#: bytes per raw value (an encoded 8-bit image is rarely larger than its raw pixels).
MAX_IMAGES = 32
MIN_IMAGE_BYTES = 1 << 18
#: Bytes of multipart framing (boundaries, part headers) allowed per image.
PART_OVERHEAD_BYTES = 1024
#: Seconds a client gets to send the whole body once the headers are in.
DEFAULT_BODY_TIMEOUT_S = 10.0

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_TO_SPACE = bytes.maketrans(b"[]{}:,\t\r\n", b" " * 9)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


class RequestError(Exception):
    """A client mistake detected before the model runs; answered with ``status`` and JSON."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Every bound the server applies to a request."""

    max_batch: int
    max_body_bytes: int
    max_depth: int
    max_numbers: int
    max_number_chars: int = MAX_NUMBER_CHARS
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    #: Image uploads: 0 when the model takes no images.
    max_images: int = 0
    max_image_bytes: int = 0
    max_upload_bytes: int = 0

    @classmethod
    def for_model(
        cls, input_ndim: int, n_features: int, max_batch: int, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        *, name_bytes: int = 0, images: bool = False,
    ) -> "Limits":
        """Limits that every valid request for a model with this input fits exactly; ``name_bytes`` is the
        length of a row sent by name beyond its numbers (the names, quoted, with their colons), ``images``
        whether the model takes image uploads."""
        max_images = min(max_batch, MAX_IMAGES) if images else 0
        max_image_bytes = max(MIN_IMAGE_BYTES, 4 * n_features) if images else 0
        return cls(
            max_batch=max_batch,
            max_body_bytes=max(MIN_BODY_BYTES, max_batch * (n_features * BYTES_PER_VALUE + name_bytes) + 4096),
            # {"inputs": [rows...]}: 1 for the object, 1 for the batch, one per input dimension (or the row's object)
            max_depth=2 + max(1, input_ndim),
            max_numbers=max_batch * n_features,
            body_timeout_s=body_timeout_s,
            max_images=max_images,
            max_image_bytes=max_image_bytes,
            max_upload_bytes=max_images * (max_image_bytes + PART_OVERHEAD_BYTES),
        )

    def describe(self) -> dict[str, Any]:
        described = {
            "max_batch": self.max_batch,
            "max_body_bytes": self.max_body_bytes,
            "max_json_depth": self.max_depth,
            "max_numbers": self.max_numbers,
            "max_number_chars": self.max_number_chars,
            "body_timeout_s": self.body_timeout_s,
        }
        if self.max_images:
            described.update({"max_images": self.max_images, "max_image_bytes": self.max_image_bytes,
                              "max_upload_bytes": self.max_upload_bytes})
        return described


def _depth(brackets: bytes) -> int:
    """The deepest nesting reached by a string of brackets."""
    if len(brackets) > 256:
        return int(np.cumsum(_STEP[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int64).max(initial=0))
    depth = deepest = 0
    for c in brackets:
        depth += 1 if c in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def check_json(body: bytes, limits: Limits) -> None:
    """Raise RequestError if ``body`` nests deeper, holds more values or longer numbers than ``limits``."""
    skeleton = _STRING.sub(b'""', body)
    depth = _depth(skeleton.translate(None, _NOT_BRACKETS))
    if depth > limits.max_depth:
        raise RequestError(
            400, "too_deep",
            f"the body nests {depth} levels deep, over the limit of {limits.max_depth}: "
            'send {"inputs": [row, ...]} with plain rows of numbers',
        )
    # values are the runs of bytes between structure and whitespace: numbers, literals, blanked strings
    spaced = b" " + skeleton.translate(_TO_SPACE) + b" "
    gaps = np.diff(np.flatnonzero(np.frombuffer(spaced, dtype=np.uint8) == ord(" ")))
    values = int(np.count_nonzero(gaps > 1)) - skeleton.count(b'""')
    if values > limits.max_numbers:
        raise RequestError(
            413, "too_many_numbers",
            f"the body holds {values} numbers, over the limit of {limits.max_numbers} "
            f"({limits.max_batch} rows of {limits.max_numbers // max(1, limits.max_batch)} values): split the batch",
        )
    longest = int(gaps.max(initial=1)) - 1
    if longest > limits.max_number_chars:
        raise RequestError(
            422, "number_too_long",
            f"a number in the body has {longest} characters, over the limit of {limits.max_number_chars}: "
            "send float32 values (about 9 significant digits)",
        )
    if longest > FLOAT32_DIGITS:
        big = next((t for t in spaced.split() if len(t.lstrip(b"-")) > FLOAT32_DIGITS and t.lstrip(b"-").isdigit()), None)
        if big is not None:
            raise RequestError(
                422, "out_of_range",
                f"the integer {big[:12].decode()}... has {len(big.lstrip(b'-'))} digits: outside float32's range "
                "(|x| <= 3.4e38), the limit of what the model takes",
            )


def _reject_constant(name: str) -> Any:
    raise RequestError(
        422, "non_finite", f"the body contains the literal {name}, which is not valid JSON and not a finite number"
    )


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def parse_predict_body(body: bytes, limits: Limits) -> Any:
    """The ``inputs`` of a predict request body, or a RequestError naming the problem and the limit."""
    if not body.strip():
        raise RequestError(400, "empty_body", 'the request body is empty: send {"inputs": [...]}')
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            400, "malformed_json", f"the request body is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    check_json(body, limits)
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise RequestError(
            400,
            "malformed_json",
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    if not isinstance(payload, dict):
        raise RequestError(
            422, "invalid_body", f'the body must be a JSON object {{"inputs": [...]}}, got a JSON {_json_kind(payload)}'
        )
    if "inputs" not in payload:
        keys = ", ".join(repr(k[:40]) for k in list(payload)[:5]) or "none"
        raise RequestError(
            422, "missing_inputs", f'the body has no "inputs" field (found keys: {keys}): send {{"inputs": [...]}}'
        )
    unknown = sorted(set(payload) - {"inputs"})
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise RequestError(422, "unknown_field", f'unknown field(s) {shown}: the body takes only "inputs"')
    return payload["inputs"]
