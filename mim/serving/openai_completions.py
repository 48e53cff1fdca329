"""``/v1/chat/completions`` on a MIM: requests checked on the event loop, the model's work on a thread, and
the reply sent whole or streamed as server-sent events, token by token.

A request stands in the server's one :class:`~mim.serving.requests.ModelQueue` with the web demo's: a place
in line is taken before any image is decoded (503 when the line is full), and a streamed reply's
``200`` goes out only once the model has started on it, so every refusal (a bad image, a prompt too long
for the LLM, a full line) is still an HTTP error in OpenAI's shape. A client that leaves mid-stream stops
its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from mim.serving.openai_protocol import (APILimits, CompletionRequest, chunk_body, completion_body, error_body,
                                         image_markdown, image_part, parse_completion_request, usage)
from mim.serving.requests import ModelQueue, RequestError, decode_upload
from synth.data.images import DecodePool


class ClientGone(Exception):
    """Raised into a generation whose client stopped reading its stream."""


class CompletionService:
    """Chat completions from one loaded MIM (an :class:`~mim.inference.interleaved.InterleavedGenerator`)."""

    def __init__(self, generator, settings, queue: ModelQueue, model_name: str, limits: APILimits | None = None,
                 max_image_pixels: int = 16_777_216, max_image_side: int = 512,
                 decoder: DecodePool | None = None, fetch: Callable[[str], bytes] | None = None) -> None:
        self.generator, self.settings, self.queue = generator, settings, queue
        self.model_name = model_name
        self.limits = limits or APILimits(max_tokens=settings.max_new_tokens)
        self.max_image_pixels, self.max_image_side = max_image_pixels, max_image_side
        self.decoder = decoder or DecodePool(64_000_000, threads=2)
        self.fetch = fetch
        self.created = int(time.time())

    # --- on the event loop -------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "textbind"}]}

    def prepare(self, payload: dict) -> CompletionRequest:
        request = parse_completion_request(payload, self.limits)
        if request.model != self.model_name:
            raise RequestError(404, f"the model {request.model!r:.80} is not served here; this server serves "
                                    f"{self.model_name!r}", param="model", code="model_not_found")
        return request

    # --- on a worker thread --------------------------------------------------------------------------

    def _image(self, source) -> Any:
        if source.url is not None:
            if self.fetch is None:
                raise RequestError(400, f"{source.where}: this server does not fetch image URLs", code="remote_image_refused")
            from synth.data.safe_fetch import Unfetchable

            try:
                data = self.fetch(source.url)
            except Unfetchable as error:
                raise RequestError(400, f"{source.where} ({source.url[:80]}) cannot be fetched: {error}",
                                   code="image_fetch_failed") from None
            except OSError as error:
                raise RequestError(400, f"{source.where} ({source.url[:80]}) could not be fetched now: "
                                        f"{type(error).__name__}: {error}", code="image_fetch_failed") from None
        else:
            data = source.data
        return decode_upload(data, source.where, self.max_image_pixels, self.max_image_side, self.decoder)

    def _settings(self, request: CompletionRequest, choice: int):
        settings = self.settings
        changes: dict[str, Any] = {"stop": request.stop}
        if request.max_tokens is not None:
            changes["max_new_tokens"] = request.max_tokens
        if request.temperature is not None or request.top_p is not None:
            temperature = 1.0 if request.temperature is None else request.temperature
            changes.update(do_sample=temperature > 0, temperature=temperature or 1.0,
                           top_p=settings.top_p if request.top_p is None else request.top_p)
        seed = settings.seed if request.seed is None else request.seed
        changes["seed"] = seed + choice  # n sampled choices differ; each is reproducible from the seed
        return replace(settings, **changes)

    def complete(self, request: CompletionRequest, started: Callable[[int], None] | None = None,
                 listener: Callable[[int, str, Any], None] | None = None) -> tuple[list, int]:
        """(one GenerationResult per choice, prompt tokens). ``started(prompt_tokens)`` is called once the
        model is this request's; ``listener(choice, kind, value)`` hears each reply as it grows."""
        with self.queue.place():
            messages = [{"role": m.role, "content": m.content, "images": [self._image(s) for s in m.images]}
                        for m in request.messages]
            prompt_tokens = self.generator.prompt_length(messages)
            context = self.generator.context_length()
            if context and prompt_tokens >= context:
                raise RequestError(400, f"the conversation takes {prompt_tokens} positions; the model holds "
                                        f"{context}", param="messages", code="context_length_exceeded")
            with self.queue.turn():
                if started is not None:
                    started(prompt_tokens)
                results = []
                for choice in range(request.n):
                    hear = None if listener is None else (lambda kind, value, c=choice: listener(c, kind, value))
                    try:
                        results.append(self.generator.generate(messages, self._settings(request, choice),
                                                               listener=hear))
                    except ClientGone:
                        raise
                    except (ValueError, OSError) as error:  # the generator's own checks
                        raise RequestError(400, str(error)) from None
        return results, prompt_tokens


