"""The world experiment's parts that need no training: the swapped "which" questions, the match threshold's
calibration, conditioning-space retrieval, the seed intervals, and the plan's checks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mim.experiments.world import WorldPlan, blank_controls, caption_retrieval, interval, summarise
from synth.world.dialogues import ORDINALS, swapped_which, write_conversations
from synth.world.parts import calibrate_threshold
from synth.world.scenes import read_scenes, write_world


def test_swapping_the_pictures_of_a_which_question_moves_its_answer(tmp_path) -> None:
    scenes = read_scenes(write_world(tmp_path, 120, 3, "train", 0.0, 32))
    path = write_conversations(scenes, tmp_path / "c.jsonl", 120, 3)
    which = 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        swapped = swapped_which(record)
        for key, new in zip(record["meta"]["answers"], swapped["meta"]["answers"]):
            before, after = record["conversation"][key["turn"] - 1], swapped["conversation"][key["turn"] - 1]
            if key["type"] != "which":
                assert new == key and after == before
                continue
            which += 1
            assert after["image_list"] == before["image_list"][::-1]
            # the picture the answer names is the same picture, now at the mirrored place
            assert after["image_list"][ORDINALS.index(new["answer"])] == \
                before["image_list"][ORDINALS.index(key["answer"])]
            assert swapped["conversation"][key["turn"]]["content"] == f"The {new['answer']} one."
    assert which > 10


def test_the_calibrated_threshold_separates_the_two_score_groups() -> None:
    scores = np.array([90.0, 85, 80, 20, 10, -5, 70])
    mismatched = np.array([False, False, False, True, True, True, True])
    result = calibrate_threshold(scores, mismatched)
    assert result["threshold"] == 80.0
    assert result["matched_kept"] == 1.0 and result["mismatched_rejected"] == 1.0
    with pytest.raises(ValueError, match="both"):
        calibrate_threshold(scores, np.zeros(7, bool))


class _TextSide:
    """An SDXL text side stand-in whose pooled embedding counts shared words with each known caption (the
    retrieval's arithmetic, checked by hand)."""

    def __init__(self, library):
        self.library = library

    def encode_prompt(self, texts, **_):
        import torch

        rows = torch.zeros(len(texts), len(self.library))
        for i, text in enumerate(texts):
            for j, caption in enumerate(self.library):
                rows[i, j] = len(set(text.split()) & set(caption.split()))
        return None, None, rows, None


def test_caption_retrieval_ranks_the_requested_caption_from_a_caption_or_an_embedding() -> None:
    library = ["a red square", "a blue circle", "a green triangle"]
    side = _TextSide(library)
    case = lambda answer: SimpleNamespace(answer={"type": "draw", "answer": answer})  # noqa: E731
    pairs = [(case("a red square"), {"images": ["x.png"], "descriptions": ["a red square"], "pooled": [None]}),
             (case("a blue circle"), {"images": ["y.png"], "descriptions": ["a green triangle"], "pooled": [None]}),
             # an MSE head: no caption, the pooled embedding it asked SDXL for (nearest "a blue circle")
             (case("a blue circle"), {"images": ["z.png"], "descriptions": [None], "pooled": [[0.1, 3.0, 0.2]]}),
             (case("a green triangle"), {"images": [], "descriptions": [], "pooled": []}),  # drew nothing
             (SimpleNamespace(answer={"type": "colour"}), {"images": [], "descriptions": []})]
    result = caption_retrieval(pairs, library, side)
    assert result["r_at_1"] == pytest.approx(2 / 3) and result["r_at_5"] == 1.0
    assert result["drawn"] == 3 and result["draw_turns"] == 4 and result["exact_caption"] == 0.5


def test_the_head_comparison_reads_the_intervals() -> None:
    from mim.experiments.world import head_comparison

    cell = lambda mean, half: {"mean": mean, "half_width": half}  # noqa: E731
    summary = {"language": {"held_out/r_at_1": cell(0.6, 0.05), "test/r_at_1": cell(0.7, 0.05)},
               "qformer_medium": {"held_out/r_at_1": cell(0.2, 0.05), "test/r_at_1": cell(0.72, 0.05)},
               "prompt_tokens": {"held_out/r_at_1": cell(0.3, 0.1), "test/r_at_1": cell(0.5, 0.05)}}
    comparison = head_comparison(summary)
    assert comparison["verdict"].startswith("holds here")
    seen = comparison["by_measure"]["image generation, seen pairs (R@1)"]
    assert seen["qformer_medium"].startswith("not told apart") and seen["prompt_tokens"].startswith("language above")
    summary["prompt_tokens"]["held_out/r_at_1"] = cell(0.8, 0.05)
    assert head_comparison(summary)["verdict"].startswith("does not hold")
    summary["prompt_tokens"]["held_out/r_at_1"] = cell(0.6, 0.2)
    assert head_comparison(summary)["verdict"].startswith("not answered at this budget")


def test_interval_is_the_t_interval_and_summarise_keeps_chance() -> None:
    cell = interval([0.5, 0.7, 0.6])
    assert cell["mean"] == pytest.approx(0.6)
    assert cell["half_width"] == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)
    assert interval([0.4])["half_width"] == 0.0
    run = lambda a: {"test": {"answers": {"colour": {"accuracy": a, "chance": 1 / 6, "turns": 9}},  # noqa: E731
                              "drawing": {"f1": None}, "retrieval": None}}
    summary = summarise({"language": {0: run(0.5), 1: run(0.7)}})
    assert summary["language"]["test/colour"]["mean"] == pytest.approx(0.6)
    assert summary["language"]["test/colour"]["chance"] == pytest.approx(1 / 6)
    assert "test/draw_f1" not in summary["language"]


