"""``synth review``: an LLM judge labels the kept conversations as the paper's annotators did.

Section 3.3 labels each conversation with Table 2's overall quality (Excellent / Satisfactory / Poor) and its
characteristics; section 4.4 (Table 5) names the errors behind the Poor ones (image-caption mismatch,
incoherence, hallucination). People did that for 100 conversations; a judge does it for all of them, through any
OpenAI-compatible endpoint or the local backend, with a rubric that is a prompt file anyone can edit. Requests go
through the generate stage's engine: concurrent, rate-limited, retried, budgeted and resumable (a rerun asks only
what has no verdict yet). A reply that is not a verdict is recorded with its reason and asked again next run;
it never stops the run.

``work_dir/review/``: ``reviews.jsonl`` (one line per answer: the verdict or why there is none, and the reply),
``failures.jsonl`` (requests that ran out of attempts), ``summary.json`` and ``table.txt`` (the label
distributions, errors, diversity per label, and the judge's agreement with the labels people gave in
``synth annotate``: Cohen's kappa and the confusion matrix), and with ``review.keep``, ``conversations.jsonl`` with
only the kept labels (images beside it).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from synth.data.schema import IMAGE_PLACEHOLDER, Conversation
from synth.generation.completions import Completion
from synth.generation.generate import Request
from synth.generation.prompt import CHARACTERISTICS, QUALITY_LABELS, image_tag
from synth.generation.structured import Constraint

RUBRIC_FILE = Path(__file__).resolve().parent / "rubric.txt"
#: Section 4.4, Table 5: why conversations were labelled Poor.
ERRORS = ("Image-caption Mismatch", "Incoherence", "Hallucination")


@dataclass
class Verdict:
    quality: str
    characteristics: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reason: str = ""


def verdict_schema() -> dict:
    """The verdict as a strict-mode JSON schema (structured judging)."""
    return {"type": "object", "additionalProperties": False,
            "required": ["quality", "characteristics", "errors", "reason"],
            "properties": {"quality": {"type": "string", "enum": list(QUALITY_LABELS)},
                           "characteristics": {"type": "array", "maxItems": len(CHARACTERISTICS),
                                               "items": {"type": "string", "enum": list(CHARACTERISTICS)}},
                           "errors": {"type": "array", "maxItems": len(ERRORS),
                                      "items": {"type": "string", "enum": list(ERRORS)}},
                           "reason": {"type": "string", "pattern": "^[^\\x00-\\x1F]{0,300}$"}}}


def _label(value: Any, allowed: Sequence[str]) -> str | None:
    """``value`` as one of ``allowed``, ignoring case and surrounding quotes or spaces."""
    if not isinstance(value, str):
        return None
    wanted = value.strip().strip("\"'").lower()
    return next((label for label in allowed if label.lower() == wanted), None)


def reply_object(text: str | None, tries: int = 50) -> dict | None:
    """The first JSON object in a model's reply: in a fenced block or not, with words before or after it
    (a ``{`` that starts no object is skipped; at most ``tries`` of them). None when there is none."""
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    start = text.find("{")
    for _ in range(tries):
        if start < 0:
            return None
        try:
            value = decoder.raw_decode(text, start)[0]
        except (json.JSONDecodeError, RecursionError):
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def parse_verdict(reply: str) -> Verdict | str:
    """The verdict in a judge's reply (its first JSON object, fenced or not), or why there is none."""
    if not isinstance(reply, str) or not reply.strip():
        return "an empty reply"
    value = reply_object(reply)
    if value is None:
        return "no JSON object in the reply"
    quality = _label(value.get("quality"), QUALITY_LABELS)
    if quality is None:
        return f"quality {value.get('quality')!r} is not one of {', '.join(QUALITY_LABELS)}"
    lists = {}
    for key, allowed in (("characteristics", CHARACTERISTICS), ("errors", ERRORS)):
        raw = value.get(key, [])
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list):
            return f"{key} is not a list"
        labels = [_label(item, allowed) for item in raw]
        unknown = [item for item, label in zip(raw, labels) if label is None]
        if unknown:
            return f"{key} {unknown!r} not among {', '.join(allowed)}"
        lists[key] = sorted(set(labels), key=allowed.index)
    reason = value.get("reason", "")
    return Verdict(quality, lists["characteristics"], lists["errors"], reason if isinstance(reason, str) else "")


