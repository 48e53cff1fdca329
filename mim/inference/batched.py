"""Several assistant turns at once: one batched forward per step, each row with its own positions.

Rows diverge: one writes text while another draws an image (32 image embeddings
to feed) or cuts a caption out of its context. Everything is expressed with
masking, so one batched KV cache serves all rows::

    step:   row 0  [tok]            row 1  [img img ... img]     row 2  [tok]
    block:  [tok pad pad ... pad]          [img img ... img]            [tok pad ... pad]
    mask:    1   0   0  ...  0              1   1  ...  1                1   0  ...  0

Each step feeds a block as wide as the widest row's input; shorter rows are
padded with masked columns. A row keeps its own position counter, so the
positions a row sees are exactly those of the one-row generator. A language-
head caption is taken out of its row's context by masking its columns (and
rewinding the row's position), not by cropping the shared cache. Prompts are
left-padded. With greedy decoding a row gives what
:class:`~mim.inference.interleaved.InterleavedGenerator` gives for it alone, up to
floating-point noise from the different shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from datamodules.rendering import IMAGE_TOKEN
from mim.inference.interleaved import (
    GenerationResult,
    GenerationSettings,
    ImagePart,
    InterleavedGenerator,
    TextPart,
    decoder_step,
    next_token_logits,
)


@dataclass
class _Row:
    settings: GenerationSettings
    sampler: torch.Generator
    position: int = 0  # the position id of the row's next input
    result: GenerationResult = field(default_factory=GenerationResult)
    text_ids: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)  # (n, H) chunks of the row's live context
    pending: torch.Tensor | None = None  # embeddings to feed next, instead of a sampled token (n, H)
    pending_ids: list[int] = field(default_factory=list)  # token ids of ``pending`` (for the record)
    caption: list[int] | None = None  # language head: the caption being written, <start> first
    caption_columns: list[int] = field(default_factory=list)  # batch columns holding the caption
    caption_position: int = 0
    caption_hidden: int = 0  # how many hidden chunks the row had when the caption began
    steps: int = 0  # text tokens sampled
    done: bool = False
    last_logits: torch.Tensor | None = None


class BatchedGenerator:
    """Generates one assistant turn for each of several conversations, together."""

    def __init__(self, generator: InterleavedGenerator) -> None:
        self.generator = generator
        self.model = generator.model

    @torch.no_grad()
    def generate(self, conversations: list[list[dict[str, Any]]],
                 settings: GenerationSettings | list[GenerationSettings] | None = None) -> list[GenerationResult]:
        """The assistant's reply to each conversation (messages ending with a user turn)."""
        if not conversations:
            return []
        if not isinstance(settings, list):
            settings = [settings or GenerationSettings()] * len(conversations)
        if len(settings) != len(conversations):
            raise ValueError(f"{len(settings)} settings for {len(conversations)} conversations")
        rows = self._start(conversations, settings)
        while not all(row.done for row in rows):
            inputs = [None if row.done else self._next_input(row) for row in rows]
            if all(item is None for item in inputs):
                break
            self._feed(rows, inputs)
        for row in rows:
            if row.text_ids:
                row.result.parts.append(TextPart(self.model.tokenizer.decode(row.text_ids, skip_special_tokens=True)))
        return [row.result for row in rows]

    @torch.no_grad()
    def prompt_logits(self, conversations: list[list[dict[str, Any]]]) -> torch.Tensor:
        """Each conversation's next-token logits (B, V) from one left-padded batched prefill: what
        :meth:`InterleavedGenerator.prompt_logits` gives for each alone, up to floating-point noise."""
        rows = self._start(conversations, [GenerationSettings()] * len(conversations))
        return torch.stack([row.last_logits for row in rows])

    def _start(self, conversations: list[list[dict[str, Any]]], settings: list[GenerationSettings]) -> list[_Row]:
        prompts = [self.generator.prompt_embeddings(messages) for messages in conversations]
        rows = [_Row(s, torch.Generator().manual_seed(s.seed)) for s in settings]
        self._rows = rows
        self._prefill(rows, prompts)
        return rows

    # --- the batched cache -------------------------------------------------------------------

    def _prefill(self, rows: list[_Row], prompts: list[torch.Tensor]) -> None:
        device = prompts[0].device
        width = max(p.shape[0] for p in prompts)
        hidden_size = prompts[0].shape[1]
        embeds = torch.zeros(len(rows), width, hidden_size, dtype=prompts[0].dtype, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        positions = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for index, prompt in enumerate(prompts):  # left padding: every prompt ends in the last column
            length = prompt.shape[0]
            embeds[index, width - length:] = prompt
            mask[index, width - length:] = 1
            positions[index, width - length:] = torch.arange(length, device=device)
        self.mask = mask
        self.cache = None
        hidden = self._forward(embeds, positions)
        for index, (row, prompt) in enumerate(zip(rows, prompts)):
            row.position = prompt.shape[0]
            row.hidden.append(hidden[index, width - prompt.shape[0]:])
            row.last_logits = next_token_logits(self.model, hidden[index, -1:][None])[0, -1]

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, self.cache = decoder_step(self.model, embeds, positions, self.cache, attention_mask=self.mask)
        return hidden

    def _feed(self, rows: list[_Row], inputs: list[torch.Tensor | None]) -> None:
        width = max(item.shape[0] for item in inputs if item is not None)
        reference = next(item for item in inputs if item is not None)
        embeds = torch.zeros(len(rows), width, reference.shape[1], dtype=reference.dtype, device=reference.device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=reference.device)
        positions = torch.zeros(len(rows), width, dtype=torch.long, device=reference.device)
        start = self.mask.shape[1]
        for index, (row, item) in enumerate(zip(rows, inputs)):
            if item is None:
                continue
            count = item.shape[0]
            embeds[index, :count] = item
            mask[index, :count] = 1
            positions[index, :count] = torch.arange(row.position, row.position + count, device=item.device)
            if row.caption is not None:
                row.caption_columns += list(range(start, start + count))
        self.mask = torch.cat([self.mask, mask], dim=1)
        hidden = self._forward(embeds, positions)
        for index, (row, item) in enumerate(zip(rows, inputs)):
            if item is None:
                continue
            count = item.shape[0]
            row.position += count
            row.hidden.append(hidden[index, :count])
            row.last_logits = next_token_logits(self.model, hidden[index, count - 1:count][None])[0, -1]
            self._after_feed(row)

    # --- one row's decisions -------------------------------------------------------------------

    def _next_input(self, row: _Row) -> torch.Tensor | None:
        """What the row feeds this step: pending embeddings, or the embedding of a sampled token."""
        if row.pending is not None:
            item, row.pending = row.pending, None
            return item
        head, tokenizer = self.model.head, self.model.tokenizer
        if row.caption is not None:  # writing a language-head caption
            end = head.token_ids.get("<end>")
            banned = [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), row.caption[0]]
            if len(row.caption) > row.settings.max_caption_tokens:  # long enough: closed without a draw
                self._finish_caption(row)
                return self._next_input(row)
            token = self.generator._next_token(row.last_logits, row.settings, row.sampler, banned)
            if token in (end, tokenizer.eos_token_id):
                self._finish_caption(row)
                return self._next_input(row)
            row.caption.append(token)
            return self.generator._token_embeds([token])
        if row.steps >= row.settings.max_new_tokens:
            row.done = True
            return None
        trigger = head.token_ids.get(head.trigger) if head.trigger else None
        banned = [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] + [
            i for t, i in head.token_ids.items() if t != head.trigger]
        if trigger is not None and len(row.result.images) >= row.settings.max_images:
            banned.append(trigger)
        token = self.generator._next_token(row.last_logits, row.settings, row.sampler, banned)
        row.steps += 1
        if token == tokenizer.eos_token_id:
            row.done = True
            return None
        if token != trigger:
            row.text_ids.append(token)
            return self.generator._token_embeds([token])
        if row.text_ids:
            row.result.parts.append(TextPart(tokenizer.decode(row.text_ids, skip_special_tokens=True)))
            row.text_ids = []
        forced = head.forced_tokens()
        if forced:  # prompt-token head: its other tokens follow at once; the image is drawn after them
            row.pending_ids = [token] + forced
            return self.generator._token_embeds([token] + forced)
        if head.token_ids.get("<end>") is not None:  # language head: a caption branch begins
            row.caption = [token]
            row.caption_columns, row.caption_position, row.caption_hidden = [], row.position, len(row.hidden)
            return self.generator._token_embeds([token])
        row.pending_ids = [token]  # Q-Former head: <img> alone, then the image
        return self.generator._token_embeds([token])

    def _after_feed(self, row: _Row) -> None:
        """After an embedding head's tokens went in: condition on the hidden states, draw, feed the image."""
        if row.pending_ids:
            row.pending_ids = []
            condition = self.model.head.condition("", torch.cat(row.hidden))
            self._draw(row, condition, caption=None)

    def _finish_caption(self, row: _Row) -> None:
        tokenizer = self.model.tokenizer
        caption = tokenizer.decode(row.caption[1:], skip_special_tokens=True).strip() or None
        condition = self.model.head.condition(caption or "", None)
        # the caption leaves the context: its columns are masked and the row's positions rewound
        self.mask[self._row_index(row), row.caption_columns] = 0
        row.position = row.caption_position
        row.hidden = row.hidden[:row.caption_hidden]
        row.caption, row.caption_columns = None, []
        self._draw(row, condition, caption)

    def _draw(self, row: _Row, condition, caption: str | None) -> None:
        index = len(row.result.images)
        image = self.generator.draw(condition, row.settings, row.settings.seed + index)
        kind = "prompt" if condition.prompt is not None else "embeddings"
        row.result.parts.append(ImagePart(image, caption, kind))
        row.result.conditions.append(condition)
        row.pending = self.generator._image_embeds(image)

    def _row_index(self, row: _Row) -> int:
        return next(index for index, other in enumerate(self._rows) if other is row)
