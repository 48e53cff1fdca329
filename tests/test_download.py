"""Downloading the released data's images: resize-and-pad as the release, resumable, failures never fatal."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from synth import read_conversations
from synth.data.download import download_images, resize_and_pad


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def image_server():
    hits: Counter[str] = Counter()
    bodies = {"/wide.png": png((100, 50), (200, 0, 0)), "/tall.png": png((30, 60), (0, 0, 200)),
              "/text": b"<html>not an image</html>"}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            hits[self.path] += 1
            if self.path == "/flaky.png" and hits[self.path] == 1:
                self.send_response(503)
                self.end_headers()
                return
            body = bodies.get(self.path) or (png((40, 40), (0, 150, 0)) if self.path == "/flaky.png" else None)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_resize_and_pad_matches_the_release() -> None:
    padded = resize_and_pad(Image.new("RGB", (100, 50), (200, 0, 0)), 512)
    assert padded.size == (512, 512)
    assert padded.getpixel((256, 0)) == (255, 255, 255) and padded.getpixel((256, 127)) == (255, 255, 255)
    assert padded.getpixel((256, 256)) == (200, 0, 0) and padded.getpixel((0, 256)) == (200, 0, 0)
    odd = resize_and_pad(Image.new("RGB", (3, 2), (0, 0, 0)), 5)  # 5 x 3 content: 1 row above, 1 below
    assert [odd.getpixel((2, y)) for y in range(5)] == [(255, 255, 255), (0, 0, 0), (0, 0, 0), (0, 0, 0),
                                                        (255, 255, 255)]


def test_download_released_conversations(image_server, tmp_path: Path) -> None:
    base, hits = image_server
    turn = lambda role, content, names, urls: {"role": role, "content": content, "image_list": names,  # noqa: E731
                                               "caption_list": [], "url_list": urls}
    records = [
        {"conversation": [turn("user", "Look <image> and <image>", ["1.png", "2.png"],
                               [f"{base}/wide.png", f"{base}/tall.png"]),
                          turn("assistant", "Here: <image>", ["3.png"], [f"{base}/flaky.png"])],
         "image_dir": "./data/mim_images"},
        {"conversation": [turn("user", "And <image>?", ["4.png"], [f"{base}/missing.png"]),
                          turn("assistant", "Gone.", [], [])], "image_dir": "./data/mim_images"},
        {"conversation": [turn("user", "This <image>?", ["5.png"], [f"{base}/text"]),
                          turn("assistant", "Hm.", [], [])], "image_dir": "./data/mim_images"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    conversations, _ = read_conversations(tmp_path / "train.json")
    report, complete = download_images(conversations, tmp_path, tmp_path / "failures.jsonl", backoff=0.01,
                                       allow_private_addresses=True,
                                       workers=4, attempts=3)
    assert (report.downloaded, report.failed, report.already_there) == (3, 2, 0)
    assert [c.id for c in complete] == ["train-000000"]  # the others lost an image: dropped, as the release did
    images = tmp_path / "data" / "mim_images"
    assert Image.open(images / "1.png").size == (512, 512) and Image.open(images / "1.png").getpixel((0, 0)) == (
        255, 255, 255)
    assert hits["/flaky.png"] == 2 and hits["/missing.png"] == 1  # a 503 is retried, a 404 is not
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert {f["image"]: f["error"].split(":")[0] for f in failures} == {"4.png": "Unfetchable",
                                                                      "5.png": "ImageDecodeError"}
    # a rerun fetches only what is missing
    again, _ = download_images(conversations, tmp_path, tmp_path / "failures.jsonl", backoff=0.01, attempts=1,
                               allow_private_addresses=True)
    assert (again.downloaded, again.already_there) == (0, 3) and hits["/wide.png"] == 1