def render_dialogue(conversation: Conversation) -> tuple[str, str]:
    """(the image list, the dialogue) in Appendix A's notation: images numbered in order of appearance."""
    captions: list[str] = []
    lines = []
    for turn in conversation.turns:
        pieces = turn.content.split(IMAGE_PLACEHOLDER)
        text = pieces[0]
        for index, piece in enumerate(pieces[1:]):
            caption = turn.caption_list[index] if index < len(turn.caption_list) else turn.image_list[index]
            text += image_tag(len(captions), caption) + piece
            captions.append(caption)
        speaker = {"user": "Human", "assistant": "Assistant"}.get(turn.role, turn.role.capitalize())
        lines.append(f"{speaker}: {text.strip()}")
    return "\n".join(image_tag(i, c) for i, c in enumerate(captions)), "\n\n".join(lines)


def review_prompt(rubric: str, conversation: Conversation) -> str:
    images, dialogue = render_dialogue(conversation)
    return rubric.replace("{images}", images or "(none)").replace("{dialogue}", dialogue)


def review_requests(conversations: Sequence[Conversation], rubric: str, structured: bool, seed: int = 0
                    ) -> list[Request]:
    """One judge request per conversation; its line in ``reviews.jsonl`` holds the verdict or why there is none."""
    constraint = Constraint("json_schema", verdict_schema(), name="verdict") if structured else None
    requests = []
    for conversation in conversations:
        def record(completion: Completion, attempts: int, conversation: Conversation = conversation) -> dict:
            verdict = parse_verdict(completion.text)
            return {"id": conversation.id, "group_id": (conversation.meta or {}).get("group_id"),
                    "judge": completion.model, "verdict": asdict(verdict) if isinstance(verdict, Verdict) else None,
                    "error": None if isinstance(verdict, Verdict) else f"unreadable verdict: {verdict}",
                    "reply": completion.text, "finish_reason": completion.finish_reason, "attempts": attempts,
                    "usage": {"prompt_tokens": completion.prompt_tokens,
                              "completion_tokens": completion.completion_tokens}}

        captions = [c for turn in conversation.turns for c in turn.caption_list]
        requests.append(Request(conversation.id, review_prompt(rubric, conversation), captions,
                                random.Random(f"{seed}:review:{conversation.id}"), record, constraint))
    return requests


