"""Human-in-the-loop refinement (section 3.3): label generated conversations, grow the seed set.

A person reads one conversation at a time and gives it a quality label
(Table 2: Excellent / Satisfactory / Poor) and its characteristics (Image
Creation, Image Comparison, Intrinsic and Extrinsic Image Understanding).
Every label is appended to ``annotations.jsonl`` at once, so quitting (``q``,
Ctrl-D) loses nothing and the next session starts where this one stopped.
Excellent and Satisfactory conversations are appended to the seed set,
which the next ``synth generate`` can draw its in-context examples from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from synth.generation.prompt import CHARACTERISTICS, SEED_SET_FILE, SeedExample, image_list

QUALITY_KEYS = {"e": "Excellent", "s": "Satisfactory", "p": "Poor"}
CHARACTERISTIC_KEYS = {"c": "Image Creation", "m": "Image Comparison", "i": "Intrinsic Image Understanding",
                       "x": "Extrinsic Image Understanding"}
assert set(CHARACTERISTIC_KEYS.values()) == set(CHARACTERISTICS)


def _read_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def _append(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def annotate(generations: str | os.PathLike[str], out_dir: str | os.PathLike[str],
             only_ids: set[str] | None = None, limit: int | None = None,
             ask: Callable[[str], str] = input, say: Callable[[str], None] = print) -> dict[str, int]:
    """Label generations interactively; return counts of this session's labels.

    ``ask`` and ``say`` are the terminal (``input`` and ``print``); tests pass scripted ones.
    The seed set grows in ``out_dir/seeds.jsonl``, which starts as a copy of the bundled one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    annotations, seeds = out_dir / "annotations.jsonl", out_dir / "seeds.jsonl"
    if not seeds.exists():
        shutil.copyfile(SEED_SET_FILE, seeds)
    done = _read_ids(annotations)
    with open(generations, encoding="utf-8") as lines:
        queue = [json.loads(line) for line in lines if line.strip()]
    queue = [g for g in queue if g["group_id"] not in done and (only_ids is None or g["group_id"] in only_ids)]
    if limit is not None:
        queue = queue[:limit]
    counts = {label: 0 for label in QUALITY_KEYS.values()} | {"skipped": 0}
    say(f"{len(done)} already labelled; {len(queue)} to go. Keys: quality e/s/p, k skip, q quit.")
    for number, generation in enumerate(queue, start=1):
        captions = [pair["caption"] for pair in generation["pairs"]]
        say(f"\n=== [{number}/{len(queue)}] group {generation['group_id']} ===\n{image_list(captions)}\n\n"
            f"{generation['output'].strip()}\n")
        quality = _ask_choice(ask, say, "Quality: [e]xcellent [s]atisfactory [p]oor, [k] skip, [q] quit > ",
                              set(QUALITY_KEYS) | {"k", "q"})
        if quality is None or quality == "q":
            say("Stopped; every label so far is saved.")
            break
        if quality == "k":
            counts["skipped"] += 1
            continue
        letters = _ask_characteristics(ask, say)
        if letters is None:
            say("Stopped; every label so far is saved.")
            break
        example = SeedExample(id=generation["group_id"], captions=captions, dialogue=generation["output"].strip(),
                              quality=QUALITY_KEYS[quality],
                              characteristics=[CHARACTERISTIC_KEYS[k] for k in "cmix" if k in letters],
                              source=f"annotated from {Path(generations).name}")
        _append(annotations, example.to_json())
        if example.quality in ("Excellent", "Satisfactory"):
            _append(seeds, example.to_json())
        counts[example.quality] += 1
    return counts


def _ask_choice(ask, say, prompt: str, allowed: set[str]) -> str | None:
    while True:
        try:
            answer = ask(prompt).strip().lower()
        except EOFError:
            return None
        if answer in allowed:
            return answer
        say(f"Please answer one of: {', '.join(sorted(allowed))}")


def _ask_characteristics(ask, say) -> str | None:
    prompt = "Characteristics, any letters: [c]reation co[m]parison [i]ntrinsic e[x]trinsic (empty: none) > "
    while True:
        try:
            answer = ask(prompt).strip().lower().replace(" ", "").replace(",", "")
        except EOFError:
            return None
        if set(answer) <= set(CHARACTERISTIC_KEYS):
            return answer
        say(f"Use only the letters {''.join(CHARACTERISTIC_KEYS)}")
