"""Tokenizers built locally with the ``tokenizers`` library, for the tiny presets.

No hub is reachable here, so the tiny LLM and the tiny CLIP text encoders get
real BPE tokenizers trained with ``tokenizers`` on the bundled sample text
(``train_*_bpe``; the result is shipped in ``assets/``, regenerated with
``python -m synth.model_parts.text_tokenizers``). They use the same ``transformers`` classes as the real models
(``LlamaTokenizer``, ``CLIPTokenizer``), so everything downstream (chat
templates, special tokens, padding, ``save_pretrained``) runs the code path
the real checkpoints take.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from synth.samples import text_corpus

#: Trained vocabularies and merges, shipped because BPE training breaks ties between
#: equally frequent pairs in hash-map order, which differs between processes: a tiny
#: model saved by one process must meet the same token ids in the next.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
LLAMA_ASSET = ASSETS_DIR / "tiny_llama_bpe.json"
CLIP_ASSET = ASSETS_DIR / "tiny_clip_bpe.json"

#: Llama-2-chat's prompt format (``[INST]``/``<<SYS>>``), as a Jinja chat template.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

#: Every special token any head or the vision path may ask for. The tiny tokenizer
#: carries them all so that swapping heads never changes the tiny LLM's vocabulary;
#: heads add the ones they need to real tokenizers (adding an existing token is a no-op).
HEAD_SPECIAL_TOKENS = ("<image>", "<start>", "<end>", "<img>") + tuple(f"<IMG{i}>" for i in range(1, 9))

_LLAMA_BASE_SPECIALS = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _merges(trained) -> list[tuple[str, str]]:
    return [tuple(pair) for pair in json.loads(trained.to_str())["model"]["merges"]]


def train_llama_bpe(vocab_size: int = 768) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the tiny Llama-style BPE on the bundled sample text (writes nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_LLAMA_BASE_SPECIALS, show_progress=False)
    trained.train_from_iterator(text_corpus(), trainer)
    return trained.get_vocab(), _merges(trained)


def tiny_llama_tokenizer():
    """A Llama-2-style tokenizer: SentencePiece-like BPE with byte fallback, so any
    text (any script, emoji) tokenizes without ``<unk>``; Llama-2's chat template;
    ``<unk>`` doubles as the pad token, as is usual for Llama-2 fine-tuning.
    """
    from transformers import LlamaTokenizer

    vocab, merges = _load_asset(LLAMA_ASSET)
    tokenizer = LlamaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, add_eos_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(HEAD_SPECIAL_TOKENS)})
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def train_clip_bpe(vocab_size: int = 1024) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the tiny CLIP-style BPE on the bundled sample text (writes nothing)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    trained.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    trained.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(text_corpus(), trainer)
    merges = _merges(trained)
    # CLIP's vocabulary layout: every byte symbol alone and word-final, then one
    # token per merge, then the two specials; so no byte ever maps to <unk>.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_assets() -> None:
    """Retrain both tiny BPEs and overwrite the shipped assets (changes every tiny token id)."""
    ASSETS_DIR.mkdir(exist_ok=True)
    for path, (vocab, merges) in ((LLAMA_ASSET, train_llama_bpe()), (CLIP_ASSET, train_clip_bpe())):
        path.write_text(json.dumps({"vocab": vocab, "merges": merges}, ensure_ascii=False, indent=0) + "\n",
                        encoding="utf-8")


@lru_cache(maxsize=None)
def _load_asset(path: Path) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["vocab"], tuple(tuple(pair) for pair in data["merges"])


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77):
    """A CLIP tokenizer (lower-cased byte-level BPE, ``</w>`` word ends, 77 tokens).

    SDXL's second tokenizer pads with ``!`` instead of ``<|endoftext|>``; pass
    ``pad_token="!"`` to mirror it.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _load_asset(CLIP_ASSET)
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tokenizer.model_max_length = max_length
    return tokenizer


if __name__ == "__main__":
    write_assets()
