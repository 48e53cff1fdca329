"""CLIP, for scoring image-caption pairs and embedding images (paper section 3.2).

Section 4.1 uses ``openai/clip-vit-base-patch16``. The image processor is the
PIL-backed one: the default backend needs torchvision, which this project
keeps out of its environment (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from synth.model_parts.source import ModelSource, check_preset, preset_weights_rng
from synth.model_parts.text_tokenizers import tiny_clip_tokenizer

#: Paper section 4.1: clip-vit-base-patch16 filters pairs and embeds images for clustering.
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


@dataclass
class ClipBundle:
    model: nn.Module  # CLIPModel
    processor: object  # CLIPProcessor: image_processor + tokenizer

    @torch.no_grad()
    def score_and_embed(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Match scores (N,) and image embeddings (N, vision_hidden) for aligned pairs.

        Score: section 3.2's 100 x cosine of the projected image and caption
        features. Embedding: "average pooling over the output of the image
        encoder" (section 3.2), i.e. the mean of the vision model's last hidden
        state over all tokens; this is what clustering groups.
        """
        vision = self.model.vision_model(pixel_values=pixel_values)
        embeddings = vision.last_hidden_state.mean(dim=1)  # (N, vision_hidden)
        image_features = self.model.visual_projection(vision.pooler_output)  # (N, projection_dim)
        # transformers 5: get_text_features returns an output whose pooler_output is the projection.
        text_features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        scores = 100 * torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
        return scores, embeddings

    def prepare(self, images: list, captions: list[str]) -> dict[str, torch.Tensor]:
        """Processor outputs for aligned images and captions (captions truncated to CLIP's 77 tokens)."""
        if len(images) != len(captions):
            raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
        inputs = self.processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True)
        return {key: inputs[key] for key in ("pixel_values", "input_ids", "attention_mask")}

    def match_scores(self, images: list, captions: list[str]) -> torch.Tensor:
        """Section 3.2's image-caption match score, 100 x cosine, for aligned pairs -> (N,)."""
        device = next(self.model.parameters()).device
        inputs = {key: value.to(device) for key, value in self.prepare(images, captions).items()}
        return self.score_and_embed(**inputs)[0]


def tiny_clip_config(vocab_size: int, image_size: int = 32):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def build_clip(source: ModelSource | str | dict = DEFAULT_CLIP) -> ClipBundle:
    """A CLIP model and its processor from a checkpoint or a preset."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    source = ModelSource.parse(source)
    if source.preset is not None:
        check_preset(source, "CLIP")
        tokenizer = tiny_clip_tokenizer()
        config = tiny_clip_config(len(tokenizer))
        image_size = config.vision_config.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                crop_size={"height": image_size, "width": image_size})
        with preset_weights_rng():
            model = CLIPModel(config)
        return ClipBundle(model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer))

    kwargs = source.pretrained_kwargs()
    image_processor = CLIPImageProcessorPil.from_pretrained(source.pretrained, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source.pretrained, **kwargs)
    if source.torch_dtype is not None:
        kwargs["dtype"] = source.torch_dtype
    model = CLIPModel.from_pretrained(source.pretrained, **kwargs)
    return ClipBundle(model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer))
