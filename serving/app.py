"""The HTTP front of a :class:`serving.server.ServingRuntime` (FastAPI + uvicorn).

This is the only module of the project that imports ``fastapi`` or ``uvicorn``.

Endpoints
---------
``POST /v1/rank``   ``{user_id, item_ids, context?, k?, served_at?, explain?}`` -> ranked items
                    with scores, impression ids and propensities; request id, arm, model
                    line and version; ``unknown_item_ids`` (candidates without content).
                    ``served_at`` (event time, default now) stamps the impressions, for
                    simulators on a virtual clock. ``explain: true`` adds an
                    ``explanation`` to each item (modality mass, top history items,
                    content / ID split of the logit).
``POST /v1/click``  ``{impression_id, user_id, item_id, clicked_at?}`` -> clicks topic.
``POST /v1/conversion``  ``{impression_id, user_id, item_id, converted_at?, value?}`` ->
                    conversions topic (a conversion after the click on that impression).
``POST /v1/items``  one item ``{item_id, text?, image? (base64), image_ref?, attributes?}``
                    or ``{"items": [...]}``; stored in Redis, cached rows dropped.
``DELETE /v1/users/{id}``          erase a user everywhere: a deletion request goes to the compacted
                    deletions topic (202 once the broker acknowledged it). Needs the API key.
``GET /v1/users/{id}/deletion``    the deletion's status: ``requested``, ``erasing``,
                    ``stores_erased``, ``complete`` with ``completed_at`` (404: none). Needs the API key.
``GET /healthz``    the process is up.
``GET /readyz``     200 once every arm's snapshot is loaded (503 before), with
                    per-source version, pointer, Redis state and last error.
``GET /metrics``    Prometheus text format.

Request bodies are decoded by the one event schema (:mod:`em3.types`, msgspec):
bad input gets 422 with ``{"error": "invalid_request", "detail": [{"field", "reason"}]}``
and never reaches Kafka; bodies over ``max_body_bytes`` get 413; a write without
the API key gets 401; a request while the arm has no snapshot or a dependency is
down gets 503. Nothing a client sends gets a 500: that is left for bugs, and the
connection is always answered.
"""
from __future__ import annotations

import hmac
import re
import json
import logging
import threading
import time
from typing import Any, Callable, TypeVar

from urllib.parse import quote

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
import msgspec
from pydantic import BaseModel

from em3.codec import error_field
from em3.types import (Click, ClickRequest, Conversion, ConversionRequest, ItemRequest, ItemsRequest, RankRequest,
                       valid_id)
from serving.metrics import CONTENT_TYPE
from serving.server import NotReady, ServingRuntime, Unavailable

