"""``/v1/chat/completions`` on ``mim serve``, driven by the official ``openai`` client against a real tiny MIM:
replies, streaming token by token, images out and back in, stop strings, n and seeds, usage, and OpenAI's
error shapes for everything it refuses."""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import threading
import time

import openai
import pytest
import torch
from PIL import Image

from heads import LanguageDescriptionHead
from mim import MIM, MIMChat
from mim.inference.interleaved import GenerationSettings, trigger_bias
from mim.modeling.directory import save_directory
from mim.serving.app import make_app
from mim.serving.chat_service import ChatService
from mim.serving.openai_completions import ClientGone, CompletionService
from mim.serving.openai_protocol import MARKDOWN_IMAGE, APILimits, parse_completion_request
from mim.serving.requests import RequestError
from mim.serving.server import RunningServer
from synth.data.safe_fetch import FetchPolicy, fetch

TINY = {"preset": "tiny"}
NAME = "tiny-mim"


def png_url(colour=(200, 30, 30), size: int = 16) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.manual_seed(5)
    directory = save_directory(MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY),
                               tmp_path_factory.mktemp("api") / "mim", sdxl=TINY)
    return MIMChat.from_pretrained(directory)


def start(loaded, image_bias: float, max_new_tokens: int = 12, eos_bias: float = 0.0, **limits):
    head = loaded.generator.model.head
    bias = trigger_bias(head, image_bias)
    if eos_bias:
        bias[loaded.generator.model.tokenizer.eos_token_id] = eos_bias
    settings = GenerationSettings(max_new_tokens=max_new_tokens, max_images=1, num_inference_steps=2, image_size=64,
                                  logit_bias=bias)
    service = ChatService(lambda: MIMChat(loaded.generator.model, loaded.generator.sdxl, None, settings),
                          max_request_bytes=1_000_000, max_waiting=2)
    fetcher = limits.pop("fetch", None)
    completions = CompletionService(loaded.generator, settings, service.queue, NAME,
                                    APILimits(max_tokens=max_new_tokens, **limits), fetch=fetcher)
    running = RunningServer.start(make_app(service, completions))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{running.port}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    return running, client, completions


@pytest.fixture(scope="module")
def text_server(loaded):
    running, client, completions = start(loaded, image_bias=-100.0)
    yield client, completions, running.port
    running.stop()


@pytest.fixture(scope="module")
def drawing_server(loaded):
    running, client, completions = start(loaded, image_bias=30.0)
    yield client, completions
    running.stop()


def post(port: int, body: bytes) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def user(text: str, *images: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": url}} for url in images]}


def test_the_openai_client_gets_a_reply_with_usage(text_server, loaded) -> None:
    client, completions, _ = text_server
    assert [model.id for model in client.models.list()] == [NAME]
    reply = client.chat.completions.create(model=NAME, messages=[user("What is this?", png_url())], max_tokens=6)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    prompt = [{"role": "user", "content": "What is this? <image>", "images": [None]}]
    assert reply.usage.prompt_tokens == loaded.generator.prompt_length(prompt)
    assert 1 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_stream_is_the_same_reply_token_by_token(text_server) -> None:
    client, _, _ = text_server
    messages = [user("Describe it.", png_url((10, 10, 200)))]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == whole.choices[0].message.content
    assert len(deltas) >= 3  # token by token, not one piece at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_stream_is_server_sent_events_ending_with_done(text_server) -> None:
    _, _, port = text_server
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    status, headers, raw = post(port, json.dumps(body).encode())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.decode().split("\n") if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_a_stop_string_ends_the_reply_before_it(text_server) -> None:
    client, _, _ = text_server
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    expected = full[:full.find(stop)]
    stopped = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, stop=[stop])
    assert stopped.choices[0].message.content == expected and stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_n_sampled_choices_are_reproducible_from_the_seed(text_server) -> None:
    client, _, _ = text_server
    ask = dict(model=NAME, messages=[{"role": "user", "content": "Say something."}], max_tokens=8, n=2,
               temperature=1.0, top_p=1.0)
    first = client.chat.completions.create(seed=11, **ask)
    again = client.chat.completions.create(seed=11, **ask)
    other = client.chat.completions.create(seed=12, **ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1] and texts[0] != texts[1]
    assert [c.message.content for c in again.choices] == texts
    assert [c.message.content for c in other.choices] != texts


