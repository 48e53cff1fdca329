"""Turn a conversation into one training sequence: token ids, labels, images, caption branches.

Layout (``Q`` = number of query tokens per image, 32 for BLIP-2)::

    main sequence:  [INST] ... <image>*Q ... [/INST] answer ... <image>*Q ... </s>
                                 ^ input image                ^ output image (anchor)
    branches:       <start> caption <end>      appended after the main sequence

Every image, input or output, is a run of ``Q`` image tokens in the main
sequence; the model replaces those embeddings with the image's query
outputs. How an *output* image is written is the generation head's business
(:class:`OutputImageRenderer`): the language-description head adds a branch
that sees only the context before the image, and whose first token is what
the position before the image learns to predict.

Labels follow Hugging Face's convention (the model shifts them): a label at
position ``i`` is predicted from position ``i - 1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from synth.data.schema import IMAGE_PLACEHOLDER, Conversation, SchemaError, Turn

IGNORE_INDEX = -100
#: The token whose embeddings are replaced by an image's query outputs.
IMAGE_TOKEN = "<image>"


class SampleError(ValueError):
    """A sample that cannot be rendered; the message names the record."""


@dataclass(frozen=True)
class Branch:
    """Tokens trained on a side branch anchored at an output image.

    ``text`` is tokenised as is; its first token is the anchor's label (what the
    position before the image predicts) and is itself not a training target.
    """

    text: str


@dataclass(frozen=True)
class OutputImage:
    """How a head writes one output image into the training sequence.

    ``tokens`` (e.g. ``<img>`` or ``<IMG1>...<IMG8>``) go right before the image and are
    trained with cross-entropy (only their first token with ``label_first_only``: the
    rest is forced at inference); their positions and the caption reach the head's
    loss. ``through_vision``: the image itself follows as an image run, so later
    tokens see it. ``branch``: a side branch anchored at the image (language head).
    """

    tokens: str = ""
    label_first_only: bool = False
    through_vision: bool = True
    branch: Branch | None = None
    untargeted: bool = False  # an assistant image no head can learn to draw (no caption): counted


@runtime_checkable
class OutputImageRenderer(Protocol):
    """What a generation head tells the datamodule about output images."""

    #: Whether ``targets`` needs ``prepare_targets`` run over the data's captions first.
    needs_targets: bool

    def render_output_image(self, caption: str | None, record_id: str) -> OutputImage: ...

    def targets(self, captions: list[str]) -> dict: ...

    def prepare_targets(self, captions: list[str]) -> None: ...


@dataclass
class RenderedSample:
    """One sample, before padding. Lists are in sequence order."""

    record_id: str
    input_ids: list[int]
    labels: list[int]
    images: list[str]  # image references, one per image run in input_ids, in order
    branches: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (anchor, ids, labels)
    outputs: list[tuple[int, int, str | None]] = field(default_factory=list)  # head tokens: (start, count, caption)
    untargeted: int = 0  # assistant images without a caption, kept as plain images

    @property
    def length(self) -> int:
        return len(self.input_ids) + sum(len(ids) for _, ids, _ in self.branches)


class TextEncoder:
    """Token ids for rendered chat text, as the released TextBind code's tokenizer produced them.

    The release (transformers 4.31, Llama-2's SentencePiece tokenizer in its legacy
    mode) cut text at special tokens, dropped the whitespace next to the tokens it had
    added (``<image>``, ``<start>``, ``<end>``; not next to ``<s>``/``</s>``), and
    encoded every piece on its own, so each piece got SentencePiece's leading ``▁``:
    ``<s>[INST]`` is ``<s> ▁[ INST ]`` and no ``▁`` stands alone before an image run.
    Encoding text in one call with transformers 5 gives ``<s> [ INST ]`` and that
    stray ``▁`` (Llama id 29871): tokens a converted released model never saw. So
    here the text is cut at every special token and each piece encoded separately.
    For byte-level BPE tokenizers (GPT-2, SmolLM2, Llama-3) this changes nothing but
    the dropped whitespace next to an image or head token.
    """

    def __init__(self, tokenizer, stripping: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stripping = {IMAGE_TOKEN, *stripping}
        specials = sorted({*tokenizer.all_special_tokens, *self.stripping}, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(re.escape(token) for token in specials) + ")")
        self.ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}

    def __call__(self, text: str, strip_left: bool = False, strip_right: bool = False) -> list[int]:
        """Ids of ``text``; ``strip_left``/``strip_right``: an image run or head token is next to it."""
        if strip_left:
            text = text.lstrip()
        if strip_right:
            text = text.rstrip()
        parts = self.pattern.split(text)  # text, special, text, special, ..., text
        for index in range(1, len(parts), 2):
            if parts[index] in self.stripping:
                parts[index - 1], parts[index + 1] = parts[index - 1].rstrip(), parts[index + 1].lstrip()
        ids: list[int] = []
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self.ids[part])
            elif part:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"]
        return ids

    def pieces(self, text: str) -> list[list[int]]:
        """Ids of the text between ``<image>`` placeholders: one more list than placeholders."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        return [self(piece, strip_left=index > 0, strip_right=index < len(pieces) - 1)
                for index, piece in enumerate(pieces)]


