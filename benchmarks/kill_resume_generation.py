"""Fault tolerance of ``synth generate``: SIGKILL it at random moments, resume, count losses and duplicates.

A loopback OpenAI-compatible server answers with a fixed latency. The
generate stage (a real process) is killed with SIGKILL at a random time, N
times in a row, then run to completion. Reported:

- lost: conversations that were on disk after some kill but not at the end,
  plus groups never generated;
- duplicated: group ids written more than once;
- repaired: half-written last lines cut off by a kill and removed on resume.

    python benchmarks/kill_resume_generation.py --kills 20
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYNTH = str(Path(sys.executable).parent / "synth")
CONFIG = str(REPO / "configs" / "synth" / "sample.yaml")


def ids_on_disk(path: Path) -> tuple[list[str], bool]:
    if not path.exists():
        return [], False
    data = path.read_bytes()
    cut = bool(data) and not data.endswith(b"\n")
    lines = data.splitlines()[:-1] if cut else data.splitlines()
    return [json.loads(line)["group_id"] for line in lines if line.strip()], cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--groups", type=int, default=120)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp()) / "run"
    overrides = [f"work_dir={work}", f"sample.num_groups={args.groups}"]
    subprocess.run([SYNTH, "run", "--config", CONFIG, "--until", "sample", *overrides], check=True,
                   capture_output=True)
    server = subprocess.Popen([sys.executable, "-m", "synth.testing", "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().strip()
    generate = [SYNTH, "generate", "--config", CONFIG, *overrides, "generate.backend=openai",
                f"generate.base_url={url}", "generate.model=loopback", "generate.api_key_env=NO_KEY",
                "generate.concurrency=4"]
    path = work / "generate" / "generations.jsonl"
    seen: set[str] = set()
    cuts = 0
    try:
        for kill in range(args.kills):
            process = subprocess.Popen(generate, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.0, 4.0))
            process.send_signal(signal.SIGKILL)
            process.wait()
            ids, cut = ids_on_disk(path)
            cuts += cut
            seen.update(ids)
            print(f"kill {kill + 1:2d}: {len(set(ids)):3d}/{args.groups} groups on disk"
                  f"{' (last line cut)' if cut else ''}")
        subprocess.run(generate, check=True, capture_output=True)
    finally:
        server.terminate()
    final, cut = ids_on_disk(path)
    counts = collections.Counter(final)
    lost = len(seen - set(final)) + (args.groups - len(set(final)))
    duplicated = sum(count - 1 for count in counts.values())
    print(f"after {args.kills} SIGKILLs and a final run: {len(set(final))}/{args.groups} groups, "
          f"lost {lost}, duplicated {duplicated}, half-written lines repaired {cuts}")


if __name__ == "__main__":
    main()
