"""``mim serve``: a local web demo. Type, attach images, get text and images back, interleaved.

Standard library HTTP server, one page, a JSON API:

- ``GET /``            the page
- ``POST /api/chat``   ``{"text": str, "images": [data URLs]}`` -> ``{"parts": [{"type": "text"|"image", ...}]}``
- ``POST /api/reset``  forget this browser's conversation

Every request gets an answer with a message the page shows: a bad request
(no or a bad ``Content-Length``, a body that is not JSON or is absurdly nested,
an image that does not decode or claims too many pixels, a placeholder without
an image) is a 4xx, an overload a 503, an unexpected failure a 500 whose details
go to the server log only.

Sessions: the server issues every session id (signed, so a client cannot choose
one) when a browser first chats. A conversation is forgotten after
``session_idle_minutes`` without a message, and the browser is told so. At
most ``max_sessions`` conversations are held; a client address holds at most
``max_sessions_per_client`` (its own oldest goes first), so no client can push
out the others; when the server is full, new conversations get a 503 until one
expires. Generation runs one request at a time; at most ``max_waiting``
requests wait for it (each up to ``wait_seconds``), further ones get a 503.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from synth.data.images import DecodePool, ImageDecodeError, decode_image

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MIM - TextBind demo</title>
<style>
body{font-family:system-ui,sans-serif;max-width:820px;margin:2em auto;padding:0 1em;color:#222}
#log{border:1px solid #ccc;border-radius:8px;padding:1em;min-height:240px;margin-bottom:1em}
.turn{margin:.6em 0}.user{color:#0b4f8a}.assistant{color:#1c5e20}
.turn img{max-width:256px;display:block;margin:.4em 0;border-radius:6px}
#error{color:#b00020;min-height:1.2em}#notice{color:#6a4a00}
textarea{width:100%;box-sizing:border-box}
</style></head><body>
<h1>MIM</h1><p>Multi-turn interleaved multimodal chat (TextBind). Attach images, ask, and the
assistant answers with text and images.</p>
<div id="log"></div><div id="notice" role="status"></div><div id="error" role="alert"></div>
<form id="form"><textarea id="text" rows="3" placeholder="Your message"></textarea>
<input id="files" type="file" accept="image/*" multiple>
<button id="send" type="submit">Send</button> <button id="reset" type="button">New conversation</button></form>
<script>
const log=document.getElementById('log'),err=document.getElementById('error'),note=document.getElementById('notice');
function add(role,parts){const d=document.createElement('div');d.className='turn '+role;
 const who=document.createElement('b');who.textContent=role==='user'?'You: ':'MIM: ';d.appendChild(who);
 for(const p of parts){if(p.type==='text'){d.appendChild(document.createTextNode(p.text));}
  else{const i=document.createElement('img');i.src=p.src;i.alt=p.caption||'generated image';
   i.className=role==='assistant'?'generated':'uploaded';d.appendChild(i);}}
 log.appendChild(d);}
function read(f){return new Promise((ok,no)=>{const r=new FileReader();r.onload=()=>ok(r.result);r.onerror=no;r.readAsDataURL(f);});}
document.getElementById('form').addEventListener('submit',async e=>{e.preventDefault();err.textContent='';note.textContent='';
 const text=document.getElementById('text').value,files=[...document.getElementById('files').files];
 const images=await Promise.all(files.map(read));
 add('user',[{type:'text',text}].concat(images.map(src=>({type:'image',src}))));
 const button=document.getElementById('send');button.disabled=true;
 try{const r=await fetch('/api/chat',{method:'POST',headers:{'content-type':'application/json'},
   body:JSON.stringify({text,images})});
   let body;try{body=await r.json();}catch(x){body={error:'the server answered '+r.status+' without a message'};}
   note.textContent=body.notice||'';
   if(!r.ok){err.textContent=body.error;}else{add('assistant',body.parts);}}
 catch(x){err.textContent='request failed: '+x;}
 finally{button.disabled=false;document.getElementById('text').value='';document.getElementById('files').value='';}});
document.getElementById('reset').addEventListener('click',async()=>{await fetch('/api/reset',{method:'POST'});
 log.innerHTML='';err.textContent='';});
</script></body></html>"""


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _image_bytes(data_url: Any, index: int) -> bytes:
    if not isinstance(data_url, str) or "," not in data_url or not data_url.startswith("data:image/"):
        raise RequestError(400, f"image {index + 1} is not an image data URL")
    try:
        return base64.b64decode(data_url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"image {index + 1} is not valid base64") from None


