"""Parse an LLM's dialogue into the conversation schema, or reject it with a reason (section 3.2).

Input: the generation for one image group, ``Human:``/``Assistant:`` turns with
images written ``<imgX> DESCRIPTION </imgX>``. Output: turns whose content has
an ``<image>`` placeholder where each tag was, with the group's image and its
*original* caption for each.

Rejected (each with a reason and a detail naming the place):

- ``no_turns`` / ``speaker_order`` / ``empty_turn`` / ``text_outside_turns``: dialogue format;
- ``unclosed_tag`` / ``mismatched_tag`` / ``bad_tag`` / ``bad_index``: image tags that do not pair up;
- ``unknown_image``: an index outside the group (an image the LLM invented);
- ``description_changed``: a description whose normalised edit distance to the
  caption exceeds the threshold (0.1 in the paper);
- ``repeated_image``: one image shown twice (the prompt forbids copying images; a
  co-reference error);
- ``literal_placeholder``: the text itself contains ``<image>``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from synth.data.schema import IMAGE_PLACEHOLDER

#: Appendix A's speaker names; models that write "User:"/"USER:" are parsed when those names are configured.
USER_NAMES, ASSISTANT_NAMES = ("Human",), ("Assistant",)


@functools.lru_cache(maxsize=32)
def _speaker_pattern(names: tuple[str, ...]) -> re.Pattern:
    """A line that starts a turn: a speaker name and a colon, markdown bold around either allowed."""
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(rf"^[ \t]*(?:\*\*|__)?[ \t]*({alternatives})[ \t]*(?:\*\*|__)?[ \t]*:[ \t]*(?:\*\*|__)?",
                      re.MULTILINE | re.IGNORECASE)
_TAG = re.compile(r"<\s*(/?)\s*img\s*([^>\s]*)\s*>", re.IGNORECASE)
_TAG_FRAGMENT = re.compile(r"</?\s*img\d*(?![^<]*>)", re.IGNORECASE)


@dataclass
class ParsedTurn:
    role: str  # user | assistant
    content: str  # with <image> placeholders
    images: list[int] = field(default_factory=list)  # group indices, in placeholder order


@dataclass
class ParseRejection:
    reason: str
    detail: str


def normalise(text: str) -> str:
    return " ".join(text.split())


def description_distance(description: str, caption: str, norm: str = "caption") -> float:
    """Normalised Levenshtein distance between the LLM's description and the caption (rapidfuzz).

    ``norm="caption"``: edits / length of the caption, both stripped, as the released
    ``process_mim.py`` computes it (the paper says "normalised" without saying by what;
    a description much longer than its caption can score above 1). ``norm="longer"``:
    edits / length of the longer string, whitespace collapsed: always in [0, 1].
    """
    from rapidfuzz.distance import Levenshtein

    if norm == "caption":
        description, caption = description.strip(), caption.strip()
        return Levenshtein.distance(description, caption) / max(1, len(caption))
    if norm == "longer":
        return Levenshtein.normalized_distance(normalise(description), normalise(caption))
    raise ValueError(f"edit_distance_norm must be 'caption' or 'longer', got {norm!r}")


def _turn_images(text: str, captions: list[str], max_distance: float, where: str,
                 norm: str = "caption") -> tuple[str, list[int]] | ParseRejection:
    pieces, images, position, open_tag = [], [], 0, None
    for match in _TAG.finditer(text):
        closing, index_text = match.group(1) == "/", match.group(2)
        if not index_text.isdigit():
            return ParseRejection("bad_index", f"{where}: image tag {match.group(0)!r} has no numeric index")
        index = int(index_text)
        if not closing:
            if open_tag is not None:
                return ParseRejection("unclosed_tag", f"{where}: <img{open_tag.group(2)}> is not closed before "
                                                      f"{match.group(0)!r}")
            open_tag = match
            continue
        if open_tag is None:
            return ParseRejection("unclosed_tag", f"{where}: {match.group(0)!r} closes no open tag")
        if int(open_tag.group(2)) != index:
            return ParseRejection("mismatched_tag", f"{where}: <img{open_tag.group(2)}> closed by {match.group(0)!r}")
        if index >= len(captions):
            return ParseRejection("unknown_image", f"{where}: <img{index}> but the group has {len(captions)} "
                                                   f"image(s), <img0> to <img{len(captions) - 1}>")
        description = text[open_tag.end():match.start()]
        distance = description_distance(description, captions[index], norm)
        if distance > max_distance:
            return ParseRejection("description_changed",
                                  f"{where}: <img{index}> reads {normalise(description)!r} for the caption "
                                  f"{captions[index]!r} (normalised edit distance {distance:.2f} > {max_distance})")
        pieces.append(text[position:open_tag.start()])
        pieces.append(IMAGE_PLACEHOLDER)
        images.append(index)
        position = match.end()
        open_tag = None
    if open_tag is not None:
        return ParseRejection("unclosed_tag", f"{where}: <img{open_tag.group(2)}> is never closed")
    pieces.append(text[position:])
    content = "".join(pieces)
    fragment = _TAG_FRAGMENT.search(content)
    if fragment:
        return ParseRejection("bad_tag", f"{where}: malformed image tag near {content[fragment.start():][:20]!r}")
    return content, images


def parse_dialogue(text: str, captions: list[str], max_distance: float = 0.1, norm: str = "caption",
                   user_names: tuple[str, ...] = USER_NAMES, assistant_names: tuple[str, ...] = ASSISTANT_NAMES,
                   ) -> list[ParsedTurn] | ParseRejection:
    """The turns of a generated dialogue, or why it is rejected. Never raises on any string.

    Speaker names match case-insensitively, with markdown bold allowed around them (``**Human:**``);
    ``user_names``/``assistant_names`` add the names some models write (``User``, ``USER``).
    """
    if not isinstance(text, str):
        return ParseRejection("no_turns", f"generation is not text: {type(text).__name__}")
    users = {name.lower() for name in user_names}
    speakers = list(_speaker_pattern(tuple(user_names) + tuple(assistant_names)).finditer(text))
    if not speakers:
        names = "/".join(f"'{name}:'" for name in (*user_names, *assistant_names))
        return ParseRejection("no_turns", f"no {names} turn found")
    preamble = text[:speakers[0].start()]
    if _TAG.search(preamble) or IMAGE_PLACEHOLDER in preamble:
        return ParseRejection("text_outside_turns", "an image appears before the first turn")
    turns: list[ParsedTurn] = []
    seen: dict[int, int] = {}
    for number, match in enumerate(speakers):
        role = "user" if match.group(1).lower() in users else "assistant"
        expected = "user" if number % 2 == 0 else "assistant"
        where = f"turn {number + 1} ({match.group(1)})"
        if role != expected:
            return ParseRejection("speaker_order", f"{where}: expected "
                                                   f"{'Human' if expected == 'user' else 'Assistant'}; turns must "
                                                   "alternate, starting with Human")
        end = speakers[number + 1].start() if number + 1 < len(speakers) else len(text)
        body = text[match.end():end].strip()
        if IMAGE_PLACEHOLDER in body:
            return ParseRejection("literal_placeholder", f"{where}: the text contains a literal {IMAGE_PLACEHOLDER}")
        parsed = _turn_images(body, captions, max_distance, where, norm)
        if isinstance(parsed, ParseRejection):
            return parsed
        content, images = parsed
        for index in images:
            if index in seen:
                return ParseRejection("repeated_image", f"{where}: <img{index}> was already shown in turn "
                                                        f"{seen[index]}; the prompt forbids copying images")
            seen[index] = number + 1
        if not content.replace(IMAGE_PLACEHOLDER, "").strip() and not images:
            return ParseRejection("empty_turn", f"{where}: the turn is empty")
        turns.append(ParsedTurn(role, content.strip(), images))
    if turns[-1].role != "assistant" and len(turns) == 1:
        return ParseRejection("speaker_order", "the dialogue has no Assistant turn")
    return turns
