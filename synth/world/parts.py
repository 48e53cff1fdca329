"""Pretrained parts for the world, trained here on a CPU in minutes and saved as real checkpoints are.

A MIM built from random tiny presets must learn language, vision and grounding at once in stage 2, and on
this world it stays at chance (benchmarks/README.md). The paper's MIM starts from pretrained parts and
freezes them (section 5.1-5.2); these are the world's equivalents:

- ``llm/``: a tiny Llama pre-trained on the world's text (captions and dialogue text, pictures left out),
  saved with ``save_pretrained`` (safetensors, tokenizer, chat template): ``llm: {pretrained: DIR}``.
- ``clip/``: a CLIP-architecture model trained contrastively on matched world pairs: ``synth score``'s and
  ``mim evaluate``'s CLIP (``clip: {pretrained: DIR}``); its calibrated match threshold is recorded in
  ``clip/world_threshold.json`` because the paper's 30 belongs to OpenAI's CLIP, not this one; its marker
  records what it tells apart (``prefers_own_caption``, :mod:`synth.world.caption_checks`), which bounds what
  the tower and the Q-Former, trained against it, can learn.
- ``blip2/``: a BLIP-2-layout directory (``config.json``, ``model.safetensors`` with ``vision_model.*``,
  ``qformer.*`` and ``query_tokens``, ``preprocessor_config.json``) whose vision tower was trained against the
  world CLIP's frozen text side, so what it sees is what captions say, and whose Q-Former and queries were
  trained with BLIP-2's image-text contrastive objective, as BLIP-2's are before any LLM sees them (a random
  Q-Former leaves the picture 14% of its output's spread after stage 1: the queries become a soft prompt and
  stage 2 answers from the language prior). ``blip2: {pretrained: DIR}``.

The tower runs at 64 px (8 px patches: 64 patches): at 32 px a small shape is 5 px across and a linear probe
of the random tower tells shapes apart 70% of the time (colours and positions 98%).

Each part is cached: a directory with its ``trained.json`` is kept, so a rerun costs nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from synth.world.scenes import Scene

WORLD_IMAGE_SIZE = 64
WORLD_PATCH = 8
MARKER = "trained.json"


def is_trained(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a finished part (its ``trained.json`` is written last)."""
    return (Path(folder) / MARKER).is_file()


#: what a marker written before a setting existed was trained with
_BEFORE_RECORDED = {"layout_weight": 0.0, "caption_weight": 0.0, "hidden_size": 64, "layers": 2}


def trained_with(folder: str | os.PathLike[str], **settings: Any) -> bool:
    """Whether ``folder`` holds a finished part trained with ``settings`` (as its marker records them). A part
    trained otherwise is refused, not reused: a rerun that changes a budget must not silently keep the old part."""
    if not is_trained(folder):
        return False
    record = json.loads((Path(folder) / MARKER).read_text())
    differing = [f"{key} {record.get(key, _BEFORE_RECORDED.get(key))}, not {value}" for key, value in settings.items()
                 if record.get(key, _BEFORE_RECORDED.get(key)) != value]
    if differing:
        raise ValueError(f"{folder} holds a {record.get('part', 'part')} trained with {'; '.join(differing)}: "
                         "give another out_dir (or delete the folder to train it again)")
    return True


def _mark(folder: Path, record: dict[str, Any]) -> None:
    from synth.atomic import atomic_write_text

    atomic_write_text(folder / MARKER, json.dumps(record, indent=1) + "\n")


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", mininterval=2.0, disable=None)


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- the language model --------------------------------------------------------------------------------