def _decode_image(data: bytes, index: int, max_pixels: int, max_side: int, pool: DecodePool | None = None):
    """Decode (on the pool's few threads, under its pixel budget), then keep only a copy at most ``max_side``
    on its longer side (the vision tower reads 224 px): a session holds small images, whatever was uploaded."""
    from PIL import Image

    def work():
        image = decode_image(data, max_pixels, f"image {index + 1}")
        if max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.LANCZOS)
        return image

    try:
        return pool.run(data, work) if pool is not None else work()
    except ImageDecodeError as error:
        raise RequestError(400, str(error)) from None


def held_pixels(chat: Any) -> int:
    """Pixels of the images a conversation keeps (uploaded and drawn, in its history)."""
    return sum(image.size[0] * image.size[1] for message in getattr(chat, "history", []) or []
               for image in message.get("images", []) or [] if hasattr(image, "size"))


def _data_url(image) -> str:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class _Session:
    chat: Any
    client: str
    last_used: float
    turns: int = 0
    pixels: int = 0  # what its images hold (held_pixels), counted against the server's max_held_pixels


@dataclass
class SessionStore:
    """Conversations by server-issued session id, with idle expiry and per-client and total caps."""

    make_chat: Callable[[], Any]
    max_sessions: int = 64
    max_sessions_per_client: int = 8
    idle_seconds: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    sessions: OrderedDict[str, _Session] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_sessions_per_client < 1:
            raise ValueError("max_sessions and max_sessions_per_client must be at least 1")
        self._secret = secrets.token_bytes(32)

    def _sign(self, token: str) -> str:
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()[:32]

    def issued_here(self, session_id: str | None) -> bool:
        """Whether this server (since its start) issued the id: a forged or foreign id is not."""
        if not session_id or session_id.count(".") != 1:
            return False
        token, signature = session_id.split(".")
        return hmac.compare_digest(signature, self._sign(token))

    def _expire(self) -> None:
        now = self.clock()
        for session_id in [k for k, v in self.sessions.items() if now - v.last_used > self.idle_seconds]:
            del self.sessions[session_id]

    def get(self, session_id: str | None, client: str) -> tuple[str, _Session, str | None]:
        """(id, session, notice): the caller's conversation, or a new one with a notice saying why
        the old one is gone. Raises RequestError(503) when the server holds all it may."""
        self._expire()
        session = self.sessions.get(session_id) if session_id else None
        if session is not None:
            session.last_used = self.clock()
            self.sessions.move_to_end(session_id)
            return session_id, session, None
        notice = None
        if self.issued_here(session_id):
            notice = ("Your earlier conversation is no longer held (idle too long, or the server needed room); "
                      "this message starts a new one.")
        own = [k for k, v in self.sessions.items() if v.client == client]
        if len(own) >= self.max_sessions_per_client:
            del self.sessions[own[0]]  # this client's least recently used conversation, never another's
        elif len(self.sessions) >= self.max_sessions:
            raise RequestError(503, f"the demo is holding its maximum of {self.max_sessions} conversations; "
                                    "try again in a few minutes")
        token = secrets.token_hex(16)
        session_id = f"{token}.{self._sign(token)}"
        session = self.sessions[session_id] = _Session(self.make_chat(), client, self.clock())
        return session_id, session, notice

    def drop(self, session_id: str | None) -> None:
        self.sessions.pop(session_id, None)

    def trim_pixels(self, max_pixels: int, keep: str) -> int:
        """Forget the least recently used conversations (never ``keep``) until their images fit
        ``max_pixels``; they are told so on their next message. Returns how many were dropped."""
        dropped = 0
        for session_id in list(self.sessions):
            if sum(session.pixels for session in self.sessions.values()) <= max_pixels:
                break
            if session_id != keep:
                del self.sessions[session_id]
                dropped += 1
        return dropped


