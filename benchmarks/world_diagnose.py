"""Why a world MIM misses what it misses: three measurements that tell "cannot see" from "cannot bind" from
"has not learned yet".

- ``by-objects``: a finished run's answers by question type and by how many shapes the asked picture holds
  (for "which", how many pictures). A model that names the colour of a lone shape but not of one among
  three sees colour and fails to bind it; one that misses a lone shape's shape does not see shape.
- ``training-fit``: the same answer keys on the run's own training conversations. Training accuracy no
  higher than test accuracy means the model underfits (budget, optimisation), not that it overfits.
- ``qformer-capacity``: a new Q-Former (the world's config) trained *directly* on the frozen world tower's
  states to name a lone shape's shape and the shape of the red one among two or three. Near 1.0 means the
  tower and the Q-Former's architecture can carry it, so a miss lies in the training signal, not the parts.
- ``caption-preference``: how often the world CLIP scores a new picture's own caption above the same caption
  with one shape, colour or size word changed (:mod:`synth.world.caption_checks`; chance 0.5). The tower and
  the Q-Former are pre-trained against this CLIP: what it cannot tell apart, they do not learn.
- ``query-spread``: how much of the query outputs changes with the picture, and whether one picture's queries
  differ from one another (:mod:`mim.evaluation.query_spread`), for a random Q-Former of the world's config,
  the world parts' pre-trained one, and the image embeddings of every finished run.

    python benchmarks/world_diagnose.py by-objects --world runs/world
    python benchmarks/world_diagnose.py training-fit --world runs/world --run language-seed0 --conversations 200
    python benchmarks/world_diagnose.py qformer-capacity --world runs/world
    python benchmarks/world_diagnose.py query-spread --world runs/world
    python benchmarks/world_diagnose.py caption-preference --world runs/world --pictures 600
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch


def by_objects(world: Path, split: str) -> None:
    from mim.experiments.world_breakdown import answers_by_objects

    rows: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    runs = sorted(p for p in (world / "runs").iterdir() if (p / "eval" / split / "answers.jsonl").is_file())
    for run in runs:
        for key, (right, turns) in answers_by_objects(world / "world" / split / "conversations.jsonl",
                                                      world / "world" / split / "scenes.jsonl",
                                                      run / "eval" / split / "answers.jsonl").items():
            rows[(run.name.rsplit("-seed", 1)[0], *key)][0] += right
            rows[(run.name.rsplit("-seed", 1)[0], *key)][1] += turns
    print(f"{split}: accuracy by question type and shapes in the asked picture (pictures, for 'which'), "
          f"pooled over {len(runs)} runs\n")
    print("| head | type | shapes | accuracy | turns |")
    print("|---|---|---|---|---|")
    for (head, kind, objects), (right, turns) in sorted(rows.items()):
        print(f"| {head} | {kind} | {objects} | {right / turns:.2f} | {turns} |")


def training_fit(world: Path, run: str, count: int, out: Path) -> None:
    from mim.evaluation.held_out import ModelResponder, answer_correctness, evaluate_cases, replay_cases
    from mim.experiments.world import generation_settings
    from mim.modeling.directory import load_model
    from synth.model_parts.sdxl import build_sdxl

    source = world / "synth" / "filter" / "conversations.jsonl"
    lines = source.read_text().splitlines()
    random.Random(0).shuffle(lines)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "images").exists():  # the subset's image_dir resolves beside it
        (out / "images").symlink_to((source.parent / "images").resolve())
    subset = out / "training_subset.jsonl"
    subset.write_text("\n".join(lines[:count]) + "\n")
    model = load_model(world / "runs" / run / "stage2" / "checkpoints" / "last.ckpt").eval()
    # as the run's own evaluation answered (its plan, in report.json)
    settings = generation_settings(json.loads((world / "report.json").read_text())["plan"]["max_new_tokens"])
    cases, _ = replay_cases([str(subset)])
    report = evaluate_cases(cases, ModelResponder(model, build_sdxl({"pretrained": str(world / "parts" / "sdxl")}),
                                                  settings=settings), out / run,
                            metrics={"correct": answer_correctness})
    test = json.loads((world / "runs" / run / "eval" / "evaluation.json").read_text())["test"]["answers"]
    print(f"{run}: {count} training conversations against the test split\n")
    print("| type | training accuracy | turns | test accuracy | chance |")
    print("|---|---|---|---|---|")
    for kind, row in report["answers"].items():
        print(f"| {kind} | {row['accuracy']:.2f} | {row['turns']} | {test.get(kind, {}).get('accuracy', float('nan')):.2f} "
              f"| {row['chance']:.2f} |")


def _fresh_qformer(parts):
    """A new Q-Former of the world parts' config, and new queries drawn as the world parts draw theirs."""
    from transformers import Blip2QFormerModel

    config = parts.qformer.config
    qformer = Blip2QFormerModel(config.__class__(**config.to_dict()))
    queries = torch.randn(1, parts.query_tokens.shape[1], config.hidden_size) * config.hidden_size ** -0.5
    return qformer, queries


