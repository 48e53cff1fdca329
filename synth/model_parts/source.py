"""Where a model part comes from: a checkpoint or a named random-weight preset.

Every builder in :mod:`synth.model_parts` takes a :class:`ModelSource`, so a YAML
config chooses between the paper's checkpoints and the offline tiny models
with the same two keys::

    llm: {pretrained: meta-llama/Llama-2-7b-chat-hf, dtype: bfloat16}
    llm: {preset: tiny}
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """A model part's origin.

    Args:
        pretrained: hub id (``meta-llama/Llama-2-7b-chat-hf``) or local directory
            written by ``save_pretrained``.
        preset: name of a random-weight preset built from a config (``tiny``).
        dtype: weights dtype for ``pretrained`` loads: float32, float16 or bfloat16.
        revision: hub revision (branch, tag or commit) for ``pretrained``.
        options: extra keyword arguments for ``from_pretrained`` (``gguf_file``,
            ``variant``, ...).
        quantization: ``8bit`` or ``4bit`` to load an LLM through bitsandbytes (inference on a small GPU).
    """

    pretrained: str | None = None
    preset: str | None = None
    dtype: str | None = None
    revision: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    quantization: str | None = None

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.preset is None):
            raise ValueError(
                f"ModelSource needs exactly one of 'pretrained' (hub id or local path) or "
                f"'preset' (e.g. 'tiny'); got pretrained={self.pretrained!r}, preset={self.preset!r}"
            )
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"ModelSource.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.preset is not None and (self.revision or self.options or self.quantization):
            raise ValueError("'revision', 'options' and 'quantization' apply to 'pretrained' sources only, "
                             "not to presets")
        if self.quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"ModelSource.quantization must be '8bit' or '4bit', got {self.quantization!r}")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.dtype] if self.dtype else None

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by every ``from_pretrained`` call for this source."""
        kwargs: dict[str, Any] = dict(self.options)
        if self.revision is not None:
            kwargs["revision"] = self.revision
        return kwargs

    @classmethod
    def parse(cls, value: "ModelSource | str | dict[str, Any]") -> "ModelSource":
        """Accept a ModelSource, a mapping from YAML, or a bare string.

        A bare string ``tiny`` means the preset; anything else is a hub id or path.
        """
        if isinstance(value, ModelSource):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, str):
            return cls(preset=value) if value in PRESETS else cls(pretrained=value)
        raise TypeError(f"cannot build a ModelSource from {type(value).__name__}: {value!r}")


#: ``from_pretrained`` options that make a load import or download code: transformers' and diffusers'
#: ``trust_remote_code``, diffusers' ``custom_pipeline``, transformers' hub kernels (``use_kernels``,
#: ``attn_implementation`` naming a hub repository) and the revision of remote code.
CODE_LOADING_OPTIONS = ("trust_remote_code", "custom_pipeline", "use_kernels", "code_revision")


class UnsafeModelSourceError(ValueError):
    """A model source read from a file asks to run code; only the user may ask that."""


def code_loading_options(source: "ModelSource | dict[str, Any] | str | None") -> list[str]:
    """The options of ``source`` that would load code (empty for a source that runs none)."""
    if source is None or isinstance(source, str):
        return []
    options = source.options if isinstance(source, ModelSource) else (source.get("options") or {})
    if not isinstance(options, dict):
        return []
    found = [key for key in CODE_LOADING_OPTIONS if options.get(key)]
    attention = options.get("attn_implementation")
    if isinstance(attention, str) and "/" in attention:  # kernels-community/...: downloaded and run
        found.append("attn_implementation")
    return found


def refuse_code_from_file(source: "ModelSource | dict[str, Any] | str | None", where: str) -> None:
    """A file being loaded (a MIM directory's mim.json, a checkpoint's hyperparameters) never opts itself
    into running code: ``trust_remote_code`` and its kin come only from the user's command line or config."""
    found = code_loading_options(source)
    if found:
        raise UnsafeModelSourceError(
            f"{where} sets {', '.join(f'options.{key}' for key in found)}: a file being loaded cannot opt itself "
            "into running code (it would import the model's own Python files). If you trust this model and its "
            "code, load it with trust_remote_code=True (`--trust_remote_code true` on the command line); "
            "otherwise remove the option from the file.")


#: Preset names every builder in :mod:`synth.model_parts` understands.
PRESETS = ("tiny",)


#: Presets draw their random weights from this seed, in a forked RNG: a tiny model is
#: the same in every process (a resumed stage must meet the model it started with)
#: and building one leaves the caller's random state untouched.
PRESET_SEED = 0


@contextmanager
def preset_weights_rng() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED)
        yield


def check_preset(source: ModelSource, part: str) -> None:
    if source.preset not in PRESETS:
        raise ValueError(f"unknown {part} preset {source.preset!r}; known presets: {', '.join(PRESETS)}")
