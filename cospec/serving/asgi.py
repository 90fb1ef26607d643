"""ASGI plumbing of the OpenAI server (``cospec.serving.app``): the API-key gate and per-status counts, the
catch-all that turns an unexpected exception into a complete 500, server-sent event streams, and OpenAI-style error
responses. Starlette is imported on first use, not at import.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid

from cospec.serving.errors import ApiError
from cospec.serving.metrics import ServerMetrics

logger = logging.getLogger("cospec.serving")


def sse(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def unexpected(error_id: str) -> ApiError:
    return ApiError(f"internal server error (error id {error_id}; the server log has the details)", status=500,
                    type="server_error", code="internal_error")


async def until_disconnect(request, work) -> bool:
    """Await ``work`` unless the client disconnects first (then cancel it and return False)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task, watch_task = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        finished, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
    return work_task.result() if work_task in finished else False


def event_stream(events, on_close, headers: dict):
    """A streamed response of server-sent events (the class is built on first use: no starlette at import)."""
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        """Server-sent events; ``on_close`` runs however the response ends (finished, client gone, cancelled)."""

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                on_close()

    return EventStream(events, media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})


class Gate:
    """ASGI middleware: the API key (all paths but /health) and the count of /v1 responses by status."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics
        self.api_key = None if api_key is None else api_key.encode("utf-8")

    def _authorized(self, scope) -> bool:
        # Compared as bytes: a non-ASCII key arrives as its UTF-8 bytes.
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith("/v1/"):
            inner_send = send

            async def send(message) -> None:
                if message["type"] == "http.response.start":
                    self.metrics.http_requests.labels(status=str(message["status"])).inc()
                await inner_send(message)
        if self.api_key is not None and path != "/health" and not self._authorized(scope):
            error = ApiError("missing or invalid API key: send 'Authorization: Bearer <key>'", status=401,
                             type="authentication_error", code="invalid_api_key")
            return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


class CatchUnexpected:
    """ASGI middleware inside Starlette's error handling: an unexpected exception before the response started
    becomes a complete 500 (with an error id that the log repeats), so the keep-alive connection stays usable.
    (Starlette's own handler would send its 500 and re-raise, and the server would then drop the connection.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:  # a body is on its way: only closing the connection can tell the client
                raise
            error_id = uuid.uuid4().hex
            logger.exception("unexpected error on %s %s (error id %s)", scope.get("method"), scope["path"], error_id)
            await error_response(unexpected(error_id))(scope, receive, send)


def error_response(error: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(error.body().model_dump(mode="json"), status_code=error.status, headers=error.headers)
