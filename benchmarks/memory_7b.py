"""GPU memory per device for MIM's training at the paper's size, by stage and strategy (computed).

Exact parameter counts (Llama-2-7b, BLIP-2's ViT-g and Q-Former, built on the
meta device) times the bytes each strategy keeps per parameter
(:mod:`mim.modeling.memory`); weights, gradients and AdamW states only, no activations.

    python benchmarks/memory_7b.py --devices 8
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--lora_rank", type=int, default=16)
    args = parser.parse_args()
    from mim.modeling.memory import memory_table, paper_part_sizes

    sizes = paper_part_sizes(lora_rank=args.lora_rank)
    print(f"parameters: LLM {sizes.llm:,}; vision {sizes.vision:,}; Q-Former side {sizes.qformer:,}; "
          f"head {sizes.head:,}; LoRA r={args.lora_rank} {sizes.lora:,}")
    rows = memory_table(sizes, args.devices)
    strategies = list(dict.fromkeys(row["strategy"] for row in rows))
    print(f"\n| stage ({args.devices} GPUs) | trained | " + " | ".join(strategies) + " |")
    print("|---|---|" + "---|" * len(strategies))
    for stage in dict.fromkeys(row["stage"] for row in rows):
        cells = [row for row in rows if row["stage"] == stage]
        text = [f"{row['gpu_gib']:.1f}" + (f" (+{row['host_gib']:.1f} host)" if row["host_gib"] else "")
                for row in cells]
        print(f"| {stage} | {cells[0]['trained'] / 1e6:,.0f}M | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
