"""The HTTP face of `partita serve`: Open Inference Protocol v2 routes, metrics, state, events, dashboard.

A Starlette application (run by uvicorn, see `server.py`). Routes:

- `GET /v2/health/live`, `GET /v2/health/ready`: no key needed (orchestrators probe them);
  ready is 200 once deployed and 503 while no plan can run.
- `GET /v2`, `GET /v2/models/{name}`, `GET /v2/models/{name}/ready`, `POST /v2/models/{name}/infer`
  (also under `/versions/{version}`): the protocol; errors are `{"error": "..."}` with 400 (a bad
  request: malformed, wrong shape or dtype, a body over the limit, a missing or wrong API key),
  404 (unknown model), 500 (an accepted request failed), 503 (shutting down, or no plan can run).
- `GET /metrics` (Prometheus text), `GET /api/state` (JSON), `GET /api/events` (server-sent
  events: the state again whenever it changed), `GET /` and `/static/...` (the dashboard).

With an API key, every route but the health probes and the dashboard's static files wants
`Authorization: Bearer KEY`; `/api/state` and `/api/events` also take `?key=KEY`, because a
browser's EventSource cannot set headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from partita.errors import InferRequestError, PartitaError
from partita.serve.metrics import CONTENT_TYPE
from partita.serve.protocol import HEADER_LENGTH, encode_response, parse_request

EVENTS_POLL_S = 0.2  # how often an event stream looks for a new state
EVENTS_KEEPALIVE_S = 15.0


class HTTPError(Exception):
    """A request answered with `{"error": message}` and `status`."""

    def __init__(self, status: int, message: str, outcome: str) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


def create_app(service: Any) -> Starlette:
    """The Starlette app over a `partita.serve.server.Service` (pipeline, batcher, state, options)."""
    routes = Routes(service)
    static = resources.files("partita.serve") / "static"
    return Starlette(
        routes=[
            Route("/v2/health/live", routes.live),
            Route("/v2/health/ready", routes.ready),
            Route("/v2", routes.server_metadata),
            Route("/v2/models/{name}", routes.model_metadata),
            Route("/v2/models/{name}/versions/{version}", routes.model_metadata),
            Route("/v2/models/{name}/ready", routes.model_ready),
            Route("/v2/models/{name}/versions/{version}/ready", routes.model_ready),
            Route("/v2/models/{name}/infer", routes.infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", routes.infer, methods=["POST"]),
            Route("/metrics", routes.metrics),
            Route("/api/state", routes.state),
            Route("/api/events", routes.events),
            Route("/", routes.dashboard),
            Mount("/static", app=StaticFiles(directory=str(static)), name="static"),
        ],
        lifespan=_lifespan(service),
    )


def _lifespan(service: Any):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # Every connection has closed by now (uvicorn drained them): close the batcher and pipeline.
        await run_in_threadpool(service.shutdown)

    return lifespan


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Routes:
    """The request handlers; each checks its input, then asks the service."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.options = service.options
        self.signature = service.signature

    # -- health and metadata ---------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.service.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        from partita import __version__

        return self._guarded(request) or JSONResponse(
            {"name": "partita", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_metadata(self, request: Request) -> Response:
        refused = self._guarded(request) or self._unknown_model(request)
        if refused:
            return refused
        return JSONResponse({
            "name": self.options.name,
            "versions": ["1"],
            "platform": "partita",
            "inputs": [m.to_json() for m in self.signature.inputs],
            "outputs": [m.to_json() for m in self.signature.outputs],
        })

    async def model_ready(self, request: Request) -> Response:
        refused = self._guarded(request) or self._unknown_model(request)
        if refused:
            return refused
        ready = self.service.ready
        return JSONResponse({"name": self.options.name, "ready": ready}, status_code=200 if ready else 503)

    # -- inference ---------------------------------------------------------------------------------
    async def infer(self, request: Request) -> Response:
        started = time.monotonic()
        try:
            response = await self._infer(request)
        except HTTPError as exc:
            self.service.state.record(exc.outcome)
            return error(exc.status, str(exc))
        self.service.state.record("ok", time.monotonic() - started)
        return response

    async def _infer(self, request: Request) -> Response:
        refused = self._guarded(request) or self._unknown_model(request)
        if refused:
            raise HTTPError(refused.status_code, json.loads(bytes(refused.body))["error"],
                            "not_found" if refused.status_code == 404 else "unauthorized")
        body = await self._read_body(request)
        try:
            parsed = parse_request(body, request.headers.get(HEADER_LENGTH), self.signature,
                                   max_rows=self.options.max_rows)
        except InferRequestError as exc:
            raise HTTPError(400, str(exc), "bad_request") from None
        if self.service.draining:
            raise HTTPError(503, "the server is shutting down and takes no new requests", "failed")
        if self.service.state.halted is not None:
            raise HTTPError(503, f"no plan can run now: {self.service.state.halted}", "failed")
        in_flight = self.service.metrics.in_flight
        in_flight.inc()
        try:
            outputs = await asyncio.wrap_future(self.service.batcher.submit(parsed.inputs, parsed.rows))
        except PartitaError as exc:
            raise HTTPError(503 if self.service.draining else 500, str(exc), "failed") from None
        finally:
            in_flight.dec()
        payload, headers = encode_response(self.options.name, parsed, self.signature, outputs)
        media = "application/octet-stream" if headers else "application/json"
        return Response(payload, media_type=media, headers=headers)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = f"the request body is over this server's limit of {limit:,} bytes (--max-body-bytes)"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(400, too_large, "too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(400, too_large, "too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- observability -----------------------------------------------------------------------------
    async def metrics(self, request: Request) -> Response:
        return self._guarded(request) or Response(self.service.metrics.render(), media_type=CONTENT_TYPE)

    async def state(self, request: Request) -> Response:
        return self._guarded(request, query=True) or JSONResponse(self.service.state.snapshot())

    async def events(self, request: Request) -> Response:
        refused = self._guarded(request, query=True)
        if refused:
            return refused
        return StreamingResponse(self._stream(request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(self, request: Request) -> AsyncIterator[bytes]:
        """The state as an SSE `state` event whenever it changed; ends when the server drains."""
        sent, last_write = -1, time.monotonic()
        while not self.service.draining:
            version = self.service.state.version
            if version != sent:
                data = json.dumps(self.service.state.snapshot(), default=str)
                yield f"event: state\ndata: {data}\n\n".encode()
                sent, last_write = version, time.monotonic()
            elif time.monotonic() - last_write > EVENTS_KEEPALIVE_S:
                yield b": keep-alive\n\n"
                last_write = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENTS_POLL_S)

    async def dashboard(self, request: Request) -> Response:
        page = (resources.files("partita.serve") / "static" / "index.html").read_text(encoding="utf-8")
        return Response(page, media_type="text/html")

    # -- checks ------------------------------------------------------------------------------------
    def _guarded(self, request: Request, *, query: bool = False) -> JSONResponse | None:
        """400 unless the API key (if any) came as a bearer token (or `?key=` where `query`)."""
        key = self.options.api_key
        if key is None:
            return None
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else None
        if token is None and query:
            token = request.query_params.get("key")
        if token is not None and hmac.compare_digest(token.encode(), key.encode()):
            return None
        what = "a wrong API key" if token is not None else "no API key"
        return error(400, f"this server wants 'Authorization: Bearer KEY' (its --api-key); the request had {what}")

    def _unknown_model(self, request: Request) -> JSONResponse | None:
        name = request.path_params["name"]
        if name == self.options.name:
            return None
        return error(404, f"unknown model {name!r}; this server serves {self.options.name!r}")