class ChatService:
    """The demo's logic, apart from HTTP: limits, sessions, one generation at a time."""

    def __init__(self, make_chat, max_sessions: int = 64, max_text_chars: int = 4000, max_images: int = 4,
                 max_request_bytes: int = 16 * 1024 * 1024, max_image_pixels: int = 16_777_216,
                 max_sessions_per_client: int = 8, session_idle_seconds: float = 3600.0, max_turns: int = 20,
                 max_waiting: int = 16, wait_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 max_image_side: int = 512, max_held_pixels: int = 200_000_000,
                 decode_budget_pixels: int = 64_000_000):
        self.store = SessionStore(make_chat, max_sessions, max_sessions_per_client, session_idle_seconds, clock)
        self.max_image_side, self.max_held_pixels = max_image_side, max_held_pixels
        self.decoder = DecodePool(decode_budget_pixels, threads=2)  # what requests may decode at once, where
        self.max_text_chars, self.max_images = max_text_chars, max_images
        self.max_request_bytes, self.max_image_pixels = max_request_bytes, max_image_pixels
        self.max_turns, self.wait_seconds = max_turns, wait_seconds
        self.sessions_lock = threading.Lock()  # the store; held briefly
        self.generation = threading.Lock()  # the model; held for a whole reply
        self.waiting = threading.BoundedSemaphore(max_waiting + 1)  # the one generating plus those in line

    def reply(self, session_id: str | None, client: str, payload: dict) -> tuple[str, dict]:
        """(session id, response body) for one chat message; RequestError for what the client must fix."""
        from mim.inference.interleaved import ImagePart

        text, images = payload.get("text", ""), payload.get("images") or []
        if not isinstance(text, str) or not isinstance(images, list):
            raise RequestError(400, "send {\"text\": string, \"images\": [image data URLs]}")
        if len(text) > self.max_text_chars:
            raise RequestError(400, f"the message is {len(text)} characters; the limit is {self.max_text_chars}")
        if len(images) > self.max_images:
            raise RequestError(400, f"{len(images)} images attached; the limit is {self.max_images}")
        if not text.strip() and not images:
            raise RequestError(400, "the message is empty")
        uploads = [_image_bytes(image, index) for index, image in enumerate(images)]
        if not self.waiting.acquire(blocking=False):  # before decoding: an overload costs no pixels
            raise RequestError(503, "the demo is busy with other requests; try again in a moment")
        try:
            decoded = [_decode_image(data, index, self.max_image_pixels, self.max_image_side, self.decoder)
                       for index, data in enumerate(uploads)]
            del uploads
            if not self.generation.acquire(timeout=self.wait_seconds):
                raise RequestError(503, f"the demo is busy (waited {self.wait_seconds:.0f} s); try again later")
            try:
                with self.sessions_lock:
                    session_id, session, notice = self.store.get(session_id, client)
                if session.turns >= self.max_turns:
                    raise RequestError(400, f"this conversation has reached {self.max_turns} turns; start a new one "
                                            "(New conversation)")
                try:
                    result = session.chat.send(text, decoded)
                except (ValueError, OSError) as error:  # the chat's own checks: a message it cannot take
                    raise RequestError(400, str(error)) from None
                session.turns += 1
                session.pixels = held_pixels(session.chat)
                with self.sessions_lock:
                    self.store.trim_pixels(self.max_held_pixels, keep=session_id)
            finally:
                self.generation.release()
        finally:
            self.waiting.release()
        parts = [{"type": "image", "src": _data_url(p.image), "caption": p.caption} if isinstance(p, ImagePart)
                 else {"type": "text", "text": p.text} for p in result.parts]
        body = {"parts": parts}
        if notice:
            body["notice"] = notice
        return session_id, body

    def reset(self, session_id: str | None) -> None:
        with self.sessions_lock:
            self.store.drop(session_id)


_COOKIE = "mim_session"


#: A body over the limit is read and thrown away up to this many times the limit, so the client, still
#: sending, receives the 413 instead of a broken pipe; past that the connection is closed after the answer.
DISCARD_FACTOR = 4


def _read_exactly(handler: BaseHTTPRequestHandler, length: int, deadline: float, keep: bool) -> bytes:
    """Read ``length`` bytes in pieces, within ``deadline`` (a monotonic time): a client that sends half a
    body, or trickles it, is answered 408 instead of holding a thread."""
    pieces, received = [], 0
    while received < length:
        if time.monotonic() > deadline:
            raise RequestError(408, f"the request body did not arrive in time ({received:,} of {length:,} bytes)")
        try:
            piece = handler.rfile.read1(min(65536, length - received))
        except TimeoutError:
            raise RequestError(408, f"the client stopped sending ({received:,} of {length:,} bytes)") from None
        if not piece:
            raise RequestError(400, f"the body ended after {received} of {length} bytes")
        received += len(piece)
        if keep:
            pieces.append(piece)
    return b"".join(pieces)


