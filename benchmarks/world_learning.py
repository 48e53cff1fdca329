"""Does a tiny MIM learn in the world? Stage 2 through `mim fit` on world conversations, then `mim evaluate`'s
answer accuracy by question type on new pictures (seen colour-shape combinations, and held-out ones), next
to chance and next to the blank-picture control.

This is the first part of the world experiment (CHANGELOG): the LLM and the vision tower are the tiny random
presets, trained here from scratch in stage 2 (no world-pretrained parts yet), with the language head.

    python benchmarks/world_learning.py --steps 600
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def build(root: Path, scenes: int, conversations: int, seed: int) -> dict[str, Path]:
    from synth.world.dialogues import write_conversations
    from synth.world.scenes import read_scenes, write_world

    files = {}
    for name, split, count, world_seed, talk in [("train", "train", scenes, seed, conversations),
                                                 ("test", "train", scenes // 5, seed + 1000, conversations // 8),
                                                 ("held_out", "held_out", scenes // 5, seed + 2000, conversations // 8)]:
        folder = root / name
        records = read_scenes(write_world(folder, count, world_seed, split, 0.0, 64))
        files[name] = write_conversations(records, folder / "conversations.jsonl", talk, world_seed, prefix=name)
    return files


def evaluate(checkpoint: Path, data: Path, out: Path, blank: bool, max_cases: int) -> dict:
    from mim.evaluation.held_out import ModelResponder, evaluate_cases, replay_cases
    from mim.inference.interleaved import GenerationSettings
    from mim.modeling.directory import load_model

    model = load_model(checkpoint).eval()
    cases, _ = replay_cases([str(data)], max_cases=max_cases)
    cases = [case for case in cases if case.answer and case.answer.get("choices")]
    responder = ModelResponder(model, None, settings=GenerationSettings(max_new_tokens=16, do_sample=False,
                                                                        max_images=0), blank_images=blank)
    return evaluate_cases(cases, responder, out)["answers"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--scenes", type=int, default=1500)
    parser.add_argument("--conversations", type=int, default=1600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_cases", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = args.out or Path(tempfile.mkdtemp(prefix="world-"))
    start = time.perf_counter()
    files = build(root, args.scenes, args.conversations, args.seed)
    from mim.experiments.world import fit, fit_config

    data = {"class_path": "datamodules.ConversationDataModule",
            "init_args": {"train": [{"path": str(files["train"])}], "batch_size": 8, "num_workers": 0}}
    checkpoint = fit(root / "run", fit_config(root / "run", "instruction", "language", args.steps, args.lr,
                                              {"llm": {"preset": "tiny"}, "blip2": {"preset": "tiny"}}, data,
                                              args.seed, []))
    trained = time.perf_counter() - start
    results = {}
    for name in ("test", "held_out"):
        for blank in (False, True):
            results[f"{name}{' blank' if blank else ''}"] = evaluate(
                checkpoint, files[name], root / f"eval-{name}{'-blank' if blank else ''}", blank, args.max_cases)
    print(f"\nworld: {args.scenes} scenes, {args.conversations} conversations, {args.steps} steps, "
          f"trained in {trained:.0f} s, total {time.perf_counter() - start:.0f} s ({root})")
    kinds = sorted({kind for table in results.values() for kind in table})
    print("| question type | chance | " + " | ".join(results) + " |")
    print("|---|---|" + "---|" * len(results))
    for kind in kinds:
        chance = next(table[kind]["chance"] for table in results.values() if kind in table)
        cells = [f"{table[kind]['accuracy']:.2f} ({table[kind]['turns']})" if kind in table else "-"
                 for table in results.values()]
        print(f"| {kind} | {chance:.2f} | " + " | ".join(cells) + " |")
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
