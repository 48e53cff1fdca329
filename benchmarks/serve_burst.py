"""A burst of simultaneous requests against ``mim serve`` with a tiny model: does every one get an answer?

Starts the real ``mim serve`` process on a tiny random-weight MIM, fires N
requests at once from N threads, each on its own connection, and counts the
answers by status: 200 (a reply) or 503 (busy, with a message), and any
request that got no HTTP answer (a reset or a closed connection). Also prints
the latency of the replies.

    python benchmarks/serve_burst.py                   # 50 at once, 3 rounds
    python benchmarks/serve_burst.py --requests 200 --max-waiting 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def make_model(directory: Path) -> Path:
    from heads import LanguageDescriptionHead
    from mim import MIM
    from mim.modeling.directory import save_directory

    return save_directory(MIM(head=LanguageDescriptionHead(), llm={"preset": "tiny"}, blip2={"preset": "tiny"}),
                          directory / "mim", sdxl={"preset": "tiny"})


def post(url: str, index: int) -> tuple[int | str, float]:
    body = json.dumps({"text": f"Tell me something, request {index}."}).encode()
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            json.loads(response.read())
            return response.status, time.perf_counter() - start
    except urllib.error.HTTPError as error:
        message = json.loads(error.read()).get("error", "")  # every refusal carries a message
        return (error.code if message else f"{error.code} without a message"), time.perf_counter() - start
    except (ConnectionError, urllib.error.URLError, OSError) as error:
        return f"no answer ({type(error).__name__})", time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-waiting", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = make_model(Path(scratch))
        mim = str(Path(sys.executable).parent / "mim")
        server = subprocess.Popen([mim, "serve", str(model), "--port", "0", "--max_waiting", str(args.max_waiting),
                                   "--max_new_tokens", str(args.max_new_tokens), "--max_images", "0",
                                   "--max_sessions_per_client", str(args.requests)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split(" on ", 1)[1].split()[0] + "api/chat"
            for round_number in range(1, args.rounds + 1):
                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=args.requests) as pool:
                    results = list(pool.map(lambda i: post(url, i), range(args.requests)))
                seconds = time.perf_counter() - start
                statuses = Counter(status for status, _ in results)
                replies = sorted(latency for status, latency in results if status == 200)
                answered = sum(count for status, count in statuses.items() if isinstance(status, int))
                median = replies[len(replies) // 2] if replies else float("nan")
                print(f"round {round_number}: {args.requests} requests at once -> {answered} answered "
                      f"({dict(statuses)}) in {seconds:.2f} s; replies: median {median:.2f} s, "
                      f"slowest {replies[-1] if replies else float('nan'):.2f} s")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
