"""Find ONNX tensors whose data lives in other files, by reading the protobuf wire format directly.

An ONNX tensor may keep its values in an external file (``data_location = EXTERNAL`` with a
``location`` entry). onnxruntime resolves that location against the model's folder, or against the
process's working directory when the model is handed over as bytes, so a tampered model.onnx could
make the server read any file it can open and return it as outputs. tinydeploy's exporter never
writes external data; the runtime therefore refuses every model that has any.

This module needs neither the ``onnx`` package nor protobuf: it walks only the messages that can
hold a ``TensorProto`` (field numbers from onnx.proto, ONNX IR):

    ModelProto.graph 7, .training_info 20 (TrainingInfoProto.initialization 1, .algorithm 2), .functions 25
    GraphProto.node 1, .initializer 5, .sparse_initializer 15
    NodeProto.attribute 5; FunctionProto.node 7, .attribute_proto 11
    AttributeProto.t 5, .g 6, .tensors 10, .graphs 11, .sparse_tensor 22, .sparse_tensors 23
    SparseTensorProto.values 1, .indices 2
    TensorProto.name 8, .external_data 13 (StringStringEntryProto key 1, value 2), .data_location 14
"""

from __future__ import annotations

from typing import Callable, Iterator

#: Nesting of graphs inside attributes deeper than this is refused (no real model comes close).
MAX_NESTING = 64
_EXTERNAL = 1

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class MalformedModel(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise MalformedModel("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of every field of one message; length-delimited values are views."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == _LENGTH:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise MalformedModel("field runs past the end of its message")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > len(data):
                raise MalformedModel("truncated fixed-size field")
        else:
            raise MalformedModel(f"unsupported wire type {wire}")


def _tensor(data: memoryview, found: list[tuple[str, str]]) -> None:
    name, location, external = "", "", False
    for number, wire, value in _fields(data):
        if number == 8 and wire == _LENGTH:
            name = bytes(value).decode("utf-8", "replace")  # type: ignore[arg-type]
        elif number == 14 and wire == _VARINT and value == _EXTERNAL:
            external = True
        elif number == 13 and wire == _LENGTH:
            external = True
            entry = {k: bytes(v).decode("utf-8", "replace") for k, w, v in _fields(value) if w == _LENGTH}  # type: ignore[arg-type]
            if entry.get(1) == "location":
                location = entry.get(2, "")
    if external:
        found.append((name, location))


def _walk(data: memoryview, children: dict[int, Callable[..., None]], found: list[tuple[str, str]], depth: int) -> None:
    if depth > MAX_NESTING:
        raise MalformedModel(f"graphs nested more than {MAX_NESTING} levels deep")
    for number, wire, value in _fields(data):
        visit = children.get(number)
        if visit is not None and wire == _LENGTH:
            visit(value, found, depth + 1)


def _sparse(data: memoryview, found: list[tuple[str, str]], depth: int) -> None:
    _walk(data, {1: _as_tensor, 2: _as_tensor}, found, depth)


def _as_tensor(data: memoryview, found: list[tuple[str, str]], depth: int) -> None:
    _tensor(data, found)


def _graph(data: memoryview, found: list[tuple[str, str]], depth: int) -> None:
    _walk(data, {1: _node, 5: _as_tensor, 15: _sparse}, found, depth)


def _attribute(data: memoryview, found: list[tuple[str, str]], depth: int) -> None:
    _walk(data, {5: _as_tensor, 6: _graph, 10: _as_tensor, 11: _graph, 22: _sparse, 23: _sparse}, found, depth)


def _node(data: memoryview, found: list[tuple[str, str]], depth: int) -> None:
    _walk(data, {5: _attribute}, found, depth)


def _function(data: memoryview, found: list[tuple[str, str]], depth: int) -> None:
    _walk(data, {7: _node, 11: _attribute}, found, depth)


def _training_info(data: memoryview, found: list[tuple[str, str]], depth: int) -> None:
    _walk(data, {1: _graph, 2: _graph}, found, depth)


def external_tensors(model: bytes) -> list[tuple[str, str]]:
    """(tensor name, external location) of every tensor of a serialised ModelProto stored outside it.

    Raises ``MalformedModel`` when the bytes are not a well-formed protobuf message.
    """
    found: list[tuple[str, str]] = []
    _walk(memoryview(model), {7: _graph, 20: _training_info, 25: _function}, found, 0)
    return found
