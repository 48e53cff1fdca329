"""The dialogue parser and filter (section 3.2), dataset statistics, and the annotate tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synth.review.annotate import annotate
from synth.data.conversation_io import read_conversations
from synth.review.dialogue_parser import ParseRejection, description_distance, parse_dialogue
from synth.review.filtering import filter_generations
from synth.generation.prompt import read_seed_set
from synth.data.schema import Conversation, Turn
from synth.statistics.stats import balance, image_positions, quality_indicators

CAPTIONS = ["a red double-decker bus on a london street", "big ben at sunset", "a cup of tea with milk"]
GOOD = ("Human: I visited London last week! <img0> a red double-decker bus on a london street </img0>\n\n"
        "Assistant: What a classic sight. Did you also see this? <img1> big ben at sunset </img1>\n\n"
        "Human: Yes! And I had lots of <img2> a cup of tea with milk </img2>\n\n"
        "Assistant: A perfect London trip.")


def test_a_good_dialogue_parses_into_turns_with_placeholders() -> None:
    turns = parse_dialogue(GOOD, CAPTIONS)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0].content == "I visited London last week! <image>" and turns[0].images == [0]
    assert turns[1].images == [1] and turns[2].images == [2] and turns[3].images == []


def test_small_description_edits_are_tolerated_and_markdown_speakers_accepted() -> None:
    text = GOOD.replace("big ben at sunset", "Big ben at sunset").replace("Human:", "**Human:**", 1)
    assert description_distance("Big ben at sunset", "big ben at sunset") == pytest.approx(1 / 17)
    assert isinstance(parse_dialogue(text, CAPTIONS), list)


BAD_OUTPUTS = {
    "description_changed": GOOD.replace("big ben at sunset </img1>", "the big clock tower at night </img1>"),
    "unknown_image": GOOD.replace("<img2> a cup of tea with milk </img2>", "<img3> a cup of tea with milk </img3>"),
    "unclosed_tag": GOOD.replace("</img1>", ""),
    "mismatched_tag": GOOD.replace("</img1>", "</img2>"),
    "bad_index": GOOD.replace("<img1>", "<imgX>").replace("</img1>", "</imgX>"),
    "bad_tag": GOOD.replace("<img1> big ben at sunset </img1>", "<img1 big ben at sunset"),
    "speaker_order": GOOD.replace("Assistant: What a classic", "Human: What a classic"),
    "empty_turn": GOOD.replace("Assistant: A perfect London trip.", "Assistant:   "),
    "repeated_image": GOOD.replace("<img2> a cup of tea with milk </img2>",
                                   "<img1> big ben at sunset </img1>"),
    "no_turns": "Sorry, I cannot help with that request.",
    "text_outside_turns": "Here: <img0> a red double-decker bus on a london street </img0>\n" + GOOD,
    "literal_placeholder": GOOD.replace("A perfect", "An <image> perfect"),
}


@pytest.mark.parametrize("reason", sorted(BAD_OUTPUTS))
def test_each_filter_rule_rejects_its_bad_output(reason: str) -> None:
    result = parse_dialogue(BAD_OUTPUTS[reason], CAPTIONS)
    assert isinstance(result, ParseRejection) and result.reason == reason, result
    assert result.detail


def test_edit_distance_threshold_is_configurable() -> None:
    text = GOOD.replace("big ben at sunset </img1>", "big ben at dusk </img1>")
    assert isinstance(parse_dialogue(text, CAPTIONS, max_distance=0.1), ParseRejection)
    assert isinstance(parse_dialogue(text, CAPTIONS, max_distance=0.5), list)


REASONS = {"no_turns", "speaker_order", "empty_turn", "text_outside_turns", "unclosed_tag", "mismatched_tag",
           "bad_tag", "bad_index", "unknown_image", "description_changed", "repeated_image", "literal_placeholder"}


def check_parse(text: str) -> None:
    result = parse_dialogue(text, CAPTIONS)
    if isinstance(result, ParseRejection):
        assert result.reason in REASONS and result.detail
    else:
        assert result and result[0].role == "user"
        assert all(t.content.count("<image>") == len(t.images) for t in result)


FRAGMENTS = ["Human:", "Assistant:", "<img0>", "</img0>", "<img1>", "</img1>", "<img2>", "</img2>", "<img7>",
             "<img>", "</img", "<image>", "\n\n", " ", "**Human:**", "hello", *CAPTIONS]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40))
def test_parser_never_crashes_on_random_fragment_soups(pieces: list[str]) -> None:
    check_parse(" ".join(pieces))


@st.composite
def mutated(draw) -> str:
    """A valid dialogue with random character-level and token-level damage."""
    text = GOOD
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["delete", "insert", "swap", "duplicate"]))
        position = draw(st.integers(0, len(text)))
        if operation == "delete":
            text = text[:position] + text[position + draw(st.integers(1, 12)):]
        elif operation == "insert":
            text = text[:position] + draw(st.sampled_from(FRAGMENTS + ["<", ">", "/", "9"])) + text[position:]
        elif operation == "swap":
            text = text.replace("Human:", "Assistant:", 1) if draw(st.booleans()) else text.replace(
                "<img1>", "<img2>", 1)
        else:
            text = text[:position] + text[max(0, position - 20):position] + text[position:]
    return text


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_parser_never_crashes_on_mutated_dialogues(text: str) -> None:
    check_parse(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_crashes_on_arbitrary_unicode(text: str) -> None:
    check_parse(text)


def generation(group_id: str, output: str, images: list[Path]) -> dict:
    return {"group_id": group_id, "cluster": 1, "model": "test", "examples": ["appendix-b-1"], "output": output,
            "pairs": [{"id": f"{group_id}-{i}", "image": str(path), "caption": CAPTIONS[i]}
                      for i, path in enumerate(images)]}


def test_filter_writes_a_valid_self_contained_dataset_and_the_rejects(tmp_path: Path) -> None:
    from PIL import Image

    images = []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        images.append(tmp_path / f"src{i}.png")
        Image.new("RGB", (8, 8), color).save(images[-1])
    lines = [generation("g1", GOOD, images), generation("g2", BAD_OUTPUTS["unknown_image"], images),
             generation("g3", BAD_OUTPUTS["description_changed"], images)]
    source = tmp_path / "generations.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = filter_generations(source, tmp_path / "out")
    assert summary["kept"] == 1 and summary["reasons"] == {"description_changed": 1, "unknown_image": 1}
    conversations, report = read_conversations(tmp_path / "out" / "conversations.jsonl")
    assert report.rejected == []
    (conversation,) = conversations
    assert conversation.id == "tb-g1" and conversation.image_dir == "images"
    assert conversation.turns[1].caption_list == [CAPTIONS[1]]
    for name in conversation.images:  # copied, readable, under image_dir
        assert Image.open(conversation.image_path(name, tmp_path / "out")).size == (8, 8)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejected} == {"unknown_image", "description_changed"}
    assert all(r["output"] and r["detail"] for r in rejected)


def test_a_damaged_generations_line_is_a_rejection_not_a_dead_stage(tmp_path: Path) -> None:
    from PIL import Image

    images = []
    for i in range(3):
        images.append(tmp_path / f"src{i}.png")
        Image.new("RGB", (8, 8), (i, i, i)).save(images[-1])
    source = tmp_path / "generations.jsonl"
    source.write_text(json.dumps(generation("g1", GOOD, images)) + "\n" + '{"group_id": "g2", "pairs": [{"capt'
                      + "\n" + "[" * 50_000 + "]" * 50_000 + "\n" + json.dumps({"group_id": "g4"}) + "\n")
    summary = filter_generations(source, tmp_path / "out")
    assert summary["kept"] == 1 and summary["reasons"] == {"unreadable_line": 3}
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [r["detail"].rsplit(":", 1)[1].split()[0] for r in rejected] == ["2", "3", "4"]


def test_image_positions_and_indicators_on_a_hand_counted_fixture() -> None:
    data = [
        Conversation("a", [Turn("user", "<image> hi", ["1"]), Turn("assistant", "ok <image>", ["2"], ["c"]),
                           Turn("user", "<image> <image> more", ["3", "4"]), Turn("assistant", "done")],
                     meta={"cluster": 1}),
        Conversation("b", [Turn("user", "plain"), Turn("assistant", "<image>", ["5"], ["c"])], meta={"cluster": 1}),
        Conversation("c", [Turn("system", "s"), Turn("user", "x <image>", ["6"]), Turn("assistant", "y")],
                     meta={"cluster": 2}),
    ]
    assert image_positions(data) == {"instruction": [2, 2], "response": [2, 0]}
    indicators = quality_indicators(data)
    assert indicators["turns_distribution"] == {1: 2, 2: 1}
    assert indicators["images_distribution"] == {1: 2, 4: 1}
    assert indicators["instructions_with_images"] == pytest.approx(3 / 4)
    assert indicators["cluster_balance"]["categories"] == 2
    assert indicators["cluster_balance"]["variance"] == pytest.approx(0.25)  # counts 2 and 1 around 1.5


def test_balance_indicators() -> None:
    assert balance([5, 5, 5, 5])["normalised_entropy"] == pytest.approx(1.0)
    assert balance([5, 5, 5, 5])["variance"] == 0.0
    skewed = balance([97, 1, 1, 1])
    assert skewed["normalised_entropy"] < 0.2 and skewed["variance"] > 1000


def test_annotate_labels_grow_the_seed_set_and_resume_after_quitting(tmp_path: Path) -> None:
    source = tmp_path / "generations.jsonl"
    source.write_text("".join(json.dumps(generation(f"g{n}", GOOD, [Path("a"), Path("b"), Path("c")])) + "\n"
                              for n in range(4)))
    answers = iter(["x", "e", "cmZ", "cmx", "s", "i", "p", "", "q"])  # with two invalid answers re-asked
    said: list[str] = []
    counts = annotate(source, tmp_path / "ann", ask=lambda prompt: next(answers), say=said.append)
    assert counts == {"Excellent": 1, "Satisfactory": 1, "Poor": 1, "skipped": 0}
    assert any("Please answer one of" in line for line in said)
    labelled = [json.loads(line) for line in (tmp_path / "ann" / "annotations.jsonl").read_text().splitlines()]
    assert [(r["id"], r["quality"]) for r in labelled] == [("g0", "Excellent"), ("g1", "Satisfactory"),
                                                             ("g2", "Poor")]
    assert labelled[0]["characteristics"] == ["Image Creation", "Image Comparison", "Extrinsic Image Understanding"]
    assert labelled[1]["characteristics"] == ["Intrinsic Image Understanding"]
    seeds = read_seed_set(tmp_path / "ann" / "seeds.jsonl")  # the annotate format is the seed-set format
    assert [s.id for s in seeds][-2:] == ["g0", "g1"] and len(seeds) == 3 + 2
    # a new session starts at the first unlabelled conversation; end of input quits cleanly
    def closed_input(prompt: str) -> str:
        raise EOFError

    remaining = iter(["k"])
    assert annotate(source, tmp_path / "ann", ask=lambda prompt: next(remaining), say=said.append)["skipped"] == 1
    assert annotate(source, tmp_path / "ann", ask=closed_input, say=said.append) == {
        "Excellent": 0, "Satisfactory": 0, "Poor": 0, "skipped": 0}


# --- the released data's rules, as named options ------------------------------------------------------

RELEASED_CASES = {
    "too_short": "Human: Look! <img0> a red double-decker bus on a london street </img0>\n\nAssistant: Nice bus.",
    "no_image": "Human: Hello there.\n\nAssistant: Hi! How can I help?\n\nHuman: Tell me about London.\n\n"
                "Assistant: It is a big city.",
}


@pytest.mark.parametrize("reason", sorted(RELEASED_CASES))
def test_each_released_rule_drops_its_case_and_can_be_switched_off(reason: str) -> None:
    from synth.review.filtering import FilterRules, to_conversation

    record = {"group_id": "g", "pairs": [{"id": f"p{i}", "image": f"{i}.png", "caption": c}
                                         for i, c in enumerate(CAPTIONS)], "output": RELEASED_CASES[reason]}
    rejected = to_conversation(record, FilterRules())
    assert isinstance(rejected, ParseRejection) and rejected.reason == reason
    rule_off = {"too_short": {"min_messages": 2}, "no_image": {"require_image": False}}[reason]
    assert not isinstance(to_conversation(record, FilterRules(**rule_off)), ParseRejection)


def test_a_trailing_user_turn_is_dropped_by_default() -> None:
    from synth.review.filtering import FilterRules, to_conversation

    output = GOOD + "\n\nHuman: Thanks, bye!"
    record = {"group_id": "g", "pairs": [{"id": f"p{i}", "image": f"{i}.png", "caption": c}
                                         for i, c in enumerate(CAPTIONS)], "output": output}
    assert to_conversation(record, FilterRules()).turns[-1].role == "assistant"
    assert to_conversation(record, FilterRules(drop_trailing_user_turn=False)).turns[-1].content == "Thanks, bye!"


def test_a_repeated_response_is_dropped(tmp_path: Path) -> None:
    from PIL import Image

    from synth.review.filtering import FilterRules

    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(images[-1])
    source = tmp_path / "generations.jsonl"
    source.write_text("".join(json.dumps(generation(g, GOOD, images)) + "\n" for g in ("g1", "g2")))
    summary = filter_generations(source, tmp_path / "out")
    assert summary["kept"] == 1 and summary["reasons"] == {"duplicate_response": 1}
    rejected = json.loads((tmp_path / "out" / "rejected.jsonl").read_text())
    assert rejected["group_id"] == "g2" and "group g1" in rejected["detail"]
    kept = filter_generations(source, tmp_path / "again", FilterRules(drop_duplicate_responses=False))
    assert kept["kept"] == 2


def test_edit_distance_by_caption_length_as_released_or_by_the_longer_string() -> None:
    caption = "big ben at sunset"
    longer_description = "big ben at sunset over the river thames"
    # released: 22 inserted characters / 17 of the caption
    assert description_distance(longer_description, caption, "caption") == pytest.approx(22 / 17)
    assert description_distance(longer_description, caption, "longer") == pytest.approx(22 / 39)
    one_edit = "big ben at sunsat"
    assert description_distance(one_edit, caption, "caption") == pytest.approx(1 / 17)
    with pytest.raises(ValueError, match="'caption' or 'longer'"):
        description_distance(one_edit, caption, "shortest")
