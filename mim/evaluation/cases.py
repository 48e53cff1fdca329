"""What every answering loop of ``mim evaluate`` shares: a case to answer, the admission of its messages
(context and image count checked before any image is decoded), and batches that isolate a failing row, so a
bad record costs only itself (held-out replay, the benchmarks, ``mim generate``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mim.inference.interleaved import GenerationSettings


@dataclass
class Case:
    """One assistant turn to replay: the reference history before it, and the reference turn."""

    key: str  # file/record/turn: unique, stable across runs
    record_id: str
    turn: int
    messages: list[dict[str, Any]]  # {"role", "content", "images": [paths]}, ending with a user turn
    reference_text: str
    reference_images: list[str] = field(default_factory=list)
    reference_captions: list[str] = field(default_factory=list)
    answer: dict[str, Any] | None = None  # the record's answer key for this turn (meta.answers), if any


def load_message_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from synth.data.images import decode_image_file

    return [{**m, "images": [decode_image_file(p) if isinstance(p, (str, Path)) else p for p in m["images"]]}
            for m in messages]


class RecordError(ValueError):
    """One record that cannot be answered; it costs only itself."""


def admit(messages: list[dict[str, Any]], generator, settings: GenerationSettings) -> list[dict[str, Any]]:
    """The messages with their images decoded, once they are known to fit: the prompt, the reply and the
    images it may draw must fit the LLM's context (checked from the text and the image count, before
    any image is decoded), and every image must decode. Raises :class:`RecordError` saying which rule."""
    context = generator.context_length()
    images = sum(len(m.get("images", [])) for m in messages)
    characters = sum(len(m.get("content", "")) for m in messages)
    reserve = settings.max_new_tokens + settings.max_images * generator.model.num_query_tokens
    if context:
        if images * generator.model.num_query_tokens + reserve > context:
            raise RecordError(f"too_many_images: {images} images take {images * generator.model.num_query_tokens:,} "
                              f"positions; with the reply's {reserve:,} that is over the model's {context:,}")
        if characters > 32 * context:  # no tokenizer makes tokens of 32 characters: too long without counting
            raise RecordError(f"prompt_too_long: {characters:,} characters cannot fit the model's {context:,} "
                              "positions")
        length = generator.prompt_length(messages)
        if length + reserve > context:
            raise RecordError(f"prompt_too_long: the prompt takes {length:,} positions; with the reply's {reserve:,} "
                              f"that is over the model's {context:,}")
    try:
        return load_message_images(messages)
    except OSError as error:  # missing, unreadable, truncated or bomb image (ImageDecodeError)
        raise RecordError(f"bad_image: {error}") from None


def generate_isolated(generate: Callable[[list, list], list], conversations: list, settings: list
                      ) -> list[Any | RecordError]:
    """``generate`` on the batch; if the batch fails, each row alone, so one bad row fails only itself."""
    try:
        return list(generate(conversations, settings))
    except (ValueError, OSError, RuntimeError, IndexError) as error:
        if len(conversations) == 1:
            return [RecordError(f"generation_failed: {type(error).__name__}: {error}")]
    return [generate_isolated(generate, [c], [s])[0] for c, s in zip(conversations, settings)]
