"""The offline quick start: every model part built, run once, and the sample data summarised.

It runs on the bundled defaults with no network: tiny random-weight models
and the sample conversations over scikit-image's photographs. The numbers it
prints show that each part is wired correctly; with random weights they say
nothing about quality. Pointing ``--models`` at ``configs/models/paper.yaml``
runs the same steps on the paper's checkpoints (needs the hub and a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from synth.data.conversation_io import read_conversations
from synth.samples import CONVERSATIONS_FILE, LLAVA_CONVERSATIONS_FILE, sample_image_dir
from synth.data.schema import Conversation
from synth.statistics.stats import describe
from synth.model_parts import ModelSource, build_blip2, build_clip, build_llm, build_sdxl
from synth.model_parts.llm import chat_template_name
from synth.model_parts.health import input_share

PARTS = ("llm", "blip2", "clip", "sdxl")


def load_model_sources(path: Path | None) -> dict[str, ModelSource]:
    """Model sources per part from a YAML file (``configs/models/*.yaml``); tiny presets by default."""
    if path is None:
        return {part: ModelSource(preset="tiny") for part in PARTS}
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from synth.resolvers import config_error_message, register_resolvers

    register_resolvers()
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, ValueError) as error:  # e.g. ${package_dir:...} of a missing package
        raise ValueError(f"{path}: {config_error_message(error)}") from None
    if not isinstance(raw, dict) or set(raw) != set(PARTS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path}: expected exactly the keys {list(PARTS)}, found {found}")
    sources = {}
    for part in PARTS:
        try:
            sources[part] = ModelSource.parse(raw[part])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: bad source for {part!r}: {error}") from None
    return sources


def _timed(label: str, build: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = build()
    print(f"  {label:<28} {time.perf_counter() - start:6.2f} s")
    return value


def _parameters(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,} parameters"


def _load_images(conversation: Conversation, root: Path) -> list:
    from PIL import Image

    return [Image.open(conversation.image_path(name, root)).convert("RGB") for name in conversation.images]


def summarise_samples() -> list[Conversation]:
    conversations, report = read_conversations([CONVERSATIONS_FILE, LLAVA_CONVERSATIONS_FILE], on_error="skip")
    print(f"Sample conversations: {report.summary()}")
    for error in report.rejected:
        print(f"  rejected: {error}")
    root = sample_image_dir()
    missing = [(c.id, name) for c in conversations for name in c.images if not c.image_path(name, root).is_file()]
    total_images = sum(len(c.images) for c in conversations)
    print(f"  images referenced: {total_images}, missing on disk: {len(missing)} (under {root})")
    for record_id, name in missing:
        print(f"  missing: {name} in record {record_id!r}")
    print(describe(conversations), end="")
    return conversations


@torch.no_grad()
def exercise_models(sources: dict[str, ModelSource], conversations: list[Conversation], out_dir: Path,
                    seed: int) -> Path:
    """Build each part and run it once on the sample data; returns the generated image's path."""
    torch.manual_seed(seed)
    root = sample_image_dir()
    first = conversations[0]
    images = _load_images(first, root)
    print("Building model parts:")
    llm = _timed(f"LLM ({_describe(sources['llm'])})", lambda: build_llm(sources["llm"]))
    blip2 = _timed(f"BLIP-2 ({_describe(sources['blip2'])})", lambda: build_blip2(sources["blip2"]))
    clip = _timed(f"CLIP ({_describe(sources['clip'])})", lambda: build_clip(sources["clip"]))
    sdxl = _timed(f"SDXL ({_describe(sources['sdxl'])})", lambda: build_sdxl(sources["sdxl"]))

    print("Forward passes on the first sample conversation:")
    pixels = blip2.image_processor(images=images, return_tensors="pt")["pixel_values"]
    queries = blip2.encode(pixels)
    print(f"  BLIP-2: {len(images)} image(s) {tuple(pixels.shape)} -> query outputs {tuple(queries.shape)}; "
          f"{_parameters(blip2.vision_model)} vision, {_parameters(blip2.qformer)} Q-Former")
    if len(images) > 1:  # a blind tower (0%) gives every picture the same queries
        print(f"  BLIP-2 sees: {100 * input_share(queries):.0f}% of the query outputs' variance comes from "
              f"which picture they read (0% would be a blind tower)")

    messages = [{"role": t.role, "content": t.content} for t in first.turns]
    ids = llm.tokenizer.apply_chat_template(messages, tokenize=True, return_tensors="pt", return_dict=True)
    output = llm.model(input_ids=ids["input_ids"], labels=ids["input_ids"])
    print(f"  LLM: {ids['input_ids'].shape[1]} tokens ({chat_template_name(llm.tokenizer)}) -> logits "
          f"{tuple(output.logits.shape)}, LM loss {output.loss.item():.3f} "
          f"(ln|V| = {torch.log(torch.tensor(float(len(llm.tokenizer)))).item():.3f} is chance); "
          f"{_parameters(llm.model)}")

    captions = [caption for turn in first.turns for caption in turn.caption_list]
    scores = clip.match_scores(images, captions)
    print(f"  CLIP: match scores (100 x cosine, section 3.2) for {len(captions)} pairs: "
          + ", ".join(f"{s:.1f}" for s in scores.tolist()))

    caption = next(c for turn in first.turns if turn.role == "assistant" for c in turn.caption_list)
    sdxl.set_progress_bar_config(disable=True)
    size = 64 if sources["sdxl"].preset else 1024
    image = sdxl(prompt=caption, num_inference_steps=2 if sources["sdxl"].preset else 40, height=size, width=size,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = out_dir / "sdxl_sample.png"
    image.save(image_path)
    print(f"  SDXL: {caption!r} -> {image.size[0]}x{image.size[1]} image at {image_path}")
    return image_path


def _describe(source: ModelSource) -> str:
    return f"preset {source.preset}" if source.preset else source.pretrained


def quickstart(out_dir: Path = Path("quickstart_out"), models: Path | None = None, seed: int = 0) -> int:
    """Run the offline quick start: summarise the sample data, build and run every model part.

    Args:
        out_dir: where generated files go.
        models: YAML naming the source of each part (configs/models/*.yaml); tiny presets if omitted.
        seed: random seed for weights and sampling.
    """
    start = time.perf_counter()
    sources = load_model_sources(models)
    conversations = summarise_samples()
    exercise_models(sources, conversations, out_dir, seed)
    print(f"Quick start finished in {time.perf_counter() - start:.1f} s. Next: `synth run --config "
          "configs/synth/sample.yaml`, then `mim fit --config configs/textbind/tiny_stage1_alignment.yaml` "
          "and tiny_stage2_instruction.yaml (README).")
    return 0
