"""The world's composer: a ``synth generate`` backend that writes dialogues about a group's world pictures.

In the paper an LLM writes the conversation for a group of images from their captions (section 3.2). In the
world the pictures' attributes are recorded, so a composer can write dialogues whose answers are known:
questions about one picture (colour, shape, count, position), comparisons across the group ("which of these
has a red square?"), a reference back to a picture shown earlier, and requests to show a described picture
(the image-generation turns the heads learn). It writes them in Appendix A's format, each image as
``<imgX> DESCRIPTION </imgX>`` with the group's caption for it, so they go through the same parser and filter
as an LLM's; the answer keys travel in the generation record (``answers``, by message index) into the kept
conversation's ``meta.answers``.

A question's answer comes from the picture's recorded attributes, not from its caption: a mismatched pair the
match filter let through gets a dialogue whose tags carry the wrong caption, as an LLM's would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synth.generation.completions import BackendError, Completion
from synth.generation.prompt import image_tag
from synth.world.dialogues import world_conversation
from synth.world.scenes import Scene, read_scenes


def appendix_a_text(record: dict[str, Any], index_of: dict[str, int], captions: Sequence[str]) -> str:
    """A world conversation record (``<image>`` placeholders and ``image_list``) as Appendix A's text, each
    image tagged with its index in the group and the group's caption for it."""
    lines = []
    for turn in record["conversation"]:
        pieces = turn["content"].split("<image>")
        text = pieces[0]
        for name, piece in zip(turn.get("image_list", []), pieces[1:]):
            index = index_of[name]
            text += image_tag(index, captions[index]) + piece
        lines.append(("Human: " if turn["role"] == "user" else "Assistant: ") + text)
    return "\n\n".join(lines)


class WorldComposer:
    """``generate.backend: world`` with ``generate.world`` the ``scenes.jsonl`` of the pictures ingested."""

    name = "world"
    uses_group = True  # it writes from the group's pictures, not only their captions

    def __init__(self, scenes: str | os.PathLike[str]) -> None:
        if scenes is None:
            raise ValueError("generate.backend world needs generate.world: the scenes.jsonl of the world's pictures")
        self.scenes: dict[str, Scene] = read_scenes(scenes)

    async def complete(self, prompt: str, captions: Sequence[str], seed: int, constraint=None,
                       group: dict[str, Any] | None = None) -> Completion:
        if group is None:
            raise BackendError("the world composer writes from the group's pictures; none was given", False, fatal=True)
        ids = [Path(pair["image"]).stem for pair in group["pairs"]]
        unknown = [i for i in ids if i not in self.scenes]
        if unknown:
            raise BackendError(f"group {group['group_id']}: picture(s) {unknown} are not in the world's scenes",
                               False)
        scenes = [self.scenes[i] for i in ids]
        rng = np.random.default_rng(seed)
        for _ in range(8):  # a group may not pose a question on a draw: try other draws of the question types
            record = world_conversation(list(reversed(scenes)), rng, group["group_id"])
            if record["meta"]["answers"]:
                break
        index_of = {f"{scene.id}.png": index for index, scene in enumerate(scenes)}
        text = appendix_a_text(record, index_of, captions)
        return Completion(text, prompt_tokens=0, completion_tokens=len(text) // 4, model=self.name,
                          meta={"answers": record["meta"]["answers"]})

    async def close(self) -> None:
        return None
