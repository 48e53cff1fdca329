"""Lightning DataModules: image-caption pairs (alignment) and conversations (instruction tuning).

Depends on ``synth`` only. What an output image looks like in the token
stream is asked of the generation head through :class:`OutputImageRenderer`.
"""

from datamodules.collate import branch_attention_mask, collate
from datamodules.datasets import (
    CAPTION_TEMPLATES,
    GENERATION_TEMPLATES,
    CaptionDataset,
    ConversationDataset,
    ModelInterface,
)
from datamodules.modules import CaptionDataModule, ConversationDataModule, ConversationSource
from datamodules.rendering import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    Branch,
    OutputImage,
    OutputImageRenderer,
    RenderedSample,
    SampleError,
    render_conversation,
    truncate,
)

__all__ = [
    "CAPTION_TEMPLATES", "GENERATION_TEMPLATES", "IGNORE_INDEX", "IMAGE_TOKEN", "Branch", "CaptionDataModule", "CaptionDataset",
    "ConversationDataModule", "ConversationDataset", "ConversationSource", "ModelInterface", "OutputImage",
    "OutputImageRenderer", "RenderedSample", "SampleError", "branch_attention_mask", "collate",
    "render_conversation", "truncate",
]
