"""MIM: BLIP-2 vision encoder + Q-Former + Llama-2 + a generation head + SDXL (paper section 5).

The model and its LightningModule (:class:`MIM`), and the ``mim`` command line.
"""

from mim.inference.chat import MIMChat
from mim.modeling.directory import load_model
from mim.inference.interleaved import GenerationResult, GenerationSettings, ImagePart, TextPart
from mim.modeling.mim_model import MIM, LoraSettings

__all__ = ["MIM", "GenerationResult", "GenerationSettings", "ImagePart", "LoraSettings", "MIMChat", "TextPart",
           "load_model"]
