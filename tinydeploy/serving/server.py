"""HTTP serving of an exported model with onnxruntime (FastAPI + uvicorn, no torch).

Endpoints (every error answer is JSON ``{"error": {"status", "code", "message"}}``):

* ``POST /v1/predict`` with ``Content-Type: application/json`` and ``{"inputs": [...]}`` (one row
  or a batch of rows of RAW features). Answers ``outputs`` (``[batch, n_outputs]``), and for
  classifiers ``labels``, ``indices`` and ``probabilities`` (softmax), always batched.
  Client mistakes get a 4xx, never a 5xx: 400 malformed JSON or body, 413 body or batch too large,
  415 wrong content type, 422 wrong shape / non-numeric / NaN or infinite / empty batch.
* ``GET /v1/metadata``: spec, classes, widths, sha256 of the model, providers in use, limits.
* ``GET /healthz``: liveness and readiness (the model is loaded and ran once at startup).
* ``GET /metrics``: Prometheus text format (requests by path and status, errors by status, a
  latency histogram, rows predicted, requests in flight), written here without prometheus_client.

Inference runs in a worker thread (onnxruntime sessions are thread-safe), so the event loop keeps
accepting requests while a batch runs. ``serve(..., workers=N)`` starts N uvicorn worker processes,
each with its own model and its own metrics.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinydeploy import __version__
from tinydeploy.errors import TinyDeployError
from tinydeploy.serving.runtime import InputError, OnnxModel

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 1024
#: Upper bound of the request body: generous room per value of a full batch (JSON text).
_BYTES_PER_VALUE = 32
_MIN_BODY_LIMIT = 1 << 20
#: Latency histogram buckets in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROUTES = ("/v1/predict", "/v1/metadata", "/healthz", "/metrics")
_ENV_DIR = "TINYDEPLOY_SERVE_DIR"
_ENV_PROVIDER = "TINYDEPLOY_SERVE_PROVIDER"
_ENV_MAX_BATCH = "TINYDEPLOY_SERVE_MAX_BATCH"


class RequestError(Exception):
    """A client mistake detected before the model runs; answered with ``status`` and JSON."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status)