def _messages(turns: list[Turn]) -> list[dict[str, str]]:
    return [{"role": turn.role, "content": turn.content} for turn in turns]


def _render(tokenizer, turns: list[Turn], generation_prompt: bool = False) -> str:
    if not turns or all(turn.role == "system" for turn in turns):
        return ""
    return tokenizer.apply_chat_template(_messages(turns), tokenize=False, add_generation_prompt=generation_prompt)


def turn_segments(tokenizer, conversation: Conversation) -> list[tuple[str, Turn | None, bool]]:
    """The rendered chat split into (text, turn it belongs to, trained) pieces.

    The chat template is applied to growing prefixes of the conversation, so any
    template works whose rendering of a prefix is a prefix of the rendering of
    the whole: assistant content is trained; template text around it
    (``[INST]``, role headers) and everything the user or system said is not.
    A trailing user turn is dropped: there is nothing after it to learn.
    """
    turns = list(conversation.turns)
    while turns and turns[-1].role != "assistant":
        turns.pop()
    segments: list[tuple[str, Turn | None, bool]] = []
    rendered = ""
    for index, turn in enumerate(turns):
        if turn.role == "assistant":
            with_header = _render(tokenizer, turns[:index], generation_prompt=True)
            if not with_header.startswith(rendered):
                with_header = rendered
            if with_header != rendered:
                segments.append((with_header[len(rendered):], None, False))
            rendered = with_header
        full = _render(tokenizer, turns[:index + 1])
        if not full.startswith(rendered):
            raise SampleError(
                f"record {conversation.id!r}: the tokenizer's chat template does not render a conversation "
                f"prefix as a prefix of the whole (turn {index}); a template like that cannot mark which "
                "tokens are the assistant's")
        segments.append((full[len(rendered):], turn, turn.role == "assistant"))
        rendered = full
    return segments


