"""Generation throughput against a loopback endpoint with a fixed latency.

The ceiling for C requests in flight and a latency of T seconds is C / T
conversations per second; the figure is the measured rate as a fraction of
it (1.0 = the client adds no overhead). Uses the real ``openai`` client and
``synth.generation.generate`` end to end, over HTTP on 127.0.0.1; the server runs in its
own process so that its CPU time is not charged to the client's event loop.

    python benchmarks/generation_rate.py                  # 1, 8, 64 in flight, 200 ms
    python benchmarks/generation_rate.py --in-flight 128 --latency 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from synth.generation.backends import OpenAIChatBackend
from synth.generation.generate import generate_groups
from synth.generation.prompt import read_seed_set


@contextmanager
def loopback(latency: float):
    server = subprocess.Popen([sys.executable, "-m", "synth.testing", "--latency", str(latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        yield server.stdout.readline().strip()
    finally:
        server.terminate()
        server.wait(timeout=30)


def groups(count: int) -> list[dict]:
    return [{"group_id": f"g{n:05d}", "cluster": 0,
             "pairs": [{"id": f"p{n}-{i}", "image": f"/x/{n}-{i}.png", "caption": f"photo {i} of scene {n}"}
                       for i in range(3)]} for n in range(count)]


def measure(in_flight: int, latency: float, rounds: int) -> tuple[float, float]:
    count = in_flight * rounds
    with loopback(latency) as url, tempfile.TemporaryDirectory() as out:
        warm = OpenAIChatBackend("bench", url, api_key_env="NO_KEY", timeout=30)
        asyncio.run(generate_groups(groups(1), warm, out + "/warm", read_seed_set()))
        backend = OpenAIChatBackend("bench", url, api_key_env="NO_KEY", timeout=30)
        start = time.perf_counter()
        tally = asyncio.run(generate_groups(groups(count), backend, out, read_seed_set(), concurrency=in_flight))
        elapsed = time.perf_counter() - start
    assert tally.generated == count, tally
    rate = count / elapsed
    return rate, rate / (in_flight / latency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=10, help="requests per in-flight slot")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    print(f"latency {args.latency * 1000:.0f} ms, {args.rounds} requests per slot")
    print(f"{'in flight':>9}  {'conv/s':>8}  {'ceiling':>8}  {'fraction':>8}")
    for in_flight in args.in_flight:
        rate, fraction = measure(in_flight, args.latency, args.rounds)
        print(f"{in_flight:>9}  {rate:8.1f}  {in_flight / args.latency:8.1f}  {fraction:8.3f}")


if __name__ == "__main__":
    main()