__all__ = ["create_app", "ServerHandle", "serve_in_thread", "serve_forever"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Request bodies, declared once in :mod:`em3.types` with their constraints.
_REQUESTS = (RankRequest, ClickRequest, ConversionRequest, ItemRequest, ItemsRequest)
_SCHEMAS, _COMPONENTS = msgspec.json.schema_components(_REQUESTS, ref_template="#/components/schemas/{name}")


_LEADING_FIELD = re.compile(r"^([a-z_]+)\[")


class _Invalid(Exception):
    """A request body that breaks the schema: answered 422 with ``detail``."""

    def __init__(self, detail: list[dict[str, str]]) -> None:
        super().__init__(detail)
        self.detail = detail


def _decode_body(body: bytes, kind: type[T]) -> T:
    """``body`` decoded as ``kind``, by the schema's constraints; :class:`_Invalid` if not."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field, reason = error_field(message), message.split(" - at `")[0]
        if reason.startswith("Object missing required field `"):  # name the missing field itself
            name = reason.split("`")[1]
            field, reason = (name if field == "body" else f"{field}.{name}"), "Field required"
        elif reason.startswith("Object contains unknown field `"):
            name = reason.split("`")[1]
            field = name if field == "body" else f"{field}.{name}"
        elif field == "body" and (m := _LEADING_FIELD.match(reason)):  # a struct's own check names it
            field = m.group(1)
        raise _Invalid([{"field": field, "reason": reason}]) from None
    except msgspec.DecodeError as exc:
        raise _Invalid([{"field": "body", "reason": f"must be JSON (UTF-8, no lone surrogates): {exc}"}]) from None
    except RecursionError:
        raise _Invalid([{"field": "body", "reason": "nested too deep"}]) from None


def _request_body(kind: type) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a msgspec request struct (``openapi_extra``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": _SCHEMAS[_REQUESTS.index(kind)]}}}}


class HistoryWeightOut(BaseModel):
    item_id: str
    weight: float


class ScoreSplitOut(BaseModel):
    """One term of the score, split: ``content + id = score - baseline_score``."""

    score: float
    baseline_score: float
    content: float
    id: float


class ExplanationOut(BaseModel):
    """Why the item scored as it did (``"explain": true`` only; :mod:`em3.model.explain`):
    the split of the score it was ranked by under the arm's objective (``score`` is the
    item's ranked score; ``units`` says what it is) and of each term of that score."""

    objective: str
    units: str
    score: float
    baseline_score: float
    content: float
    id: float
    terms: dict[str, ScoreSplitOut]
    history: list[HistoryWeightOut]
    modality: dict[str, float] | None
    content_rows_current: bool


class RankedItemOut(BaseModel):
    item_id: str
    score: float
    position: int
    impression_id: str
    propensity: float
    explanation: ExplanationOut | None = None


class RankOut(BaseModel):
    request_id: str
    arm: str
    model_line: str
    model_version: int
    items: list[RankedItemOut]
    unknown_item_ids: list[str]


class ErrorOut(BaseModel):
    error: str
    detail: Any = None


def _errors_body(detail: list[dict[str, str]], error: str = "invalid_request") -> dict[str, Any]:
    return {"error": error, "detail": detail}


def _errors_422(detail: list[dict[str, str]]) -> JSONResponse:
    return JSONResponse(_errors_body(detail), status_code=422)


def _pydantic_detail(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """FastAPI's own validation errors (query and path parameters) in our shape."""
    return [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
             "reason": str(e.get("msg", "invalid"))} for e in errors]


def _rank_bytes(runtime: ServingRuntime, body: bytes) -> tuple[int, bytes]:
    """``POST /v1/rank`` from request bytes to (status, response bytes).

    Runs whole in a worker thread: JSON parsing and validation (pydantic's
    ``model_validate_json``), ranking, impression logging and serialisation, so
    the event loop only moves bytes.
    """
    max_candidates = runtime.config.ranking.max_candidates
    try:
        req = _decode_body(body, RankRequest)
    except _Invalid as exc:
        return 422, json.dumps(_errors_body(exc.detail)).encode()
    if len(req.item_ids) > max_candidates:
        reason = f"must hold at most {max_candidates} candidates, but {len(req.item_ids)} are given"
        return 422, json.dumps(_errors_body([{"field": "item_ids", "reason": reason}])).encode()
    if req.served_at is not None and req.served_at > time.time() + runtime.config.max_future_s:
        reason = f"must not lie more than {runtime.config.max_future_s} s ahead of the server's clock"
        return 422, json.dumps(_errors_body([{"field": "served_at", "reason": reason}])).encode()
    try:
        result = runtime.rank(req.user_id, req.item_ids, req.context, req.k, served_at=req.served_at,
                              explain=req.explain)
    except NotReady as exc:
        return 503, json.dumps({"error": "not_ready", "detail": str(exc)}).encode()
    except Unavailable as exc:
        return 503, json.dumps({"error": "unavailable", "detail": str(exc)}).encode()
    return 200, json.dumps(result.to_dict()).encode()


class _Edge:
    """Pure ASGI middleware (cheaper than ``BaseHTTPMiddleware``): 413 for bodies over
    ``limit`` bytes, declared or streamed; request counts and latency per endpoint;
    and the hot path, ``POST /v1/rank``, served without the framework's routing and
    dependency machinery (measured at about 2 ms of a 9 ms request on this CPU):
    the buffered body goes to :func:`_rank_bytes`, in the event-loop thread itself
    (``in_loop``, the default ``rank_executor``) or in a worker thread, and its
    bytes come straight back."""

    def __init__(self, app: Any, limit: int, metrics: Any, rank: Callable[[bytes], tuple[int, bytes]],
                 in_loop: bool = True) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.rank = rank
        self.in_loop = in_loop

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in _KNOWN else "/v1/users" if path.startswith("/v1/users/") else "other"
        status = 500

        async def observed_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, observed_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _guarded(self, scope: dict, receive: Any, send: Any) -> None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await self._reject(send, declared)
                    return
        # Buffer the body (bounded) before the app sees it: an oversized stream is
        # refused before any handler runs, so no half-sent response can exist.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await self._reject(send, seen)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if scope.get("path") == "/v1/rank" and scope.get("method") == "POST":
            await self._rank(body, send)
            return
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _rank(self, body: bytes, send: Any) -> None:
        try:
            if self.in_loop:
                status, payload = self.rank(body)  # blocks the loop: one rank at a time per process
            else:
                status, payload = await anyio.to_thread.run_sync(self.rank, body)
        except Exception:  # noqa: BLE001 - a bug must answer 500, not drop the connection
            logger.exception("/v1/rank failed")
            status, payload = 500, b'{"error": "internal"}'
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def _reject(self, send: Any, size: int) -> None:
        body = json.dumps({
            "error": "payload_too_large",
            "detail": [{"field": "body", "reason": f"must be at most {self.limit} bytes, but {size} are given"}],
        }).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _Unauthorized(Exception):
    """A write without the server's API key (HTTP 401)."""


class _WriteAuth:
    """The check in front of every write endpoint.

    With an API key (``ServerConfig.api_key``, or ``EM3_API_KEY`` through the
    settings) a write must send ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``
    (compared in constant time). Without one, writes are refused unless the server
    was started for a trusted network (``--trusted-network``): an open write
    endpoint must be a decision, never a default.
    """

    def __init__(self, runtime: ServingRuntime) -> None:
        self.key = runtime.api_key.encode()
        self.trusted = runtime.config.trusted_network

    def __call__(self, request: Request) -> None:
        if not self.key:
            if self.trusted:
                return
            raise _Unauthorized("this server has no API key; set EM3_API_KEY, or start it with --trusted-network")
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.key):
            raise _Unauthorized("missing or wrong API key (Authorization: Bearer KEY, or X-API-Key: KEY)")