def world_texts(scenes: Iterable[Scene], conversations: Iterable[dict[str, Any]], tokenizer) -> list[str]:
    """What the world's LLM reads: every matched caption, and every dialogue through the chat template with
    its pictures left out (the LLM never sees pictures; stage 1 teaches it to read them)."""
    texts = [scene.caption for scene in scenes if not scene.mismatched]
    for record in conversations:
        messages = [{"role": t["role"], "content": " ".join(t["content"].replace("<image>", " ").split())}
                    for t in record["conversation"]]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def pretrain_language_model(out_dir: str | os.PathLike[str], texts: list[str] | Callable[[], list[str]],
                            steps: int = 800,
                            batch_size: int = 16, block: int = 96, learning_rate: float = 3e-3,
                            seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Train the tiny Llama preset's architecture (``hidden_size`` wide, ``layers`` deep) on ``texts`` (causal
    LM, packed blocks) and save it. ``texts`` may be a function that builds them: it is called only when the
    model is to be trained, not when a part trained with these settings is already there."""
    from synth.model_parts.llm import tiny_llama_config
    from synth.model_parts.text_tokenizers import tiny_llama_tokenizer
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    if trained_with(out, steps=steps, seed=seed, hidden_size=hidden_size, layers=layers):
        return out
    if callable(texts):
        texts = texts()
    torch.manual_seed(seed)
    tokenizer = tiny_llama_tokenizer()
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"))["input_ids"]
        stream.append(tokenizer.eos_token_id)
    data = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    if len(data) < batch_size:
        raise ValueError(f"{len(stream)} tokens of world text make {len(data)} blocks of {block}; "
                         f"need at least {batch_size}")
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer, hidden_size, layers))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()

    def step_loss() -> torch.Tensor:
        batch = data[torch.randint(len(data), (batch_size,), generator=generator)]
        return model(input_ids=batch, labels=batch).loss

    losses = _optimise(list(model.parameters()), steps, learning_rate, "world LLM", step_loss)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _mark(out, {"part": "llm", "steps": steps, "hidden_size": hidden_size, "layers": layers, "tokens": len(stream),
                "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.perf_counter() - start, 1), "seed": seed})
    return out


# --- contrastive training, shared by the CLIP and the vision tower --------------------------------------


def _optimise(parameters: list, steps: int, learning_rate: float, description: str,
              step_loss: Callable[[], torch.Tensor]) -> list[float]:
    """AdamW (weight decay 0.01), warm-up then cosine, gradients clipped at 1, a progress bar: every part's
    training loop; ``step_loss`` draws its own batch. Returns the losses."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = _schedule(optimizer, steps, max(1, steps // 20))
    losses = []
    with _progress(steps, description) as bar:
        for _ in range(steps):
            loss = step_loss()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def _contrastive(steps: int, batch_size: int, count: int, parameters: list, description: str,
                 step_loss: Callable[[np.ndarray], torch.Tensor], learning_rate: float, seed: int) -> list[float]:
    """:func:`_optimise` over batches of distinct pairs (in-batch negatives must be other pairs)."""
    rng = np.random.default_rng(seed)
    return _optimise(parameters, steps, learning_rate, description,
                     lambda: step_loss(rng.choice(count, size=min(batch_size, count), replace=False)))


def _symmetric_infonce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    logits = scale * image @ text.T
    target = torch.arange(len(image))
    return (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def _pictures(scenes: list[Scene], folder: Path) -> list:
    from PIL import Image

    return [Image.open(folder / f"{scene.id}.png").convert("RGB") for scene in scenes]


def world_clip_processor():
    from synth.model_parts.text_tokenizers import tiny_clip_tokenizer
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": WORLD_IMAGE_SIZE},
                                            crop_size={"height": WORLD_IMAGE_SIZE, "width": WORLD_IMAGE_SIZE})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer())


def pretrain_clip(out_dir: str | os.PathLike[str], scenes: list[Scene], image_folder: str | os.PathLike[str],
                  calibration: list[Scene] | None = None, calibration_folder: str | os.PathLike[str] | None = None,
                  steps: int = 600, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0) -> Path:
    """A CLIP-architecture model trained on the matched pairs of ``scenes``; ``calibration`` (matched and
    mismatched pairs the training never saw) sets the match threshold recorded next to it."""
    from synth.model_parts.clip import tiny_clip_config
    from transformers import CLIPModel

    out = Path(out_dir)
    if trained_with(out, steps=steps, seed=seed):
        return out
    torch.manual_seed(seed)
    matched = [scene for scene in scenes if not scene.mismatched]
    processor = world_clip_processor()
    config = tiny_clip_config(len(processor.tokenizer), image_size=WORLD_IMAGE_SIZE)
    model = CLIPModel(config)
    pixels = processor.image_processor(images=_pictures(matched, Path(image_folder)), return_tensors="pt")["pixel_values"]
    text = processor.tokenizer([scene.caption for scene in matched], padding=True, truncation=True, return_tensors="pt")
    start = time.perf_counter()
    model.train()

    def step_loss(index: np.ndarray) -> torch.Tensor:
        index = torch.as_tensor(index)
        return model(input_ids=text["input_ids"][index], attention_mask=text["attention_mask"][index],
                     pixel_values=pixels[index], return_loss=True).loss

    losses = _contrastive(steps, batch_size, len(matched), list(model.parameters()), "world CLIP", step_loss,
                          learning_rate, seed)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    record: dict[str, Any] = {"part": "clip", "steps": steps, "pairs": len(matched),
                              "final_loss": float(np.mean(losses[-50:])), "seed": seed}
    if calibration:
        from synth.model_parts.clip import build_clip
        from synth.world.caption_checks import caption_preference

        bundle = build_clip({"pretrained": str(out)})
        pictures = _pictures(calibration, Path(calibration_folder or image_folder))
        scores = bundle.match_scores(pictures, [scene.caption for scene in calibration]).numpy()
        record["calibration"] = calibrate_threshold(scores, np.array([scene.mismatched for scene in calibration]))
        # what it tells apart (synth.world.caption_checks): the tower and the Q-Former learn against it
        matched_calibration = [i for i, scene in enumerate(calibration) if not scene.mismatched]
        record["prefers_own_caption"] = caption_preference(
            bundle, [pictures[i] for i in matched_calibration], [calibration[i].caption for i in matched_calibration],
            seed=seed)
        from synth.atomic import atomic_write_text

        atomic_write_text(out / "world_threshold.json", json.dumps(record["calibration"], indent=1) + "\n")
    record["seconds"] = round(time.perf_counter() - start, 1)
    _mark(out, record)
    return out