def _pixels(scenes):
    from synth.model_parts.blip2 import _image_processor
    from synth.world.parts import WORLD_IMAGE_SIZE
    from synth.world.scenes import render

    return _image_processor(WORLD_IMAGE_SIZE)(images=[render(s, WORLD_IMAGE_SIZE) for s in scenes],
                                              return_tensors="pt")["pixel_values"]


def qformer_capacity(world: Path, pictures: int, steps: int) -> None:
    from synth.model_parts import build_blip2
    from synth.world.scenes import POSITIONS, SHAPES, world_pairs

    parts = build_blip2({"pretrained": str(world / "parts" / "blip2")})
    drawn = list(world_pairs(12 * pictures, 3, "train"))
    lone = [s for s in drawn if s.count == 1][:pictures]
    tasks = {  # name: (pictures, label, classes)
        "shape of a lone shape": (lone, lambda s: s.objects[0].shape, SHAPES),
        "position of a lone shape": (lone, lambda s: s.objects[0].position, POSITIONS),
        "shape of the red one among 2-3": (
            [s for s in drawn if s.count >= 2 and [o.colour for o in s.objects].count("red") == 1][:pictures],
            lambda s: next(o.shape for o in s.objects if o.colour == "red"), SHAPES),
    }
    print(f"a new Q-Former trained on the frozen tower's states ({steps} steps of 64, 3/4 of {pictures} "
          "pictures; held-out quarter scored); chance: shape 0.25, position 0.33\n")
    print("| task | linear probe on the tower's states | Q-Former, trained on the task |")
    print("|---|---|---|")
    for name, (scenes, label, classes) in tasks.items():
        with torch.no_grad():
            states = parts.vision_model(pixel_values=_pixels(scenes)).last_hidden_state
        y = torch.tensor([classes.index(label(s)) for s in scenes])
        cut = 3 * len(scenes) // 4
        scores = []
        for reader in ("linear", "qformer"):
            torch.manual_seed(0)
            if reader == "linear":
                head = torch.nn.Linear(states[0].numel(), len(classes))
                modules, read = [head], lambda s, head=head: head(s.flatten(1))
            else:
                qformer, queries = _fresh_qformer(parts)
                queries = torch.nn.Parameter(queries)
                head = torch.nn.Linear(queries[0].numel(), len(classes))
                modules = [qformer, head, torch.nn.ParameterList([queries])]

                def read(s, qformer=qformer, queries=queries, head=head):
                    return head(qformer(query_embeds=queries.expand(len(s), -1, -1),
                                        encoder_hidden_states=s).last_hidden_state.flatten(1))
            parameters = [p for module in modules for p in module.parameters()]
            optimizer = torch.optim.AdamW(parameters, lr=2e-3)
            generator = torch.Generator().manual_seed(0)
            for module in modules:
                module.train()
            for _ in range(steps):
                index = torch.randint(0, cut, (64,), generator=generator)
                loss = torch.nn.functional.cross_entropy(read(states[index]), y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            for module in modules:
                module.eval()
            with torch.no_grad():
                scores.append(float((read(states[cut:]).argmax(-1) == y[cut:]).float().mean()))
        print(f"| {name} | {scores[0]:.2f} | {scores[1]:.2f} |")


@torch.no_grad()
def query_spreads(world: Path, pictures: int) -> None:
    from mim.evaluation.query_spread import query_spread
    from mim.modeling.directory import load_model
    from synth.model_parts import build_blip2
    from synth.world.scenes import world_pairs

    parts = build_blip2({"pretrained": str(world / "parts" / "blip2")})
    scenes = list(world_pairs(pictures, 5, "train"))
    pixels = _pixels(scenes)
    states = parts.vision_model(pixel_values=pixels).last_hidden_state
    torch.manual_seed(0)
    random_qformer, random_queries = _fresh_qformer(parts)
    rows = {"a random Q-Former (the world's config)": random_qformer.eval()(
                query_embeds=random_queries.expand(len(scenes), -1, -1), encoder_hidden_states=states
            ).last_hidden_state,
            "the world parts' Q-Former (pre-trained)": parts.qformer(
                query_embeds=parts.query_tokens.expand(len(scenes), -1, -1), encoder_hidden_states=states
            ).last_hidden_state}
    for run in sorted(p for p in (world / "runs").iterdir() if (p / "stage2" / "checkpoints" / "last.ckpt").is_file()):
        model = load_model(run / "stage2" / "checkpoints" / "last.ckpt").eval()
        rows[f"image embeddings, {run.name} (after stage 2)"] = model.encode_images(pixels)
    print(f"{len(scenes)} world pictures. picture share: of the outputs' spread, what changes with the picture; "
          "query share: of that, what differs between one picture's queries (mim.evaluation.query_spread)\n")
    print("| query outputs | picture share | query share | mean cosine between queries |")
    print("|---|---|---|---|")
    for name, outputs in rows.items():
        spread = query_spread(outputs)
        print(f"| {name} | {spread['picture_share']:.3f} | {spread['query_share']:.3f} | {spread['mean_cosine']:.3f} |")


def caption_preferences(world: Path, pictures: int) -> None:
    from synth.model_parts.clip import build_clip
    from synth.world.caption_checks import caption_preference
    from synth.world.parts import WORLD_IMAGE_SIZE
    from synth.world.scenes import render, world_pairs

    scenes = [s for s in world_pairs(pictures, 99, "train") if not s.mismatched]
    preference = caption_preference(build_clip({"pretrained": str(world / "parts" / "clip")}),
                                    [render(s, WORLD_IMAGE_SIZE) for s in scenes], [s.caption for s in scenes])
    print(f"{len(scenes)} new world pictures: how often the world CLIP scores a picture's own caption above it with "
          "one word of a class changed (chance 0.50)\n")
    print("| word changed | prefers its own caption |")
    print("|---|---|")
    for word, share in preference.items():
        print(f"| {word} | {share:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["by-objects", "training-fit", "qformer-capacity", "query-spread",
                                         "caption-preference"])
    parser.add_argument("--world", default="runs/world", help="a `mim world` out_dir")
    parser.add_argument("--split", default="test", help="by-objects: test or held_out")
    parser.add_argument("--run", default="language-seed0", help="training-fit: which run")
    parser.add_argument("--conversations", type=int, default=200, help="training-fit: how many")
    parser.add_argument("--out", default="runs/world_diagnose", help="training-fit: where its answers go")
    parser.add_argument("--pictures", type=int, default=None,
                        help="qformer-capacity: pictures per task (2400); query-spread: pictures (256); "
                        "caption-preference: pictures drawn (600)")
    parser.add_argument("--steps", type=int, default=600, help="qformer-capacity: training steps")
    args = parser.parse_args()
    start = time.perf_counter()
    world = Path(args.world)
    if args.what == "by-objects":
        by_objects(world, args.split)
    elif args.what == "training-fit":
        training_fit(world, args.run, args.conversations, Path(args.out))
    elif args.what == "query-spread":
        query_spreads(world, args.pictures or 256)
    elif args.what == "caption-preference":
        caption_preferences(world, args.pictures or 600)
    else:
        qformer_capacity(world, args.pictures or 2400, args.steps)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
