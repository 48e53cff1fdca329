"""Peak memory of synth download-images and mim serve under inputs built to exhaust it.

download: 16 workers fetch small PNGs that each decode to 9000 x 9000 pixels (under the pixel limit), from a
loopback server. With the defaults (a shared pixel budget of 200 M pixels, decoding on 2 threads), with the
budget but every worker decoding (16 threads), and with neither (as before either existed).

serve: 12 simultaneous requests of 4 small PNGs that decode to 4096 x 4096, through the demo's ChatService
with a chat that keeps its images as MIMChat does. Kept at 512 px with the decode budget (the defaults) and
kept whole with no budget (what the demo did before).

Each case runs in its own process; the figure is that process's peak RSS (ru_maxrss) and, for serve, the
RSS left once the requests are done (what the sessions hold).

    python benchmarks/hostile_memory.py
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def big_png(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (30, 90, 200)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_download(budget: int, decode_threads: int) -> dict:
    from synth.data.conversation_io import read_conversations
    from synth.data.download import download_images

    body = big_png(9000)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    root = Path(tempfile.mkdtemp())
    records = [{"conversation": [{"role": "user", "content": "<image>", "image_list": [f"{i}.png"],
                                  "url_list": [f"{base}/{i}.png"]}, {"role": "assistant", "content": "ok"}]}
               for i in range(16)]
    (root / "c.json").write_text(json.dumps(records))
    conversations, _ = read_conversations(root / "c.json")
    before = rss_mb()
    report, _ = download_images(conversations, root, root / "f.jsonl", workers=16, attempts=1,
                                allow_private_addresses=True, pixel_budget=budget, decode_threads=decode_threads)
    server.shutdown()
    return {"case": "download", "png_bytes": len(body), "budget_pixels": budget, "decode_threads": decode_threads,
            "downloaded": report.downloaded,
            "peak_decoding_pixels": report.peak_decoding_pixels, "rss_before_mb": round(before),
            "peak_rss_mb": round(peak_mb())}


def run_serve(keep_whole: bool) -> dict:
    from PIL import Image  # noqa: F401 - loaded before the baseline

    from mim.inference.interleaved import GenerationResult, TextPart
    from mim.serving.chat_service import ChatService

    class KeepingChat:
        def __init__(self) -> None:
            self.history: list = []

        def send(self, text, images):
            self.history.append({"role": "user", "content": text, "images": list(images)})
            return GenerationResult([TextPart("ok")])

    url = "data:image/png;base64," + base64.b64encode(big_png(4096)).decode()
    options = dict(max_image_side=10**6, decode_budget_pixels=10**12, max_held_pixels=10**12) if keep_whole else {}
    service = ChatService(KeepingChat, max_image_pixels=20_000_000, max_sessions_per_client=100,
                          max_request_bytes=64 * 2**20, **options)
    before = rss_mb()
    threads = [threading.Thread(target=service.reply, args=(None, f"c{i}", {"text": "hi", "images": [url] * 4}))
               for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = sum(session.pixels for session in service.store.sessions.values())
    return {"case": "serve", "keep_whole": keep_whole, "png_bytes": len(url), "sessions": len(service.store.sessions),
            "held_pixels": held, "rss_before_mb": round(before), "peak_rss_mb": round(peak_mb()),
            "rss_after_mb": round(rss_mb())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["download", "serve"])
    parser.add_argument("--budget", type=int, default=200_000_000)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--keep-whole", action="store_true")
    args = parser.parse_args()
    if args.case == "download":
        print(json.dumps(run_download(args.budget, args.decode_threads)))
        return
    if args.case == "serve":
        print(json.dumps(run_serve(args.keep_whole)))
        return
    for extra in (["--case", "download"], ["--case", "download", "--decode-threads", "16"],
                  ["--case", "download", "--budget", str(10**12), "--decode-threads", "16"],
                  ["--case", "serve"], ["--case", "serve", "--keep-whole"]):
        result = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, check=True)
        print(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
