"""Chat with a trained MIM: text and images in, text and images out.

::

    from mim import MIMChat
    chat = MIMChat.from_pretrained("runs/mim-export", sdxl="stabilityai/stable-diffusion-xl-base-1.0")
    result = chat.send("What do these have in common? <image> <image>", images=["a.jpg", "b.jpg"])
    result.text, result.images

A ``MIMChat`` keeps the conversation: the assistant's generated images stay
in it (through the vision path), so later turns can talk about them.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mim.inference.interleaved import GenerationResult, GenerationSettings, ImagePart, InterleavedGenerator
from synth.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image_file
from synth.data.schema import IMAGE_PLACEHOLDER
from synth.model_parts import ModelSource, build_sdxl

DEFAULT_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def _load_image(image: Any, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A path (decoded under the pixel limit, fully, so a damaged file fails here) or a PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return decode_image_file(image, max_pixels)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"image is {width} x {height} pixels, over the limit of "
                                                  f"{max_pixels:,}")
    return image.convert("RGB")


class MIMChat:
    """A conversation with a MIM model and an SDXL decoder."""

    def __init__(self, model, sdxl=None, refiner=None, settings: GenerationSettings | None = None) -> None:
        self.generator = InterleavedGenerator(model, sdxl, refiner)
        self.settings = settings or GenerationSettings()
        self.history: list[dict[str, Any]] = []

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], sdxl: ModelSource | str | dict | None = None,
                        refiner: ModelSource | str | dict | None = None, device: str | None = None,
                        dtype: str | None = None, settings: GenerationSettings | None = None,
                        watermark: bool = False, quantization: str | None = None,
                        sdxl_offload: bool = False, trust_remote_code: bool = False) -> "MIMChat":
        """Load a MIM directory (or .ckpt) and the SDXL it draws with.

        ``sdxl`` and ``refiner`` default to the ones recorded in the directory (else SDXL base 1.0 and
        no refiner). ``dtype`` (float16 / bfloat16) casts the model and SDXL, for GPUs. ``watermark``:
        SDXL's invisible watermark, as the released demo applied.

        For one GPU that cannot hold the 7B LLM and SDXL together: ``quantization`` (8bit / 4bit) loads
        the LLM through bitsandbytes (a LoRA or ``--merge_lora true`` export), and ``sdxl_offload`` keeps
        SDXL's parts in host memory, each moved to the GPU only while it runs (diffusers' model CPU
        offload: slower images, about 10 GB less on the GPU at SDXL's size).

        ``trust_remote_code``: let the directory's own model sources run their code (its mim.json asks for
        ``trust_remote_code``); without it such a directory is refused before anything is imported.
        """
        from mim.modeling.directory import CONFIG_FILE, load_model, read_config
        from synth.model_parts.sdxl import build_sdxl_refiner

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if sdxl_offload and device.type != "cuda":
            raise ValueError("sdxl_offload moves SDXL's parts between host memory and the GPU: it needs "
                             f"device cuda, not {device.type}")
        recorded = read_config(path) if (Path(path) / CONFIG_FILE).is_file() else {}
        model = load_model(path, quantization, trust_remote_code=trust_remote_code).eval()
        pipeline = build_sdxl(sdxl or recorded.get("sdxl") or DEFAULT_SDXL, watermark=watermark)
        refiner_source = refiner or recorded.get("refiner")
        refiner_pipeline = build_sdxl_refiner(refiner_source, pipeline, watermark) if refiner_source else None
        torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, None: None}[dtype]
        if quantization is None:
            model.to(device=device, dtype=torch_dtype)
        else:  # the quantized LLM is placed as it loads; the other parts follow it
            llm_device = next(model.llm.parameters()).device
            for name, child in model.named_children():
                if name != "llm":
                    child.to(device=llm_device, dtype=torch_dtype)
            model.query_tokens.data = model.query_tokens.data.to(llm_device, torch_dtype or model.query_tokens.dtype)
        for part in (pipeline, refiner_pipeline):
            if part is None:
                continue
            if not sdxl_offload:
                part.to(device, torch_dtype)
                continue
            if torch_dtype is not None:
                part.to(dtype=torch_dtype)
            part.enable_model_cpu_offload(device=device)
        return cls(model, pipeline, refiner_pipeline, settings)

    def reset(self) -> None:
        self.history = []

    def chat(self, messages: list[dict[str, Any]], **settings: Any) -> GenerationResult:
        """The assistant's reply to a whole conversation (``{"role", "content", "images"}``
        messages; images as PIL images or paths), without touching ``history``."""
        messages = [{**m, "images": [_load_image(i) for i in m.get("images", [])]} for m in messages]
        return self.generator.generate(messages, replace(self.settings, **settings))

    def chat_batch(self, conversations: list[list[dict[str, Any]]], **settings: Any) -> list[GenerationResult]:
        """Replies to several conversations at once: one batched forward per step (left padding, a KV
        cache per row; see :mod:`mim.inference.batched`). Greedy replies equal :meth:`chat`'s for each one."""
        from mim.inference.batched import BatchedGenerator

        loaded = [[{**m, "images": [_load_image(i) for i in m.get("images", [])]} for m in messages]
                  for messages in conversations]
        return BatchedGenerator(self.generator).generate(loaded, replace(self.settings, **settings))

    def send(self, text: str, images: list[Any] | None = None, **settings: Any) -> GenerationResult:
        """One user turn: the reply, with the turn and the reply kept in ``history``.

        Images without a placeholder in ``text`` are put at its start.
        """
        images = [_load_image(image) for image in images or []]
        missing = len(images) - text.count(IMAGE_PLACEHOLDER)
        if missing < 0:
            raise ValueError(f"the message has {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
                             f"but only {len(images)} image(s) attached; attach one image per {IMAGE_PLACEHOLDER} "
                             "or remove the extra placeholders")
        text = f"{IMAGE_PLACEHOLDER} " * missing + text
        turn_seed = self.settings.seed + len(self.history)
        result = self.generator.generate(self.history + [{"role": "user", "content": text, "images": images}],
                                         replace(self.settings, seed=turn_seed, **settings))
        self.history.append({"role": "user", "content": text, "images": images})
        self.history.append({"role": "assistant", "content": result.text,
                             "images": [p.image for p in result.parts if isinstance(p, ImagePart)]})
        return result
