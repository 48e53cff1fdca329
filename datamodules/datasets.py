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
from synth.data.pairs import ImagePair, open_image
from synth.data.schema import IMAGE_PLACEHOLDER, Conversation, Turn

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


#: Requests to draw an image, and the answer that shows it: the released code's 20
#: ``ImageGenerationTemplates`` (data_utils.py, SihengLi99/TextBind, Apache-2.0), word for word (its
#: typos included). Head pre-training (``task="generate"``) turns each caption into one of these.
GENERATION_TEMPLATES = (
    ("Now, I need you to creat an image for me, the main content is: {image_caption}, Thanks!",
     "My pleasure! Here you are <image>."),
    ("Could you create an image for me with this content: {image_caption}? Thanks a lot!",
     "Here's the image you requested: <image>."),
    ("I'd appreciate if you have an image with this description: {image_caption}.",
     "Happy to help! Here's your image: <image>."),
    ("Can you please create an image with the following caption: {image_caption}?",
     "Sure thing! Here's the image you asked for: <image>."),
    ("I was wondering if you could make an image based on this: {image_caption}.",
     "Absolutely! Here's the image you're looking for: <image>."),
    ("I need an image that represents this idea: {image_caption}. Can you help?",
     "Of course! Here's the image that fits your description: <image>."),
    ("Please create an image for me with this concept: {image_caption}.",
     "No problem! Here's the image you requested: <image>."),
    ("It would be great if you could make an image with this theme: {image_caption}.",
     "I'm happy to help! Here's the image based on your theme: <image>."),
    ("I'd love to see an image that captures this: {image_caption}.",
     "I've got you covered! Check out this image: <image>."),
    ("Can you come up with an image that has this content: {image_caption}?",
     "Sure! Here's an image with the content you described: <image>."),
    ("Please provide me with an image that showcases this: {image_caption}.",
     "Here's an image that showcases your request: <image>."),
    ("I'm looking for an image that depicts this: {image_caption}. Can you help?",
     "Certainly! Here's an image that depicts your request: <image>."),
    ("Could you generate an image based on this idea: {image_caption}?",
     "Here's an image generated based on your idea: <image>."),
    ("I'd be grateful if you could create an image with this subject: {image_caption}.",
     "I'm happy to assist! Here's the image with the subject you mentioned: <image>."),
    ("Can you design an image for me that includes this: {image_caption}?",
     "I'd be happy to! Here's the image that includes your request: <image>."),
    ("Please make an image for me that captures this essence: {image_caption}.",
     "Here's an image that captures the essence you described: <image>."),
    ("I need an image that conveys this message: {image_caption}. Can you create one?",
     "Sure! Here's an image that conveys the message you described: <image>."),
    ("I'd like to see an image that represents this concept: {image_caption}.",
     "Here's an image that represents the concept you mentioned: <image>."),
    ("Can you please come up with an image that illustrates this: {image_caption}?",
     "Here's an image that illustrates your request: <image>."),
    ("I'm looking for an image that embodies this idea: {image_caption}. Can you make one?",
     "Of course! Here's an image that embodies the idea you described: <image>."),
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
    """Image-caption pairs as a one-turn conversation.

    ``task="caption"`` (stage 1): an instruction with the image, then the caption.
    ``task="generate"`` (head pre-training): a request to draw the caption, then an answer that shows
    the image, whose caption is the head's target (SDXL embeddings, or the language head's branch).
    """

    def __init__(self, pairs: Sequence[ImagePair], interface: ModelInterface, max_length: int,
                 templates: Sequence[str] | None = None, seed: int = 0,
                 on_error: Literal["raise", "skip"] = "raise", truncation: str = "whole", task: str = "caption"):
        super().__init__(interface, max_length, on_error, truncation)
        if task not in ("caption", "generate"):
            raise ValueError(f"task must be 'caption' or 'generate', got {task!r}")
        if task == "caption":
            templates = list(templates or CAPTION_TEMPLATES)
            bad = [t for t in templates if t.count(IMAGE_PLACEHOLDER) != 1]
        else:
            templates = list(templates or GENERATION_TEMPLATES)
            bad = [t for t in templates if len(t) != 2 or "{image_caption}" not in t[0]
                   or t[1].count(IMAGE_PLACEHOLDER) != 1]
        if not templates or bad:
            raise ValueError(f"bad {task} templates (a caption template has one {IMAGE_PLACEHOLDER}; a generate "
                             f"template is (request with {{image_caption}}, answer with one {IMAGE_PLACEHOLDER})): "
                             f"{bad or 'none given'}")
        self.pairs = list(pairs)
        self.templates = templates
        self.seed = seed
        self.task = task

    def __len__(self) -> int:
        return len(self.pairs)

    def conversation(self, index: int) -> tuple[Conversation, str | None]:
        """``index`` may carry an epoch (:class:`~datamodules.samplers.EpochSampler`): the template is
        drawn anew for every epoch, as the release drew one per sample, and is the same on a rerun."""
        item, epoch = split_epoch(index, len(self.pairs))
        pair = self.pairs[item]
        template = random.Random(f"{self.seed}:{pair.id}:{epoch}").choice(self.templates)
        if self.task == "generate":
            request, answer = template
            turns = [Turn("user", request.format(image_caption=pair.caption)),
                     Turn("assistant", answer, [pair.image], [pair.caption])]
        else:
            turns = [Turn("user", template, [pair.image]), Turn("assistant", pair.caption)]
        return Conversation(id=pair.id, turns=turns), None  # references are used as they are
