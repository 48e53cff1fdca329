"""The procedural world: deterministic, a held-out split no training picture or text contains, recorded
mismatches, conversations whose stored answers are true of their pictures, and the answer metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mim.evaluation.held_out import (AnswerStore, ReferenceResponder, answer_cases, answer_correctness,
                                     answer_metrics, blanked, chosen_answer, replay_cases)
from mim.inference.interleaved import GenerationResult, TextPart
from synth.data.conversation_io import read_conversations
from synth.world.dialogues import write_conversations
from synth.world.scenes import COLOURS, HELD_OUT_PAIRS, SHAPES, read_scenes, render, world_pairs, write_world


def test_the_world_is_deterministic_from_its_seed() -> None:
    first, again, other = (list(world_pairs(30, seed)) for seed in (3, 3, 4))
    assert first == again and first != other
    assert render(first[0], 64).tobytes() == render(again[0], 64).tobytes()
    assert render(first[0], 64).size == (64, 64)


def test_the_world_conversations_do_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    """Each Python process salts str hashes anew (PYTHONHASHSEED), so a set of names iterates in another order
    in each; the "which" questions once picked their described shape from such a set, and CI's evaluation
    set was not the one a developer measured."""
    import hashlib
    import os
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from synth.world.dialogues import write_conversations; "
              "from synth.world.scenes import read_scenes, write_world; out = Path(sys.argv[1]); "
              "scenes = read_scenes(write_world(out, 60, 7, 'train', 0.1, 32)); "
              "write_conversations(scenes, out / 'conversations.jsonl', 60, 7)")
    digests = set()
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / hash_seed
        subprocess.run([sys.executable, "-c", script, str(out)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed})
        text = (out / "conversations.jsonl").read_bytes() + (out / "scenes.jsonl").read_bytes()
        assert b"Which of these" in text
        digests.add(hashlib.sha256(text).hexdigest())
    assert len(digests) == 1


def test_held_out_pairs_are_in_no_training_picture_or_caption_and_in_every_held_out_one() -> None:
    train = list(world_pairs(2000, 0, "train"))
    held = list(world_pairs(300, 0, "held_out"))
    assert all((o.colour, o.shape) not in HELD_OUT_PAIRS for scene in train for o in scene.objects)
    assert all(any((o.colour, o.shape) in HELD_OUT_PAIRS for o in scene.objects) for scene in held)
    texts = " ".join(scene.caption for scene in train)
    for colour, shape in HELD_OUT_PAIRS:
        assert not re.search(rf"\b{colour} {shape}\b", texts)
    seen = {(o.colour, o.shape) for scene in train for o in scene.objects}
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)  # each part seen


def test_mismatched_pairs_are_recorded_and_really_do_not_match() -> None:
    scenes = list(world_pairs(2000, 1, "train", mismatched=0.1))
    wrong = [scene for scene in scenes if scene.mismatched]
    assert 0.07 <= len(wrong) / len(scenes) <= 0.13
    for scene in wrong:
        named = set(re.findall(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})", scene.caption))
        assert named != {(o.colour, o.shape) for o in scene.objects}
    assert not any(scene.mismatched for scene in world_pairs(200, 1, "train"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("world")
    scenes = read_scenes(write_world(folder, 200, 0, "train", 0.0, 32))
    return write_conversations(scenes, folder / "conversations.jsonl", 150, 0), scenes


def test_every_stored_answer_is_true_of_its_pictures(world) -> None:
    path, scenes = world
    conversations, report = read_conversations(path)
    assert report.read == 150 and not report.rejected
    kinds = set()
    for line in path.read_text().splitlines():
        record = json.loads(line)
        turns = record["conversation"]
        for answer in record["meta"]["answers"]:
            kinds.add(answer["type"])
            question, reply = turns[answer["turn"] - 1], turns[answer["turn"]]
            pictures = [scenes[name.removesuffix(".png")] for name in question["image_list"]]
            if answer["type"] == "draw":
                assert reply["caption_list"] == [answer["answer"]]
                continue
            assert answer["answer"] in answer["choices"] and chosen_answer(reply["content"], answer["choices"]) == \
                answer["answer"]
            if answer["type"] == "colour":
                shape = re.search(r"the (\w+)\?", question["content"]).group(1)
                assert [o.colour for o in pictures[0].objects if o.shape == shape] == [answer["answer"]]
            if answer["type"] == "which":
                colour, shape = re.search(r"has an? (\w+) (\w+)\?", question["content"]).groups()
                holding = [i for i, p in enumerate(pictures) if any((o.colour, o.shape) == (colour, shape)
                                                                     for o in p.objects)]
                assert len(holding) == 1 and answer["choices"][holding[0]] == answer["answer"]
    assert kinds == {"colour", "shape", "count", "position", "which", "recall", "draw"}


def test_the_world_is_an_ingest_source(tmp_path: Path) -> None:
    from synth.selection.ingest import IngestSource, ingest

    result = ingest([IngestSource("world", str(tmp_path / "images"),
                                  options={"count": 40, "seed": 2, "mismatched": 0.2, "image_size": 32})])
    assert len(result.pairs) + len(result.rejected) == 40
    assert all(Image.open(pair.image).size == (32, 32) for pair in result.pairs)
    records = [json.loads(line) for line in (tmp_path / "images" / "scenes.jsonl").read_text().splitlines()]
    assert {r["id"] for r in records} >= {Path(p.image).stem for p in result.pairs}
    with pytest.raises(ValueError, match="kind must be one of"):
        IngestSource("planet", "x")


class ConstantResponder:
    def respond(self, cases, seeds):
        return [GenerationResult([TextPart("It is red, the first one, on the left, one.")]) for _ in cases]


def test_answer_metrics_score_the_reference_perfectly_and_a_constant_at_its_rate(world, tmp_path: Path) -> None:
    path, _ = world
    cases, _ = replay_cases([str(path)])
    keyed = [case for case in cases if case.answer and case.answer.get("choices")]
    assert keyed
    store = AnswerStore(tmp_path / "ref")
    answer_cases(keyed, ReferenceResponder(), store)
    table = answer_metrics([(case, store.records[(case.key, 0)]) for case in keyed])
    assert all(row["accuracy"] == 1.0 for row in table.values())
    assert table["colour"]["chance"] == pytest.approx(1 / 6) and table["which"]["chance"] > 1 / 3
    store = AnswerStore(tmp_path / "constant")
    answer_cases(keyed, ConstantResponder(), store)
    constant = answer_metrics([(case, store.records[(case.key, 0)]) for case in keyed])
    expected = sum(case.answer["answer"] == "red" for case in keyed if case.answer["type"] == "colour")
    assert constant["colour"]["accuracy"] == expected / constant["colour"]["turns"]
    assert constant["count"]["accuracy"] < 1.0
    # every turn right is no guess; "red" to every colour question is, at its share of red answers
    assert table["all"]["p_chance"] < 1e-30
    assert constant["colour"]["p_chance"] > 0.01
    correct = answer_correctness([(case, store.records[(case.key, 0)]) for case in keyed])
    assert set(correct) == {case.key for case in keyed}
    assert all(correct[case.key] == (case.answer["answer"] == "red") for case in keyed
               if case.answer["type"] == "colour")
    assert sum(correct.values()) == round(constant["all"]["accuracy"] * constant["all"]["turns"])


def test_evaluate_cases_adds_the_callers_metrics_from_the_answered_pairs(world, tmp_path: Path) -> None:
    from mim.evaluation.held_out import evaluate_cases

    path, _ = world
    cases, _ = replay_cases([str(path)], max_cases=12)
    seen = []

    def answered(pairs):
        seen.extend(pairs)
        return len(pairs)

    report = evaluate_cases(cases, ReferenceResponder(), tmp_path / "eval", metrics={"answered_turns": answered})
    assert report["answered_turns"] == 12 and [case.key for case, _ in seen] == [case.key for case in cases]
    assert all(answer["error"] is None for _, answer in seen)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["answered_turns"] == 12


def test_chosen_answer_takes_the_first_choice_named() -> None:
    assert chosen_answer("It is blue, not red.", ["red", "blue"]) == "blue"
    assert chosen_answer("The second one.", ["first", "second"]) == "second"
    assert chosen_answer("reddish", ["red"]) is None


def test_blanked_keeps_the_count_and_size_of_pictures() -> None:
    picture = Image.new("RGB", (20, 10), (255, 0, 0))
    out = blanked([{"role": "user", "content": "x <image>", "images": [picture]}])
    assert out[0]["images"][0].size == (20, 10) and out[0]["images"][0].getpixel((0, 0)) == (128, 128, 128)


def test_the_world_goes_through_the_synthesis_pipeline_with_true_answer_keys(tmp_path: Path) -> None:
    """ingest -> score -> cluster -> sample -> generate (the world's composer) -> filter: the kept dialogues are
    in Appendix A's format, parsed like an LLM's, and every answer key is true of the picture it asks about."""
    from synth.config import ClusterConfig, GenerateConfig, IngestConfig, SampleConfig, ScoreConfig, SynthConfig
    from synth.data.pairs import read_pairs
    from synth.pipeline import run_all
    from synth.selection.ingest import IngestSource

    images = tmp_path / "pictures"
    config = SynthConfig(
        work_dir=str(tmp_path / "synth"),
        ingest=IngestConfig(sources=[IngestSource("world", str(images), options={"count": 120, "seed": 4,
                                                                                 "image_size": 32})]),
        score=ScoreConfig(clip={"preset": "tiny"}, min_score=-100.0, batch_size=64, num_workers=0),
        cluster=ClusterConfig(k=3, min_cluster_size=4), sample=SampleConfig(num_groups=40),
        generate=GenerateConfig(backend="world", world=str(images / "scenes.jsonl"), concurrency=8))
    run_all(config, until="filter", log=lambda line: None)
    generations = [json.loads(line) for line in (tmp_path / "synth" / "generate" / "generations.jsonl")
                   .read_text().splitlines()]
    assert len(generations) == 40 and all(g["output"].startswith("Human: ") for g in generations)
    scenes = read_scenes(images / "scenes.jsonl")
    scene_of = {f"{pair.id}.png": scenes[Path(pair.image).stem]
                for pair in read_pairs(tmp_path / "synth" / "ingest" / "pairs.jsonl")}
    kept = [json.loads(line) for line in (tmp_path / "synth" / "filter" / "conversations.jsonl")
            .read_text().splitlines()]
    assert len(kept) >= 15
    checked = 0
    for record in kept:
        turns = record["conversation"]
        for answer in record["meta"]["answers"]:
            question, reply = turns[answer["turn"] - 1], turns[answer["turn"]]
            if answer["type"] == "draw":
                assert reply["image_list"] and scene_of[reply["image_list"][0]].caption == answer["answer"]
                continue
            assert chosen_answer(reply["content"], answer["choices"]) == answer["answer"]
            pictures = [scene_of[name] for name in question["image_list"]]
            if answer["type"] == "count":
                assert answer["answer"] == {1: "one", 2: "two", 3: "three"}[pictures[0].count]
                checked += 1
            if answer["type"] == "which":
                colour, shape = re.search(r"has an? (\w+) (\w+)\?", question["content"]).groups()
                holding = [i for i, p in enumerate(pictures)
                           if any((o.colour, o.shape) == (colour, shape) for o in p.objects)]
                assert len(holding) == 1 and answer["choices"][holding[0]] == answer["answer"]
                checked += 1
    assert checked >= 5


def test_the_world_sdxl_encodes_captions_into_the_world_clips_space(tmp_path: Path) -> None:
    """The MSE heads' targets: SDXL's pooled embedding of a caption is exactly the world CLIP's text feature."""
    import torch
    from transformers import CLIPModel

    from synth.model_parts.clip import tiny_clip_config
    from synth.model_parts.sdxl import build_sdxl_text_encoders, sdxl_text_dims
    from synth.world.parts import WORLD_IMAGE_SIZE, build_world_sdxl, world_clip_processor

    torch.manual_seed(0)
    processor = world_clip_processor()
    clip = CLIPModel(tiny_clip_config(len(processor.tokenizer), image_size=WORLD_IMAGE_SIZE)).eval()
    clip.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    sdxl = build_world_sdxl(tmp_path / "sdxl", tmp_path / "clip")
    assert sdxl_text_dims({"pretrained": str(sdxl)}) == (77, 64, 32)
    captions = ["a small red square on the left", "two large blue circles on a grey background"]
    _, _, pooled, _ = build_sdxl_text_encoders({"pretrained": str(sdxl)}).encode_prompt(
        captions, device="cpu", do_classifier_free_guidance=False)
    with torch.no_grad():
        features = clip.get_text_features(**processor.tokenizer(captions, padding=True, return_tensors="pt"))
    features = getattr(features, "pooler_output", features)
    assert torch.allclose(pooled, features, atol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1])


