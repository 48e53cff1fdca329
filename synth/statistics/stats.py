"""Dataset statistics in the paper's terms: Table 3 and the section 4.3 diversity score."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from synth.data.schema import IMAGE_PLACEHOLDER, Conversation


@dataclass(frozen=True)
class DatasetStats:
    """Table 3 of the paper. A "turn" is an instruction-response pair (section 4.2)."""

    conversations: int
    avg_turns: float
    avg_images: float
    avg_images_in_instructions: float
    avg_images_in_responses: float
    avg_words: float
    avg_words_in_instructions: float
    avg_words_in_responses: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("# of conversations", f"{self.conversations:,}"),
            ("Avg. # turns in conversations", f"{self.avg_turns:.2f}"),
            ("Avg. # images in conversations", f"{self.avg_images:.2f}"),
            ("Avg. # images in instructions", f"{self.avg_images_in_instructions:.2f}"),
            ("Avg. # images in responses", f"{self.avg_images_in_responses:.2f}"),
            ("Avg. # words in conversations", f"{self.avg_words:.2f}"),
            ("Avg. # words in instructions", f"{self.avg_words_in_instructions:.2f}"),
            ("Avg. # words in responses", f"{self.avg_words_in_responses:.2f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows)


def words(text: str) -> list[str]:
    """Whitespace words of a turn, with image placeholders removed."""
    return text.replace(IMAGE_PLACEHOLDER, " ").split()


def dataset_stats(conversations: Sequence[Conversation]) -> DatasetStats:
    n = len(conversations)
    if n == 0:
        raise ValueError("no conversations to describe")
    totals = dict(turns=0, images_user=0, images_assistant=0, words_user=0, words_assistant=0)
    for conversation in conversations:
        for turn in conversation.turns:
            if turn.role == "assistant":
                totals["turns"] += 1
            if turn.role in ("user", "assistant"):
                totals[f"images_{turn.role}"] += len(turn.image_list)
                totals[f"words_{turn.role}"] += len(words(turn.content))
    return DatasetStats(
        conversations=n,
        avg_turns=totals["turns"] / n,
        avg_images=(totals["images_user"] + totals["images_assistant"]) / n,
        avg_images_in_instructions=totals["images_user"] / n,
        avg_images_in_responses=totals["images_assistant"] / n,
        avg_words=(totals["words_user"] + totals["words_assistant"]) / n,
        avg_words_in_instructions=totals["words_user"] / n,
        avg_words_in_responses=totals["words_assistant"] / n,
    )


def diversity(texts: Iterable[str], orders: Sequence[int] = (2, 3, 4)) -> float:
    """Section 4.3: sum over n of (# unique n-grams / # total n-grams), lower-cased words."""
    grams: dict[int, list[tuple[str, ...]]] = {n: [] for n in orders}
    for text in texts:
        tokens = words(text.lower())
        for n in orders:
            grams[n].extend(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return sum(len(set(found)) / len(found) for found in grams.values() if found)


def conversation_diversity(conversations: Sequence[Conversation]) -> float:
    """Section 4.3's diversity over every turn of the conversations."""
    return diversity(turn.content for conversation in conversations for turn in conversation.turns)


def describe(conversations: Sequence[Conversation]) -> str:
    """Table 3 and the section 4.3 diversity, as printed by ``synth describe`` and the stats stage."""
    return (dataset_stats(conversations).table()
            + f"\nDiversity (section 4.3, n = 2..4): {conversation_diversity(conversations):.3f}\n")


def image_positions(conversations: Sequence[Conversation]) -> dict[str, list[int]]:
    """Figure 4: how many images appear in the i-th instruction and the i-th response (i from 1)."""
    counts: dict[str, list[int]] = {"instruction": [], "response": []}
    for conversation in conversations:
        pair = 0
        for turn in conversation.turns:
            if turn.role == "system":
                continue
            key = "instruction" if turn.role == "user" else "response"
            if turn.role == "user":
                pair += 1
            slots = counts[key]
            while len(slots) < pair:
                slots.append(0)
            slots[pair - 1] += len(turn.image_list)
    width = max(len(counts["instruction"]), len(counts["response"]))
    return {key: values + [0] * (width - len(values)) for key, values in counts.items()}


def balance(counts: Sequence[int]) -> dict[str, float]:
    """How evenly samples spread over categories: the review's variance of per-category counts
    (section 4.2 of the VLIT review), and the normalised entropy (1 = perfectly even)."""
    import math

    values = [c for c in counts if c > 0]
    if not values:
        return {"categories": 0, "variance": 0.0, "normalised_entropy": 0.0}
    total, mean = sum(values), sum(values) / len(values)
    entropy = -sum(c / total * math.log(c / total) for c in values)
    return {"categories": len(values), "variance": sum((c - mean) ** 2 for c in values) / len(values),
            "normalised_entropy": entropy / math.log(len(values)) if len(values) > 1 else 1.0}


def quality_indicators(conversations: Sequence[Conversation]) -> dict[str, object]:
    """The review's diversity, complexity and balance indicators, where captions-only data allows them.

    Diversity: the section 4.3 score on instructions and on responses separately
    (instruction and response diversity, review section 3.1.1). Complexity:
    words and images per instruction. Balance: over topic clusters (``meta.cluster``),
    over turns per conversation and over images per conversation.
    """
    from collections import Counter

    instructions = [t.content for c in conversations for t in c.turns if t.role == "user"]
    responses = [t.content for c in conversations for t in c.turns if t.role == "assistant"]
    clusters = Counter(c.meta.get("cluster") for c in conversations if c.meta.get("cluster") is not None)
    turns = Counter(sum(t.role == "assistant" for t in c.turns) for c in conversations)
    images = Counter(len(c.images) for c in conversations)
    return {
        "instruction_diversity": diversity(instructions),
        "response_diversity": diversity(responses),
        "avg_words_per_instruction": sum(len(words(t)) for t in instructions) / max(1, len(instructions)),
        "instructions_with_images": sum(IMAGE_PLACEHOLDER in t for t in instructions) / max(1, len(instructions)),
        "cluster_balance": balance(list(clusters.values())),
        "turns_distribution": dict(sorted(turns.items())),
        "images_distribution": dict(sorted(images.items())),
    }
