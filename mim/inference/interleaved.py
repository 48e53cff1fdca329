"""Interleaved generation: the assistant writes text and, where its head says so, images.

One assistant turn, token by token, with a KV cache::

    context (text + input images as query embeddings)
      -> sample tokens ... trigger (<start> / <img> / <IMG1>)
         language head: write the caption until <end>; then cut the caption out of the cache
         MSE heads:     force the head's remaining tokens; condition on their hidden states
      -> SDXL draws the image from the head's condition
      -> the image goes back into the context through the vision path (its query embeddings)
      -> sampling continues ... </s>

This mirrors training: a caption is a branch that later tokens never see;
they see the image. Images per turn are capped; past the cap the trigger
token is never sampled.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from datamodules.rendering import IMAGE_TOKEN, TextEncoder
from heads.base import SDXLCondition
from synth.decoding import nucleus_sample
from synth.data.schema import IMAGE_PLACEHOLDER, escape_control_tokens, escape_placeholders


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    image: Any  # PIL.Image
    caption: str | None  # the language head's description; None for embedding conditions
    condition: str  # "prompt" or "embeddings"
    tokens: int = 0  # tokens written for it after the trigger (a caption, or the head's forced tokens)


@dataclass
class GenerationSettings:
    """Args:
        max_new_tokens: tokens the assistant may write (image runs excluded).
        do_sample: top-p sampling; False is greedy.
        top_p: nucleus mass for sampling.
        temperature: softmax temperature for sampling.
        seed: makes sampling and the images reproducible.
        max_images: images per turn; further triggers are suppressed.
        max_caption_tokens: a language-head caption longer than this is closed.
        num_inference_steps: SDXL denoising steps (40 in the released demo).
        high_noise_frac: where SDXL base hands over to the refiner, when one is set (0.8).
        guidance_scale: SDXL classifier-free guidance (5.0 in the released demo).
        image_size: SDXL output height and width (1024 for SDXL base).
        logit_bias: token id -> value added to its logit (as in OpenAI's API), e.g. to
            encourage or forbid images.
        stop: strings that end the reply where they first appear in a run of text (the string itself is
            not kept), as OpenAI's ``stop``; checked within the text since the last image.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0
    max_images: int = 2
    max_caption_tokens: int = 77
    num_inference_steps: int = 40
    high_noise_frac: float = 0.8
    guidance_scale: float = 5.0  # diffusers' SDXL default, which the released demo uses
    image_size: int = 1024
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()


#: What :meth:`InterleavedGenerator.generate` tells a listener as the reply grows: ("text", new characters)
#: or ("image", the ImagePart just drawn). A listener that raises stops the generation (a client that left).
Listener = Callable[[str, Any], None]


def trigger_bias(head, bias: float) -> dict[int, float]:
    """``logit_bias`` that makes the head's image trigger more (bias > 0) or less likely."""
    return {head.token_ids[head.trigger]: bias} if bias else {}


@dataclass
class GenerationResult:
    parts: list[TextPart | ImagePart] = field(default_factory=list)
    conditions: list[SDXLCondition] = field(default_factory=list)
    finish_reason: str = "stop"  # "length" when max_new_tokens ran out, as OpenAI's field
    completion_tokens: int = 0  # tokens the model chose or was forced to write (captions and image runs included)

    @property
    def text(self) -> str:
        """The reply with ``<image>`` exactly where images were generated: a literal ``<image>`` the
        model spelled is escaped, so the text can go back into the conversation safely."""
        return "".join(escape_placeholders(p.text) if isinstance(p, TextPart) else IMAGE_PLACEHOLDER
                       for p in self.parts)

    @property
    def images(self) -> list[Any]:
        return [p.image for p in self.parts if isinstance(p, ImagePart)]


@functools.cache
def _cache_argument(decoder_class: type) -> str:
    """The decoder's name for the KV cache: ``cache`` (transformers >= 5.20), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def decoder_step(model, embeds: torch.Tensor, positions: torch.Tensor, cache, attention_mask=None):
    """One pass of the LLM's decoder over new embeddings (B, W, H) at ``positions`` (B, W), appending to
    ``cache``; returns the last hidden states (B, W, H) and the cache."""
    decoder = model.llm.get_decoder()
    name = _cache_argument(type(decoder))
    output = decoder(inputs_embeds=embeds, position_ids=positions, attention_mask=attention_mask,
                     use_cache=True, **{name: cache})
    return output.last_hidden_state, getattr(output, name)


def next_token_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Float logits (..., V) for the next token from last hidden states (..., H), the head's rows included."""
    logits = model.llm.get_output_embeddings()(hidden)
    return model.head.adjust_logits(hidden, logits).float()


class _Context:
    """The LLM's running state: KV cache, length, and every last-layer hidden state so far."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache = None
        self.length = 0
        self.hidden: list[torch.Tensor] = []  # (n, H) chunks
        self.last_logits: torch.Tensor | None = None  # (V,)

    @torch.no_grad()
    def feed(self, embeds: torch.Tensor) -> None:
        """Append embeddings (n, H) to the context."""
        n = embeds.shape[0]
        positions = torch.arange(self.length, self.length + n, device=embeds.device)[None]
        hidden, self.cache = decoder_step(self.model, embeds[None], positions, self.cache)
        hidden = hidden[0]  # (n, H)
        self.hidden.append(hidden)
        self.length += n
        self.last_logits = next_token_logits(self.model, hidden[-1:][None])[0, -1]

    def rewind(self, length: int) -> None:
        """Forget everything after ``length`` (a caption branch)."""
        remove = self.length - length
        if remove <= 0:
            return
        self.cache.crop(-remove)  # transformers 5: a negative count removes that many tokens
        kept, total = [], 0
        for chunk in self.hidden:
            if total + chunk.shape[0] <= length:
                kept.append(chunk)
            elif total < length:
                kept.append(chunk[:length - total])
            total += chunk.shape[0]
        self.hidden = kept
        self.length = length
        self.last_logits = None

    def all_hidden(self) -> torch.Tensor:
        return torch.cat(self.hidden)


class _TextSegment:
    """The text since the last image, token by token: decoded whole each time (so a tokenizer's spaces come
    out as in one decode), cut at the first ``stop`` string, and passed to a listener as it becomes final."""

    def __init__(self, tokenizer, stop: tuple[str, ...], listener: Listener | None) -> None:
        self.tokenizer, self.stop, self.listener = tokenizer, tuple(s for s in stop if s), listener
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # characters a stop string could still claim
        self.ids: list[int] = []
        self.text = ""
        self.told = 0  # characters of ``text`` the listener has heard
        self.cut = False

    def add(self, token: int) -> bool:
        """Take a token; True when the text now holds a stop string (it is cut there)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [self.text.find(s) for s in self.stop if s in self.text]
        if cuts:
            self.text = self.text[:min(cuts)]
            self.cut = True
            return True
        if self.listener is not None and not self.text.endswith("\ufffd"):  # no half a character
            self._tell(len(self.text) - self.hold)
        return False

    def _tell(self, upto: int) -> None:
        if self.listener is not None and upto > self.told:
            self.listener("text", self.text[self.told:upto])
            self.told = upto

    def close(self, parts: list) -> None:
        """The segment ends (an image, or the reply): what is left goes out, and into ``parts``."""
        if self.ids:
            self._tell(len(self.text))
            if self.text or not self.cut:  # as batched generation: every run of tokens is a part
                parts.append(TextPart(self.text))
        self.ids, self.text, self.told, self.cut = [], "", 0, False


class InterleavedGenerator:
    """Generates an assistant turn with a MIM model and an SDXL pipeline (plus optional refiner)."""

    def __init__(self, model, sdxl=None, refiner=None) -> None:
        self.model = model.eval()
        self.encode = TextEncoder(model.tokenizer, tuple(model.head.special_tokens))
        self.sdxl = sdxl
        self.refiner = refiner
        if sdxl is not None:
            sdxl.set_progress_bar_config(disable=True)
        if refiner is not None:
            refiner.set_progress_bar_config(disable=True)

    # --- context -----------------------------------------------------------------------

    def _token_embeds(self, ids: list[int]) -> torch.Tensor:
        model = self.model
        tensor = torch.tensor([ids], device=model.device)
        return model.head.embed_tokens(tensor, model.llm.get_input_embeddings()(tensor))[0]

    def _image_embeds(self, image) -> torch.Tensor:
        model = self.model
        pixels = model.image_processor(images=[image], return_tensors="pt")["pixel_values"].to(model.device)
        return model.encode_images(pixels)[0].to(model.llm.dtype)  # (Q, H)

    def prompt_embeddings(self, messages: list[dict[str, Any]]) -> torch.Tensor:
        """The rendered chat (with the assistant's generation prompt) as embeddings (T, H).

        Each message: ``{"role", "content", "images": [PIL images]}``, one image per
        ``<image>`` in content.
        """
        tokenizer = self.model.tokenizer
        # control tokens spelled in a message ("</s>", "<start>") stay text; the template adds the real ones
        controls = tokenizer.all_special_tokens
        plain = [{"role": m["role"], "content": escape_control_tokens(m["content"], controls)} for m in messages]
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        images = [image for m in messages for image in m.get("images", [])]
        pieces = self.encode.pieces(text)  # exactly as training renders text around images
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images given")
        chunks = []
        for index, ids in enumerate(pieces):
            if ids:
                chunks.append(self._token_embeds(ids))
            if index < len(images):
                chunks.append(self._image_embeds(images[index]))
        return torch.cat(chunks)

    def context_length(self) -> int:
        """Positions the LLM holds (its ``max_position_embeddings``)."""
        return int(getattr(self.model.llm.config, "max_position_embeddings", 0) or 0)

    def prompt_length(self, messages: list[dict[str, Any]]) -> int:
        """Positions the rendered prompt takes (text tokens + a run of query tokens per image), from the text
        and the number of images alone: checked before any image is decoded."""
        tokenizer = self.model.tokenizer
        controls = tokenizer.all_special_tokens
        plain = [{"role": m["role"], "content": escape_control_tokens(m["content"], controls)} for m in messages]
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        images = sum(len(m.get("images", [])) for m in messages)
        return sum(len(ids) for ids in self.encode.pieces(text)) + images * self.model.num_query_tokens

    # --- sampling ----------------------------------------------------------------------

    def _next_token(self, logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator,
                    banned: list[int]) -> int:
        logits = logits.clone()
        for token, bias in settings.logit_bias.items():
            logits[int(token)] += bias
        if banned:
            logits[banned] = float("-inf")
        if not settings.do_sample:
            return int(logits.argmax())
        return nucleus_sample(logits, settings.temperature, settings.top_p, generator)

    # --- images ------------------------------------------------------------------------

    def draw(self, condition: SDXLCondition, settings: GenerationSettings, seed: int):
        """SDXL base, then (when set) the refiner from ``high_noise_frac`` of the way, for every head.

        The refiner conditions on text_encoder_2 alone: for a text prompt it encodes the prompt itself;
        for an embedding head it gets the text_encoder_2 part of the predicted ``prompt_embeds`` (their
        last ``text_encoder_2.hidden_size`` channels, 1280 of SDXL base's 2048) and the pooled embedding.
        """
        if self.sdxl is None:
            raise RuntimeError("no SDXL pipeline was given, so images cannot be drawn")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        kwargs = dict(condition.pipeline_kwargs(), num_inference_steps=settings.num_inference_steps,
                      guidance_scale=settings.guidance_scale, height=settings.image_size,
                      width=settings.image_size, generator=generator)
        if condition.prompt_embeds is not None:
            dtype = self.sdxl.unet.dtype
            kwargs["prompt_embeds"] = condition.prompt_embeds.to(self.sdxl.device, dtype)
            kwargs["pooled_prompt_embeds"] = condition.pooled_prompt_embeds.to(self.sdxl.device, dtype)
        if self.refiner is None:
            return self.sdxl(**kwargs).images[0]
        latents = self.sdxl(**kwargs, denoising_end=settings.high_noise_frac, output_type="latent").images
        refine = dict(image=latents, num_inference_steps=settings.num_inference_steps,
                      guidance_scale=settings.guidance_scale, denoising_start=settings.high_noise_frac,
                      generator=generator)
        if condition.prompt is not None:
            refine["prompt"] = condition.prompt
        else:
            width = self.refiner.text_encoder_2.config.hidden_size
            dtype = self.refiner.unet.dtype
            refine["prompt_embeds"] = condition.prompt_embeds[..., -width:].to(self.refiner.device, dtype)
            refine["pooled_prompt_embeds"] = condition.pooled_prompt_embeds.to(self.refiner.device, dtype)
        return self.refiner(**refine).images[0]

    # --- one turn --------------------------------------------------------------------------

    def _image_from_trigger(self, context: _Context, token: int, settings: GenerationSettings,
                            generator: torch.Generator, index: int) -> tuple[ImagePart, SDXLCondition]:
        """The head's trigger was chosen: let the head describe the image, draw it, feed it back."""
        tokenizer, head = self.model.tokenizer, self.model.head
        end_caption = head.token_ids.get("<end>")
        banned = [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), token]
        before = context.length
        caption_ids = [token]
        context.feed(self._token_embeds([token]))
        forced = head.forced_tokens()
        if forced:  # prompt-token head: the rest of its tokens, not sampled
            context.feed(self._token_embeds(forced))
        elif end_caption is not None:  # language head: the caption branch, until <end>
            while len(caption_ids) <= settings.max_caption_tokens:
                next_id = self._next_token(context.last_logits, settings, generator, banned)
                if next_id in (end_caption, tokenizer.eos_token_id):
                    break
                caption_ids.append(next_id)
                context.feed(self._token_embeds([next_id]))
        caption = tokenizer.decode(caption_ids[1:], skip_special_tokens=True).strip() or None
        condition = head.condition(caption or "", context.all_hidden())
        if condition.prompt is not None:
            context.rewind(before)  # later tokens see the image, not the caption
        image = self.draw(condition, settings, settings.seed + index)
        context.feed(self._image_embeds(image))
        written = len(forced) if forced else len(caption_ids) - 1
        return ImagePart(image, caption, "prompt" if condition.prompt is not None else "embeddings",
                         written), condition

    def _start(self, messages: list[dict[str, Any]], assistant_prefix: str) -> _Context:
        context = _Context(self.model)
        embeds = self.prompt_embeddings(messages)
        if assistant_prefix:  # the assistant's words up to an image: trailing space dropped, as in training
            embeds = torch.cat([embeds, self._token_embeds(self.encode(assistant_prefix, strip_right=True))])
        context.feed(embeds)
        return context

    @torch.no_grad()
    def generate(self, messages: list[dict[str, Any]], settings: GenerationSettings | None = None,
                 assistant_prefix: str = "", listener: Listener | None = None) -> GenerationResult:
        """The assistant's reply to ``messages`` (which end with a user turn), optionally
        continuing an assistant message that starts with ``assistant_prefix``.

        ``listener`` hears the reply as it grows (``Listener``): text a token at a time, held back only
        while it could still turn out to be the start of a ``stop`` string or half a UTF-8 character.
        """
        settings = settings or GenerationSettings()
        tokenizer, head = self.model.tokenizer, self.model.head
        generator = torch.Generator().manual_seed(settings.seed)
        context = self._start(messages, assistant_prefix)
        result = GenerationResult(finish_reason="length")
        segment = _TextSegment(tokenizer, settings.stop, listener)
        trigger = head.token_ids.get(head.trigger) if head.trigger else None
        never = [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] + [
            i for t, i in head.token_ids.items() if t != head.trigger]
        for _ in range(settings.max_new_tokens):
            banned = list(never)
            if trigger is not None and len(result.images) >= settings.max_images:
                banned.append(trigger)
            token = self._next_token(context.last_logits, settings, generator, banned)
            result.completion_tokens += 1
            if token == tokenizer.eos_token_id:
                result.finish_reason = "stop"
                break
            if token != trigger:
                if segment.add(token):  # a stop string: the reply ends before it
                    result.finish_reason = "stop"
                    break
                context.feed(self._token_embeds([token]))
                continue
            segment.close(result.parts)
            part, condition = self._image_from_trigger(context, token, settings, generator, len(result.images))
            result.completion_tokens += part.tokens
            result.parts.append(part)
            result.conditions.append(condition)
            if listener is not None:
                listener("image", part)
        segment.close(result.parts)
        return result

    @torch.no_grad()
    def prompt_logits(self, messages: list[dict[str, Any]], assistant_prefix: str = "") -> torch.Tensor:
        """The next-token logits (V,) after ``messages`` (and ``assistant_prefix``): what the first
        sampled token is drawn from, for scoring answers without generating them."""
        return self._start(messages, assistant_prefix).last_logits

    @torch.no_grad()
    def image_at(self, messages: list[dict[str, Any]], assistant_prefix: str = "",
                 settings: GenerationSettings | None = None) -> tuple[ImagePart, SDXLCondition]:
        """The image the head makes at this exact point of the conversation (the trigger is
        forced): the ablation's probe of what each head draws for the same context."""
        settings = settings or GenerationSettings()
        head = self.model.head
        generator = torch.Generator().manual_seed(settings.seed)
        context = self._start(messages, assistant_prefix)
        return self._image_from_trigger(context, head.token_ids[head.trigger], settings, generator, 0)