def create_app(runtime: ServingRuntime) -> Any:
    """The ASGI app for ``runtime`` (which the caller starts and stops): the FastAPI
    app behind the :class:`_Edge` middleware."""
    app = FastAPI(title="em3-stream serving", version="1")
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # The request structs' $defs (from msgspec) join FastAPI's own components.
        schema = build_openapi()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_COMPONENTS)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.runtime = runtime
    metrics = runtime.metrics

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _errors_422(_pydantic_detail(list(exc.errors())))

    @app.exception_handler(_Invalid)
    async def _on_bad_body(request: Request, exc: _Invalid) -> JSONResponse:
        return _errors_422(exc.detail)

    @app.exception_handler(_Unauthorized)
    async def _on_unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse({"error": "unauthorized", "detail": str(exc)}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Exception)
    async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: answer (never drop the connection) and count it.
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "internal"}, status_code=500)

    authorize = _WriteAuth(runtime)

    @app.post("/v1/rank", response_model=RankOut, openapi_extra=_request_body(RankRequest),
              responses={422: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    async def rank(request: Request) -> Any:
        """Rank ``item_ids`` for ``user_id``: the top ``k`` with scores, impression ids and
        propensities, the arm, model line and version, and the candidates without
        registered content. In a running server the edge middleware answers this path
        ahead of the framework (same validation, same answers); this route documents
        the contract in the OpenAPI schema and serves an app mounted without the edge."""
        status, payload = await anyio.to_thread.run_sync(_rank_bytes, runtime, await request.body())
        return Response(payload, status_code=status, media_type="application/json")

    @app.post("/v1/click", status_code=202, openapi_extra=_request_body(ClickRequest),
              responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    async def click(request: Request) -> Any:
        """Record a click on a served impression (to the clicks topic). Needs the API key."""
        authorize(request)
        body = _decode_body(await request.body(), ClickRequest)
        now = time.time()
        if body.clicked_at is not None and body.clicked_at > now + runtime.config.max_future_s:
            raise _Invalid([{"field": "clicked_at", "reason":
                             f"must not lie more than {runtime.config.max_future_s} s ahead of the server's clock"}])
        clicked_at = body.clicked_at if body.clicked_at is not None else now
        try:
            await anyio.to_thread.run_sync(
                runtime.click, Click(body.impression_id, body.user_id, body.item_id, clicked_at))
        except Unavailable as exc:
            return JSONResponse({"error": "unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse({"accepted": True, "clicked_at": clicked_at}, status_code=202)

    @app.post("/v1/conversion", status_code=202, openapi_extra=_request_body(ConversionRequest),
              responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    async def conversion(request: Request) -> Any:
        """Record a conversion (a purchase, a sign-up) after the click on a served
        impression, with an optional value (to the conversions topic; the join
        attributes it to the click). Needs the API key."""
        authorize(request)
        body = _decode_body(await request.body(), ConversionRequest)
        now = time.time()
        if body.converted_at is not None and body.converted_at > now + runtime.config.max_future_s:
            raise _Invalid([{"field": "converted_at", "reason":
                             f"must not lie more than {runtime.config.max_future_s} s ahead of the server's clock"}])
        converted_at = body.converted_at if body.converted_at is not None else now
        event = Conversion(body.impression_id, body.user_id, body.item_id, converted_at, body.value)
        try:
            await anyio.to_thread.run_sync(runtime.conversion, event)
        except Unavailable as exc:
            return JSONResponse({"error": "unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse({"accepted": True, "converted_at": converted_at}, status_code=202)

    @app.post("/v1/items", openapi_extra=_request_body(ItemsRequest),
              responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    async def items(request: Request) -> Any:
        """Register or update item content: ``{"items": [...]}`` or one item. Needs the API key."""
        authorize(request)
        raw = await request.body()
        try:
            contents = [i.to_content() for i in _decode_body(raw, ItemsRequest).items]
        except _Invalid as many:
            try:
                contents = [_decode_body(raw, ItemRequest).to_content()]
            except _Invalid as one:
                raise (many if raw.lstrip().startswith(b'{"items"') else one) from None
        try:
            await anyio.to_thread.run_sync(runtime.put_items, contents)
        except Unavailable as exc:
            return JSONResponse({"error": "unavailable", "detail": str(exc)}, status_code=503)
        return {"registered": [c.item_id for c in contents]}

    def user_path(user_id: str) -> str:
        if not valid_id(user_id):
            raise _Invalid([{"field": "user_id", "reason": "must be 1-256 characters without control characters"}])
        return user_id

    @app.delete("/v1/users/{user_id:path}", status_code=202,
                responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    async def delete_user(user_id: str, request: Request) -> Any:
        """Erase a user everywhere: the request (under the user's pseudonym) goes to the
        compacted deletions topic; the join's deletion agent erases the user's history
        and pending join state, the learners reset the user's rows in their next
        snapshot. Answers 202 once the broker acknowledged the request; follow
        ``status_url`` for the time erasure completed. Needs the API key."""
        authorize(request)
        raw = user_path(user_id)
        try:
            out = await anyio.to_thread.run_sync(runtime.request_deletion, raw)
        except Unavailable as exc:
            return JSONResponse({"error": "unavailable", "detail": str(exc)}, status_code=503)
        out["status_url"] = f"/v1/users/{quote(raw, safe='')}/deletion"
        return JSONResponse(out, status_code=202)

    @app.get("/v1/users/{user_id:path}/deletion",
             responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    async def deletion_status(user_id: str, request: Request) -> Any:
        """The status of a user's deletion: ``requested`` -> ``erasing`` ->
        ``stores_erased`` -> ``complete``, with ``completed_at`` (when the last store
        and model line was erased) and what was erased. Needs the API key."""
        authorize(request)
        raw = user_path(user_id)
        try:
            status = await anyio.to_thread.run_sync(runtime.deletion_status, raw)
        except Unavailable as exc:
            return JSONResponse({"error": "unavailable", "detail": str(exc)}, status_code=503)
        if status is None:
            return JSONResponse({"error": "not_found", "detail": "no deletion of this user is known"},
                                status_code=404)
        return status

    @app.get("/healthz")
    def healthz() -> Any:
        return {"ok": True, "uptime_s": round(time.time() - runtime.started_at, 3)}

    @app.get("/readyz")
    def readyz() -> Any:
        report = runtime.readiness()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return _Edge(app, runtime.config.max_body_bytes, metrics, lambda body: _rank_bytes(runtime, body),  # type: ignore[return-value]
                 in_loop=runtime.config.rank_executor == "loop")


_KNOWN = {"/v1/rank", "/v1/click", "/v1/conversion", "/v1/items", "/healthz", "/readyz", "/metrics"}


class ServerHandle:
    """A uvicorn server running in a background thread (tests, demo, benchmarks)."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, runtime: ServingRuntime,
                 host: str, port: int) -> None:
        self.server = server
        self.thread = thread
        self.runtime = runtime
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, finish in-flight requests, then stop the runtime."""
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.runtime.stop()

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _uvicorn_config(runtime: ServingRuntime, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    kwargs.setdefault("log_level", "warning")
    kwargs.setdefault("access_log", False)
    return uvicorn.Config(create_app(runtime), host=host, port=port, lifespan="off", **kwargs)


def serve_in_thread(runtime: ServingRuntime, host: str = "127.0.0.1", port: int = 0,
                    start_timeout_s: float = 30.0, **uvicorn_kwargs: Any) -> ServerHandle:
    """Start ``runtime`` and a uvicorn server for it in a daemon thread.

    ``port=0`` picks a free port (see ``handle.port``). Returns once the socket
    listens; readiness (a loaded snapshot) is ``GET /readyz``.
    """
    runtime.start()
    server = uvicorn.Server(_uvicorn_config(runtime, host, port, **uvicorn_kwargs))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
    thread = threading.Thread(target=server.run, name="em3-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            runtime.stop()
            raise TimeoutError(f"uvicorn did not start on {host}:{port} within {start_timeout_s} s")
        time.sleep(0.02)
    bound = port
    for srv in getattr(server, "servers", []):
        for sock in srv.sockets:
            bound = sock.getsockname()[1]
            break
    return ServerHandle(server, thread, runtime, host, bound)


def serve_forever(runtime: ServingRuntime, host: str = "127.0.0.1", port: int = 8000, **uvicorn_kwargs: Any) -> None:
    """Run in the foreground until SIGINT/SIGTERM (``em3 serve``)."""
    runtime.start()
    try:
        uvicorn.Server(_uvicorn_config(runtime, host, port, **uvicorn_kwargs)).run()
    finally:
        runtime.stop()
