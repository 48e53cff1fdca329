"""Language description as the medium: the paper's MIM head (section 5.1, Figure 5).

The LLM writes an image's description between ``<start>`` and ``<end>``;
SDXL's own text encoders turn it into the image. It is trained with the
LLM's ordinary cross-entropy, so the head has no parameters and no loss of
its own.

Training layout (as in the released implementation): the caption is a branch
that sees only the context before the image; the position before the image
learns to emit ``<start>``; tokens after the image see the image through the
vision path, never the caption. At inference, ``<start>`` opens the caption,
``<end>`` closes it, the caption becomes an image, and the image (not the
caption) stays in the context.
"""

from __future__ import annotations


from datamodules.rendering import Branch, OutputImage
from heads.base import GenerationHead, SDXLCondition, untargeted_image

START, END = "<start>", "<end>"


class LanguageDescriptionHead(GenerationHead):
    """``<start> caption <end>`` per output image, cross-entropy like any text."""

    special_tokens = (START, END)
    trigger = START

    def __init__(self, trigger_loss_weight: float | None = None) -> None:
        """
        Args:
            trigger_loss_weight: cross-entropy weight of ``<start>`` (deciding to draw) as a term of its
                own; None: an ordinary label, as in the release.
        """
        super().__init__(**({} if trigger_loss_weight is None else {"trigger_loss_weight": trigger_loss_weight}))
        self.trigger_loss_weight = trigger_loss_weight

    def render_output_image(self, caption: str | None, record_id: str) -> OutputImage:
        """A caption branch after the image; an image without a caption stays a plain image (counted)."""
        if not caption or not caption.strip():
            return untargeted_image(record_id)
        return OutputImage(through_vision=True, branch=Branch(f"{START} {' '.join(caption.split())}{END}"))

    def condition(self, text: str, hidden=None) -> SDXLCondition:
        """The caption the LLM wrote between ``<start>`` and ``<end>``, for SDXL's own text encoders."""
        text = text.replace(START, " ").replace(END, " ")
        return SDXLCondition(prompt=" ".join(text.split()))
