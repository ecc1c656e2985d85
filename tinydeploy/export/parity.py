"""The parity gate: does an artifact compute what the frozen model computes? (numpy only)

Pass rule, elementwise over every output of every input batch (``b`` = frozen model, ``a`` = artifact):

    |a - b| <= atol + rtol * |b|

(``numpy.isclose`` with the frozen model as reference). The inputs are the whole test split and
random batches of 1, 7 and the test-split size drawn per feature from N(mean, std) of the test
split with a fixed seed, all in the space the artifact expects (raw features unless exported with
``--no-preprocessing``). Reported per check: max/mean absolute difference, max relative difference
``|a - b| / max(|b|, 1e-12)``, argmax agreement (classification); per format: the task metric
(accuracy, or MSE with RMSE, MAE and R^2 under ``scores``) on the test split for the artifact and the
frozen model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from tinydeploy.errors import TinyDeployError
from tinydeploy.model.scores import regression_scores

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
RANDOM_BATCHES = (1, 7)
PARITY_SEED = 0
TOLERANCE_RULE = "|artifact - frozen| <= atol + rtol * |frozen|, elementwise"
TEST_CHECK = "test"


class ParityError(TinyDeployError):
    """At least one artifact failed the gate; ``results`` holds every format's measurements."""

    def __init__(self, message: str, results: list["FormatParity"]) -> None:
        super().__init__(message)
        self.results = results


@dataclass
class FormatParity:
    """Gate result of one artifact."""

    format: str
    file: str
    passed: bool
    runtime: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: dict[str, Any] = field(default_factory=dict)
    spec_matches: bool = True
    error: str | None = None

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.checks.values()), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff}

    def reason(self, atol: float, rtol: float) -> str:
        """Why the gate failed, in one clause."""
        if self.error:
            return self.error
        if not self.spec_matches:
            return "its embedded spec differs from model.safetensors"
        worst = max(self.checks, key=lambda name: self.checks[name]["max_abs_diff"])
        return f"max abs diff {self.max_abs_diff:.3g} on '{worst}' exceeds atol {atol:g} + rtol {rtol:g} x |frozen|"


def parity_inputs(X: np.ndarray, seed: int = PARITY_SEED) -> dict[str, np.ndarray]:
    """The test split plus random batches of 1, 7 and ``len(X)`` samples, float32."""
    rng = np.random.default_rng(seed)
    mean, std = X.mean(axis=0), X.std(axis=0)
    inputs = {TEST_CHECK: np.ascontiguousarray(X, dtype=np.float32)}
    for batch in (*RANDOM_BATCHES, len(X)):
        inputs[f"random_{batch}"] = (mean + std * rng.standard_normal((batch, *X.shape[1:]))).astype(np.float32)
    return inputs


def compare(candidate: np.ndarray, reference: np.ndarray, atol: float, rtol: float, task: str) -> dict[str, Any]:
    """Differences of one batch of outputs and whether they pass the tolerance rule."""
    if candidate.shape != reference.shape:
        return {"max_abs_diff": float("inf"), "passed": False, "error": f"shape {candidate.shape} != {reference.shape}"}
    a, b = candidate.astype(np.float64), reference.astype(np.float64)
    diff = np.abs(a - b)
    result = {
        "batch": int(len(b)),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": float((diff / np.maximum(np.abs(b), 1e-12)).max()),
        "passed": bool(np.all(diff <= atol + rtol * np.abs(b))),
    }
    if task == "classification":
        result["argmax_agreement"] = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
    return result


def task_metric(task: str, outputs: np.ndarray, y: np.ndarray) -> float:
    """Accuracy for classification, mean squared error for regression."""
    if task == "classification":
        return float(np.mean(outputs.argmax(axis=1) == y))
    return float(np.mean((outputs.astype(np.float64) - y) ** 2))


def run_gate(
    fmt: str,
    file: str,
    predict: Callable[[np.ndarray], np.ndarray],
    runtime: dict[str, Any],
    inputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    y_test: np.ndarray,
    task: str,
    atol: float,
    rtol: float,
    spec_matches: bool = True,
) -> FormatParity:
    """Run ``predict`` on every input batch and compare with the frozen model's ``reference`` outputs."""
    outputs = {name: predict(x) for name, x in inputs.items()}
    checks = {name: compare(outputs[name], reference[name], atol, rtol, task) for name in inputs}
    metric: dict[str, Any] = {
        "name": "accuracy" if task == "classification" else "mse",
        "artifact": task_metric(task, outputs[TEST_CHECK], y_test),
        "frozen": task_metric(task, reference[TEST_CHECK], y_test),
    }
    if task != "classification":
        metric["scores"] = {"artifact": regression_scores(outputs[TEST_CHECK], y_test),
                            "frozen": regression_scores(reference[TEST_CHECK], y_test)}
    passed = spec_matches and all(check["passed"] for check in checks.values())
    return FormatParity(fmt, file, passed, runtime, checks, metric, spec_matches)


def failure_message(results: list[FormatParity], atol: float, rtol: float) -> str:
    """One line naming every failed format and why."""
    failed = [f"{r.format} ({r.reason(atol, rtol)})" for r in results if not r.passed]
    return "parity check failed for " + "; ".join(failed)


def parity_document(
    results: list[FormatParity], atol: float, rtol: float, inputs: dict[str, Any]
) -> dict[str, Any]:
    """The content of parity.json."""
    return {
        "reference": "frozen model (torch, CPU, float32)",
        "tolerance": {"atol": atol, "rtol": rtol, "rule": TOLERANCE_RULE},
        "inputs": inputs,
        "passed": all(r.passed for r in results),
        "formats": {r.format: r.to_dict() for r in results},
    }