def test_the_plan_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="builds"):
        WorldPlan(heads=["diffusion_prior"])
    with pytest.raises(ValueError, match="splits"):
        WorldPlan(splits=["val"])
    with pytest.raises(ValueError, match="seed"):
        WorldPlan(seeds=[])
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['vision'\]"):
        WorldPlan(stage2_part_learning_rates={"vision": 1e-3})


def test_stage2_part_learning_rates_reach_the_model(tmp_path) -> None:
    from mim.experiments.world import fit_config
    from mim.modeling.mim_model import MIM

    models = {"llm": {"preset": "tiny"}, "blip2": {"preset": "tiny"}}
    plain = fit_config(tmp_path, "instruction", "language", 10, 1e-3, models, {}, 0, [])
    assert "part_learning_rates" not in plain["model"]
    config = fit_config(tmp_path, "instruction", "language", 10, 1e-3, models, {}, 0, [], {"qformer": 3e-3})
    model_args = {k: v for k, v in config["model"].items() if k != "head"}
    model = MIM(head=config["model"]["head"], **model_args)
    assert model.hparams.part_learning_rates == {"qformer": 3e-3}


def test_answers_keep_the_pooled_embedding_each_condition_asked_sdxl_for(tmp_path) -> None:
    """What an MSE head asked SDXL for is kept with its answer, for conditioning-space metrics; a prompt has none."""
    import torch
    from PIL import Image

    from heads.base import SDXLCondition
    from mim.evaluation.cases import Case
    from mim.evaluation.held_out import AnswerStore
    from mim.inference.interleaved import GenerationResult, ImagePart, TextPart

    store = AnswerStore(tmp_path)
    conditions = [SDXLCondition(prompt_embeds=torch.zeros(1, 77, 4), pooled_prompt_embeds=torch.tensor([[0.5, -1.25]])),
                  SDXLCondition(prompt="a red square")]
    picture = Image.new("RGB", (8, 8))
    result = GenerationResult([TextPart("Here: "), ImagePart(picture, None, "embeddings"),
                               ImagePart(picture, "a red square", "prompt")], conditions)
    store.add(Case("c/1", "c", 1, [], ""), 0, result, 0.1)
    record = json.loads((tmp_path / "answers.jsonl").read_text())
    assert record["pooled"] == [[0.5, -1.25], None] and record["descriptions"] == [None, "a red square"]


def test_blank_controls_gather_each_seeds_paired_p_by_split() -> None:
    def run(p_seen: float, p_held: float) -> dict:
        return {"test": {}, "test_blank": {"pictures_matter": {"p": p_seen}},
                "held_out": {}, "held_out_blank": {"pictures_matter": {"p": p_held}}, "swapped": {}}

    controls = blank_controls({"language": {0: run(1e-9, 0.2), 1: run(3e-7, 0.04)}})
    assert controls == {"language": {"test": [1e-9, 3e-7], "held_out": [0.2, 0.04]}}