def sse(body: dict | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


class Stream:
    """One streamed completion: the worker's events, passed from its thread to the response's iterator."""

    def __init__(self, service: CompletionService, request: CompletionRequest) -> None:
        self.service, self.request = service, request
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.ready: asyncio.Future = self.loop.create_future()
        self.gone = threading.Event()
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())

    def _put(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _started(self, prompt_tokens: int) -> None:
        self.loop.call_soon_threadsafe(lambda: self.ready.done() or self.ready.set_result(prompt_tokens))

    def _hear(self, choice: int, kind: str, value: Any) -> None:
        if self.gone.is_set():
            raise ClientGone()
        if kind == "image":
            part = image_part(value)
            self._put(("delta", choice, {"content": image_markdown(value.caption, part["image_url"]["url"]),
                                         "images": [part]}))
        else:
            self._put(("delta", choice, {"content": value}))

    def _work(self) -> tuple[list, int]:
        return self.service.complete(self.request, self._started, self._hear)

    def _finished(self, task: asyncio.Future) -> None:
        if not task.cancelled():
            task.exception()  # looked at here, so a refusal raised in start() is not also "never retrieved"
        self._put(("done",))

    async def start(self, run_in_thread) -> None:
        """Wait until the model has started on this request (or refused it: the RequestError is raised)."""
        self.task = asyncio.ensure_future(run_in_thread(self._work))
        self.task.add_done_callback(self._finished)
        await asyncio.wait([self.task, self.ready], return_when=asyncio.FIRST_COMPLETED)
        if not self.ready.done():
            self.ready.cancel()
            self.task.result()  # the refusal, raised here: still an HTTP error

    async def body(self) -> AsyncIterator[bytes]:
        model = self.service.model_name
        chunk = lambda *args, **kwargs: sse(chunk_body(self.id, self.created, model, *args, **kwargs))  # noqa: E731
        opened: set[int] = set()
        try:
            while True:
                event = await self.events.get()
                if event[0] == "done":
                    break
                _, choice, delta = event
                if choice not in opened:
                    opened.add(choice)
                    yield chunk(choice, {"role": "assistant", "content": ""})
                yield chunk(choice, delta)
            try:
                results, prompt_tokens = self.task.result()
            except RequestError as error:
                yield sse(error_body(error))
                return
            except Exception as error:  # noqa: BLE001 - after the 200, a failure can only be told in the stream
                import traceback

                traceback.print_exception(error)
                yield sse(error_body(RequestError(500, f"the server failed on this request ({type(error).__name__}); "
                                                       "the details are in its log", code="server_error")))
                return
            for index, result in enumerate(results):
                if index not in opened:
                    yield chunk(index, {"role": "assistant", "content": ""})
                yield chunk(index, {}, finish_reason=result.finish_reason)
            if self.request.include_usage:
                yield chunk(None, usage_counts=usage(prompt_tokens, sum(r.completion_tokens for r in results)))
            yield sse("[DONE]")
        finally:
            self.gone.set()  # a client that left: the generation stops at its next token


def completion(service: CompletionService, results: list, prompt_tokens: int) -> dict:
    return completion_body("chatcmpl-" + secrets.token_hex(12), int(time.time()), service.model_name, results,
                           prompt_tokens)