def test_the_caption_objective_trains_the_queries_and_is_recorded(tmp_path: Path) -> None:
    """BLIP-2's ITG beside ITC: the decoder sees the picture only through the query outputs, its loss reaches
    the Q-Former and the tower, pads are not scored, and the part records the weight it was trained with."""
    import torch
    from transformers import CLIPModel

    from synth.model_parts.clip import tiny_clip_config
    from synth.world.parts import MARKER, WORLD_IMAGE_SIZE, _caption_decoder, _caption_loss, pretrain_vision_tower
    from synth.world.parts import world_clip_processor

    torch.manual_seed(0)
    processor = world_clip_processor()
    decoder, captions = _caption_decoder(processor.tokenizer, ["a red square", "two shapes : a large blue circle "
                                                               "and a small green diamond on white"], 32)
    assert captions["attention_mask"][0].sum() < captions["attention_mask"][1].sum()  # the first one is padded
    queries = torch.randn(2, 4, 32, requires_grad=True)
    loss = _caption_loss(decoder, queries, captions, torch.tensor([0, 1]))
    loss.backward()
    assert queries.grad.abs().sum() > 0  # the caption is written from the queries
    with torch.no_grad():  # a pad token in the label would change the loss; pads' ids are not scored
        padded = {k: v.clone() for k, v in captions.items()}
        padded["input_ids"][0, captions["attention_mask"][0] == 0] = 7
        torch.testing.assert_close(_caption_loss(decoder, queries[:1], padded, torch.tensor([0])),
                                   _caption_loss(decoder, queries[:1], captions, torch.tensor([0])))
        other = _caption_loss(decoder, torch.randn(2, 4, 32), captions, torch.tensor([0, 1]))
    assert not torch.isclose(other, loss)  # and from nothing else

    CLIPModel(tiny_clip_config(len(processor.tokenizer), image_size=WORLD_IMAGE_SIZE)).save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    scenes = list(read_scenes(write_world(tmp_path / "pictures", 24, 0, "train")).values())
    tower = pretrain_vision_tower(tmp_path / "blip2", tmp_path / "clip", scenes, tmp_path / "pictures", steps=4,
                                  batch_size=8, caption_weight=1.0)
    assert json.loads((tower / MARKER).read_text())["caption_weight"] == 1.0
    with pytest.raises(ValueError, match="caption_weight 1.0, not 0.0: give another out_dir"):
        pretrain_vision_tower(tmp_path / "blip2", tmp_path / "clip", scenes, tmp_path / "pictures", steps=4,
                              batch_size=8)


