"""Inputs matched to the model's features by name (standard library only).

A model grown on a CSV (or on an .npz or DataFrame with feature names) records its feature names in
its spec and in the ONNX metadata. Clients may then send

* rows as JSON objects ``{"mean radius": 17.99, ...}`` (the server, ``OnnxModel.validate``), and
* tables whose header names the columns (``tinydeploy predict --input rows.csv``),

in any order: the values are put in the model's order. A name the model does not know, or one of its
features left out, is refused with every such name listed, since a column in the wrong place gives
confident wrong answers rather than an error.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from tinydeploy.errors import TinyDeployError

#: Names listed in an error before "and N more".
SHOWN = 8


class FeatureMismatch(TinyDeployError):
    """Named inputs do not match the model's feature names."""


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def mismatch(expected: Sequence[str], given: Sequence[str]) -> str | None:
    """What is wrong with ``given`` names for a model taking ``expected`` ("missing feature(s) ...;
    unknown feature(s) ..."), or None when they are the same names (any order, none twice)."""
    known, seen = set(expected), set(given)
    missing = [name for name in expected if name not in seen]
    unknown = [name for name in dict.fromkeys(given) if name not in known]
    twice = [name for name, count in Counter(given).items() if count > 1]
    problems = []
    if missing:
        problems.append(f"missing feature(s) {_listed(missing)}")
    if unknown:
        problems.append(f"unknown feature(s) {_listed(unknown)}")
    if twice:
        problems.append(f"feature(s) {_listed(twice)} given twice")
    return "; ".join(problems) or None


def column_order(expected: Sequence[str], header: Sequence[str], where: str) -> list[int]:
    """Index of each of the model's features in ``header`` (a table's column names), or FeatureMismatch."""
    problem = mismatch(expected, header)
    if problem:
        raise FeatureMismatch(f"{where}: {problem}: the model takes the {len(expected)} columns it was trained on, "
                              "in any order (GET /v1/metadata lists feature_names)")
    position = {name: i for i, name in enumerate(header)}
    return [position[name] for name in expected]


def rows_by_name(rows: list[Any], expected: Sequence[str]) -> list[list[Any]]:
    """``rows`` of ``{name: value}`` objects as lists of values in the model's order, or FeatureMismatch."""
    if not expected:
        raise FeatureMismatch("this model has no feature names (it was trained on unnamed arrays): send rows of "
                              "numbers in the training order")
    values = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise FeatureMismatch(f"inputs row {i} is not an object like the rows before it: send every row by name "
                                  "or every row as a list of numbers")
        problem = mismatch(expected, list(row))
        if problem:
            raise FeatureMismatch(f"inputs row {i}: {problem}: send the model's {len(expected)} features by name "
                                  "(GET /v1/metadata lists feature_names)")
        values.append([row[name] for name in expected])
    return values
