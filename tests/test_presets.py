"""Every random-weight preset is built as a model that can learn: no weight matrix left at (near) zero,
and outputs that depend on the input. The tiny BLIP-2 vision tower once had every weight at ~1e-10
(Blip2VisionConfig's default initializer_range, meant to be overwritten by Salesforce's weights), so
its output was the same for every picture and no tiny MIM ever saw an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from colour_squares import COLOURS, square
from synth.model_parts import build_blip2, build_clip, build_llm, build_sdxl
from synth.model_parts.health import input_share

CAPTIONS = [f"a {colour} square on a grey background" for colour in COLOURS]


@pytest.fixture(scope="module")
def pictures() -> list:
    rng = np.random.default_rng(0)
    return [square(colour, rng) for colour in COLOURS]


def assert_every_weight_matrix_varies(module: torch.nn.Module, name: str) -> None:
    flat = [(key, float(p.float().std())) for key, p in module.named_parameters() if p.dim() >= 2 and p.numel() > 1]
    assert flat, f"{name} has no weight matrices"
    dead = [(key, std) for key, std in flat if std < 1e-3]
    assert not dead, f"{name}: weight tensors initialised at ~0 (std < 1e-3): {dead[:5]}"


def test_the_blip2_preset_sees_its_pictures(pictures) -> None:
    parts = build_blip2("tiny")
    assert_every_weight_matrix_varies(parts.vision_model, "vision model")
    assert_every_weight_matrix_varies(parts.qformer, "Q-Former")
    pixels = parts.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        vision = parts.vision_model(pixel_values=pixels).last_hidden_state
        queries = parts.encode(pixels)
    # measured: 0.88 and 0.40 (the blind preset: 0.00 and 0.0003)
    assert input_share(vision) > 0.3
    assert input_share(queries) > 0.1
    with torch.no_grad():
        assert torch.equal(parts.encode(pixels[:1]), parts.encode(pixels[:1]))


def test_the_clip_preset_tells_pictures_and_captions_apart(pictures) -> None:
    bundle = build_clip("tiny")
    assert_every_weight_matrix_varies(bundle.model, "CLIP")
    inputs = bundle.prepare(pictures, CAPTIONS)
    with torch.no_grad():
        vision = bundle.model.vision_model(pixel_values=inputs["pixel_values"])
        image_features = bundle.model.visual_projection(vision.pooler_output)
        text_features = bundle.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]).pooler_output
    assert input_share(image_features) > 0.02  # measured 0.11
    assert input_share(text_features) > 0.02  # measured 0.31


def test_the_sdxl_preset_depends_on_its_prompt_and_picture(pictures) -> None:
    pipe = build_sdxl("tiny")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_every_weight_matrix_varies(getattr(pipe, name), name)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False)
        assert input_share(embeds) > 0.01 and input_share(pooled) > 0.01  # measured 0.07, 0.14
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(len(CAPTIONS), -1, -1, -1)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * len(CAPTIONS))
        noise = pipe.unet(latents, 10, encoder_hidden_states=embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        # diffusers' own initialisation: the text moves the prediction a little (measured 0.0013), not zero
        assert input_share(noise) > 1e-4
        images = torch.tensor(np.stack([np.asarray(p.resize((64, 64))) for p in pictures]), dtype=torch.float32)
        encoded = pipe.vae.encode(images.permute(0, 3, 1, 2) / 127.5 - 1).latent_dist.mean
        assert input_share(encoded) > 0.05  # measured 0.30


def test_input_share_is_zero_for_a_constant_part_and_one_for_the_input_itself() -> None:
    rows = torch.randn(6, 10)
    assert input_share(rows.mean(0, keepdim=True).expand(6, -1)) == 0.0
    assert input_share(rows) == pytest.approx(1.0, abs=0.25)  # all variance is across rows
    assert input_share(torch.zeros(3, 4)) == 0.0
    with pytest.raises(ValueError, match="at least two inputs"):
        input_share(rows[:1])


def test_the_llm_preset_depends_on_its_tokens() -> None:
    bundle = build_llm("tiny")
    assert_every_weight_matrix_varies(bundle.model, "LLM")
    ids = bundle.tokenizer(CAPTIONS, return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        assert input_share(bundle.model(ids).logits[:, -1]) > 0.02  # measured 0.11
