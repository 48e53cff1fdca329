"""BLIP-2's vision side: EVA ViT-g vision model, Q-Former and its learned queries.

MIM takes these three parts from ``Salesforce/blip2-flan-t5-xxl`` (paper
section 5.1, footnote 6). Only ``vision_model.*``, ``qformer.*`` and
``query_tokens`` are read from the checkpoint; the Flan-T5 language model in
the same files is never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from synth.model_parts.checkpoint_files import read_tensors, strip_prefix
from synth.model_parts.source import ModelSource, check_preset, preset_weights_rng

#: Paper section 5.1: "our vision encoder and Q-Former are initialized from BLIP-2".
DEFAULT_BLIP2 = "Salesforce/blip2-flan-t5-xxl"
#: OpenAI CLIP normalisation, which BLIP-2's image processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Blip2Parts:
    """The three BLIP-2 parts MIM uses, and the image processor that feeds them."""

    vision_model: nn.Module  # Blip2VisionModel
    qformer: nn.Module  # Blip2QFormerModel
    query_tokens: nn.Parameter  # (1, num_query_tokens, qformer_hidden)
    image_processor: object  # BlipImageProcessorPil

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def qformer_hidden_size(self) -> int:
        return self.query_tokens.shape[2]

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> Q-Former query outputs (N, num_query_tokens, qformer_hidden)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, P+1, vision_hidden)
        queries = self.query_tokens.expand(pixel_values.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state


def tiny_blip2_config(num_query_tokens: int = 32, image_size: int = 32):
    """A BLIP-2 config a laptop CPU runs in milliseconds; same layer types as ViT-g."""
    from transformers import Blip2Config

    hidden = 32
    # initializer_range: Blip2VisionConfig's default (1e-10) assumes Salesforce's weights are always
    # loaded over it; built at random it leaves every weight ~0 and the tower blind (one output for
    # every picture). The Q-Former's default 0.02 is sized for width ~1000: at width 32 it leaves
    # 0.03% of the Q-Former output's variance to the picture. hidden**-0.5 (LeCun's fan-in scale)
    # keeps each layer's activations at unit scale as 0.02 does at full width: 79% of the output's
    # variance then comes from the picture, as in a pretrained BLIP-2 whose queries read the image.
    init = hidden**-0.5
    vision = dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, initializer_range=init)
    qformer = dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   cross_attention_frequency=1, encoder_hidden_size=hidden, vocab_size=99,
                   max_position_embeddings=64, initializer_range=init)
    # The language model is never built by us; a tiny OPT config only keeps the
    # composite config complete so a saved tiny checkpoint has BLIP-2's layout.
    text = dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=37,
                vocab_size=99, max_position_embeddings=64, word_embed_proj_dim=32)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=num_query_tokens)


def _image_processor(image_size: int):
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def blip2_config(source: ModelSource | str | dict = DEFAULT_BLIP2):
    """The BLIP-2 configuration (query count, widths), without weights."""
    from transformers import Blip2Config

    source = ModelSource.parse(source)
    if source.preset is not None:
        check_preset(source, "BLIP-2")
        return tiny_blip2_config()
    return Blip2Config.from_pretrained(source.pretrained, **source.pretrained_kwargs())


def blip2_image_processor(source: ModelSource | str | dict = DEFAULT_BLIP2):
    """BLIP-2's image processor alone (what the datamodules need before any weight is loaded)."""
    from transformers import BlipImageProcessorPil

    source = ModelSource.parse(source)
    if source.preset is not None:
        return _image_processor(blip2_config(source).vision_config.image_size)
    return BlipImageProcessorPil.from_pretrained(source.pretrained, **source.pretrained_kwargs())


def build_blip2(source: ModelSource | str | dict = DEFAULT_BLIP2) -> Blip2Parts:
    """Vision model, Q-Former and query tokens from a BLIP-2 checkpoint or a preset."""
    from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel, BlipImageProcessorPil

    source = ModelSource.parse(source)
    if source.preset is not None:
        check_preset(source, "BLIP-2")
        config = tiny_blip2_config()
        with preset_weights_rng():
            vision_model = Blip2VisionModel(config.vision_config)
            qformer = Blip2QFormerModel(config.qformer_config)
            query_tokens = nn.Parameter(
                torch.randn(1, config.num_query_tokens, config.qformer_config.hidden_size) * 0.02)
        return Blip2Parts(vision_model.eval(), qformer.eval(), query_tokens,
                          _image_processor(config.vision_config.image_size))

    kwargs = source.pretrained_kwargs()
    config = Blip2Config.from_pretrained(source.pretrained, **kwargs)
    tensors = read_tensors(source.pretrained, ("vision_model.", "qformer.", "query_tokens"), source.revision)
    vision_model = Blip2VisionModel(config.vision_config)
    qformer = Blip2QFormerModel(config.qformer_config)
    # strict loads: every parameter must come from the checkpoint, nothing extra may be in it.
    vision_model.load_state_dict(strip_prefix(tensors, "vision_model."), strict=True)
    qformer.load_state_dict(strip_prefix(tensors, "qformer."), strict=True)
    query_tokens = nn.Parameter(tensors["query_tokens"].clone())
    if source.torch_dtype is not None:
        vision_model.to(source.torch_dtype)
        qformer.to(source.torch_dtype)
        query_tokens = nn.Parameter(query_tokens.data.to(source.torch_dtype))
    image_processor = BlipImageProcessorPil.from_pretrained(source.pretrained, **kwargs)
    # eval mode, as from_pretrained leaves models: the trainer switches modes itself.
    return Blip2Parts(vision_model.eval(), qformer.eval(), query_tokens, image_processor)
