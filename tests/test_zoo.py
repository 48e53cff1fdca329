"""Tiny presets run; saving them and loading back through the real-checkpoint path is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synth.samples import sample_pairs
from synth.model_parts import ModelSource, build_blip2, build_clip, build_llm, build_sdxl
from synth.model_parts.blip2 import tiny_blip2_config
from synth.model_parts.checkpoint_files import read_tensors
from synth.model_parts.text_tokenizers import HEAD_SPECIAL_TOKENS, tiny_clip_tokenizer, tiny_llama_tokenizer


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.open(pair.image).convert("RGB") for pair in sample_pairs()[:3]]


def assert_same_weights(left: torch.nn.Module, right: torch.nn.Module) -> None:
    a, b = left.state_dict(), right.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- ModelSource -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"),
    ({"pretrained": "x", "preset": "tiny"}, "exactly one of"),
    ({"pretrained": "x", "dtype": "float64"}, "dtype must be one of"),
    ({"preset": "tiny", "options": {"variant": "fp16"}}, "apply to 'pretrained' sources only"),
])
def test_model_source_rejects_ambiguous_or_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSource(**kwargs)


def test_model_source_parse_and_unknown_preset() -> None:
    assert ModelSource.parse("tiny") == ModelSource(preset="tiny")
    assert ModelSource.parse("meta-llama/Llama-2-7b-chat-hf").pretrained == "meta-llama/Llama-2-7b-chat-hf"
    assert ModelSource.parse({"pretrained": "d", "dtype": "bfloat16"}).torch_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown LLM preset 'huge'"):
        build_llm(ModelSource(preset="huge"))


# --- tokenizers ------------------------------------------------------------------

def test_tiny_llama_tokenizer_is_llama_like() -> None:
    tokenizer = tiny_llama_tokenizer()
    for token in HEAD_SPECIAL_TOKENS:  # each special token is one id, never split
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    text = "Zebra crossing 你好 🚀 <image> done"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids  # byte fallback: no <unk> for unseen scripts
    assert tokenizer.decode(ids, skip_special_tokens=False).replace("<s>", "").strip() == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
        tokenize=False)
    assert rendered == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s>"
    assert tokenizer.pad_token == "<unk>"


def test_tiny_tokenizers_are_fixed_across_builds() -> None:
    from synth.model_parts import text_tokenizers

    first_llama, first_clip = tiny_llama_tokenizer().get_vocab(), tiny_clip_tokenizer().get_vocab()
    text_tokenizers._load_asset.cache_clear()
    assert tiny_llama_tokenizer().get_vocab() == first_llama
    assert tiny_clip_tokenizer().get_vocab() == first_clip


@pytest.mark.parametrize("train, wrap", [
    ("train_llama_bpe", lambda v, m: __import__("transformers").LlamaTokenizer(vocab=v, merges=m)),
    ("train_clip_bpe", lambda v, m: __import__("transformers").CLIPTokenizer(vocab=v, merges=m)),
])
def test_bpe_training_on_the_sample_text_gives_working_tokenizers(train: str, wrap) -> None:
    from synth.model_parts import text_tokenizers

    vocab, merges = getattr(text_tokenizers, train)()
    tokenizer = wrap(vocab, merges)
    text = "a tabby cat looking to the side"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.replace(" ", ""))  # merges learned from the corpus apply
    assert tokenizer.decode(ids).strip() == text


def test_tiny_clip_tokenizer_has_no_unknown_bytes() -> None:
    tokenizer = tiny_clip_tokenizer()
    ids = tokenizer("Commas, dashes - and 你好!")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    padded = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length)["input_ids"]
    assert len(padded) == 77
    assert tiny_clip_tokenizer(pad_token="!").pad_token == "!"


# --- LLM -------------------------------------------------------------------------

def test_tiny_llm_forward_and_save_load_round_trip(tmp_path: Path) -> None:
    bundle = build_llm("tiny")
    ids = bundle.tokenizer(["a photo of <image>", "hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = bundle.model(**ids).logits
    assert logits.shape == (2, ids["input_ids"].shape[1], len(bundle.tokenizer))
    bundle.model.save_pretrained(tmp_path)
    bundle.tokenizer.save_pretrained(tmp_path)
    loaded = build_llm(ModelSource(pretrained=str(tmp_path)))
    assert_same_weights(bundle.model, loaded.model)
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    assert loaded.tokenizer.chat_template == bundle.tokenizer.chat_template
    with torch.no_grad():
        assert torch.equal(loaded.model(**loaded.tokenizer(["a photo of <image>", "hello"], return_tensors="pt",
                                                           padding=True)).logits, logits)


def test_llm_dtype_is_applied(tmp_path: Path) -> None:
    bundle = build_llm("tiny")
    bundle.model.save_pretrained(tmp_path)
    bundle.tokenizer.save_pretrained(tmp_path)
    loaded = build_llm({"pretrained": str(tmp_path), "dtype": "bfloat16"})
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


# --- BLIP-2 ----------------------------------------------------------------------

def test_tiny_blip2_encodes_images(photos: list[Image.Image]) -> None:
    parts = build_blip2("tiny")
    pixels = parts.image_processor(images=photos, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32)
    assert parts.encode(pixels).shape == (3, parts.num_query_tokens, parts.qformer_hidden_size) == (3, 32, 32)


def test_blip2_parts_load_from_a_full_blip2_checkpoint_and_match_it(tmp_path: Path, photos) -> None:
    """A checkpoint laid out like Salesforce/blip2-flan-t5-xxl: we read only the vision side,
    and it computes exactly what the reference Blip2ForConditionalGeneration computes."""
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(0)
    reference = Blip2ForConditionalGeneration(tiny_blip2_config()).eval()
    reference.save_pretrained(tmp_path)
    build_blip2("tiny").image_processor.save_pretrained(tmp_path)
    parts = build_blip2(str(tmp_path))
    pixels = parts.image_processor(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_embeds = reference.vision_model(pixel_values=pixels).last_hidden_state
        expected = reference.qformer(query_embeds=reference.query_tokens.expand(3, -1, -1),
                                     encoder_hidden_states=image_embeds).last_hidden_state
    assert torch.equal(parts.encode(pixels), expected)
    assert torch.equal(parts.query_tokens, reference.query_tokens)


def test_blip2_reads_only_its_shards(tmp_path: Path) -> None:
    from transformers import Blip2ForConditionalGeneration

    Blip2ForConditionalGeneration(tiny_blip2_config()).save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    lm_only = {s for k, s in index.items() if k.startswith("language_model")} - {
        s for k, s in index.items() if not k.startswith("language_model")}
    for shard in lm_only:  # shards holding only the language model are never opened
        (tmp_path / shard).unlink()
    tensors = read_tensors(str(tmp_path), ("vision_model.", "qformer.", "query_tokens"))
    assert tensors and all(not key.startswith("language_model") for key in tensors)


def test_checkpoint_without_safetensors_gets_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="Only safetensors checkpoints are read"):
        read_tensors(str(tmp_path), ("vision_model.",))


# --- CLIP ------------------------------------------------------------------------

def test_tiny_clip_scores_and_save_load_round_trip(tmp_path: Path, photos) -> None:
    bundle = build_clip("tiny")
    captions = [pair.caption for pair in sample_pairs()[:3]]
    scores = bundle.match_scores(photos, captions)
    assert scores.shape == (3,) and bool(((scores >= -100) & (scores <= 100)).all())
    bundle.model.save_pretrained(tmp_path)
    bundle.processor.save_pretrained(tmp_path)
    loaded = build_clip(str(tmp_path))
    assert_same_weights(bundle.model, loaded.model)
    assert torch.equal(loaded.match_scores(photos, captions), scores)
    with pytest.raises(ValueError, match="one caption per image"):
        bundle.match_scores(photos, captions[:1])


# --- SDXL ------------------------------------------------------------------------

def test_tiny_sdxl_generates_from_embeddings_and_from_text(tmp_path: Path) -> None:
    pipe = build_sdxl("tiny")
    pipe.set_progress_bar_config(disable=True)
    embeds, _, pooled, _ = pipe.encode_prompt("a rocket on the launch pad", do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)  # SDXL base: (1, 77, 2048), (1, 1280)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    from_embeds = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=1.0,
                       generator=torch.Generator().manual_seed(0), **kwargs).images
    from_text = pipe(prompt="a rocket on the launch pad", guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(0), **kwargs).images
    assert from_embeds.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(from_embeds, from_text)

    pipe.save_pretrained(tmp_path)
    loaded = build_sdxl(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))
    reloaded = loaded(prompt="a rocket on the launch pad", guidance_scale=1.0,
                      generator=torch.Generator().manual_seed(0), **kwargs).images
    # Bit-identical weights; outputs agree to float rounding (freshly loaded tensors can
    # take a different BLAS path, about 1e-7 here).
    np.testing.assert_allclose(reloaded, from_text, atol=1e-5)


def test_presets_are_the_same_in_every_build_and_leave_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_clip("tiny").model
    assert torch.equal(torch.rand(1), expected_next)
    assert_same_weights(first, build_clip("tiny").model)
    assert_same_weights(build_llm("tiny").model, build_llm("tiny").model)
    one, two = build_blip2("tiny"), build_blip2("tiny")
    assert_same_weights(one.qformer, two.qformer) and torch.equal(one.query_tokens, two.query_tokens)
    assert_same_weights(build_sdxl("tiny").unet, build_sdxl("tiny").unet)
