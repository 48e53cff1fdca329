"""The web demo under bad input, bursts and hostile sessions, with a real tiny MIM behind it."""

from __future__ import annotations

import base64
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from heads import LanguageDescriptionHead
from mim import MIM, MIMChat
from mim.modeling.directory import save_directory
from mim.inference.interleaved import GenerationResult, GenerationSettings, TextPart
from fixture_images import claimed_png
from mim.serving.app import make_app
from mim.serving.chat_service import ChatService
from mim.serving.requests import RequestError
from mim.serving.server import RunningServer

TINY = {"preset": "tiny"}


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    torch.manual_seed(3)
    directory = save_directory(MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY),
                               tmp_path_factory.mktemp("serve") / "mim", sdxl=TINY)
    loaded = MIMChat.from_pretrained(directory)
    settings = GenerationSettings(max_new_tokens=4, max_images=1, num_inference_steps=2, image_size=64)
    return lambda: MIMChat(loaded.generator.model, loaded.generator.sdxl, None, settings)


@pytest.fixture()
def server(tiny_chat):
    service = ChatService(tiny_chat, max_request_bytes=2_000_000, max_image_pixels=4_000_000, max_waiting=8,
                          max_sessions_per_client=64)
    running = RunningServer.start(make_app(service))
    yield running.port, service
    running.stop()


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 60) -> tuple[int, dict]:
    """Send bytes as they are (no client library fixing the headers); return status and JSON body
    (``{"text": ...}`` for an answer that is not JSON: uvicorn's own, to framing it cannot parse)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head.encode() + b"\r\nConnection: close\r\n\r\n" + body)
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    assert response, "the server closed the connection without answering"
    status = int(response.split(b" ", 2)[1])
    body = response.split(b"\r\n\r\n", 1)[1]
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, {"text": body.decode(errors="replace")}


def chat_request(port: int, payload, headers: str = "", raw: bytes | None = None) -> tuple[int, dict]:
    body = raw if raw is not None else json.dumps(payload).encode()
    head = f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return raw_request(port, head + headers, body)


def test_a_real_model_answers(server) -> None:
    port, _ = server
    status, body = chat_request(port, {"text": "What is this? <image>", "images": [data_url(png())]})
    assert status == 200 and body["parts"], body


@pytest.mark.parametrize("case, expected_status, message", [
    ("placeholder without image", 400, "1 <image> placeholder(s) but only 0 image(s) attached"),
    ("bomb 30000 x 30000", 400, "pixels (Pillow refuses to open it), over the limit of 4,000,000"),
    ("13000 x 13000", 400, "over the limit of 4,000,000"),
    ("bad base64", 400, "not valid base64"),
    ("nested JSON", 400, "nested too deeply"),
    ("not JSON", 400, "not JSON"),
])
def test_every_bad_chat_request_gets_a_message(server, case: str, expected_status: int, message: str) -> None:
    port, _ = server
    payloads = {
        "placeholder without image": {"text": "Look at <image>"},
        "bomb 30000 x 30000": {"text": "hi", "images": [data_url(claimed_png(30000, 30000))]},
        "13000 x 13000": {"text": "hi", "images": [data_url(claimed_png(13000, 13000))]},
        "bad base64": {"text": "hi", "images": ["data:image/png;base64,###"]},
    }
    raws = {"nested JSON": b"[" * 100_000 + b"]" * 100_000, "not JSON": b"\xff\xfe nonsense"}
    status, body = chat_request(port, payloads.get(case), raw=raws.get(case))
    assert status == expected_status and message in body["error"], body


@pytest.mark.parametrize("length_header, status, message", [
    ("", 411, "needs a Content-Length"),
    ("Content-Length: 999999999", 413, "the limit is 1.91 MiB"),
])
def test_bad_lengths_are_refused_before_reading(server, length_header: str, status: int, message: str) -> None:
    port, _ = server
    head = "POST /api/chat HTTP/1.1\r\nHost: x" + (f"\r\n{length_header}" if length_header else "")
    got, body = raw_request(port, head, b'{"text": "hi"}')
    assert got == status and message in body["error"], body


@pytest.mark.parametrize("length_header", ["Content-Length: abc", "Content-Length: -1"])
def test_a_malformed_length_is_refused_by_the_http_parser(server, length_header: str) -> None:
    """Framing the HTTP parser cannot read never reaches the application: uvicorn answers 400 itself."""
    port, _ = server
    got, body = raw_request(port, f"POST /api/chat HTTP/1.1\r\nHost: x\r\n{length_header}", b'{"text": "hi"}')
    assert got == 400 and body, body


def chunked(body: bytes, size: int = 65536) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def test_a_chunked_body_is_read_under_the_same_limit(server) -> None:
    port, _ = server
    head = "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
    status, body = raw_request(port, head, chunked(json.dumps({"text": "hello"}).encode()))
    assert status == 200 and body["parts"], body
    status, body = raw_request(port, head, chunked(b'{"text": "' + b"x" * 2_100_000 + b'"}'))
    assert status == 413 and "the limit is 1.91 MiB" in body["error"], body


def test_a_burst_of_50_requests_is_answered_in_full(server) -> None:
    """Each of 50 simultaneous requests gets an HTTP answer: a reply, or a 503 with a message."""
    port, _ = server
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda i: chat_request(port, {"text": f"hello {i}"}), range(50)))
    statuses = [status for status, _ in results]
    assert len(statuses) == 50 and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 9  # one generating plus max_waiting=8 in line: at least those get answers
    assert all("busy" in body["error"] for status, body in results if status == 503)


# --- sessions: the logic, with a stand-in chat ----------------------------------------------------

class EchoChat:
    def __init__(self) -> None:
        self.turns = 0

    def send(self, text, images):
        self.turns += 1
        return GenerationResult([TextPart(f"turn {self.turns}")])


def test_session_ids_are_issued_by_the_server_only() -> None:
    service = ChatService(EchoChat)
    session, body = service.reply("attacker-chosen", "1.2.3.4", {"text": "hi"})
    assert session != "attacker-chosen" and service.store.issued_here(session)
    assert not service.store.issued_here(session.split(".")[0] + ".0123456789abcdef0123456789abcdef")
    assert "notice" not in body  # a forged id is not a conversation that expired
    again, body = service.reply(session, "1.2.3.4", {"text": "more"})
    assert again == session and body["parts"][0]["text"] == "turn 2"


def test_one_client_cannot_push_out_another() -> None:
    service = ChatService(EchoChat, max_sessions=10, max_sessions_per_client=3)
    victim, _ = service.reply(None, "victim", {"text": "hi"})
    for i in range(100):  # a flood of new conversations from one address evicts only its own
        service.reply(None, "flooder", {"text": f"x{i}"})
    assert service.reply(victim, "victim", {"text": "still there?"})[1]["parts"][0]["text"] == "turn 2"
    assert sum(s.client == "flooder" for s in service.store.sessions.values()) == 3
    for i in range(6):
        service.reply(None, f"client-{i}", {"text": "hi"})
    with pytest.raises(RequestError, match="maximum of 10 conversations") as refused:
        service.reply(None, "one-too-many", {"text": "hi"})
    assert refused.value.status == 503


def test_an_expired_conversation_is_announced_and_memory_is_freed() -> None:
    now = [0.0]
    service = ChatService(EchoChat, session_idle_seconds=60, clock=lambda: now[0], max_turns=2)
    session, _ = service.reply(None, "a", {"text": "hi"})
    now[0] = 61.0
    new_session, body = service.reply(session, "a", {"text": "are you there?"})
    assert new_session != session and "no longer held" in body["notice"]
    assert body["parts"][0]["text"] == "turn 1" and session not in service.store.sessions
    service.reply(new_session, "a", {"text": "second"})
    with pytest.raises(RequestError, match="reached 2 turns"):
        service.reply(new_session, "a", {"text": "third"})