# ----- metrics -------------------------------------------------------------------------------------
def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metrics:
    """Thread-safe counters and a latency histogram, rendered in Prometheus text format 0.0.4."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[int, int] = {}
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}
        self.latency_count: dict[str, int] = {}
        self.rows = 0
        self.in_flight = 0
        self.started = time.time()

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def observe(self, path: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            key = (path, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if status >= 400:
                self.errors[status] = self.errors.get(status, 0) + 1
            counts = self.latency.setdefault(path, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[path] = self.latency_sum.get(path, 0.0) + seconds
            self.latency_count[path] = self.latency_count.get(path, 0) + 1

    def add_rows(self, n: int) -> None:
        with self._lock:
            self.rows += n

    def render(self, model: OnnxModel) -> str:
        with self._lock:
            lines = [
                "# HELP tinydeploy_requests_total HTTP requests answered, by path, method and status.",
                "# TYPE tinydeploy_requests_total counter",
            ]
            for (path, method, status), n in sorted(self.requests.items()):
                lines.append(f'tinydeploy_requests_total{{path="{_label(path)}",method="{method}",status="{status}"}} {n}')
            lines += [
                "# HELP tinydeploy_errors_total HTTP answers with status >= 400, by status.",
                "# TYPE tinydeploy_errors_total counter",
            ]
            for status, n in sorted(self.errors.items()):
                lines.append(f'tinydeploy_errors_total{{status="{status}"}} {n}')
            lines += [
                "# HELP tinydeploy_request_duration_seconds Time from request start to the end of the answer.",
                "# TYPE tinydeploy_request_duration_seconds histogram",
            ]
            for path in sorted(self.latency):
                label = _label(path)
                for bound, n in zip(self.buckets, self.latency[path]):
                    lines.append(f'tinydeploy_request_duration_seconds_bucket{{path="{label}",le="{_number(bound)}"}} {n}')
                count = self.latency_count[path]
                lines.append(f'tinydeploy_request_duration_seconds_bucket{{path="{label}",le="+Inf"}} {count}')
                lines.append(f'tinydeploy_request_duration_seconds_sum{{path="{label}"}} {self.latency_sum[path]!r}')
                lines.append(f'tinydeploy_request_duration_seconds_count{{path="{label}"}} {count}')
            lines += [
                "# HELP tinydeploy_predicted_rows_total Rows answered by /v1/predict.",
                "# TYPE tinydeploy_predicted_rows_total counter",
                f"tinydeploy_predicted_rows_total {self.rows}",
                "# HELP tinydeploy_requests_in_flight Requests being handled now.",
                "# TYPE tinydeploy_requests_in_flight gauge",
                f"tinydeploy_requests_in_flight {self.in_flight}",
                "# HELP tinydeploy_model_info The served model (value is always 1).",
                "# TYPE tinydeploy_model_info gauge",
                f'tinydeploy_model_info{{sha256="{model.sha256}",task="{_label(model.task)}",'
                f'providers="{_label(",".join(model.providers))}",version="{__version__}"}} 1',
                "# HELP tinydeploy_start_time_seconds Unix time the server started.",
                "# TYPE tinydeploy_start_time_seconds gauge",
                f"tinydeploy_start_time_seconds {self.started!r}",
            ]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request and recording its status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]], send: Callable[..., Awaitable[Any]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in ROUTES else "other"
        status = 500
        start = time.perf_counter()
        self.metrics.begin()

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe(label, scope.get("method", "GET"), status, time.perf_counter() - start)


# ----- request handling ----------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise RequestError(
        422, "non_finite", f"the body contains the literal {name}, which is not valid JSON and not a finite number"
    )


def parse_predict_body(body: bytes) -> Any:
    """The ``inputs`` of a predict request body, or a RequestError naming the problem."""
    if not body.strip():
        raise RequestError(400, "empty_body", 'the request body is empty: send {"inputs": [...]}')
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, "malformed_json", f"the request body is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise RequestError(400, "malformed_json", f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise RequestError(400, "malformed_json", "the request body is nested too deeply") from exc
    if not isinstance(payload, dict):
        raise RequestError(422, "invalid_body", f'the body must be a JSON object {{"inputs": [...]}}, got a JSON {_json_kind(payload)}')
    if "inputs" not in payload:
        keys = ", ".join(repr(k) for k in list(payload)[:5]) or "none"
        raise RequestError(422, "missing_inputs", f'the body has no "inputs" field (found keys: {keys}): send {{"inputs": [...]}}')
    unknown = sorted(set(payload) - {"inputs"})
    if unknown:
        raise RequestError(422, "unknown_field", f"unknown field(s) {', '.join(map(repr, unknown))}: the body takes only \"inputs\"")
    return payload["inputs"]


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _input_status(exc: InputError) -> int:
    return 413 if exc.code == "too_large" else 422


def create_app(
    export_dir: str | os.PathLike[str],
    provider: str = "auto",
    max_batch: int = DEFAULT_MAX_BATCH,
    *,
    model: OnnxModel | None = None,
) -> FastAPI:
    """The FastAPI application serving ``export_dir`` (loaded and checked now, before any request)."""
    if int(max_batch) < 1:
        raise TinyDeployError(f"--max-batch must be at least 1, got {max_batch}")
    max_batch = int(max_batch)
    model = model or OnnxModel(export_dir, provider)
    # One run at startup: a model that cannot execute fails here, not on the first request.
    model.run(np.zeros((1, *model.input_shape), dtype=np.float32))
    body_limit = max(_MIN_BODY_LIMIT, max_batch * model.n_features * _BYTES_PER_VALUE + 4096)
    metrics = Metrics()

    app = FastAPI(
        title="tinydeploy model server",
        version=__version__,
        description=f"onnxruntime serving of {model.model_path}",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.model = model
    app.state.metrics = metrics
    app.state.max_batch = max_batch
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.url.path}: use POST /v1/predict, GET /v1/metadata, /healthz or /metrics"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        response = error_response(exc.status_code, code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); the server keeps running")

    def handle_predict(body: bytes) -> dict[str, Any]:
        inputs = parse_predict_body(body)
        try:
            prediction = model.predict(inputs, max_batch=max_batch)
        except InputError as exc:
            raise RequestError(_input_status(exc), exc.code, str(exc)) from exc
        if not np.isfinite(prediction.outputs).all():
            rows = np.unique(np.nonzero(~np.isfinite(prediction.outputs))[0])[:5].tolist()
            raise RequestError(
                422, "non_finite_output",
                f"the model produced non-finite outputs for rows {rows}: the inputs are far outside the training range",
            )
        metrics.add_rows(len(prediction))
        answer = prediction.to_dict()
        answer["batch_size"] = len(prediction)
        answer["model_sha256"] = model.sha256
        return answer

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > body_limit:
                    raise RequestError(413, "body_too_large", f"the body has {int(declared)} bytes, over the limit of {body_limit}: send at most {max_batch} rows per request")
            except ValueError:
                raise RequestError(400, "bad_content_length", f"Content-Length {declared!r} is not an integer") from None
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > body_limit:
                raise RequestError(413, "body_too_large", f"the body is over the limit of {body_limit} bytes: send at most {max_batch} rows per request")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        try:
            content_type = request.headers.get("content-type", "")
            media = content_type.split(";")[0].strip().lower()
            if media != "application/json":
                raise RequestError(
                    415, "unsupported_media_type",
                    f"Content-Type must be application/json, got {content_type or 'none'!r}",
                )
            body = await read_body(request)
            answer = await run_in_threadpool(handle_predict, body)
        except RequestError as exc:
            return error_response(exc.status, exc.code, exc.message)
        return Response(json.dumps(answer, allow_nan=False), media_type="application/json")

    @app.get("/v1/metadata")
    async def metadata() -> dict[str, Any]:
        return {**model.describe(), "max_batch": max_batch, "max_body_bytes": body_limit, "tinydeploy": __version__}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model_sha256": model.sha256, "providers": model.providers}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(model), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def app_from_env() -> FastAPI:
    """Factory used by uvicorn worker processes (``serve(workers>1)``): arguments come from env vars."""
    directory = os.environ.get(_ENV_DIR)
    if not directory:
        raise TinyDeployError(f"{_ENV_DIR} is not set: start the server with 'tinydeploy serve DIR'")
    return create_app(
        directory,
        os.environ.get(_ENV_PROVIDER, "auto"),
        int(os.environ.get(_ENV_MAX_BATCH, str(DEFAULT_MAX_BATCH))),
    )


def serve(
    export_dir: str | os.PathLike[str],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    provider: str = "auto",
    workers: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    log_level: str = "info",
) -> None:
    """Serve ``export_dir`` with uvicorn until interrupted (loopback by default)."""
    import uvicorn

    if workers < 1:
        raise TinyDeployError(f"--workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise TinyDeployError(f"--port must be between 0 and 65535, got {port}")
    # Load and check the model in this process first, so a bad directory fails with one line.
    app = create_app(export_dir, provider, max_batch)
    model: OnnxModel = app.state.model
    print(
        f"tinydeploy: serving {model.model_path} (sha256 {model.sha256[:12]}, {model.task}, "
        f"providers {', '.join(model.providers)}, max batch {max_batch}) on http://{host}:{port} "
        f"[POST /v1/predict, GET /v1/metadata, /healthz, /metrics]",
        file=sys.stderr, flush=True,
    )
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
        return
    os.environ[_ENV_DIR] = str(Path(export_dir).resolve())
    os.environ[_ENV_PROVIDER] = provider
    os.environ[_ENV_MAX_BATCH] = str(max_batch)
    uvicorn.run(
        "tinydeploy.serving.server:app_from_env", factory=True, host=host, port=port,
        workers=workers, log_level=log_level, access_log=False,
    )
