"""``mim serve``: the web demo and the OpenAI-compatible API for a MIM, on uvicorn.

One model, one queue: the demo's messages and ``/v1/chat/completions`` requests wait in the same line
(:class:`~mim.serving.requests.ModelQueue`). :class:`RunningServer` starts the same application on a thread
(tests, benchmarks, a notebook).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from mim.serving.app import make_app
from mim.serving.chat_service import ChatService
from mim.serving.openai_completions import CompletionService
from mim.serving.openai_protocol import APILimits
from mim.serving.requests import RequestError

__all__ = ["ChatService", "RequestError", "RunningServer", "listening_socket", "serve", "uvicorn_config"]


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port 0: any free one), so the address is known before the server runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # a burst of connections waits instead of being reset
    return sock


def uvicorn_config(app, idle_seconds: float = 30.0) -> uvicorn.Config:
    """uvicorn as ``mim serve`` runs it: h11 (pure Python, always there), no access log, keep-alive bounded."""
    return uvicorn.Config(app, http="h11", lifespan="off", access_log=False, log_level="warning",
                          timeout_keep_alive=int(max(1, idle_seconds)), timeout_graceful_shutdown=5)


@dataclass
class RunningServer:
    """The application served on a thread: ``port`` to talk to, ``stop()`` to end it."""

    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @classmethod
    def start(cls, app, host: str = "127.0.0.1", port: int = 0, idle_seconds: float = 30.0) -> "RunningServer":
        sock = listening_socket(host, port)
        server = uvicorn.Server(uvicorn_config(app, idle_seconds))
        thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            thread.join(0.01)
        if not server.started:
            raise RuntimeError("the server did not start")
        return cls(server, thread, sock.getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(model: str, host: str = "127.0.0.1", port: int = 7860, sdxl: dict | str | None = None,
          refiner: dict | str | None = None, device: str | None = None, dtype: str | None = None,
          max_new_tokens: int = 256, max_images: int = 2, image_size: int = 1024, num_inference_steps: int = 40,
          high_noise_frac: float = 0.8, guidance_scale: float = 5.0, watermark: bool = False,
          do_sample: bool = False, top_p: float = 0.9, seed: int = 0,
          image_bias: float = 0.0, max_text_chars: int = 4000, max_upload_images: int = 4,
          max_request_mb: float = 16, max_image_pixels: int = 16_777_216, max_sessions: int = 64,
          max_sessions_per_client: int = 8, session_idle_minutes: float = 60, max_turns: int = 20,
          max_waiting: int = 16, quantization: str | None = None, sdxl_offload: bool = False,
          trust_remote_code: bool = False, max_image_side: int = 512, max_held_pixels: int = 200_000_000,
          read_timeout: float = 30.0, served_model_name: str | None = None, allow_remote_images: bool = False,
          api_max_images: int = 8, max_choices: int = 4) -> int:
    """Serve the web demo and the OpenAI-compatible API (``/v1/chat/completions``) for a MIM directory (or .ckpt).

    Args:
        model: MIM directory (``mim export``/``mim convert``) or Lightning checkpoint.
        host: interface to listen on (127.0.0.1: this machine only).
        port: TCP port (0: any free one; the address is printed).
        sdxl: the SDXL that draws images (default: recorded in the directory, else SDXL base 1.0).
        refiner: an SDXL refiner (e.g. stabilityai/stable-diffusion-xl-refiner-1.0, as the released demo).
        device: cuda or cpu (default: cuda when available).
        dtype: float16 or bfloat16 on GPUs.
        max_new_tokens: tokens per reply.
        max_images: generated images per reply.
        image_size: generated image size.
        num_inference_steps: SDXL steps (40 in the released demo).
        high_noise_frac: where SDXL base hands over to the refiner (0.8 in the released demo).
        guidance_scale: SDXL classifier-free guidance (5.0, diffusers' SDXL default, as the released demo).
        watermark: SDXL's invisible watermark on every image (the released demo's pipelines added it when
            invisible-watermark was installed); needs ``pip install invisible-watermark``.
        do_sample: top-p sampling instead of greedy (the released demo decodes greedily).
        top_p: nucleus mass.
        seed: for sampling and images.
        image_bias: added to the image trigger's logit (positive: more images).
        max_text_chars: longest accepted message.
        max_upload_images: images per message.
        max_request_mb: largest accepted request.
        max_image_pixels: largest uploaded image (width x height), checked before decoding.
        max_sessions: conversations held at once.
        max_sessions_per_client: conversations one client address may hold (its oldest goes first).
        session_idle_minutes: a conversation idle this long is forgotten (the browser is told).
        max_turns: messages per conversation.
        max_waiting: requests that may wait for the model; more get a 503.
        quantization: 8bit or 4bit: the LLM through bitsandbytes, for a GPU too small for it in 16 bits
            (a LoRA or ``mim export --merge_lora true`` directory).
        sdxl_offload: keep SDXL in host memory and move each part to the GPU only while it runs.
        trust_remote_code: let the model's own sources run their Python code (a mim.json or checkpoint that
            asks for ``trust_remote_code``); refused without it. Only for models you trust.
        max_image_side: uploads are kept at most this many pixels on their longer side (the vision tower
            reads 224).
        max_held_pixels: pixels of images all conversations may hold together; the least recently used
            conversations are forgotten (and told) past it.
        read_timeout: seconds a connection may stay silent (a stalled upload is cut off with a 408); a whole
            request body has twice as long.
        served_model_name: the ``model`` name the API answers to (default: the directory's name).
        allow_remote_images: let ``/v1/chat/completions`` fetch ``image_url`` parts given as http(s) URLs (public
            addresses only, bounded in time and size); without it only ``data:`` URLs are taken.
        api_max_images: images one API request's conversation may hold.
        max_choices: the largest ``n`` an API request may ask for.
    """
    from mim.inference.chat import MIMChat
    from mim.inference.interleaved import GenerationSettings, trigger_bias

    loaded = MIMChat.from_pretrained(model, sdxl=sdxl, refiner=refiner, device=device, dtype=dtype,
                                     watermark=watermark, quantization=quantization, sdxl_offload=sdxl_offload,
                                     trust_remote_code=trust_remote_code)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, max_images=max_images, image_size=image_size,
                                  num_inference_steps=num_inference_steps, high_noise_frac=high_noise_frac,
                                  guidance_scale=guidance_scale, do_sample=do_sample, top_p=top_p, seed=seed,
                                  logit_bias=trigger_bias(loaded.generator.model.head, image_bias))

    def make_chat():
        return MIMChat(loaded.generator.model, loaded.generator.sdxl, loaded.generator.refiner, settings)

    service = ChatService(make_chat, max_sessions=max_sessions, max_text_chars=max_text_chars,
                          max_images=max_upload_images, max_request_bytes=int(max_request_mb * 2**20),
                          max_image_pixels=max_image_pixels, max_sessions_per_client=max_sessions_per_client,
                          session_idle_seconds=session_idle_minutes * 60, max_turns=max_turns,
                          max_waiting=max_waiting, max_image_side=max_image_side, max_held_pixels=max_held_pixels)
    name = served_model_name or Path(model).name or "mim"
    limits = APILimits(max_text_chars=max_text_chars, max_messages=2 * max_turns + 1, max_images=api_max_images,
                       max_tokens=max_new_tokens, max_n=max_choices, allow_remote_images=allow_remote_images)
    fetch = None
    if allow_remote_images:
        from synth.data.safe_fetch import FetchPolicy, fetch as safe_fetch

        policy = FetchPolicy(max_bytes=int(max_request_mb * 2**20))
        fetch = lambda url: safe_fetch(url, policy)  # noqa: E731
    completions = CompletionService(loaded.generator, settings, service.queue, name, limits,
                                    max_image_pixels=max_image_pixels, max_image_side=max_image_side,
                                    decoder=service.decoder, fetch=fetch)
    app = make_app(service, completions, idle_seconds=read_timeout, body_seconds=2 * read_timeout)
    sock = listening_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"MIM demo on http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C to stop); OpenAI-compatible API at "
          f"http://{shown}:{sock.getsockname()[1]}/v1 serving model {name!r}", flush=True)
    uvicorn.Server(uvicorn_config(app, read_timeout)).run(sockets=[sock])
    return 0