def calibrate_threshold(scores: np.ndarray, mismatched: np.ndarray) -> dict[str, Any]:
    """The score that best separates matched from mismatched pairs (the world's counterpart of section
    3.2's 30), and how well it does: kept share of matched pairs, rejected share of mismatched ones."""
    if mismatched.all() or not mismatched.any():
        raise ValueError("calibration needs both matched and mismatched pairs")
    candidates = np.unique(scores)
    best, best_accuracy = float(candidates[0]), -1.0
    for threshold in candidates:
        accuracy = ((scores >= threshold) != mismatched).mean()
        if accuracy > best_accuracy:
            best, best_accuracy = float(threshold), float(accuracy)
    keep = scores >= best
    return {"threshold": round(best, 3), "accuracy": round(best_accuracy, 4),
            "matched_kept": round(float(keep[~mismatched].mean()), 4),
            "mismatched_rejected": round(float((~keep[mismatched]).mean()), 4),
            "matched_mean": round(float(scores[~mismatched].mean()), 3),
            "mismatched_mean": round(float(scores[mismatched].mean()), 3),
            "pairs": int(len(scores))}


# --- the vision tower, in BLIP-2's layout ----------------------------------------------------------------


def world_blip2_config(num_query_tokens: int = 32):
    """The tiny BLIP-2 config at the world's resolution (64 px, 8 px patches)."""
    from synth.model_parts.blip2 import tiny_blip2_config

    config = tiny_blip2_config(num_query_tokens=num_query_tokens, image_size=WORLD_IMAGE_SIZE)
    config.vision_config.patch_size = WORLD_PATCH
    config.qformer_config.max_position_embeddings = 128
    return config


