"""SDXL text-encoder targets for the MSE heads, computed once into a disk cache keyed by caption.

A target is what SDXL's pipeline would condition on for the caption:
``prompt_embeds`` (the two text encoders' penultimate hidden states,
concatenated: 77 x 2048 for SDXL base) and ``pooled_prompt_embeds``
(text_encoder_2's projection: 1280), computed by diffusers' own
``encode_prompt``. One safetensors file per caption, named by the SHA-1 of
the caption and written atomically, so computing resumes wherever it stopped
and several runs share a cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from synth.atomic import atomic_path
from synth.model_parts import ModelSource


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


class SDXLTargetCache:
    """Targets by caption under ``directory``; ``compute`` fills in the missing ones."""

    def __init__(self, directory: str | os.PathLike[str], sdxl: ModelSource | str | dict, batch_size: int = 32,
                 store_dtype: torch.dtype = torch.float16):
        self.directory = Path(directory)
        self.sdxl = ModelSource.parse(sdxl)
        self.batch_size = batch_size
        self.store_dtype = store_dtype

    def path(self, caption: str) -> Path:
        key = caption_key(caption)
        return self.directory / key[:2] / f"{key}.safetensors"

    def missing(self, captions: Iterable[str]) -> list[str]:
        return sorted({caption for caption in captions if not self.path(caption).exists()})

    @torch.no_grad()
    def compute(self, captions: Iterable[str], device: str | torch.device | None = None) -> int:
        """Encode every caption not yet cached; return how many were computed."""
        from safetensors.torch import save_file

        from synth.model_parts.sdxl import build_sdxl_text_encoders

        todo = self.missing(captions)
        if not todo:
            return 0
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        encoders = build_sdxl_text_encoders(self.sdxl).to(device)
        for start in tqdm(range(0, len(todo), self.batch_size), desc="SDXL targets", unit="batch"):
            batch = todo[start:start + self.batch_size]
            prompt_embeds, _, pooled, _ = encoders.encode_prompt(batch, device=device,
                                                                 do_classifier_free_guidance=False)
            for index, caption in enumerate(batch):
                with atomic_path(self.path(caption)) as temporary:
                    save_file({"prompt_embeds": prompt_embeds[index].to(self.store_dtype).contiguous().cpu(),
                               "pooled_prompt_embeds": pooled[index].to(self.store_dtype).contiguous().cpu()},
                              str(temporary), metadata={"caption": caption})
        return len(todo)

    def load(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Stacked float32 targets: prompt_embeds (N, 77, D) and pooled_prompt_embeds (N, P)."""
        from safetensors.torch import load_file

        missing = self.missing(captions)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} caption(s) have no SDXL target in {self.directory} (first: {missing[0]!r}); "
                "the datamodule computes them in prepare_data, or call SDXLTargetCache.compute(captions)")
        loaded = [load_file(str(self.path(caption))) for caption in captions]
        return {key: torch.stack([item[key] for item in loaded]).float()
                for key in ("prompt_embeds", "pooled_prompt_embeds")}
