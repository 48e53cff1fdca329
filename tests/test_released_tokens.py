"""The token sequence around images equals the released TextBind code's, with a real SentencePiece Llama tokenizer.

The expected ids are computed here from the release's logic, written out from its code:
``data_utils.preprocess_llama`` and ``preprocess_mim`` (SihengLi99/TextBind), run with
transformers 4.31's slow ``LlamaTokenizer`` in its legacy mode (Llama-2-chat's config of
2023 set no ``legacy`` key) and its ``PreTrainedTokenizer.tokenize``:

- the text is cut at special tokens; tokens added as plain strings (``<image>``,
  ``<start>``, ``<end>``, via ``add_special_tokens``) strip the whitespace on both
  sides; ``<s>``, ``</s>``, ``<unk>`` are ``AddedToken(lstrip=False, rstrip=False)``;
- each remaining piece is ``sp_model.encode(piece)``: SentencePiece's dummy prefix
  gives every piece a leading ``▁`` (legacy mode removes nothing);
- a turn pair is ``f"{bos}[INST] {prompt.strip()} [/INST]"`` (untrained) and
  ``f"{answer.strip()} {eos}"`` (trained), ``<image>`` expanded to 32 ``<image>``;
  a system turn is folded into the first prompt with ``<<SYS>>``;
- an assistant image's first image-token label becomes ``<start>``, the rest -100, and
  ``[<start>] + encode(caption) + [<end>]`` is appended with labels ``[-100, ...]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from datamodules import IGNORE_INDEX, render_conversation
from heads import LanguageDescriptionHead
from synth.data.schema import Conversation, Turn
from synth.model_parts.text_tokenizers import LLAMA2_CHAT_TEMPLATE

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_llama_sentencepiece"
ADDED = ("<image>", "<start>", "<end>")  # utils.build_model_and_processor, in this order
QUERIES = 32
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Released:
    """The release's tokenizer (4.31, legacy) and preprocessing, on the same SentencePiece model."""

    def __init__(self, model_file: Path) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.special = {"<s>": self.sp.bos_id(), "</s>": self.sp.eos_id(), "<unk>": self.sp.unk_id()}
        self.special |= {token: self.sp.get_piece_size() + index for index, token in enumerate(ADDED)}
        self.pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special, key=len,
                                                                                reverse=True)) + ")")

    def encode(self, text: str) -> list[int]:
        parts = self.pattern.split(text)
        for index in range(1, len(parts), 2):
            if parts[index] in ADDED:  # plain-string special tokens: strip both neighbours
                parts[index - 1], parts[index + 1] = parts[index - 1].rstrip(), parts[index + 1].lstrip()
        ids = []
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self.special[part])
            elif part:
                ids += self.sp.encode(part)  # legacy: the dummy prefix stays on every piece
        return ids

    def preprocess(self, dialog: list[dict]) -> tuple[list[int], list[int], list[list[int]]]:
        """(input_ids, labels) of the main sequence and the caption branches' ids."""
        dialog = [dict(turn, content=turn["content"].replace("<image>", "<image>" * QUERIES)) for turn in dialog]
        if dialog[0]["role"] == "system":
            dialog = [dict(dialog[1], content=B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"])] + dialog[2:]
        input_ids, labels, captions = [], [], []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            prompt_ids = self.encode(f"<s>[INST] {prompt['content'].strip()} [/INST]")
            answer_ids = self.encode(f"{answer['content'].strip()} </s>")
            input_ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            captions += answer.get("caption_list", [])
        branches, index, image = [], 0, self.special["<image>"]
        while index < len(input_ids):
            if input_ids[index] == image and labels[index] != IGNORE_INDEX:
                caption = captions[len(branches)]
                branches.append([self.special["<start>"]] + self.sp.encode(caption) + [self.special["<end>"]])
                labels[index] = self.special["<start>"]
                labels[index + 1:index + QUERIES] = [IGNORE_INDEX] * (QUERIES - 1)
                index += QUERIES
            else:
                index += 1
        return input_ids, labels, branches


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(FIXTURE))  # as build_llm loads Llama-2 from a directory
    loaded.add_special_tokens({"additional_special_tokens": list(ADDED)})
    loaded.pad_token = loaded.unk_token
    loaded.chat_template = LLAMA2_CHAT_TEMPLATE
    return loaded


CONVERSATION = Conversation("parity", [
    Turn("system", "Be helpful."),
    Turn("user", "Here they are: <image> and <image>. Which one do you like?", ["a.png", "b.png"]),
    Turn("assistant", "The first. It reminds me of this: <image> a calm place.", ["c.png"], ["a quiet lake at dawn"]),
    Turn("user", "<image>what about this one?", ["d.png"]),
    Turn("assistant", "That is a busy street."),
])


def names(ids: list[int], tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens([i for i in ids if i != IGNORE_INDEX])


def test_tokens_around_images_equal_the_released_preprocessing(tokenizer) -> None:
    released = Released(FIXTURE / "tokenizer.model")
    dialog = [{"role": t.role, "content": t.content, "caption_list": t.caption_list} for t in CONVERSATION.turns]
    expected_ids, expected_labels, expected_branches = released.preprocess(dialog)
    ours = render_conversation(CONVERSATION, tokenizer, LanguageDescriptionHead(), QUERIES)
    # the SentencePiece pieces keep their ids; the three added tokens are compared by name
    assert names(ours.input_ids, tokenizer) == [released.sp.id_to_piece(i) if i < released.sp.get_piece_size()
                                                else ADDED[i - released.sp.get_piece_size()] for i in expected_ids]
    added = {i: tokenizer.convert_tokens_to_ids(t) for t, i in released.special.items() if t in ADDED}
    assert ours.input_ids == [added.get(i, i) for i in expected_ids]
    assert ours.labels == [added.get(i, i) if i != IGNORE_INDEX else i for i in expected_labels]
    assert [branch for _, branch, _ in ours.branches] == [[added.get(i, i) for i in b] for b in expected_branches]


def test_no_lone_space_before_an_image_and_inst_keeps_its_prefix(tokenizer) -> None:
    ours = render_conversation(CONVERSATION, tokenizer, LanguageDescriptionHead(), QUERIES)
    pieces = tokenizer.convert_ids_to_tokens(ours.input_ids)
    image_starts = [i for i, piece in enumerate(pieces) if piece == "<image>" and pieces[i - 1] != "<image>"]
    assert len(image_starts) == 4 and all(pieces[i - 1] != "▁" for i in image_starts)
    assert pieces[:4] == ["<s>", "▁[", "INST", "]"]  # as Meta's Llama-2 chat format; transformers 5 in one call
    # gives "<s> [ INST ]" for the same text
    one_call = tokenizer("<s>[INST] hi", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(one_call)[1] == "["
