"""``mim serve``'s web application (Starlette, run by uvicorn): the demo page and its API, and the
OpenAI-compatible API, in front of one model.

- ``GET /``                      the page
- ``POST /api/chat``             ``{"text", "images": [data URLs]}`` -> ``{"parts": [{"type": "text"|"image"}]}``
- ``POST /api/reset``            forget this browser's conversation
- ``GET /v1/models``             the served model
- ``POST /v1/chat/completions``  OpenAI's chat completions, streamed with ``"stream": true``

Every request gets an answer with a message: a bad request is a 4xx, an overload a 503, an unexpected
failure a 500 whose details go to the server log only. The demo answers ``{"error": message}``; ``/v1``
answers OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Bodies are read under the size limit
and deadlines of :mod:`mim.serving.http_body`; the model runs on worker threads, never on the event loop.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mim.serving.chat_service import ChatService
from mim.serving.http_body import parse_json, read_body
from mim.serving.openai_completions import CompletionService, Stream, completion
from mim.serving.openai_protocol import error_body
from mim.serving.page import PAGE
from mim.serving.requests import RequestError

COOKIE = "mim_session"
NO_STORE = {"cache-control": "no-store"}


def _demo_error(error: RequestError) -> Response:
    return JSONResponse({"error": str(error)}, error.status, headers=NO_STORE)


def _api_error(error: RequestError) -> Response:
    return JSONResponse(error_body(error), error.status, headers=NO_STORE)


def _answered(shape: Callable[[RequestError], Response]):
    """Wrap an endpoint so that whatever happens the client gets a response with a message."""

    def wrap(endpoint: Callable[[Request], Awaitable[Response]]):
        async def answer(request: Request) -> Response:
            try:
                return await endpoint(request)
            except RequestError as error:
                response = shape(error)
            except Exception as error:  # noqa: BLE001 - a bug must still be answered, and logged
                print(f"mim serve: error answering {request.method} {request.url.path}:", file=sys.stderr)
                traceback.print_exc()
                response = shape(RequestError(500, f"the server failed on this request ({type(error).__name__}); "
                                                   "the details are in its log", code="server_error"))
            if response.status_code in (408, 411, 413) or response.status_code >= 500:
                response.headers["connection"] = "close"  # the body may be unread
            return response

        return answer

    return wrap


def make_app(service: ChatService, completions: CompletionService | None = None, idle_seconds: float = 30.0,
             body_seconds: float = 60.0, worker_threads: int | None = None) -> Starlette:
    """The application. ``idle_seconds`` bounds each silence while a body arrives, ``body_seconds`` a whole
    body; ``worker_threads`` caps the threads that wait for the model (default: the line's length plus 4)."""
    limiter = anyio.CapacityLimiter(worker_threads or service.queue.max_waiting + 5)
    in_thread = partial(anyio.to_thread.run_sync, limiter=limiter)
    body = partial(read_body, limit=service.max_request_bytes, idle_seconds=idle_seconds, body_seconds=body_seconds)

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE, headers=NO_STORE)

    @_answered(_demo_error)
    async def chat(request: Request) -> Response:
        payload = parse_json(await body(request))
        cookie = request.cookies.get(COOKIE)
        client = request.client.host if request.client else "unknown"
        session_id, reply = await in_thread(service.reply, cookie, client, payload)
        response = JSONResponse(reply, headers=NO_STORE)
        if session_id != cookie:
            response.set_cookie(COOKIE, session_id, path="/", httponly=True, samesite="strict")
        return response

    @_answered(_demo_error)
    async def reset(request: Request) -> Response:
        await body(request)
        service.reset(request.cookies.get(COOKIE))
        return JSONResponse({"ok": True}, headers=NO_STORE)

    @_answered(_api_error)
    async def models(request: Request) -> Response:
        if completions is None:
            raise RequestError(404, "this server has no OpenAI-compatible API", code="not_found")
        return JSONResponse(completions.models(), headers=NO_STORE)

    @_answered(_api_error)
    async def chat_completions(request: Request) -> Response:
        if completions is None:
            raise RequestError(404, "this server has no OpenAI-compatible API", code="not_found")
        completion_request = completions.prepare(parse_json(await body(request)))
        if not completion_request.stream:
            results, prompt_tokens = await in_thread(completions.complete, completion_request)
            return JSONResponse(completion(completions, results, prompt_tokens), headers=NO_STORE)
        stream = Stream(completions, completion_request)
        await stream.start(in_thread)
        return StreamingResponse(stream.body(), media_type="text/event-stream",
                                 headers={**NO_STORE, "x-accel-buffering": "no"})

    async def not_found(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 404)
        message = "not found" if status == 404 else f"{request.method} is not allowed here"
        if request.url.path.startswith("/v1/"):
            return _api_error(RequestError(status, message, code="not_found" if status == 404 else None))
        return _demo_error(RequestError(status, message))

    routes = [Route("/", page), Route("/index.html", page), Route("/api/chat", chat, methods=["POST"]),
              Route("/api/reset", reset, methods=["POST"]), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
