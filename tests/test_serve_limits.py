"""mim serve under memory and connection abuse: uploads are decoded only when admitted and kept small,
what all conversations hold is bounded, stalled uploads are cut off, and an oversized body gets its 413."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import pytest
from PIL import Image

from mim.inference.interleaved import GenerationResult, TextPart
from mim.serving import requests as serving_requests
from mim.serving.app import make_app
from mim.serving.chat_service import ChatService
from mim.serving.requests import RequestError
from mim.serving.server import RunningServer


def data_url(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class KeepingChat:
    """Keeps what it is sent in ``history``, as MIMChat does."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def send(self, text, images):
        self.history.append({"role": "user", "content": text, "images": list(images)})
        return GenerationResult([TextPart(f"saw {[image.size for image in images]}")])


def test_uploads_are_kept_at_the_vision_towers_scale() -> None:
    service = ChatService(KeepingChat, max_image_pixels=20_000_000, max_image_side=512)
    session, body = service.reply(None, "a", {"text": "hi", "images": [data_url((4096, 2048))]})
    assert body["parts"][0]["text"] == "saw [(512, 256)]"
    assert service.store.sessions[session].pixels == 512 * 256


def test_an_overloaded_server_refuses_before_decoding(monkeypatch) -> None:
    decoded = []
    monkeypatch.setattr(serving_requests, "decode_image", lambda *args: decoded.append(args) or Image.new("RGB", (4, 4)))
    service = ChatService(KeepingChat, max_waiting=0)
    service.queue.places.acquire()  # the one slot is taken by a reply in progress
    with pytest.raises(RequestError) as refused:
        service.reply(None, "a", {"text": "hi", "images": [data_url((64, 64))] * 4})
    assert refused.value.status == 503 and decoded == []


def test_what_all_conversations_hold_is_bounded() -> None:
    service = ChatService(KeepingChat, max_image_pixels=20_000_000, max_image_side=512,
                          max_held_pixels=3 * 512 * 512, max_sessions_per_client=100)
    sessions = [service.reply(None, f"client-{i}", {"text": "hi", "images": [data_url((2048, 2048))]})[0]
                for i in range(12)]
    held = sum(session.pixels for session in service.store.sessions.values())
    assert held <= 3 * 512 * 512 and sessions[-1] in service.store.sessions
    assert sessions[0] not in service.store.sessions  # the least recently used went first
    _, body = service.reply(sessions[0], "client-0", {"text": "still there?"})
    assert "no longer held" in body["notice"]


@pytest.fixture()
def server():
    service = ChatService(KeepingChat, max_request_bytes=1_000_000)
    running = RunningServer.start(make_app(service, idle_seconds=1.0, body_seconds=2.0))
    yield running.port
    running.stop()


def read_response(connection: socket.socket) -> tuple[int, dict]:
    response = b""
    while chunk := connection.recv(65536):
        response += chunk
    return int(response.split(b" ", 2)[1]), json.loads(response.split(b"\r\n\r\n", 1)[1])


def test_half_a_body_is_answered_408_and_the_thread_freed(server) -> None:
    before = threading.active_count()
    connections = []
    for _ in range(20):
        connection = socket.create_connection(("127.0.0.1", server), timeout=10)
        connection.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"text\": ")
        connections.append(connection)
    start = time.monotonic()
    for connection in connections:
        status, body = read_response(connection)
        assert status == 408 and "stopped sending" in body["error"]
        connection.close()
    assert time.monotonic() - start < 5
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_a_trickled_body_is_cut_off_at_its_deadline(server) -> None:
    connection = socket.create_connection(("127.0.0.1", server), timeout=10)
    connection.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    start = time.monotonic()
    try:
        while time.monotonic() - start < 6:  # a byte every half second: never silent for read_timeout
            connection.sendall(b" ")
            time.sleep(0.5)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, body = read_response(connection)
    assert status == 408 and "did not arrive in time" in body["error"]
    assert time.monotonic() - start < 4


def test_an_oversized_body_gets_its_413_not_a_broken_pipe(server) -> None:
    body = b"x" * 3_000_000  # three times the limit: read and discarded, then answered
    connection = socket.create_connection(("127.0.0.1", server), timeout=10)
    connection.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    status, answer = read_response(connection)
    assert status == 413 and "the limit is 0.95 MiB" in answer["error"]