def render_conversation(
    conversation: Conversation,
    tokenizer,
    renderer: OutputImageRenderer,
    num_query_tokens: int,
    image_root: str | None = None,
) -> RenderedSample:
    """Token ids, labels, image runs and branches for one conversation (untruncated)."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; add it first (mim adds it when it builds the LLM)")
    encode = TextEncoder(tokenizer, tuple(getattr(renderer, "special_tokens", ())))

    sample = RenderedSample(conversation.id, [], [], [])
    for text, turn, trained in turn_segments(tokenizer, conversation):
        pieces = encode.pieces(text)
        images = turn.image_list if turn is not None else []
        captions = turn.caption_list if turn is not None and turn.caption_list else [None] * len(images)
        if len(pieces) - 1 != len(images):
            raise SampleError(
                f"record {conversation.id!r}: the chat template changed the number of {IMAGE_PLACEHOLDER} "
                f"placeholders in a {turn.role if turn else 'template'} turn ({len(pieces) - 1} rendered, "
                f"{len(images)} images)")
        for position, ids in enumerate(pieces):
            sample.input_ids += ids
            sample.labels += ids if trained else [IGNORE_INDEX] * len(ids)
            if position == len(images):
                break
            try:
                reference = str(conversation.image_path(images[position], image_root)) if image_root is not None \
                    else images[position]
            except SchemaError as error:
                raise SampleError(f"record {conversation.id!r}: {error.detail}") from None
            # an image the assistant shows: the head decides how it is written and learnt
            output = renderer.render_output_image(captions[position], conversation.id) if trained else OutputImage()
            sample.untargeted += output.untargeted
            if output.tokens:
                ids = encode(output.tokens)
                sample.outputs.append((len(sample.input_ids), len(ids), captions[position]))
                sample.input_ids += ids
                sample.labels += [ids[0]] + [IGNORE_INDEX] * (len(ids) - 1) if output.label_first_only else ids
            if not output.through_vision:
                continue
            anchor = len(sample.input_ids)
            sample.input_ids += [image_token_id] * num_query_tokens
            sample.labels += [IGNORE_INDEX] * num_query_tokens
            sample.images.append(reference)
            if output.branch is not None:
                branch_ids = encode(output.branch.text)
                sample.labels[anchor] = branch_ids[0]
                sample.branches.append((anchor, branch_ids, [IGNORE_INDEX] + branch_ids[1:]))
    return sample


def truncate(sample: RenderedSample, max_length: int, num_query_tokens: int, image_token_id: int,
             mode: str = "whole") -> RenderedSample:
    """Cut the main sequence so that it plus its surviving branches fit ``max_length``.

    ``whole`` (ours): the cut never falls inside an image run or a head's token run: an
    image is kept whole or dropped with its run, and a branch or head target is kept only
    if its tokens are. ``released``: as the released ``preprocess_mim``, see :func:`truncate_released`.
    """
    if mode == "released":
        return truncate_released(sample, max_length, image_token_id)
    if mode != "whole":
        raise ValueError(f"truncation must be 'whole' or 'released', got {mode!r}")
    if sample.length <= max_length:
        return sample
    ids = torch.tensor(sample.input_ids)
    is_image = ids == image_token_id
    run_starts = torch.nonzero(is_image & ~torch.cat([torch.tensor([False]), is_image[:-1]])).flatten().tolist()
    spans = [(start, start + num_query_tokens) for start in run_starts]
    spans += [(start, start + count) for start, count, _ in sample.outputs]
    # cost of cutting at c: c main tokens + branches whose image ends at or before c
    branch_end = sorted((anchor + num_query_tokens, len(branch)) for anchor, branch, _ in sample.branches)
    cut = min(len(sample.input_ids), max_length)
    while cut > 0:
        inside = next((start for start, end in spans if start < cut < end), None)
        if inside is not None:
            cut = inside
            continue
        cost = cut + sum(length for end, length in branch_end if end <= cut)
        if cost <= max_length:
            break
        cut -= cost - max_length
    cut = max(cut, 0)
    kept_images = sum(1 for start in run_starts if start + num_query_tokens <= cut)
    return RenderedSample(
        sample.record_id, sample.input_ids[:cut], sample.labels[:cut], sample.images[:kept_images],
        [branch for branch in sample.branches if branch[0] + num_query_tokens <= cut],
        [output for output in sample.outputs if output[0] + output[1] <= cut])


def truncate_released(sample: RenderedSample, max_length: int, image_token_id: int) -> RenderedSample:
    """The released ``preprocess_mim``'s cut: branches are appended after the main sequence and the whole is
    cut at ``max_length``; a cut inside an image run moves forward to the run's end (so the sample can
    exceed ``max_length`` by up to one run less a token). A cut in the main sequence drops every branch;
    a cut in the branches keeps the main sequence and the branches' first tokens, a partial caption included.
    """
    if sample.length <= max_length:
        return sample
    main = len(sample.input_ids)
    if max_length >= main:
        branches, budget = [], max_length - main
        for anchor, ids, labels in sample.branches:
            if budget <= 0:
                break
            branches.append((anchor, ids[:budget], labels[:budget]))
            budget -= len(ids)
        return RenderedSample(sample.record_id, sample.input_ids, sample.labels, sample.images, branches,
                              sample.outputs)
    cut = max_length
    while cut < main and sample.input_ids[cut] == image_token_id:
        cut += 1
    kept_images = sample.input_ids[:cut].count(image_token_id) // max(1, _run_length(sample, image_token_id))
    return RenderedSample(sample.record_id, sample.input_ids[:cut], sample.labels[:cut], sample.images[:kept_images],
                          [], [output for output in sample.outputs if output[0] + output[1] <= cut])


def _run_length(sample: RenderedSample, image_token_id: int) -> int:
    """Tokens per image run (the number of query tokens), read off the sample."""
    total = sample.input_ids.count(image_token_id)
    return total // len(sample.images) if sample.images else 1
