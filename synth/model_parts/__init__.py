"""Model parts by origin: checkpoints (hub id or directory) or tiny offline presets.

Lives in ``synth`` because it is the one package every other may import
(``synth <- datamodules <- heads <- mim``): synth needs CLIP, the datamodules
need the LLM tokenizer, the heads need SDXL's text encoders, MIM needs all.
``transformers`` and ``diffusers`` are imported inside the builders, only when a part is built.
"""

from synth.model_parts.blip2 import DEFAULT_BLIP2, Blip2Parts, build_blip2
from synth.model_parts.clip import DEFAULT_CLIP, ClipBundle, build_clip
from synth.model_parts.llm import DEFAULT_LLM, LLMBundle, build_llm
from synth.model_parts.sdxl import DEFAULT_SDXL, build_sdxl
from synth.model_parts.source import PRESETS, ModelSource

__all__ = [
    "DEFAULT_BLIP2", "DEFAULT_CLIP", "DEFAULT_LLM", "DEFAULT_SDXL", "PRESETS",
    "Blip2Parts", "ClipBundle", "LLMBundle", "ModelSource",
    "build_blip2", "build_clip", "build_llm", "build_sdxl",
]
