"""What the world MIM's vision path keeps of a picture: linear probes, stage by stage.

On pictures of one shape (new ones, from the world's test split), a logistic-regression probe (torch, trained on
two thirds, scored on the rest) reads the shape's colour, shape and position from:

- the vision tower's states (their mean, and all 65 flattened), frozen in every stage;
- the Q-Former's 32 query outputs (flattened) as the world parts leave them (pre-trained against captions);
- the image embeddings a trained MIM gives its LLM (Q-Former, then projection; flattened), for each MIM named.

A property the captions never state (position: no world caption says where anything is) and the query outputs
lose while the tower keeps it would explain answers at chance for "where is the X?".

    python benchmarks/world_probe.py --world runs/world --mims '[runs/world/mim/language-seed0]'
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def probe(features: torch.Tensor, labels: list[str], steps: int = 400, seed: int = 0) -> float:
    """Held-out accuracy of a linear probe (full-batch AdamW, standardised features)."""
    with torch.enable_grad():
        return _probe(features.detach(), labels, steps, seed)


def _probe(features: torch.Tensor, labels: list[str], steps: int, seed: int) -> float:
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    cut = 2 * len(y) // 3
    train, test = order[:cut], order[cut:]
    x = features.float()
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x[train]), y[train]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((linear(x[test]).argmax(-1) == y[test]).float().mean())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="runs/world", help="a `mim world` out_dir (its parts and test pictures)")
    parser.add_argument("--mims", default="[]", help="MIM directories to probe: '[DIR, DIR]'")
    parser.add_argument("--pictures", type=int, default=900, help="one-shape pictures to render")
    args = parser.parse_args()
    from synth.model_parts import build_blip2
    from synth.model_parts.blip2 import _image_processor
    from synth.world.parts import WORLD_IMAGE_SIZE
    from synth.world.scenes import render, world_pairs

    scenes = [s for s in world_pairs(6 * args.pictures, 77, "train") if s.count == 1][:args.pictures]
    pixels = _image_processor(WORLD_IMAGE_SIZE)(images=[render(s, WORLD_IMAGE_SIZE) for s in scenes],
                                                 return_tensors="pt")["pixel_values"]
    labels = {"colour": [s.objects[0].colour for s in scenes], "shape": [s.objects[0].shape for s in scenes],
              "position": [s.objects[0].position for s in scenes]}
    parts = build_blip2({"pretrained": str(Path(args.world) / "parts" / "blip2")})
    states = parts.vision_model(pixel_values=pixels).last_hidden_state  # (N, 65, Dv)
    queries = parts.qformer(query_embeds=parts.query_tokens.expand(len(scenes), -1, -1),
                            encoder_hidden_states=states).last_hidden_state  # (N, 32, Dq)
    features = {"vision tower (mean of its states)": states.mean(1),
                "vision tower (every state, flattened)": states.flatten(1),
                "Q-Former outputs, world parts (before any stage)": queries.flatten(1)}
    from mim.modeling.directory import load_directory

    for directory in [d.strip() for d in args.mims.strip("[]").split(",") if d.strip()]:
        model = load_directory(directory).eval()
        features[f"image embeddings the LLM gets, {Path(directory).name}"] = model.encode_images(pixels).flatten(1)
    print(f"{len(scenes)} one-shape pictures; chance: colour 0.17, shape 0.25, position 0.33\n")
    print("| features | colour | shape | position |")
    print("|---|---|---|---|")
    for name, values in features.items():
        accuracy = {kind: probe(values, labels[kind]) for kind in labels}
        print(f"| {name} | {accuracy['colour']:.2f} | {accuracy['shape']:.2f} | {accuracy['position']:.2f} |")


if __name__ == "__main__":
    main()