def test_answers_are_broken_down_by_the_shapes_in_the_asked_picture(tmp_path) -> None:
    """A lone shape's colour and the colour of one among three land in different cells, "which" counts
    pictures, and a reply is scored as mim evaluate scores it (the first choice it names)."""
    from mim.experiments.world_breakdown import answers_by_objects
    from synth.world.scenes import Scene, WorldObject

    lone = Scene("lone", (WorldObject("square", "red", "large", "left"),), "white", "test")
    three = Scene("three", (WorldObject("square", "red", "large", "left"),
                            WorldObject("circle", "blue", "small", "centre"),
                            WorldObject("diamond", "green", "small", "right")), "white", "test")
    (tmp_path / "scenes.jsonl").write_text("".join(json.dumps(s.record()) + "\n" for s in (lone, three)))
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]

    def asked(text: str, images: list[str], kind: str, answer: str, choices: list[str]) -> dict:
        return {"conversation": [{"role": "user", "content": text, "image_list": images},
                                 {"role": "assistant", "content": "", "image_list": []}],
                "meta": {"answers": [{"turn": 1, "type": kind, "answer": answer, "choices": choices}]}}

    records = {"a": asked("What colour is the square? <image>", ["lone.png"], "colour", "red", colours),
               "b": asked("What colour is the circle? <image>", ["three.png"], "colour", "blue", colours),
               "c": asked("What colour is the square? <image>", ["three.png"], "colour", "red", colours),
               "d": asked("Which has a blue circle? <image> <image>", ["lone.png", "three.png"], "which", "second",
                          ["first", "second"]),
               "e": asked("Draw it", [], "draw", "a caption", [])}
    (tmp_path / "conversations.jsonl").write_text("".join(json.dumps({"id": k, **v}) + "\n" for k, v in records.items()))
    replies = {"a": "It is red.", "b": "It is red, not blue.", "c": "It is red.", "d": "The second one.",
               "e": "Here it is."}
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"key": f"{k}/1", "text": t}) + "\n"
                                                    for k, t in replies.items()))
    assert answers_by_objects(tmp_path / "conversations.jsonl", tmp_path / "scenes.jsonl",
                              tmp_path / "answers.jsonl") == {("colour", 1): (1, 1), ("colour", 3): (1, 2),
                                                              ("which", 2): (1, 1)}


def test_query_spread_tells_collapsed_queries_from_a_random_qformers() -> None:
    import torch
    from transformers import Blip2QFormerModel

    from mim.evaluation.query_spread import query_spread
    from synth.world.parts import world_blip2_config

    # two pictures, two queries: a pattern by query (+-1 in the first unit) and one by picture (+-2 in the
    # second): sums of squares 4 and 16 of 20, no interaction
    split = query_spread(torch.tensor([[[1.0, 2.0], [-1.0, 2.0]], [[1.0, -2.0], [-1.0, -2.0]]]))
    assert split["picture_share"] == pytest.approx(0.8)
    assert split["query_share"] == pytest.approx(0.0)
    # each picture's queries opposite, and opposite ways in the two pictures: all interaction
    crossed = query_spread(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]], [[-1.0, 0.0], [1.0, 0.0]]]))
    assert crossed["picture_share"] == pytest.approx(1.0)
    assert crossed["query_share"] == pytest.approx(1.0)
    assert crossed["mean_cosine"] == pytest.approx(-1.0)
    picture = torch.randn(6, 1, 8)
    collapsed = query_spread(picture.expand(-1, 5, -1) + 1e-3 * torch.randn(6, 5, 8))
    assert collapsed["mean_cosine"] > 0.99 and collapsed["query_share"] < 1e-3
    assert collapsed["picture_share"] > 0.999
    prompt = query_spread(torch.randn(1, 5, 8).expand(6, -1, -1) + 1e-3 * torch.randn(6, 5, 8))
    assert prompt["picture_share"] < 1e-3
    torch.manual_seed(0)
    config = world_blip2_config()
    qformer = Blip2QFormerModel(config.qformer_config).eval()
    queries = torch.randn(1, 32, config.qformer_config.hidden_size) * config.qformer_config.hidden_size ** -0.5
    with torch.no_grad():
        outputs = qformer(query_embeds=queries.expand(4, -1, -1),
                          encoder_hidden_states=torch.randn(4, 65, config.vision_config.hidden_size)).last_hidden_state
    random = query_spread(outputs)
    assert random["mean_cosine"] < 0.9 and random["query_share"] > 0.3
    with pytest.raises(ValueError, match="pictures >= 2"):
        query_spread(torch.randn(1, 4, 8))
