"""Map-style datasets that render samples and load their images.

Both stages end in the same place: a conversation rendered by
:mod:`datamodules.rendering`. Alignment pairs become a two-turn conversation
(an instruction template with the image, and the caption as the answer).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from datamodules.collate import collate
from datamodules.samplers import split_epoch
from datamodules.rendering import OutputImageRenderer, RenderedSample, SampleError, render_conversation, truncate
from synth.pairs import ImagePair, open_image
from synth.schema import IMAGE_PLACEHOLDER, Conversation, Turn

#: Instructions for the alignment stage (section 5.2), one drawn for every sample: the released
#: code's 20 ``ImageCaptionTemplates`` (data_utils.py, SihengLi99/TextBind, Apache-2.0), word for word.
CAPTION_TEMPLATES = (
    "<image> Provide a short and precise description of the image displayed.",
    "Give a brief and accurate depiction of the picture shown. <image>",
    "<image> Present a concise and clear summary of the image seen.",
    "Offer a short and straightforward representation of the image provided. <image>",
    "<image> Share a brief, yet informative account of the picture presented.",
    "Deliver a concise and comprehensible explanation of the image shown. <image>",
    "<image> Express a succinct and clear narrative of the picture displayed.",
    "Convey a brief and unambiguous description of the image presented. <image>",
    "<image> Present a short and coherent account of the picture shown.",
    "Provide a compact and lucid representation of the image displayed. <image>",
    "<image> Give a brief and distinct explanation of the picture provided.",
    "Share a concise and easy-to-understand description of the image shown. <image>",
    "<image> Offer a clear and to-the-point narrative of the picture presented.",
    "Express a brief and well-defined interpretation of the image provided. <image>",
    "<image> Deliver a concise and intelligible account of the image displayed.",
    "Convey a short and easily grasped summary of the picture shown. <image>",
    "<image> Present a succinct and clear-cut representation of the image presented.",
    "Provide a brief and sharp explanation of the picture provided. <image>",
    "<image> Give a concise and articulate description of the image shown.",
    "Share a short and comprehensible narrative of the picture displayed. <image>",
)


@dataclass
class ModelInterface:
    """What the datamodules need from the model: nothing more, so they never import it."""

    tokenizer: Any
    renderer: OutputImageRenderer  # the generation head
    image_processor: Any
    num_query_tokens: int

    @property
    def image_token_id(self) -> int:
        from datamodules.rendering import IMAGE_TOKEN

        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def collate(self, items: list[dict | None]) -> dict[str, Any] | None:
        """Collate rendered items, dropping skipped ones (counted in ``batch["skipped"]``)."""
        kept = [item for item in items if item is not None]
        if not kept:
            return None
        batch = collate([item["sample"] for item in kept], self.tokenizer.pad_token_id)
        pixels = [item["pixel_values"] for item in kept if item["pixel_values"] is not None]
        batch["pixel_values"] = torch.cat(pixels) if pixels else None
        batch["skipped"] = len(items) - len(kept)
        if batch["output_captions"]:  # the head's extra targets (SDXL embeddings for the MSE heads)
            batch.update(self.renderer.targets(batch["output_captions"]))
        return batch


class RenderedDataset(Dataset):
    """Renders, truncates and loads the images of one record per item."""

    def __init__(self, interface: ModelInterface, max_length: int, on_error: Literal["raise", "skip"] = "raise",
                 truncation: str = "whole"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if truncation not in ("whole", "released"):
            raise ValueError(f"truncation must be 'whole' or 'released', got {truncation!r}")
        self.interface = interface
        self.max_length = max_length
        self.on_error = on_error
        self.truncation = truncation

    def conversation(self, index: int) -> tuple[Conversation, str | None]:
        raise NotImplementedError

    def render(self, index: int) -> dict[str, Any]:
        conversation, image_root = self.conversation(index)
        interface = self.interface
        sample = render_conversation(conversation, interface.tokenizer, interface.renderer,
                                     interface.num_query_tokens, image_root)
        sample = truncate(sample, self.max_length, interface.num_query_tokens, interface.image_token_id,
                          self.truncation)
        return {"sample": sample, "pixel_values": self._pixels(sample)}

    def _pixels(self, sample: RenderedSample) -> torch.Tensor | None:
        if not sample.images:
            return None
        images = []
        for reference in sample.images:
            try:
                images.append(open_image(reference))
            except (OSError, ValueError) as error:
                raise SampleError(f"record {sample.record_id!r}: cannot load image {reference}: {error}") from None
        return self.interface.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self.render(index)
        except SampleError:
            if self.on_error == "raise":
                raise
            return None


class ConversationDataset(RenderedDataset):
    """Conversations in the schema, each with the folder its image paths resolve under."""

    def __init__(self, conversations: Sequence[tuple[Conversation, str]], interface: ModelInterface,
                 max_length: int, on_error: Literal["raise", "skip"] = "raise", truncation: str = "whole"):
        super().__init__(interface, max_length, on_error, truncation)
        self.conversations = list(conversations)

    def __len__(self) -> int:
        return len(self.conversations)

    def conversation(self, index: int) -> tuple[Conversation, str | None]:
        return self.conversations[index]


class CaptionDataset(RenderedDataset):
    """Image-caption pairs as a one-turn conversation: an instruction template, then the caption."""

    def __init__(self, pairs: Sequence[ImagePair], interface: ModelInterface, max_length: int,
                 templates: Sequence[str] = CAPTION_TEMPLATES, seed: int = 0,
                 on_error: Literal["raise", "skip"] = "raise", truncation: str = "whole"):
        super().__init__(interface, max_length, on_error, truncation)
        bad = [t for t in templates if t.count(IMAGE_PLACEHOLDER) != 1]
        if not templates or bad:
            raise ValueError(f"each caption template needs exactly one {IMAGE_PLACEHOLDER}; bad: {bad or 'none given'}")
        self.pairs = list(pairs)
        self.templates = list(templates)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def conversation(self, index: int) -> tuple[Conversation, str | None]:
        """``index`` may carry an epoch (:class:`~datamodules.samplers.EpochSampler`): the template is
        drawn anew for every epoch, as the release drew one per sample, and is the same on a rerun."""
        item, epoch = split_epoch(index, len(self.pairs))
        pair = self.pairs[item]
        template = random.Random(f"{self.seed}:{pair.id}:{epoch}").choice(self.templates)
        turns = [Turn("user", template, [pair.image]), Turn("assistant", pair.caption)]
        return Conversation(id=pair.id, turns=turns), None  # references are used as they are