def pretrain_vision_tower(out_dir: str | os.PathLike[str], clip_dir: str | os.PathLike[str], scenes: list[Scene],
                          image_folder: str | os.PathLike[str], steps: int = 600, batch_size: int = 64,
                          learning_rate: float = 2e-3, seed: int = 0, train_qformer: bool = True,
                          layout_weight: float = 0.0, caption_weight: float = 0.0) -> Path:
    """A BLIP-2 vision model and Q-Former trained to meet the world CLIP's frozen caption features, saved as a
    BLIP-2 directory that :func:`synth.model_parts.blip2.build_blip2` reads. ``train_qformer=False`` leaves the
    Q-Former and queries at their random start (a new Q-Former, which stages 1 and 2 then train).

    ``layout_weight`` > 0 adds a second Q-Former objective, not BLIP-2's: rebuild every patch state of the
    tower from the query outputs alone (one cross-attention from a learned query per patch position, mean
    squared error against the tower's states, detached). Captions never say where a thing is, so the
    contrastive objective alone lets the queries drop it; this one makes them keep the patch layout. Off by
    default: the paper's Q-Former is BLIP-2's.

    ``caption_weight`` > 0 adds BLIP-2's image-grounded text generation (ITG, its section 3.2) beside the
    contrastive loss: a small causal decoder writes the caption with the query outputs as its only view of
    the picture, so the queries must carry everything a caption says (every object's colour and shape, and
    which colour goes with which shape), where the contrastive loss is met by one best-matching query. BLIP-2
    runs ITG in the Q-Former's own text transformer; transformers' ``Blip2QFormerModel`` has no text path, so
    the decoder here is separate (2 layers as wide as the Q-Former) and, like BLIP-2's ITC projections,
    dropped after training."""
    from safetensors.torch import save_file
    from synth.model_parts.blip2 import _image_processor
    from synth.model_parts.clip import build_clip
    from transformers import Blip2QFormerModel, Blip2VisionModel

    out = Path(out_dir)
    if trained_with(out, steps=steps, seed=seed, qformer_trained=train_qformer, layout_weight=layout_weight,
                    caption_weight=caption_weight):
        return out
    torch.manual_seed(seed)
    matched = [scene for scene in scenes if not scene.mismatched]
    clip = build_clip({"pretrained": str(clip_dir)})
    with torch.no_grad():
        text = clip.processor.tokenizer([s.caption for s in matched], padding=True, truncation=True,
                                        return_tensors="pt")
        targets = clip.model.get_text_features(**text).pooler_output  # (N, projection_dim)
    config = world_blip2_config()
    tower = Blip2VisionModel(config.vision_config)
    qformer = Blip2QFormerModel(config.qformer_config)
    init = config.qformer_config.hidden_size ** -0.5
    query_tokens = torch.nn.Parameter(torch.randn(1, config.num_query_tokens, config.qformer_config.hidden_size) * init)
    # both projections are dropped after training, as BLIP-2's ITC projections are
    tower_head = torch.nn.Linear(config.vision_config.hidden_size, targets.shape[-1])
    query_head = torch.nn.Linear(config.qformer_config.hidden_size, targets.shape[-1])
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    layout: list[torch.nn.Module] = []
    if layout_weight:  # built only when asked: its initialisation would move the random stream of the default
        # the layout decoder (dropped after training): a learned query per tower state reads the Q-Former outputs
        patches = (WORLD_IMAGE_SIZE // config.vision_config.patch_size) ** 2 + 1
        layout = [torch.nn.ParameterList([torch.randn(1, patches, config.qformer_config.hidden_size) * init]),
                  torch.nn.MultiheadAttention(config.qformer_config.hidden_size, 4, batch_first=True),
                  torch.nn.Linear(config.qformer_config.hidden_size, config.vision_config.hidden_size)]
    decoder = None
    if caption_weight:  # built only when asked, as the layout decoder is
        decoder, captions = _caption_decoder(clip.processor.tokenizer, [s.caption for s in matched],
                                             config.qformer_config.hidden_size)
    processor = _image_processor(WORLD_IMAGE_SIZE)
    pixels = processor(images=_pictures(matched, Path(image_folder)), return_tensors="pt")["pixel_values"]
    start = time.perf_counter()
    tower.train()
    qformer.train()

    def step_loss(index: np.ndarray) -> torch.Tensor:
        index = torch.as_tensor(index)
        states = tower(pixel_values=pixels[index]).last_hidden_state  # (B, P+1, D)
        text = torch.nn.functional.normalize(targets[index], dim=-1)
        logit_scale = scale.exp().clamp(max=100)
        # the tower: the mean over every token, since the Q-Former's queries read all of them
        tower_loss = _symmetric_infonce(tower_head(states.mean(1)), targets[index], logit_scale)
        # the Q-Former: BLIP-2's image-text contrastive stage (its section 3.2, ITC): each caption is scored
        # against its best-matching query, so the queries learn to carry what captions say
        outputs = qformer(query_embeds=query_tokens.expand(len(index), -1, -1),
                          encoder_hidden_states=states).last_hidden_state  # (B, Q, Dq)
        queries = torch.nn.functional.normalize(query_head(outputs), dim=-1)
        similarity = torch.einsum("iqd,jd->ijq", queries, text).amax(-1) * logit_scale  # (B images, B texts)
        target = torch.arange(len(index))
        query_loss = (torch.nn.functional.cross_entropy(similarity, target)
                      + torch.nn.functional.cross_entropy(similarity.T, target)) / 2
        if not train_qformer:
            return tower_loss
        if layout:
            layout_queries, layout_reader, layout_head = layout
            read, _ = layout_reader(layout_queries[0].expand(len(index), -1, -1), outputs, outputs,
                                    need_weights=False)
            target_states = torch.nn.functional.layer_norm(states.detach(), states.shape[-1:])
            query_loss = query_loss + layout_weight * torch.nn.functional.mse_loss(layout_head(read), target_states)
        if decoder is not None:
            query_loss = query_loss + caption_weight * _caption_loss(decoder, outputs, captions, index)
        return tower_loss + query_loss

    parameters = [*tower.parameters(), *qformer.parameters(), query_tokens, *tower_head.parameters(),
                  *query_head.parameters(), scale]
    parameters += [parameter for module in layout for parameter in module.parameters()]
    parameters += list(decoder.parameters()) if decoder is not None else []
    losses = _contrastive(steps, batch_size, len(matched), parameters, "world vision tower + Q-Former", step_loss,
                          learning_rate, seed)
    tower.eval()
    qformer.eval()
    query_tokens = query_tokens.detach()
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tensors = {**{f"vision_model.{k}": v.contiguous() for k, v in tower.state_dict().items()},
               **{f"qformer.{k}": v.contiguous() for k, v in qformer.state_dict().items()},
               "query_tokens": query_tokens.contiguous()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(out)
    _mark(out, {"part": "blip2", "steps": steps, "qformer_trained": train_qformer, "layout_weight": layout_weight,
                "caption_weight": caption_weight,
                "pairs": len(matched), "final_loss": float(np.mean(losses[-50:])),
                "seconds": round(time.perf_counter() - start, 1), "seed": seed})
    return out


def _caption_decoder(tokenizer, captions: list[str], width: int):
    """The ITG decoder (a 2-layer Llama as wide as the Q-Former, over the CLIP tokenizer's vocabulary) and the
    captions as token ids (``input_ids``, ``attention_mask``)."""
    from synth.model_parts.llm import tiny_llama_config
    from transformers import LlamaForCausalLM

    tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=width, layers=2)), tokens