def test_generated_images_come_back_as_markdown_and_as_parts(drawing_server, loaded) -> None:
    client, _ = drawing_server
    reply = client.chat.completions.create(model=NAME, messages=[user("Draw a red square.")], max_tokens=8)
    message = reply.choices[0].message
    images = message.model_extra["images"]
    links = MARKDOWN_IMAGE.findall(message.content)
    assert len(images) == 1 and [url for _, url in links] == [images[0]["image_url"]["url"]]
    drawn = Image.open(io.BytesIO(base64.b64decode(images[0]["image_url"]["url"].split(",", 1)[1])))
    assert drawn.size == (64, 64)
    # sent back, the drawn image is in the conversation again: its query tokens count in the prompt
    follow_up = [user("Draw a red square."), {"role": "assistant", "content": message.content}, user("Again.")]
    again = client.chat.completions.create(model=NAME, messages=follow_up, max_tokens=2)
    text = MARKDOWN_IMAGE.sub("<image>", message.content)
    prompt = [{"role": "user", "content": "Draw a red square."}, {"role": "assistant", "content": text,
              "images": [drawn]}, {"role": "user", "content": "Again."}]
    assert again.usage.prompt_tokens == loaded.generator.prompt_length(prompt)
    streamed = list(client.chat.completions.create(model=NAME, messages=[user("Draw.")], max_tokens=8, stream=True))
    parts = [part for c in streamed if c.choices for part in (c.choices[0].delta.model_extra or {}).get("images", [])]
    assert len(parts) == 1 and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("ask, error, status, param, message", [
    (dict(model="gpt-4o"), openai.NotFoundError, 404, "model", "not served here"),
    (dict(messages=[user("hi", "http://203.0.113.7/a.png")]), openai.BadRequestError, 400,
     "messages[0].content[1].image_url", "--allow_remote_images"),
    (dict(messages=[{"role": "tool", "content": "x"}]), openai.BadRequestError, 400, "messages[0].role", "'tool'"),
    (dict(messages=[user("hi", "data:image/png;base64,AAAA")]), openai.BadRequestError, 400, None,
     "not an image format Pillow can identify"),
    (dict(max_tokens=10_000), openai.BadRequestError, 400, "max_tokens", "from 1 to 12"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]),
     openai.BadRequestError, 400, "messages[1].role", "last message must be the user's"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), openai.BadRequestError, 400, "tools",
     "tool calls"),
    (dict(stop=["a", "b", "c", "d", "e"]), openai.BadRequestError, 400, "stop", "at most 4"),
])
def test_refusals_are_openai_errors(text_server, ask, error, status, param, message) -> None:
    client, _, _ = text_server
    request = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **ask}
    with pytest.raises(error) as raised:
        client.chat.completions.create(**request)
    body = raised.value.body
    assert raised.value.status_code == status and message in body["message"], body
    assert body["param"] == param and body["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw, status, message", [
    (b"\xff not json", 400, "not JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"model": "tiny-mim", "messages": "' + b"x" * 1_200_000 + b'"}', 413, "the limit is 0.95 MiB"),
    (b'{"model": "tiny-mim"}', 400, "messages must be a non-empty list"),
])
def test_malformed_bodies_get_openai_error_shapes(text_server, raw: bytes, status: int, message: str) -> None:
    _, _, port = text_server
    got, _, answer = post(port, raw)
    error = json.loads(answer)["error"]
    assert got == status and message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_a_full_line_is_a_503_before_anything_is_decoded(text_server) -> None:
    client, completions, _ = text_server
    queue = completions.queue
    taken = 0
    while queue.places.acquire(blocking=False):
        taken += 1
    try:
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model=NAME, messages=[user("hi", png_url())], stream=True)
        assert refused.value.status_code == 503 and refused.value.body["code"] == "server_busy"
    finally:
        for _ in range(taken):
            queue.places.release()
    assert taken == queue.max_waiting + 1