def test_the_world_llm_takes_its_size_and_a_cached_one_of_another_size_is_refused(tmp_path: Path) -> None:
    from synth.model_parts import build_llm
    from synth.model_parts.llm import tiny_llama_config
    from synth.world.parts import pretrain_language_model

    texts = ["a large red square on a white background"] * 64
    llm = pretrain_language_model(tmp_path / "llm", lambda: texts, steps=2, batch_size=2, block=16, hidden_size=32,
                                  layers=3)  # the corpus as a function, built because the LLM is to be trained
    config = build_llm({"pretrained": str(llm)}).model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 3, 2)

    def unneeded() -> list[str]:
        raise AssertionError("the corpus was built for an LLM already trained with these settings")

    # the same settings: the cached part is reused, and a corpus given as a function is never built
    assert pretrain_language_model(tmp_path / "llm", unneeded, steps=2, batch_size=2, block=16, hidden_size=32,
                                   layers=3) == llm
    with pytest.raises(ValueError, match="hidden_size 32, not 64"):
        pretrain_language_model(tmp_path / "llm", texts, steps=2, batch_size=2, block=16)
    with pytest.raises(ValueError, match="positive multiple of 16"):
        tiny_llama_config(100, hidden_size=40)


def test_the_layout_objective_runs_and_a_part_cached_with_other_settings_is_refused(tmp_path: Path) -> None:
    import torch
    from transformers import CLIPModel

    from synth.model_parts import build_blip2
    from synth.model_parts.clip import tiny_clip_config
    from synth.world.parts import MARKER, WORLD_IMAGE_SIZE, pretrain_vision_tower, world_clip_processor

    torch.manual_seed(0)
    processor = world_clip_processor()
    CLIPModel(tiny_clip_config(len(processor.tokenizer), image_size=WORLD_IMAGE_SIZE)).save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    scenes = list(read_scenes(write_world(tmp_path / "pictures", 24, 0, "train")).values())
    tower = pretrain_vision_tower(tmp_path / "blip2", tmp_path / "clip", scenes, tmp_path / "pictures", steps=6,
                                  batch_size=8, layout_weight=1.0)
    record = json.loads((tower / MARKER).read_text())
    assert record["layout_weight"] == 1.0 and record["qformer_trained"]
    assert build_blip2({"pretrained": str(tower)}).qformer is not None  # what MIM reads; the decoder is not kept
    with pytest.raises(ValueError, match="layout_weight 1.0, not 0.0: give another out_dir"):
        pretrain_vision_tower(tmp_path / "blip2", tmp_path / "clip", scenes, tmp_path / "pictures", steps=6)
    with pytest.raises(ValueError, match="trained with steps 6, not 9: give another out_dir"):
        pretrain_vision_tower(tmp_path / "blip2", tmp_path / "clip", scenes, tmp_path / "pictures", steps=9,
                              batch_size=8, layout_weight=1.0)
    mtime = (tower / "model.safetensors").stat().st_mtime_ns
    assert pretrain_vision_tower(tmp_path / "blip2", tmp_path / "clip", scenes, tmp_path / "pictures", steps=6,
                                 batch_size=8, layout_weight=1.0) == tower  # the same settings: reused
    assert (tower / "model.safetensors").stat().st_mtime_ns == mtime
