"""HTTP serving of an exported model with onnxruntime: a plain ASGI application run by uvicorn.

Endpoints (every error answer is JSON ``{"error": {"status", "code", "message"}}``):

* ``POST /v1/predict`` with ``Content-Type: application/json`` and ``{"inputs": [...]}`` (one row
  or a batch of rows of RAW features; a tensor [C, H, W] or a batch [B, C, H, W] for a CNN; rows as
  objects ``{name: value}`` when the model has feature names), or, for a model grown on images,
  ``multipart/form-data`` with one file field ``image`` per image (PNG, JPEG, ...; ``multipart.py``,
  ``images.py``). Answers ``outputs`` (``[batch, n_outputs]``), and for classifiers ``labels``,
  ``indices`` and ``probabilities`` (softmax), always batched.
* ``GET /v1/metadata``: spec, classes, widths, sha256 of the model, providers in use, limits.
* ``GET /healthz``: liveness and readiness (the model is loaded and ran once at startup), and the
  pid of the worker process that answered.
* ``GET /metrics``: Prometheus text format (requests by route, method and status, errors by
  status, client disconnects, a latency histogram, rows predicted, requests in flight).

Clients are untrusted. A predict request is bounded before its body is parsed (``limits.py``):
Content-Type, declared and streamed body size, a deadline for the whole body (a client that
announces more bytes than it sends gets 408 instead of holding the request open), JSON depth,
count and length of numbers, numbers beyond float32, then batch size, shape, dtype and finiteness.
Every rejection is a 4xx naming the limit; a 5xx means a bug. Label values of /metrics come from
fixed sets (routes, methods, statuses the server writes), and a client that disconnects before its
answer is counted apart from errors.

No web framework: the application is a few dozen lines of ASGI over uvicorn, which keeps start-up
short (no FastAPI/pydantic import) and leaves body reading, timeouts and disconnects in our hands.
Inference runs in a worker thread (onnxruntime sessions are thread-safe), so the event loop keeps
accepting requests while a batch runs. ``serve(..., workers=N)`` starts N uvicorn worker processes,
each with its own model and its own metrics; a worker imports only this stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

from tinydeploy import __version__
from tinydeploy.errors import TinyDeployError
from tinydeploy.serving.images import ImageError, decode_image, pillow_available
from tinydeploy.serving.limits import DEFAULT_BODY_TIMEOUT_S, Limits, RequestError, parse_predict_body
from tinydeploy.serving.multipart import image_parts, is_multipart
from tinydeploy.serving.providers import DEFAULT_PROVIDER
from tinydeploy.serving.runtime import NO_VERIFY_WARNING, InputError, OnnxModel

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 1024
#: Latency histogram buckets in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROUTES = ("/v1/predict", "/v1/metadata", "/healthz", "/metrics")
#: Methods reported as themselves in /metrics; any other is reported as "other".
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_ALLOWED = {"/v1/predict": ("POST",), "/v1/metadata": ("GET",), "/healthz": ("GET",), "/metrics": ("GET",)}
_ENV_OPTIONS = "TINYDEPLOY_SERVE_OPTIONS"
logger = logging.getLogger("tinydeploy.serve")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ClientDisconnected(Exception):
    """The client went away before its request was answered."""


# ----- metrics -------------------------------------------------------------------------------------
def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metrics:
    """Thread-safe counters and a latency histogram, rendered in Prometheus text format 0.0.4.

    Every label value comes from a fixed set: ``route`` is one of ``ROUTES`` or "other", ``method``
    one of ``METHODS`` or "other", ``status`` a status this server writes.
    """

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[int, int] = {}
        self.disconnects: dict[str, int] = {}
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}
        self.latency_count: dict[str, int] = {}
        self.rows = 0
        self.in_flight = 0
        self.started = time.time()

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def observe(self, route: str, method: str, status: int | None, seconds: float) -> None:
        """Record one finished request; ``status`` None means the client disconnected first."""
        with self._lock:
            self.in_flight -= 1
            if status is None:
                self.disconnects[route] = self.disconnects.get(route, 0) + 1
                return
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if status >= 400:
                self.errors[status] = self.errors.get(status, 0) + 1
            counts = self.latency.setdefault(route, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[route] = self.latency_sum.get(route, 0.0) + seconds
            self.latency_count[route] = self.latency_count.get(route, 0) + 1

    def add_rows(self, n: int) -> None:
        with self._lock:
            self.rows += n

    def render(self, model: OnnxModel) -> str:
        with self._lock:
            lines = [
                "# HELP tinydeploy_requests_total HTTP requests answered, by route, method and status.",
                "# TYPE tinydeploy_requests_total counter",
            ]
            for (route, method, status), n in sorted(self.requests.items()):
                lines.append(f'tinydeploy_requests_total{{path="{route}",method="{method}",status="{status}"}} {n}')
            lines += [
                "# HELP tinydeploy_errors_total HTTP answers with status >= 400, by status.",
                "# TYPE tinydeploy_errors_total counter",
            ]
            lines += [f'tinydeploy_errors_total{{status="{status}"}} {n}' for status, n in sorted(self.errors.items())]
            lines += [
                "# HELP tinydeploy_client_disconnects_total Requests whose client went away before the answer "
                "(not errors).",
                "# TYPE tinydeploy_client_disconnects_total counter",
            ]
            lines += [f'tinydeploy_client_disconnects_total{{path="{route}"}} {n}' for route, n in sorted(self.disconnects.items())]
            lines += [
                "# HELP tinydeploy_request_duration_seconds Time from request start to the end of the answer.",
                "# TYPE tinydeploy_request_duration_seconds histogram",
            ]
            for route in sorted(self.latency):
                for bound, n in zip(self.buckets, self.latency[route]):
                    lines.append(f'tinydeploy_request_duration_seconds_bucket{{path="{route}",le="{_number(bound)}"}} {n}')
                count = self.latency_count[route]
                lines.append(f'tinydeploy_request_duration_seconds_bucket{{path="{route}",le="+Inf"}} {count}')
                lines.append(f'tinydeploy_request_duration_seconds_sum{{path="{route}"}} {self.latency_sum[route]!r}')
                lines.append(f'tinydeploy_request_duration_seconds_count{{path="{route}"}} {count}')
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
                f'providers="{_label(",".join(model.providers))}",verified="{str(model.manifest is not None).lower()}",'
                f'version="{__version__}"}} 1',
                "# HELP tinydeploy_start_time_seconds Unix time the server started.",
                "# TYPE tinydeploy_start_time_seconds gauge",
                f"tinydeploy_start_time_seconds {self.started!r}",
            ]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ----- the application -----------------------------------------------------------------------------
def _json(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=False).encode("utf-8")


async def _respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json",
                   close: bool = False, extra: list[tuple[bytes, bytes]] | None = None) -> int:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})
    return status


def _error(status: int, code: str, message: str) -> bytes:
    return _json({"error": {"status": status, "code": code, "message": message}})


class ModelServer:
    """The ASGI application serving one ``OnnxModel`` under ``limits``."""

    def __init__(self, model: OnnxModel, limits: Limits) -> None:
        self.model = model
        self.limits = limits
        self.metrics = Metrics()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope.get("path", ""), scope.get("method", "")
        route = path if path in ROUTES else "other"
        method_label = method if method in METHODS else "other"
        start = time.perf_counter()
        self.metrics.begin()
        status: int | None = None
        try:
            status = await self._dispatch(scope, path, method, receive, send)
        except ClientDisconnected:
            status = None
        except Exception:  # a bug: log it, answer 500 (if no answer started yet), keep serving
            logger.exception("internal error on %s %s", method_label, route)
            status = 500
            with contextlib.suppress(Exception):
                await _respond(send, 500, _error(500, "internal_error", "internal error; the server keeps running"),
                               close=True)
        finally:
            self.metrics.observe(route, method_label, status, time.perf_counter() - start)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, scope: dict[str, Any], path: str, method: str, receive: Receive, send: Send) -> int:
        if path not in _ALLOWED:
            shown = path if len(path) <= 80 else path[:77] + "..."
            return await _respond(send, 404, _error(
                404, "not_found", f"no endpoint {shown}: use POST /v1/predict, GET /v1/metadata, /healthz or /metrics"))
        if method not in _ALLOWED[path]:
            allowed = ", ".join(_ALLOWED[path])
            shown = method if method in METHODS else "this method"
            return await _respond(send, 405, _error(405, "method_not_allowed", f"{shown} is not allowed on {path}: use {allowed}"),
                                  extra=[(b"allow", allowed.encode())])
        if path == "/v1/predict":
            return await self._predict(scope, receive, send)
        if path == "/metrics":
            return await _respond(send, 200, self.metrics.render(self.model).encode(),
                                  b"text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            return await _respond(send, 200, _json({
                "status": "ok", "model_sha256": self.model.sha256, "providers": self.model.providers, "pid": os.getpid()}))
        return await _respond(send, 200, _json({
            **self.model.describe(), **self.limits.describe(), "tinydeploy": __version__}))

    async def _predict(self, scope: dict[str, Any], receive: Receive, send: Send) -> int:
        headers = dict(scope.get("headers") or [])
        try:
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            upload = is_multipart(content_type)
            if upload and not self.limits.max_images:
                why = ("image uploads need Pillow, which this server lacks (pip install pillow)"
                       if self.model.image and self.model.input_space == "raw" else "this model was not grown on images")
                raise RequestError(415, "unsupported_media_type", f'{why}: send application/json {{"inputs": [...]}}')
            if not upload and content_type.split(";")[0].strip().lower() != "application/json":
                kinds = "application/json or multipart/form-data (images)" if self.limits.max_images else "application/json"
                raise RequestError(415, "unsupported_media_type",
                                   f"Content-Type must be {kinds}, got {content_type[:60] or 'none'!r}")
            body = await self._read_body(headers.get(b"content-length"), receive, upload)
        except RequestError as exc:
            # A stalled body (408): drop the connection. Otherwise uvicorn reads and discards the rest of
            # the body after the answer (closing now would reset the connection under the client's answer).
            return await _respond(send, exc.status, _error(exc.status, exc.code, exc.message), close=exc.status == 408)
        work = (lambda: self._answer_upload(body, content_type)) if upload else (lambda: self._answer(body))
        try:
            answer = await asyncio.get_running_loop().run_in_executor(None, work)
        except RequestError as exc:
            return await _respond(send, exc.status, _error(exc.status, exc.code, exc.message))
        return await _respond(send, 200, answer)

    async def _read_body(self, declared: bytes | None, receive: Receive, upload: bool = False) -> bytes:
        limit = self.limits.max_upload_bytes if upload else self.limits.max_body_bytes
        code = "upload_too_large" if upload else "body_too_large"
        fix = (f"send at most {self.limits.max_images} images of at most {self.limits.max_image_bytes} bytes"
               if upload else f"send at most {self.limits.max_batch} rows per request")
        if declared is not None:
            if not declared.strip().isdigit():
                raise RequestError(400, "bad_content_length", f"Content-Length {declared[:40].decode('latin-1')!r} is not an integer")
            if int(declared) > limit:
                raise RequestError(413, code, f"the body has {int(declared)} bytes, over the limit of {limit} bytes: {fix}")
        timeout = self.limits.body_timeout_s
        received: list[bytes] = []
        try:  # one deadline for the whole body: a client trickling bytes cannot extend it
            return await asyncio.wait_for(self._receive_body(receive, limit, received, code, fix), timeout)
        except asyncio.TimeoutError:
            raise RequestError(408, "body_timeout", f"the body did not arrive within the limit of {timeout:g} s "
                               f"(got {sum(map(len, received))} bytes): send the whole body at once") from None

    async def _receive_body(self, receive: Receive, limit: int, chunks: list[bytes], code: str, fix: str) -> bytes:
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, code, f"the body is over the limit of {limit} bytes: {fix}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _answer_upload(self, body: bytes, content_type: str) -> bytes:
        """Decode the images of a multipart upload (in a worker thread) and answer them like a JSON batch."""
        tensors = []
        for index, (filename, data) in enumerate(image_parts(body, content_type, self.limits)):
            try:
                tensors.append(decode_image(data, self.model.image, f"image {index} ({filename[:60]!r})"))
            except ImageError as exc:
                raise RequestError(422, exc.code, str(exc)) from None
        return self._run(np.stack(tensors))

    def _answer(self, body: bytes) -> bytes:
        """Parse, validate and run one predict body (in a worker thread); the JSON answer."""
        return self._run(parse_predict_body(body, self.limits))

    def _run(self, inputs: Any) -> bytes:
        """Validate and run ``inputs``; the JSON answer."""
        try:
            prediction = self.model.predict(inputs, max_batch=self.limits.max_batch)
        except InputError as exc:
            raise RequestError(413 if exc.code == "too_large" else 422, exc.code, str(exc)) from None
        if not np.isfinite(prediction.outputs).all():
            rows = np.unique(np.nonzero(~np.isfinite(prediction.outputs))[0])[:5].tolist()
            raise RequestError(
                422, "non_finite_output",
                f"the model produced non-finite outputs for rows {rows}: the inputs are far outside the training range",
            )
        self.metrics.add_rows(len(prediction))
        answer = prediction.to_dict()
        answer["batch_size"] = len(prediction)
        answer["model_sha256"] = self.model.sha256
        return _json(answer)


# ----- building and running ------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeOptions:
    """What a server process needs to build its application (passed to uvicorn workers as JSON)."""

    export_dir: str
    provider: str = DEFAULT_PROVIDER
    max_batch: int = DEFAULT_MAX_BATCH
    verify: bool = True
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S


def create_app(
    export_dir: str | os.PathLike[str],
    provider: str = DEFAULT_PROVIDER,
    max_batch: int = DEFAULT_MAX_BATCH,
    *,
    model: OnnxModel | None = None,
    verify: bool = True,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> ModelServer:
    """The ASGI application serving ``export_dir`` (loaded and checked now, before any request)."""
    if int(max_batch) < 1:
        raise TinyDeployError(f"--max-batch must be at least 1, got {max_batch}")
    if not 0 < body_timeout_s <= 3600:
        raise TinyDeployError(f"--body-timeout must be between 0 and 3600 seconds, got {body_timeout_s}")
    model = model or OnnxModel(export_dir, provider, verify=verify)
    # One run at startup: a model that cannot execute fails here, not on the first request.
    model.run(np.zeros((1, *model.input_shape), dtype=np.float32))
    name_bytes = sum(len(json.dumps(name)) + 2 for name in model.feature_names)  # "name": before each value
    images = model.image is not None and model.input_space == "raw"
    if images and not pillow_available():
        logger.warning("Pillow is not installed: image uploads are refused (415); JSON tensors are served. "
                       "pip install pillow to take PNG/JPEG uploads")
        images = False
    limits = Limits.for_model(len(model.input_shape), model.n_features, int(max_batch), float(body_timeout_s),
                              name_bytes=name_bytes, images=images)
    return ModelServer(model, limits)


def app_from_env() -> ModelServer:
    """Factory used by uvicorn worker processes (``serve(workers>1)``): the options come as JSON."""
    text = os.environ.get(_ENV_OPTIONS)
    if not text:
        raise TinyDeployError(f"{_ENV_OPTIONS} is not set: start the server with 'tinydeploy serve DIR'")
    options = ServeOptions(**json.loads(text))
    return create_app(options.export_dir, options.provider, options.max_batch, verify=options.verify,
                      body_timeout_s=options.body_timeout_s)


def serve(
    export_dir: str | os.PathLike[str],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    provider: str = DEFAULT_PROVIDER,
    workers: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    log_level: str = "info",
    *,
    verify: bool = True,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> None:
    """Serve ``export_dir`` with uvicorn until interrupted (loopback by default)."""
    import uvicorn

    if workers < 1:
        raise TinyDeployError(f"--workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise TinyDeployError(f"--port must be between 0 and 65535, got {port}")
    # Load and check the model in this process first, so a bad directory fails with one line.
    app = create_app(export_dir, provider, max_batch, verify=verify, body_timeout_s=body_timeout_s)
    model = app.model
    if not verify:
        print(NO_VERIFY_WARNING.format(path=model.model_path), file=sys.stderr, flush=True)
    print(
        f"tinydeploy: serving {model.model_path} (sha256 {model.sha256[:12]}, {model.task}, "
        f"providers {', '.join(model.providers)}, max batch {max_batch}, "
        f"{workers} worker{'s' if workers > 1 else ''}) on http://{host}:{port} "
        f"[POST /v1/predict, GET /v1/metadata, /healthz, /metrics]",
        file=sys.stderr, flush=True,
    )
    settings = {"host": host, "port": port, "log_level": log_level, "access_log": False, "lifespan": "on"}
    if workers == 1:
        uvicorn.run(app, **settings)
        return
    del app, model  # each worker loads its own
    options = ServeOptions(str(Path(export_dir).resolve()), provider, int(max_batch), verify, float(body_timeout_s))
    os.environ[_ENV_OPTIONS] = json.dumps(asdict(options))
    uvicorn.run("tinydeploy.serving.server:app_from_env", factory=True, workers=workers, **settings)
