"""synth download-images against hostile lists and servers: it never overwrites, never wanders to private
addresses, survives any URL, is not held by a slow server, and does not decode everything at once."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from synth.cli import main as synth_main
from synth.data import safe_fetch
from synth.data.conversation_io import read_conversations
from synth.data.download import download_images
from synth.data.images import PixelBudget
from synth.data.safe_fetch import FetchPolicy, FetchTimeout, Unfetchable, check_url, fetch, is_public


def png(size: tuple[int, int], color: tuple[int, int, int] = (0, 120, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def server():
    """A loopback server whose routes the test sets: path -> handler(request)."""
    routes: dict = {}
    hits: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            hits[self.path] += 1
            route = routes.get(self.path)
            if route is None:
                self.send_response(404)
                self.end_headers()
                return
            route(self)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes, hits
    httpd.shutdown()
    httpd.server_close()


def serve_bytes(body: bytes):
    def handle(request) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
    return handle


def redirect(location: str):
    def handle(request) -> None:
        request.send_response(302)
        request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()
    return handle


def records_file(folder: Path, images: list[tuple[str, object]], image_dir: str = ".") -> Path:
    """One conversation per (name, url), TextBind format."""
    records = [{"conversation": [{"role": "user", "content": "See <image>", "image_list": [name],
                                  "caption_list": [], "url_list": [url]},
                                 {"role": "assistant", "content": "Yes.", "image_list": [], "caption_list": [],
                                  "url_list": []}], "image_dir": image_dir} for name, url in images]
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


# --- never overwrite -------------------------------------------------------------------------------


def test_files_the_downloader_did_not_make_are_never_overwritten(server, tmp_path: Path) -> None:
    base, routes, hits = server
    routes["/x.png"] = serve_bytes(png((20, 20)))
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "download_failures.jsonl").write_text('{"earlier": 1}\n')
    (tmp_path / "a-folder.png").mkdir()
    names = ["notes.txt", "train.json", "download_failures.jsonl", "a-folder.png", "new.png"]
    path = records_file(tmp_path, [(name, f"{base}/x.png") for name in names])
    before = {name: (tmp_path / name).read_bytes() for name in ("notes.txt", "train.json")}
    code = _run(["download-images", str(path), "--image-root", str(tmp_path), "--allow-private-addresses",
                 "--attempts", "1", "--complete", str(tmp_path / "complete.jsonl")])
    assert code == 0  # one conversation (new.png) is complete
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    failures = [json.loads(line) for line in (tmp_path / "download_failures.jsonl").read_text().splitlines()]
    assert failures[0] == {"earlier": 1}  # appended to, never replaced
    refused = {f["image"]: f["error"] for f in failures[1:]}
    assert set(refused) == {"notes.txt", "train.json", "download_failures.jsonl", "a-folder.png"}
    assert all("not overwritten" in error for error in refused.values())
    assert Image.open(tmp_path / "new.png").size == (512, 512)
    assert hits["/x.png"] == 1  # only the free name was fetched
    assert [json.loads(line)["conversation"][0]["image_list"] for line in
            (tmp_path / "complete.jsonl").read_text().splitlines()] == [["new.png"]]


def test_outputs_may_not_be_an_input_file(tmp_path: Path, capsys) -> None:
    path = records_file(tmp_path, [("a.png", "http://example.com/a.png")])
    before = path.read_bytes()
    for flag in ("--complete", "--failures"):
        assert _run(["download-images", str(path), "--image-root", str(tmp_path), flag, str(path)]) == 2
        assert "is one of the input files" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_a_name_taken_while_downloading_is_not_replaced(server, tmp_path: Path, monkeypatch) -> None:
    base, routes, _ = server
    target = tmp_path / "late.png"

    def arrives_meanwhile(request) -> None:
        target.write_text("written by someone else meanwhile")
        serve_bytes(png((10, 10)))(request)
    routes["/late.png"] = arrives_meanwhile
    conversations, _ = read_conversations(records_file(tmp_path, [("late.png", f"{base}/late.png")]))
    report, _ = download_images(conversations, tmp_path, tmp_path / "f.jsonl", attempts=1,
                                allow_private_addresses=True)
    assert report.failed == 1 and target.read_text() == "written by someone else meanwhile"
    assert "appeared while it was downloading" in (tmp_path / "f.jsonl").read_text()
    assert not list(tmp_path.glob(".late.png.*"))  # no temporary file left behind


# --- addresses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("address, public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("240.0.0.1", False), ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:169.254.169.254", False), ("93.184.216.34", True), ("8.8.8.8", True), ("2606:4700::1111", True)])
def test_address_policy(address: str, public: bool) -> None:
    assert is_public(address) is public


def test_loopback_is_refused_by_default_without_connecting(server, tmp_path: Path) -> None:
    base, routes, hits = server
    routes["/x.png"] = serve_bytes(png((10, 10)))
    with pytest.raises(Unfetchable, match="loopback, private"):
        fetch(f"{base}/x.png")
    with pytest.raises(Unfetchable, match="loopback, private"):
        fetch(f"http://localhost:{base.rsplit(':', 1)[1]}/x.png")
    assert hits["/x.png"] == 0
    conversations, _ = read_conversations(records_file(tmp_path, [("x.png", f"{base}/x.png")]))
    report, complete = download_images(conversations, tmp_path, tmp_path / "f.jsonl", attempts=1)
    assert (report.failed, complete, hits["/x.png"]) == (1, [], 0)
    assert fetch(f"{base}/x.png", FetchPolicy(allow_private_addresses=True)) == png((10, 10))  # the explicit option


def test_every_redirect_hop_is_checked(server, monkeypatch) -> None:
    """With 127.0.0.1 standing in for a public address, redirects to other addresses, ports and schemes."""
    base, routes, hits = server
    port = int(base.rsplit(":", 1)[1])
    monkeypatch.setattr(safe_fetch, "is_public", lambda address: address == "127.0.0.1")
    routes["/ok.png"] = serve_bytes(png((10, 10)))
    routes["/to-ok"] = redirect("/ok.png")
    routes["/to-metadata"] = redirect("http://169.254.169.254/latest/meta-data/")
    routes["/to-private"] = redirect(f"http://127.0.0.2:{port}/ok.png")
    routes["/to-ftp"] = redirect("ftp://127.0.0.1/x.png")
    routes["/to-port"] = redirect("http://127.0.0.1:6379/")
    routes["/loop"] = redirect("/loop")
    assert fetch(f"{base}/to-ok") == png((10, 10))
    for path, message in [("/to-metadata", "169.254.169.254"), ("/to-private", "127.0.0.2"),
                          ("/to-ftp", "only http"), ("/to-port", "port 6379"), ("/loop", "redirects")]:
        with pytest.raises(Unfetchable, match=message):
            fetch(f"{base}{path}")
    assert hits["/loop"] == 6  # five redirects followed, then stop


# --- any URL is one record's failure ------------------------------------------------------------------------


MALFORMED = ["http://exa mple.com/a.png", "http://example.com/a.png\r\nHost: evil", None, 42, "http://[::1",
             "ftp://example.com/a.png", "", "http://user:secret@example.com/a.png", "http://:80/", "javascript:x",
             ["http://example.com/a.png"], "http://example.com:99999/a.png"]


@pytest.mark.parametrize("url", MALFORMED, ids=[repr(u)[:30] for u in MALFORMED])
def test_check_url_refuses_with_a_message(url) -> None:
    with pytest.raises(Unfetchable):
        check_url(url)


def test_malformed_urls_are_recorded_and_the_run_completes(server, tmp_path: Path) -> None:
    base, routes, _ = server
    routes["/good.png"] = serve_bytes(png((16, 16)))
    images = [(f"bad{index}.png", url) for index, url in enumerate(MALFORMED)] + [("good.png", f"{base}/good.png")]
    path = records_file(tmp_path, images)
    records = json.loads(path.read_text())
    records.append({**records[0], "conversation": [{**records[0]["conversation"][0], "image_list": ["odd.png"],
                                                    "url_list": "http://not-a-list/"}, records[0]["conversation"][1]]})
    path.write_text(json.dumps(records))
    for _ in range(2):  # and a rerun goes the same way
        assert _run(["download-images", str(path), "--image-root", str(tmp_path), "--allow-private-addresses",
                     "--attempts", "1", "--complete", str(tmp_path / "complete.jsonl")]) == 0
        assert len((tmp_path / "complete.jsonl").read_text().splitlines()) == 1
    failures = [json.loads(line) for line in (tmp_path / "download_failures.jsonl").read_text().splitlines()]
    first_run = failures[: len(MALFORMED) + 1]
    assert {f.get("image") for f in first_run if "image" in f} == {name for name, _ in images[:-1]}
    assert any("url_list is a str" in f["error"] for f in first_run)


# --- time ----------------------------------------------------------------------------------------------------


def slow_headers(request) -> None:
    request.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(100):
        request.wfile.write(b"X")
        request.wfile.flush()
        time.sleep(0.25)


def slow_body(request) -> None:
    request.send_response(200)
    request.send_header("Content-Length", "100000")
    request.end_headers()
    for _ in range(400):
        request.wfile.write(b"\x89")
        request.wfile.flush()
        time.sleep(0.25)


@pytest.mark.parametrize("route", [slow_headers, slow_body])
def test_a_trickling_server_cannot_hold_a_request_past_its_deadline(server, route) -> None:
    base, routes, _ = server
    routes["/slow"] = route
    policy = FetchPolicy(timeout=1.0, deadline=1.5, allow_private_addresses=True)  # each byte beats the timeout
    start = time.monotonic()
    with pytest.raises(FetchTimeout):
        fetch(f"{base}/slow", policy)
    assert time.monotonic() - start < 3.0


def test_an_unanswering_server_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        start = time.monotonic()
        with pytest.raises(OSError):
            fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/x", FetchPolicy(timeout=0.5, deadline=5,
                                                                               allow_private_addresses=True))
        assert time.monotonic() - start < 2.0
    finally:
        listener.close()


# --- memory -----------------------------------------------------------------------------------------------


def test_the_pixel_budget_bounds_what_decodes_at_once(server, tmp_path: Path) -> None:
    base, routes, _ = server
    big = png((2000, 1500))  # 3 M pixels, a 15 KB file
    for index in range(6):
        routes[f"/big{index}.png"] = serve_bytes(big)
    conversations, _ = read_conversations(records_file(tmp_path, [(f"b{i}.png", f"{base}/big{i}.png")
                                                                  for i in range(6)]))
    report, complete = download_images(conversations, tmp_path, tmp_path / "f.jsonl", workers=6, attempts=1,
                                       allow_private_addresses=True, pixel_budget=7_000_000)
    assert (report.downloaded, len(complete)) == (6, 6)
    assert report.peak_decoding_pixels == 6_000_000  # two at a time: a third would pass the budget
    unbounded, _ = download_images(conversations, tmp_path / "again", tmp_path / "g.jsonl", workers=6, attempts=1,
                                   allow_private_addresses=True, pixel_budget=10**12)
    assert unbounded.downloaded == 6


def test_an_image_larger_than_the_budget_still_decodes_alone() -> None:
    budget = PixelBudget(100)
    with budget.reserve(500):
        assert budget.in_use == 500
    assert (budget.in_use, budget.peak) == (0, 500)


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        synth_main(argv)
    return exit_info.value.code