def _read_body(handler: BaseHTTPRequestHandler, limit: int, seconds: float = 60.0) -> bytes:
    if "chunked" in handler.headers.get("transfer-encoding", "").lower():
        raise RequestError(411, "chunked requests are not accepted; send a Content-Length")
    raw = handler.headers.get("content-length")
    if raw is None:
        raise RequestError(411, "the request needs a Content-Length header")
    if not raw.strip().isdigit():
        raise RequestError(400, f"Content-Length must be a non-negative whole number, got {raw[:40]!r}")
    length = int(raw)
    deadline = time.monotonic() + seconds
    if length > limit:
        message = (f"the request is {length / 2**20:.2f} MiB; the limit is {limit / 2**20:.2f} MiB "
                   "(smaller images?)")
        if length <= DISCARD_FACTOR * limit:
            try:
                _read_exactly(handler, length, deadline, keep=False)
            except RequestError:
                pass  # the 413 is the answer either way
        raise RequestError(413, message)
    return _read_exactly(handler, length, deadline, keep=True)


def _parse_json(body: bytes) -> dict:
    try:
        payload = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not JSON") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return payload


def make_handler(service: ChatService, read_timeout: float = 30.0, body_seconds: float = 60.0):
    """The request handler; ``read_timeout`` bounds every socket read (an idle or stalled connection
    frees its thread), ``body_seconds`` a whole request body."""

    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout

        def log_message(self, *args) -> None:
            pass

        def _cookie(self) -> str | None:
            for item in self.headers.get("cookie", "").split(";"):
                name, _, value = item.strip().partition("=")
                if name == _COOKIE and value:
                    return value
            return None

        def _send(self, status: int, body: bytes, content_type: str, session_id: str | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.send_header("cache-control", "no-store")
            if session_id is not None and session_id != self._cookie():
                self.send_header("set-cookie", f"{_COOKIE}={session_id}; Path=/; HttpOnly; SameSite=Strict")
            self.end_headers()
            self.wfile.write(body)
            self.answered = True

        def _json(self, status: int, payload: dict, session_id: str | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json", session_id)

        def _answer(self, work: Callable[[], None]) -> None:
            """Run ``work``; whatever happens, the client gets a response with a message."""
            self.answered = False
            try:
                work()
            except RequestError as error:
                if error.status in (408, 411, 413) or error.status >= 500:
                    self.close_connection = True  # the body may be unread
                if not self.answered:
                    self._json(error.status, {"error": str(error)})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left
            except Exception as error:  # noqa: BLE001 - a bug must still be answered, and logged
                print(f"mim serve: error answering {self.command} {self.path}:", file=sys.stderr)
                traceback.print_exc()
                if not self.answered:
                    self.close_connection = True
                    self._json(500, {"error": f"the server failed on this request ({type(error).__name__}); "
                                              "the details are in its log"})

        def do_GET(self) -> None:
            def work() -> None:
                if self.path in ("/", "/index.html"):
                    return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                self._json(404, {"error": "not found"})

            self._answer(work)

        def do_POST(self) -> None:
            def work() -> None:
                body = _read_body(self, service.max_request_bytes, body_seconds)
                if self.path == "/api/reset":
                    service.reset(self._cookie())
                    return self._json(200, {"ok": True})
                if self.path != "/api/chat":
                    return self._json(404, {"error": "not found"})
                session_id, response = service.reply(self._cookie(), self.client_address[0], _parse_json(body))
                self._json(200, response, session_id)

            self._answer(work)

    return Handler


class DemoServer(ThreadingHTTPServer):
    """A threading HTTP server that queues a burst of connections instead of resetting them:
    socketserver's default listen backlog of 5 drops the rest of 50 simultaneous requests."""

    request_queue_size = 1024
    daemon_threads = True


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
          read_timeout: float = 30.0) -> int:
    """Serve the web demo for a MIM directory (or .ckpt).

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
        read_timeout: seconds a connection may stay silent (a stalled upload frees its thread); a whole
            request body has twice as long.
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
    server = DemoServer((host, port), make_handler(service, read_timeout, 2 * read_timeout))
    print(f"MIM demo on http://{host}:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
