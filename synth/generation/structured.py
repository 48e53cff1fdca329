"""Appendix A's dialogue format as a constraint on decoding: small models write only dialogues that parse.

Off by default (``generate.structured: null``): the paper sends a prompt and filters free text. A model too small
to follow the prompt (SmolLM2-135M keeps 0 of 8) can be held to the format while it decodes instead, as
researchers now do with OpenAI's structured outputs, vLLM's structured outputs and llama.cpp grammars. Two
forms of one format, chosen per group from its captions:

- ``grammar`` (GBNF, as llama.cpp, vLLM and llguidance read it): ``Human:`` and ``Assistant:`` alternate, from
  ``min_turns`` to ``max_turns`` messages (4 and 5 by default: the prompt asks for fewer than 6, the released
  filter keeps 3 or more, and a dialogue ends with the Assistant, so 4); every image of the group appears exactly
  once, in any order and any turn, as ``<imgX> DESCRIPTION </imgX>`` with the caption written for the model (so
  it cannot drift); text runs between images and turn boundaries hold no ``<`` and no line break and are at most
  ``max_text_chars`` long. A model that would ignore the images must place them; a model that would loop on image
  tags cannot repeat one, and the whole dialogue has a bounded length, so it ends well before ``max_tokens``.
- ``json_schema`` (OpenAI's strict structured outputs, vLLM, llama.cpp): ``{"dialogue": [{"human": [parts],
  "assistant": [parts]}, ...]}``, a part ``{"text": ...}`` or ``{"image": X}``. Alternation, the number of
  messages, valid image indices and text runs are guaranteed; JSON Schema cannot say "each image exactly once
  across the dialogue", so a repeated or missing image is left to the section 3.2 filter. The reply is turned
  back into Appendix A's text (lossless: the JSON is a function of that text and back) before it is stored.

The section 3.2 filter runs on every output either way.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

KINDS = ("grammar", "json_schema")
#: How an OpenAI-compatible server takes a GBNF grammar: llama.cpp's server reads a top-level ``grammar`` field,
#: vLLM >= 0.10.2 ``structured_outputs: {grammar: ...}``, older vLLM ``guided_grammar``.
GRAMMAR_FIELDS = ("grammar", "structured_outputs", "guided_grammar")


@dataclass(frozen=True)
class Constraint:
    """What a backend holds its model to: a GBNF grammar or a JSON schema, and how to read the reply back."""

    kind: str  # "grammar" or "json_schema"
    spec: str | dict
    name: str = "dialogue"
    decode: Callable[[str], str] = field(default=lambda text: text, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"a constraint is one of {KINDS}, not {self.kind!r}")


def _gbnf_string(text: str) -> str:
    """A GBNF string literal: backslash, quote and control characters escaped."""
    out = []
    for char in text:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


@dataclass(frozen=True)
class DialogueFormat:
    """Appendix A's format for one image group (its captions, in the order the prompt lists them)."""

    captions: tuple[str, ...]
    min_turns: int = 4
    max_turns: int = 5
    max_text_chars: int = 240

    def __post_init__(self) -> None:
        if not self.captions:
            raise ValueError("a dialogue format needs the group's captions")
        if not 2 <= self.min_turns <= self.max_turns:
            raise ValueError(f"turns: need 2 <= min_turns <= max_turns, got {self.min_turns}, {self.max_turns}")
        if not any(t % 2 == 0 and self.min_turns <= t <= self.max_turns for t in range(2, self.max_turns + 1)):
            raise ValueError(f"turns {self.min_turns}..{self.max_turns}: a dialogue ends with the Assistant, so an "
                             "even number of messages must lie in the range")
        if self.max_text_chars < 8:
            raise ValueError(f"max_text_chars must be at least 8, got {self.max_text_chars}")

    def constraint(self, kind: str) -> Constraint:
        if kind == "grammar":
            return Constraint("grammar", self.grammar())
        if kind == "json_schema":
            return Constraint("json_schema", self.json_schema(), decode=self.text_from_json)
        raise ValueError(f"generate.structured must be one of {KINDS} (or null), got {kind!r}")

    # --- the grammar -----------------------------------------------------------------------------------

    @property
    def _full(self) -> int:
        return (1 << len(self.captions)) - 1

    def _can_finish(self, turn: int) -> bool:
        """Some Assistant message at index >= turn may end the dialogue (the rest of the images fit in it)."""
        return any(t % 2 == 1 and self.min_turns <= t + 1 <= self.max_turns for t in range(turn, self.max_turns))

    def grammar(self) -> str:
        """The GBNF grammar: one rule set per (message, images used so far), only states that can still finish."""
        rules: dict[str, str] = {}
        named: list[tuple[int, int]] = [(0, 0)]  # messages an end option names, to write rules for

        def end(turn: int, used: int) -> list[str]:  # close the dialogue, or start the next message
            options = []
            if turn % 2 == 1 and used == self._full and turn + 1 >= self.min_turns:
                options.append('""')
            if turn + 1 < self.max_turns and self._can_finish(turn + 1):
                options.append(f'"\\n\\n" u-{turn + 1}-{used}')
                named.append((turn + 1, used))
            return options

        @functools.lru_cache(maxsize=None)
        def after_image(turn: int, used: int) -> bool:  # z: text, another image, or the end of the message
            options = [f'" "? txt y-{turn}-{used}'] if after_text(turn, used) else []
            options += images(turn, used)
            options += end(turn, used)
            if options:
                rules[f"z-{turn}-{used}"] = " | ".join(options)
            return bool(options)

        @functools.lru_cache(maxsize=None)
        def after_text(turn: int, used: int) -> bool:  # y: an image, or the end of the message
            options = images(turn, used) + end(turn, used)
            if options:
                rules[f"y-{turn}-{used}"] = " | ".join(options)
            return bool(options)

        def images(turn: int, used: int, lead: str = '" "? ') -> list[str]:
            return [f"{lead}tag-{i} z-{turn}-{used | 1 << i}" for i in range(len(self.captions))
                    if not used & 1 << i and after_image(turn, used | 1 << i)]

        def message(turn: int, used: int) -> None:
            speaker = "Human" if turn % 2 == 0 else "Assistant"
            options = [f"txt y-{turn}-{used}"] if after_text(turn, used) else []
            options += images(turn, used, lead="")
            rules[f"u-{turn}-{used}"] = f'"{speaker}: " (' + " | ".join(options) + ")"

        written: set[tuple[int, int]] = set()
        while named:  # every message an end option names, and the rules it reaches
            state = named.pop()
            if state not in written:
                written.add(state)
                message(*state)
        lines = ['root ::= " "? u-0-0']  # SentencePiece models write the first word with its leading space
        lines += [f"{name} ::= {body}" for name, body in sorted(rules.items())]
        lines += [f"tag-{i} ::= " + _gbnf_string(f"<img{i}> {caption} </img{i}>")
                  for i, caption in enumerate(self.captions)]
        # no "<" (no tag the grammar did not write), no control character (no line break: no new speaker)
        lines.append(f"txt ::= [^<\\x00-\\x20\\x7F] [^<\\x00-\\x1F\\x7F]{{0,{self.max_text_chars - 1}}}")
        return "\n".join(lines) + "\n"

    # --- the JSON schema --------------------------------------------------------------------------------

    def json_schema(self) -> dict:
        """A strict-mode JSON schema (every object closed, every property required)."""
        text = {"type": "object", "additionalProperties": False, "required": ["text"],
                "properties": {"text": {"type": "string", "pattern": f"^[^<\\x00-\\x1F]{{1,{self.max_text_chars}}}$"}}}
        image = {"type": "object", "additionalProperties": False, "required": ["image"],
                 "properties": {"image": {"type": "integer", "enum": list(range(len(self.captions)))}}}
        message = {"type": "array", "minItems": 1, "maxItems": 2 * len(self.captions) + 1,
                   "items": {"anyOf": [text, image]}}
        exchange = {"type": "object", "additionalProperties": False, "required": ["human", "assistant"],
                    "properties": {"human": message, "assistant": message}}
        return {"type": "object", "additionalProperties": False, "required": ["dialogue"],
                "properties": {"dialogue": {"type": "array", "items": exchange, "minItems": -(-self.min_turns // 2),
                                            "maxItems": self.max_turns // 2}}}

    def text_from_json(self, reply: str) -> str:
        """A JSON reply as Appendix A's text; a reply that is not such JSON is returned as it is (the filter then
        rejects it, with the reply kept for inspection)."""
        try:
            exchanges = json.loads(reply)["dialogue"]
            messages = [(speaker, exchange[key]) for exchange in exchanges
                        for speaker, key in (("Human", "human"), ("Assistant", "assistant"))]
            lines = []
            for speaker, parts in messages:
                pieces = []
                for part in parts:
                    if "image" in part:
                        index = part["image"]
                        if not isinstance(index, int) or not 0 <= index < len(self.captions):
                            return reply
                        pieces.append(f"<img{index}> {self.captions[index]} </img{index}>")
                    else:
                        pieces.append(str(part["text"]).strip())
                lines.append(f"{speaker}: " + " ".join(p for p in pieces if p))
            return "\n\n".join(lines)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return reply


def dialogue_constraint(kind: str | None, captions: Sequence[str], min_turns: int = 4, max_turns: int = 5,
                        max_text_chars: int = 240) -> Constraint | None:
    """The constraint ``generate.structured`` asks for, for one group; None when it is off."""
    if kind is None:
        return None
    return DialogueFormat(tuple(captions), min_turns, max_turns, max_text_chars).constraint(kind)


def request_fields(constraint: Constraint | None, grammar_field: str = "grammar") -> dict:
    """The chat-completions body fields that carry ``constraint`` to an OpenAI-compatible server (the live
    ``openai`` backend and batch files alike): ``response_format`` with a strict JSON schema, or the grammar
    where the server reads it (``grammar_field``: see :data:`GRAMMAR_FIELDS`)."""
    if constraint is None:
        return {}
    if constraint.kind == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": constraint.name, "strict": True, "schema": constraint.spec}}}
    if grammar_field == "grammar":
        return {"grammar": constraint.spec}
    if grammar_field == "structured_outputs":
        return {"structured_outputs": {"grammar": constraint.spec}}
    if grammar_field == "guided_grammar":
        return {"guided_grammar": constraint.spec}
    raise ValueError(f"generate.grammar_field must be one of {GRAMMAR_FIELDS}, got {grammar_field!r}")
