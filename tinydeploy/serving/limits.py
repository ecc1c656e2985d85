"""Bounds on a predict request, checked on the raw bytes before any JSON is parsed.

Every request is untrusted. Before ``json.loads`` sees a body, ``check_json`` measures it in linear
time with regular expressions and numpy (strings blanked out first, so their contents never count):

* its nesting depth (``[`` and ``{``) against ``max_depth``, which a valid request reaches exactly
  (object, batch, then one level per input dimension): no recursion limit is ever approached;
* the number of numeric tokens against ``max_numbers`` (``max_batch`` rows of ``n_features``);
* the length of every numeric token against ``max_number_chars``: no integer with thousands of
  digits reaches Python's int conversion (which raises past 4,300 digits).

``parse_predict_body`` then parses with every number converted by ``float`` straight from its text
and refused when it is beyond float32's range (|x| > 3.4e38), so no big integer is ever built. Each
violation is a ``RequestError`` with a 4xx status, a stable ``code`` and a message naming the limit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

#: float32's largest finite value: inputs beyond it cannot be represented by the model.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Longest numeric token accepted: far more than any float32 needs (about 9 significant digits).
MAX_NUMBER_CHARS = 64
#: Bytes of request body allowed per input value (JSON text of a float plus separator), and a floor.
BYTES_PER_VALUE = 32
MIN_BODY_BYTES = 1 << 20
#: Seconds a client gets to send the whole body once the headers are in.
DEFAULT_BODY_TIMEOUT_S = 10.0

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NUMBER = re.compile(rb"-?[0-9][0-9.eE+\-]*")
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


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

    @classmethod
    def for_model(
        cls, input_ndim: int, n_features: int, max_batch: int, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    ) -> "Limits":
        """Limits that every valid request for a model with this input fits exactly."""
        return cls(
            max_batch=max_batch,
            max_body_bytes=max(MIN_BODY_BYTES, max_batch * n_features * BYTES_PER_VALUE + 4096),
            # {"inputs": [rows...]}: 1 for the object, 1 for the batch, one per input dimension
            max_depth=2 + max(1, input_ndim),
            max_numbers=max_batch * n_features,
            body_timeout_s=body_timeout_s,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "max_body_bytes": self.max_body_bytes,
            "max_json_depth": self.max_depth,
            "max_numbers": self.max_numbers,
            "max_number_chars": self.max_number_chars,
            "body_timeout_s": self.body_timeout_s,
        }


def check_json(body: bytes, limits: Limits) -> None:
    """Raise RequestError if ``body`` nests deeper, holds more numbers or longer numbers than ``limits``."""
    skeleton = _STRING.sub(b'""', body)
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = _OPEN[codes]
    steps = steps[steps != 0]
    depth = int(np.cumsum(steps, dtype=np.int64).max(initial=0))
    if depth > limits.max_depth:
        raise RequestError(
            400,
            "too_deep",
            f"the body nests {depth} levels deep, over the limit of {limits.max_depth}: "
            'send {"inputs": [row, ...]} with plain rows of numbers',
        )
    numbers = _NUMBER.findall(skeleton)
    if len(numbers) > limits.max_numbers:
        raise RequestError(
            413,
            "too_many_numbers",
            f"the body holds {len(numbers)} numbers, over the limit of {limits.max_numbers} "
            f"({limits.max_batch} rows of {limits.max_numbers // max(1, limits.max_batch)} values): split the batch",
        )
    longest = max(map(len, numbers), default=0)
    if longest > limits.max_number_chars:
        raise RequestError(
            422,
            "number_too_long",
            f"a number in the body has {longest} characters, over the limit of {limits.max_number_chars}: "
            "send float32 values (about 9 significant digits)",
        )


def _number(text: str) -> float:
    value = float(text)  # never int(text): no big integer is built, whatever the digits
    if not -FLOAT32_MAX <= value <= FLOAT32_MAX:
        shown = text if len(text) <= 24 else text[:21] + "..."
        raise RequestError(
            422,
            "out_of_range",
            f"the number {shown} is outside float32's range (|x| <= 3.4e38), the limit of what the model takes",
        )
    return value


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
        payload = json.loads(text, parse_int=_number, parse_float=_number, parse_constant=_reject_constant)
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
