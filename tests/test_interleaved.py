"""Interleaved generation: images in, text and images out, with the image fed back as vision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from heads import LanguageDescriptionHead
from mim import MIM
from mim.inference.interleaved import GenerationSettings, ImagePart, InterleavedGenerator, TextPart
from synth.samples import sample_pairs
from synth.model_parts import build_sdxl

TINY = {"preset": "tiny"}


@pytest.fixture(scope="module")
def generator() -> InterleavedGenerator:
    return InterleavedGenerator(MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY), build_sdxl("tiny"))


def messages() -> list[dict]:
    photos = [Image.open(pair.image).convert("RGB") for pair in sample_pairs()[:2]]
    return [{"role": "user", "content": "Here are two photos: <image> and <image>. Paint me a third.",
             "images": photos}]


def settings(generator: InterleavedGenerator, **overrides) -> GenerationSettings:
    start = generator.model.head.token_ids["<start>"]
    values = dict(max_new_tokens=12, max_images=1, num_inference_steps=2, image_size=64, do_sample=True,
                  max_caption_tokens=6, logit_bias={start: 8.0}, seed=3)
    return GenerationSettings(**{**values, **overrides})


def test_a_full_interleaved_turn_is_deterministic_for_a_seed(generator: InterleavedGenerator, monkeypatch) -> None:
    encoded = []
    original = generator._image_embeds
    monkeypatch.setattr(generator, "_image_embeds", lambda image: encoded.append(image) or original(image))
    result = generator.generate(messages(), settings(generator))
    images = [part for part in result.parts if isinstance(part, ImagePart)]
    assert len(images) == 1 and images[0].image.size == (64, 64) and images[0].condition == "prompt"
    assert any(isinstance(part, TextPart) for part in result.parts)
    assert result.conditions[0].prompt == (images[0].caption or "")
    # two input images, then the generated one re-encoded into the context
    assert len(encoded) == 3 and encoded[2] is images[0].image
    again = generator.generate(messages(), settings(generator))
    assert again.text == result.text
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    other = generator.generate(messages(), settings(generator, seed=4))
    assert other.text != result.text or not np.array_equal(np.asarray(other.images[0]),
                                                           np.asarray(result.images[0]))


def test_image_cap_and_greedy_decoding(generator: InterleavedGenerator) -> None:
    no_images = generator.generate(messages(), settings(generator, max_images=0, logit_bias={
        generator.model.head.token_ids["<start>"]: 100.0}))
    assert no_images.images == []  # past the cap the trigger is never chosen
    # Greedy text does not depend on the seed while no image is drawn (a drawn image does: SDXL's noise
    # comes from the seed, and the model sees the picture it drew).
    greedy = [generator.generate(messages(), settings(generator, do_sample=False, max_images=0, seed=s)).text
              for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_caption_branch_is_removed_from_the_context(generator: InterleavedGenerator) -> None:
    """After an image, the context holds the image, not the caption: same as training."""
    from mim.inference.interleaved import _Context

    model = generator.model
    context = _Context(model)
    context.feed(generator.prompt_embeddings(messages()))
    before = context.length
    start = model.head.token_ids["<start>"]
    context.feed(generator._token_embeds([start, 5, 6, 7]))
    context.rewind(before)
    assert context.length == before and context.cache.get_seq_length() == before
    assert context.all_hidden().shape[0] == before


def test_placeholder_image_mismatch_is_an_error(generator: InterleavedGenerator) -> None:
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        generator.generate([{"role": "user", "content": "<image> <image>", "images": messages()[0]["images"][:1]}])


def test_greedy_first_token_matches_the_training_forward(generator: InterleavedGenerator) -> None:
    """The cached, incremental path scores the next token exactly as the batch forward does."""
    from mim.inference.interleaved import _Context

    model = generator.model
    embeds = generator.prompt_embeddings([{"role": "user", "content": "Hello there"}])
    context = _Context(model)
    context.feed(embeds)
    with torch.no_grad():
        hidden = model.llm.get_decoder()(inputs_embeds=embeds[None]).last_hidden_state
        logits = model.head.adjust_logits(hidden, model.llm.get_output_embeddings()(hidden))[0, -1]
    torch.testing.assert_close(context.last_logits, logits.float())


def test_the_inference_prompt_is_tokenized_as_training_renders_it(generator: InterleavedGenerator) -> None:
    """Text around images at inference is encoded exactly as the training sequence has it."""
    from datamodules import render_conversation
    from synth.data.schema import Conversation, Turn

    model = generator.model
    content = messages()[0]["content"]
    trained = render_conversation(Conversation("x", [Turn("user", content, ["a.png", "b.png"]),
                                                     Turn("assistant", "Sure.")]),
                                  model.tokenizer, model.head, model.num_query_tokens)
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
    pieces = generator.encode.pieces(text)
    image_run = [model.image_token_id] * model.num_query_tokens
    inference = pieces[0] + image_run + pieces[1] + image_run + pieces[2]
    assert trained.input_ids[:len(inference)] == inference
    assert len(trained.input_ids) > len(inference)  # followed by the assistant's answer


def test_the_refiner_finishes_every_head_s_image(generator: InterleavedGenerator) -> None:
    """Text prompts (language head) and predicted embeddings (MSE heads) both go through base then refiner."""
    from heads.base import SDXLCondition
    from synth.model_parts.sdxl import build_sdxl_refiner

    base = generator.sdxl
    refined = InterleavedGenerator(generator.model, base, build_sdxl_refiner("tiny", base))
    settings = GenerationSettings(num_inference_steps=4, image_size=64, high_noise_frac=0.5)
    embeds = SDXLCondition(prompt_embeds=torch.randn(1, 77, 64), pooled_prompt_embeds=torch.randn(1, 32))
    for condition in (SDXLCondition(prompt="a red bus"), embeds):
        plain = np.asarray(generator.draw(condition, settings, seed=1))
        finished = np.asarray(refined.draw(condition, settings, seed=1))
        assert plain.shape == finished.shape == (64, 64, 3) and not np.array_equal(plain, finished)


@pytest.mark.parametrize("head_name", ["language", "prompt_tokens", "qformer"])
def test_batched_generation_gives_each_row_what_it_gets_alone(head_name: str, tmp_path) -> None:
    """Three conversations of different lengths, each drawing an image at some point: the batched generator
    (left padding, masked columns, per-row positions, captions masked out) matches one-by-one generation."""
    from heads import PromptTokensHead, QFormerMediumHead
    from mim.inference.batched import BatchedGenerator

    options = dict(target_cache=str(tmp_path), sdxl=TINY, hidden_size=32, num_layers=1, num_heads=4)
    head = {"language": LanguageDescriptionHead, "prompt_tokens": lambda: PromptTokensHead(**options),
            "qformer": lambda: QFormerMediumHead(**options)}[head_name]()
    torch.manual_seed(0)
    generator = InterleavedGenerator(MIM(head=head, llm=TINY, blip2=TINY), build_sdxl("tiny"))
    trigger = generator.model.head.token_ids[generator.model.head.trigger]
    photos = messages()[0]["images"]
    conversations = [
        messages(),
        [{"role": "user", "content": "Hi.", "images": []}],
        [{"role": "user", "content": "One photo <image> please paint a friend for it and tell me a story",
          "images": photos[:1]}],
    ]
    rows = [GenerationSettings(max_new_tokens=10 + 3 * i, max_images=1, num_inference_steps=2, image_size=64,
                               do_sample=False, max_caption_tokens=4, logit_bias={trigger: 4.0 + i}, seed=i)
            for i in range(3)]
    # The prompts' logits agree row by row to 1e-4, and the two photos are told apart far beyond that
    # (their order moves the logits by 7e-3), so a misplaced or dropped picture fails here.
    swapped = [{**messages()[0], "images": photos[::-1]}]
    batched = BatchedGenerator(generator).prompt_logits(conversations + [swapped])
    for row, conversation in enumerate(conversations + [swapped]):
        torch.testing.assert_close(batched[row], generator.prompt_logits(conversation), atol=1e-4, rtol=1e-4)
    assert (batched[3] - batched[0]).abs().max() > 1e-3
    alone = [generator.generate(c, s) for c, s in zip(conversations, rows)]
    together = BatchedGenerator(generator).generate(conversations, rows)
    assert sum(len(result.images) for result in alone) >= 2  # images were drawn, so masking was exercised
    for one, batch in zip(alone, together):
        assert batch.text == one.text
        assert [type(p) for p in batch.parts] == [type(p) for p in one.parts]
        for a, b in zip(one.images, batch.images):
            assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 2
