"""A loopback HTTP server that speaks OpenAI's chat-completions protocol: for tests and benchmarks.

It listens on 127.0.0.1 only, answers each request according to a ``plan``
(ok, 429, 500, 400, 401, 403, 404, slow, timeout, garbage, empty) and records
what it received. The 401/403/404 answers echo the request's Authorization
header in their error message, as a misconfigured proxy does, so tests can
check that no key is ever written. The default answer is a well-formed TextBind dialogue built from
the image list in the prompt, so successful generations pass the filter.
Useful for developing against ``synth generate`` without an API key::

    with ChatServer(plan=lambda n, body: "slow", slow_seconds=0.2) as server:
        ...  # generate.base_url = server.url
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_IMAGE_LINE = re.compile(r"^<img(\d+)> (.*) </img\1>$", re.MULTILINE)


def captions_from_prompt(prompt: str) -> list[str]:
    """The group's captions: the image list between the header and 'Characteristics about the assistant'."""
    section = prompt.split("following input images:", 1)[1].split("Characteristics about the assistant", 1)[0]
    return [caption for _, caption in _IMAGE_LINE.findall(section)]


def dialogue_for(prompt: str) -> str:
    captions = captions_from_prompt(prompt)
    tags = [f"<img{i}> {c} </img{i}>" for i, c in enumerate(captions)]
    lines = [f"Human: What do these have in common? {tags[0]} {tags[1]}",
             "Assistant: Both are photographs with a clear subject; the first is calmer than the second."]
    for tag in tags[2:]:
        lines += ["Human: Show me another one like them.", f"Assistant: Here is one: {tag}"]
    return "\n\n".join(lines)


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # socketserver's default of 5 drops connections when many arrive at once


class ChatServer:
    """``plan(n, body)`` picks the behaviour of request number n (from 0); ``reply(n, body)`` the text of an answer."""

    def __init__(self, plan: Callable[[int, dict], str] | None = None, slow_seconds: float = 0.2,
                 hang_seconds: float = 2.0, reply: Callable[[int, dict], str] | None = None):
        self.plan = plan or (lambda n, body: "ok")
        # the message content of an "ok" answer; default: a TextBind dialogue over the prompt's images
        self.reply = reply or (lambda n, body: dialogue_for(body["messages"][-1]["content"]))
        self.slow_seconds, self.hang_seconds = slow_seconds, hang_seconds
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.modes: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections, as with real endpoints

            def setup(self) -> None:
                super().setup()
                # headers and body go out in two writes: without this, Nagle's algorithm and the
                # client's delayed ACK stall every response by ~40 ms
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):  # a client killed mid-request
                    pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server.lock:
                    number = len(server.requests)
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    mode = server.plan(number, body)
                    server.modes[mode] += 1
                if mode == "429":
                    return self._json(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                                      {"retry-after": "0"})
                if mode == "500":
                    return self._json(500, {"error": {"message": "boom", "type": "server_error"}})
                if mode == "400":
                    return self._json(400, {"error": {"message": "bad request", "type": "invalid_request"}})
                if mode in ("401", "403", "404"):
                    echoed = self.headers.get("authorization", "")
                    return self._json(int(mode), {"error": {"message": f"denied for {echoed}", "type": "auth"}})
                if mode == "garbage":
                    return self._raw(200, b"{this is not json", "application/json")
                if mode == "empty":
                    return self._json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                            "choices": []})
                if mode == "timeout":
                    time.sleep(server.hang_seconds)
                if mode == "slow":
                    time.sleep(server.slow_seconds)
                content = body["messages"][-1]["content"]
                prompt = content if isinstance(content, str) else json.dumps(content)
                text = server.reply(number, body)
                self._json(200, {
                    "id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "test"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                              "total_tokens": (len(prompt) + len(text)) // 4}})

            def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
                self._raw(status, json.dumps(payload).encode(), "application/json", headers)

            def _raw(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", content_type)
                    self.send_header("content-length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    """``python -m synth.testing --latency 0.2``: serve until killed; prints the base URL."""
    import argparse

    parser = argparse.ArgumentParser(description="OpenAI-compatible loopback server answering TextBind dialogues")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    serve_until_interrupted(ChatServer(plan=lambda n, body: "slow" if args.latency else "ok",
                                       slow_seconds=args.latency))


def serve_until_interrupted(server) -> None:
    """Start ``server`` (a context manager with a ``url``), print its URL for a caller to read, and serve until
    Ctrl-C or a signal ends the process."""
    with server:
        print(server.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
