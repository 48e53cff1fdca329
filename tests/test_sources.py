"""The stage-2 sources of the released mixture, each read from a small hand-made file in its own format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from synth import read_conversations
from synth.data.sources import ALPACA_WITH_INPUT, ALPACA_WITHOUT_INPUT, MINIGPT4_INSTRUCTION


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


PLATYPUS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "data_source": "scibench"},
    {"instruction": "Name a prime.", "input": "", "output": "7 <image>", "data_source": "guanaco"},
    {"instruction": "No answer here."},
]


def test_platypus_becomes_an_alpaca_prompt_without_images(tmp_path: Path) -> None:
    path = tmp_path / "platypus.json"
    path.write_text(json.dumps(PLATYPUS, indent=1))
    conversations, report = read_conversations(path, on_error="skip", format="platypus")
    first, second = conversations
    assert first.turns[0].content == ALPACA_WITH_INPUT.format(instruction="Add the numbers.", input="2 and 3")
    assert second.turns[0].content == ALPACA_WITHOUT_INPUT.format(instruction="Name a prime.")
    assert second.turns[1].content == "7 " and not first.images  # a literal <image> is removed, as the release did
    assert first.extra == {"source_format": "platypus", "data_source": "scibench"}
    (error,) = report.rejected
    line = path.read_text().splitlines().index("  \"instruction\": \"No answer here.\"") 
    assert error.rule == "missing_field" and str(error) == f"{path}:{line}: 'output' must be a string, got None"


def test_platypus_parquet_as_published_on_the_hub(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = PLATYPUS[:2]
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "train-00000-of-00001.parquet")
    conversations, report = read_conversations(tmp_path / "train-00000-of-00001.parquet", format="platypus")
    assert [c.turns[1].content for c in conversations] == ["5", "7 "] and report.rejected == []


def test_minigpt4_annotations_file(tmp_path: Path) -> None:
    path = tmp_path / "filter_cap.json"
    path.write_text(json.dumps({"annotations": [
        {"image_id": "2", "caption": "The image shows a man fishing on a lawn next to a river."},
        {"image_id": 17, "caption": "A red bus."},
        {"caption": "no image id"},
    ]}, indent=2))
    conversations, report = read_conversations(path, on_error="skip", format="minigpt4")
    assert [c.id for c in conversations] == ["2", "17"]
    assert conversations[0].turns[0].content == f"<image>\n{MINIGPT4_INSTRUCTION}"
    assert conversations[0].turns[0].image_list == ["2.jpg"] and conversations[1].turns[1].content == "A red bus."
    (error,) = report.rejected
    assert str(error).startswith(f"{path} (record 'filter_cap-000002')") and "'image_id'" in str(error)
    (tmp_path / "broken.json").write_text('{"annotations": {"not": "a list"}}')
    _, broken = read_conversations(tmp_path / "broken.json", on_error="skip", format="minigpt4")
    assert "expected {\"annotations\": [...]}" in str(broken.rejected[0])


def test_shikra_gpt4gen_is_cleaned_as_the_release_did(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "GPT4GEN_BoxCoT_train.jsonl", [
        {"img_path": "1000092795.jpg", "boxes": [[1, 2, 3, 4]], "question": "What is <ph_st>the man<ph_ed> holding ?",
         "question_boxes_seq": [[0]], "cot_with_ans": "The man<ph_st><ph_ed> holds a rope , so the answer is rope .",
         "answer_boxes_seq": [[0]], "answer": "rope"},
        {"img_path": "x.jpg", "question": 3, "cot_with_ans": "?"},
    ])
    conversations, report = read_conversations(path, on_error="skip", format="shikra")
    (conversation,) = conversations
    assert conversation.turns[0].content == "<image>\nWhat is the man holding ?"
    assert conversation.turns[1].content == "The man holds a rope, so the answer is rope."
    assert conversation.turns[0].image_list == ["1000092795.jpg"] and conversation.extra["boxes"] == [[1, 2, 3, 4]]
    assert report.rejected[0].rule == "bad_type" and "'question' must be a string" in str(report.rejected[0])


def test_multiinstruct_with_either_target_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train_2000.jsonl", [
        {"unique_id": "vqa-1", "image_path": "coco/1.jpg", "prompt": "What colour is the car?", "target": "red"},
        {"unique_id": "vqa-2", "image_path": "coco/2.jpg", "prompt": "Count the dogs.", "target_txt": "two",
         "task_name": "counting"},
        {"unique_id": "vqa-3", "prompt": "Missing image path.", "target": "x"},
    ])
    conversations, report = read_conversations(path, on_error="skip", format="multiinstruct")
    assert [c.turns[1].content for c in conversations] == ["red", "two"]
    assert conversations[1].turns[0].content == "<image>\nCount the dogs." and conversations[1].id == "vqa-2"
    assert report.rejected[0].rule == "missing_field" and "(record 'vqa-3')" in str(report.rejected[0])


def test_convert_dataset_command_writes_the_schema(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "train_10.jsonl", [
        {"unique_id": "a", "image_path": "1.jpg", "prompt": "Q?", "target": "A."}])
    synth = Path(sys.executable).parent / "synth"
    result = subprocess.run([str(synth), "convert-dataset", str(source), "--format", "multiinstruct", "--out",
                             str(tmp_path / "out.jsonl"), "--image-dir", "images"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (conversation,), report = read_conversations(tmp_path / "out.jsonl")
    assert conversation.image_dir == "images" and conversation.turns[1].content == "A."
    empty = subprocess.run([str(synth), "convert-dataset", str(tmp_path / "out.jsonl"), "--format", "platypus",
                            "--out", str(tmp_path / "none.jsonl")], capture_output=True, text=True)
    assert empty.returncode == 1 and "0 written" in empty.stdout  # nothing converted is a failure


def test_text_only_records_train_beside_image_records(tmp_path: Path) -> None:
    """A Platypus record (no image) and a MiniGPT-4 record (one image) in one batch: both are trained on."""
    import torch
    from PIL import Image

    from datamodules import ConversationDataModule, ConversationSource
    from heads import LanguageDescriptionHead
    from mim import MIM

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "images" / "2.jpg")
    (tmp_path / "platypus.jsonl").write_text(json.dumps(PLATYPUS[0]) + "\n")
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": "2", "caption": "Green."}]}))
    model = MIM(head=LanguageDescriptionHead(), llm={"preset": "tiny"}, blip2={"preset": "tiny"})
    module = ConversationDataModule(train=[
        ConversationSource(str(tmp_path / "platypus.jsonl"), format="platypus"),
        ConversationSource(str(tmp_path / "filter_cap.json"), format="minigpt4", image_root=str(tmp_path / "images")),
    ], batch_size=2, num_workers=0).bind(model.data_interface())
    module.setup("fit")
    batch = model.data_interface().collate([module.train_set[0], module.train_set[1]])
    assert batch["pixel_values"].shape[0] == 1 and (batch["labels"] != -100).sum(dim=1).min() > 0
    loss = model.losses(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