def _caption_loss(decoder, query_outputs: torch.Tensor, captions, index: torch.Tensor) -> torch.Tensor:
    """The captions' next-token loss with the query outputs as a prefix the text attends to (BLIP-2's ITG:
    the text sees the picture only through the queries)."""
    ids, mask = captions["input_ids"][index], captions["attention_mask"][index]
    embeds = torch.cat([query_outputs, decoder.get_input_embeddings()(ids)], dim=1)
    prefix = torch.ones(query_outputs.shape[:2], dtype=mask.dtype)
    labels = torch.cat([torch.full(query_outputs.shape[:2], -100), ids.masked_fill(mask == 0, -100)], dim=1)
    return decoder(inputs_embeds=embeds, attention_mask=torch.cat([prefix, mask], dim=1), labels=labels).loss


def build_world_sdxl(out_dir: str | os.PathLike[str], clip_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """An SDXL-layout directory whose two text encoders are the world CLIP's text side, so the MSE heads'
    targets (``prompt_embeds``: both encoders' penultimate states, ``pooled_prompt_embeds``: the second one's
    projection, exactly as diffusers' ``encode_prompt`` computes them for SDXL) live in a space that means
    something in the world: the pooled target of a caption is the world CLIP's caption feature. The UNet and
    VAE are the tiny preset's, untrained: the world checks what a head asks SDXL to draw in this conditioning
    space (caption retrieval), not pixels. ``sdxl: {pretrained: DIR}`` loads it like any SDXL checkpoint."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from synth.model_parts.source import preset_weights_rng
    from synth.model_parts.sdxl import tiny_sdxl_components

    out = Path(out_dir)
    if trained_with(out, seed=seed):
        return out
    clip = CLIPModel.from_pretrained(clip_dir)
    text_config = clip.config.text_config
    first = CLIPTextModel(text_config)
    # transformers 5's CLIPTextModel is the text transformer itself (4.x wrapped it in .text_model)
    getattr(first, "text_model", first).load_state_dict(clip.text_model.state_dict())
    text_config.projection_dim = clip.config.projection_dim
    second = CLIPTextModelWithProjection(text_config)
    second.text_model.load_state_dict(clip.text_model.state_dict())
    second.text_projection.load_state_dict(clip.text_projection.state_dict())
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    with preset_weights_rng():
        components = tiny_sdxl_components()
    if components["text_encoder"].config.hidden_size != text_config.hidden_size or \
            components["text_encoder_2"].config.projection_dim != text_config.projection_dim:
        raise ValueError("the world CLIP's text width must match the tiny SDXL's (32) for its UNet to take it")
    components.update(text_encoder=first.eval(), text_encoder_2=second.eval(), tokenizer=tokenizer,
                      tokenizer_2=tokenizer)
    pipeline = StableDiffusionXLPipeline(**components, add_watermarker=False)
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out, safe_serialization=True)
    _mark(out, {"part": "sdxl", "text_encoders": "the world CLIP's text side", "unet": "tiny preset, untrained",
                "clip": str(clip_dir), "seed": seed})
    return out