def read_reviews(path: str | os.PathLike[str]) -> dict[str, dict]:
    """id -> its latest review line (a later answer to the same conversation replaces an earlier one)."""
    from synth.generation.generate import read_done

    path = Path(path)
    read_done(path, key="id")  # trims a last line cut short by a kill
    reviews: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                reviews[str(record["id"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return reviews


# --- the summary --------------------------------------------------------------------------------------------

def cohen_kappa(pairs: Sequence[tuple[str, str]], labels: Sequence[str]) -> float | None:
    """Cohen's kappa of (person, judge) label pairs: 1 is full agreement, 0 what chance gives. None when
    undefined (no pairs, or both raters always give the one same label)."""
    if not pairs:
        return None
    total = len(pairs)
    observed = sum(a == b for a, b in pairs) / total
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(first[label] * second[label] for label in labels) / total ** 2
    return None if expected == 1 else (observed - expected) / (1 - expected)


def agreement(reviews: dict[str, dict], annotations: Sequence[dict]) -> dict[str, Any] | None:
    """The judge against the people of ``synth annotate`` (its ``annotations.jsonl``, keyed by group id):
    kappa and confusion matrix for quality, kappa per characteristic."""
    verdicts = {str(r["group_id"]): r["verdict"] for r in reviews.values() if r.get("verdict") and r.get("group_id")}
    both = [(a, verdicts[str(a["id"])]) for a in annotations if str(a.get("id")) in verdicts]
    if not both:
        return None
    pairs = [(a["quality"], v["quality"]) for a, v in both]
    matrix = {person: {judge: sum(1 for a, b in pairs if (a, b) == (person, judge)) for judge in QUALITY_LABELS}
              for person in QUALITY_LABELS}
    per_characteristic = {
        name: cohen_kappa([(str(name in a.get("characteristics", [])), str(name in v["characteristics"]))
                           for a, v in both], ["True", "False"]) for name in CHARACTERISTICS}
    return {"conversations": len(both), "quality_kappa": cohen_kappa(pairs, QUALITY_LABELS),
            "quality_agreement": sum(a == b for a, b in pairs) / len(pairs),
            "confusion_rows_person_columns_judge": matrix, "characteristic_kappa": per_characteristic}


def summarize_reviews(conversations: Sequence[Conversation], reviews: dict[str, dict],
                      annotations: Sequence[dict] = ()) -> dict[str, Any]:
    """Figure 3's distributions and Table 5's errors from the verdicts, and (Table 4's measure) the diversity
    of each label's conversations; with people's labels, the judge's agreement with them."""
    from synth.statistics.stats import conversation_diversity

    by_id = {c.id: c for c in conversations}
    judged = {key: r["verdict"] for key, r in reviews.items() if r.get("verdict") and key in by_id}
    unreadable = sum(1 for key, r in reviews.items() if not r.get("verdict") and key in by_id)
    total = len(judged)
    quality = Counter(v["quality"] for v in judged.values())
    characteristics = Counter(c for v in judged.values() for c in v["characteristics"])
    poor = [v for v in judged.values() if v["quality"] == "Poor"]
    errors = Counter(e for v in poor for e in v["errors"])
    diversity = {label: conversation_diversity([by_id[k] for k, v in judged.items() if v["quality"] == label])
                 for label in QUALITY_LABELS if quality[label]}
    # the paper's errors are why a conversation is Poor: a verdict naming errors yet not Poor contradicts itself
    inconsistent = sum(1 for v in judged.values() if v["errors"] and v["quality"] != "Poor")
    return {"conversations": len(conversations), "judged": total, "unreadable": unreadable,
            "pending": len(conversations) - total - unreadable, "inconsistent": inconsistent,
            "quality": {label: {"count": quality[label], "share": quality[label] / total if total else 0.0}
                        for label in QUALITY_LABELS},
            "characteristics": {name: {"count": characteristics[name],
                                       "share": characteristics[name] / total if total else 0.0}
                                for name in CHARACTERISTICS},
            "errors_in_poor": {name: {"count": errors[name], "share": errors[name] / len(poor) if poor else 0.0}
                               for name in ERRORS},
            "diversity_by_quality": diversity,
            "agreement_with_people": agreement(reviews, annotations) if annotations else None}


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as text, in the order of the paper's figures and tables."""
    lines = [f"Judged {summary['judged']} of {summary['conversations']} conversation(s) "
             f"({summary['unreadable']} unreadable verdict(s), {summary['pending']} not yet asked; "
             f"{summary['inconsistent']} verdict(s) name errors yet are not Poor)",
             "Quality (Figure 3a): " + ", ".join(f"{label} {row['count']} ({100 * row['share']:.0f}%)"
                                                 for label, row in summary["quality"].items()),
             "Characteristics (Figure 3b): " + ", ".join(f"{name} {row['count']} ({100 * row['share']:.0f}%)"
                                                         for name, row in summary["characteristics"].items()),
             "Errors in Poor conversations (Table 5): " + ", ".join(
                 f"{name} {row['count']}" for name, row in summary["errors_in_poor"].items()),
             "Diversity by quality (section 4.3's measure, as Table 4): " + (", ".join(
                 f"{label} {value:.3f}" for label, value in summary["diversity_by_quality"].items()) or "none")]
    agreement_row = summary.get("agreement_with_people")
    if agreement_row:
        kappa = agreement_row["quality_kappa"]
        lines.append(f"Agreement with people ({agreement_row['conversations']} conversation(s)): quality kappa "
                     f"{'undefined' if kappa is None else f'{kappa:.3f}'}, "
                     f"{100 * agreement_row['quality_agreement']:.0f}% the same label")
        lines.append("Confusion (rows: people; columns: judge, " + " / ".join(QUALITY_LABELS) + "):")
        for person, row in agreement_row["confusion_rows_person_columns_judge"].items():
            lines.append(f"  {person:<12} " + " ".join(f"{row[label]:>4}" for label in QUALITY_LABELS))
    return "\n".join(lines) + "\n"