def test_a_client_that_leaves_mid_stream_frees_the_model(loaded) -> None:
    running, client, completions = start(loaded, image_bias=-100.0, max_new_tokens=4000, eos_bias=-100.0)
    outcomes = []
    generate = completions.generator.generate

    def watched(*args, **kwargs):
        try:
            result = generate(*args, **kwargs)
        except ClientGone:
            outcomes.append("stopped")
            raise
        outcomes.append(f"finished {result.completion_tokens}")
        return result

    completions.generator = type("Watched", (), {"generate": staticmethod(watched),
                                                 "prompt_length": generate.__self__.prompt_length,
                                                 "context_length": generate.__self__.context_length})()
    try:
        stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Go on."}],
                                                stream=True)
        for index, _ in enumerate(stream):
            if index == 3:
                break
        stream.close()
        deadline = time.monotonic() + 30
        while not outcomes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcomes == ["stopped"]
        assert completions.queue.generation.acquire(timeout=5)
        completions.queue.generation.release()
    finally:
        running.stop()


# --- the protocol, without HTTP ----------------------------------------------------------------------

def test_messages_become_mims_conversation() -> None:
    drawn = png_url((1, 2, 3))
    request = parse_completion_request({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": png_url()}},
                                     {"type": "text", "text": "with a literal <image> tag"}]},
        {"role": "assistant", "content": f"Here: ![a red <image> square]({drawn}) done"},
        {"role": "user", "content": "and <image>?"}]}, APILimits())
    system, first, answer, last = request.messages
    assert (system.role, system.content, system.images) == ("system", "Be brief.", [])
    assert first.content.count("<image>") == 1 and first.content.startswith("Compare <image> with a literal")
    assert len(first.images) == 1 and first.images[0].data.startswith(b"\x89PNG")
    assert answer.content.startswith("Here: <image> done") and len(answer.images) == 1
    assert last.content.count("<image>") == 0 and last.images == []  # typed, not an image


def test_remote_image_urls_are_fetched_only_when_allowed_and_never_from_private_addresses(loaded) -> None:
    image = base64.b64decode(png_url((0, 200, 0)).split(",", 1)[1])

    class Picture(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    host = http.server.HTTPServer(("127.0.0.1", 0), Picture)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{host.server_address[1]}/p.png"
    try:
        running, client, _ = start(loaded, image_bias=-100.0, allow_remote_images=True,
                                   fetch=lambda target: fetch(target, FetchPolicy()))
        try:
            with pytest.raises(openai.BadRequestError, match="cannot be fetched") as refused:
                client.chat.completions.create(model=NAME, messages=[user("hi", url)], max_tokens=2)
            assert "127.0.0.1" in refused.value.body["message"]  # a loopback address, refused by the policy
        finally:
            running.stop()
        running, client, _ = start(loaded, image_bias=-100.0, allow_remote_images=True,
                                   fetch=lambda target: fetch(target, FetchPolicy(allow_private_addresses=True)))
        try:  # a user who asked for private addresses (a local mirror) gets them
            reply = client.chat.completions.create(model=NAME, messages=[user("hi", url)], max_tokens=2)
            assert reply.usage.prompt_tokens > 32
        finally:
            running.stop()
    finally:
        host.shutdown()


def test_limits_are_checked_before_any_work() -> None:
    limits = APILimits(max_text_chars=10, max_images=1)
    with pytest.raises(RequestError, match="11 characters; the limit is 10"):
        parse_completion_request({"model": "m", "messages": [{"role": "user", "content": "x" * 11}]}, limits)
    with pytest.raises(RequestError, match="2 images; the limit is 1"):
        parse_completion_request({"model": "m", "messages": [user("a", png_url(), png_url())]}, limits)
    with pytest.raises(RequestError, match="a system message cannot hold images"):
        parse_completion_request({"model": "m", "messages": [
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": png_url()}}]},
            {"role": "user", "content": "hi"}]}, limits)
