"""OpenAI chat messages and ShareGPT, next to TextBind and LLaVA: read, written, converted, trained on,
and round trips that lose nothing."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from synth.data.chat_formats import from_openai, from_sharegpt, to_openai, to_sharegpt
from synth.data.conversation_io import read_conversations, write_conversations
from synth.data.schema import SchemaError, from_textbind, to_textbind

RECORD = {
    "id": "talk-1", "image_dir": "pictures",
    "conversation": [
        {"role": "user", "content": "Compare <image> and <image>, please.", "image_list": ["a.png", "b.png"],
         "caption_list": [], "lang": "en"},
        {"role": "assistant", "content": "The first is red. Here is a third: <image>", "image_list": ["c.png"],
         "caption_list": ["a red circle"]},
        {"role": "user", "content": "<image>", "image_list": ["d.png"], "caption_list": []},
        {"role": "assistant", "content": "  Thanks \n", "image_list": [], "caption_list": []},
    ],
    "meta": {"answers": [{"turn": 1, "type": "colour", "answer": "red"}]},
    "source": "handwritten",
}


def test_textbind_to_openai_and_back_loses_nothing() -> None:
    conversation = from_textbind(RECORD, "x")
    record = to_openai(conversation)
    first = record["messages"][0]["content"]
    assert first == [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": "a.png"}},
                     {"type": "text", "text": " and "}, {"type": "image_url", "image_url": {"url": "b.png"}},
                     {"type": "text", "text": ", please."}]
    assert record["messages"][3]["content"] == "  Thanks \n"  # text-only: a plain string, whitespace kept
    assert to_textbind(from_openai(json.loads(json.dumps(record)), "x")) == RECORD


def test_textbind_to_sharegpt_and_back_loses_nothing() -> None:
    record = to_sharegpt(from_textbind(RECORD, "x"))
    assert record["images"] == ["a.png", "b.png", "c.png", "d.png"]
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert to_textbind(from_sharegpt(json.loads(json.dumps(record)), "x")) == RECORD


def test_files_in_each_format_are_detected_and_read_the_same(tmp_path: Path) -> None:
    conversation = from_textbind(RECORD, "x")
    for name in ("textbind", "openai", "sharegpt"):
        path = tmp_path / f"{name}.jsonl"
        assert write_conversations(path, [conversation], format=name) == 1
        read, report = read_conversations(path)  # auto: by the record's fields
        assert report.read == 1 and to_textbind(read[0]) == RECORD, name


@pytest.mark.parametrize("record, rule", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]},
     "remote_image"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "data": "..."}]}]}, "bad_type"),
    ({"messages": [{"role": "user", "content": "look <image>"}]}, "placeholder_mismatch"),
    ({"messages": [{"role": "user"}]}, "missing_field"),
    ({"conversations": [{"from": "human", "value": "<image> <image>"}], "images": ["a.png"]}, "placeholder_mismatch"),
    ({"conversations": [{"from": "robot", "value": "hi"}], "images": []}, "missing_field"),
    ({"messages": [{"role": "user", "content": "hi"}], "meta": "not an object"}, "bad_type"),
    ({"conversations": [{"from": "human", "value": "hi"}], "images": [], "meta": ["x"]}, "bad_type"),
])
def test_bad_records_are_one_rejection_each(tmp_path: Path, record: dict, rule: str) -> None:
    path = tmp_path / "data.jsonl"
    good = to_openai(from_textbind(RECORD, "x"))
    path.write_text(json.dumps(record) + "\n" + json.dumps(good) + "\n")
    read, report = read_conversations(path, on_error="skip")
    assert [c.id for c in read] == ["talk-1"]
    assert [error.rule for error in report.rejected] == [rule]
    assert report.rejected[0].location.line == 1


def _data_url(colour) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_convert_dataset_writes_data_url_images_out_as_files(tmp_path: Path) -> None:
    from synth.cli import convert_dataset

    red = _data_url((255, 0, 0))
    records = [{"id": "inline", "messages": [
                   {"role": "user", "content": [{"type": "text", "text": "What is this? "},
                                                {"type": "image_url", "image_url": {"url": red}}]},
                   {"role": "assistant", "content": "Red."}]},
               {"id": "again", "messages": [
                   {"role": "user", "content": [{"type": "image_url", "image_url": {"url": red}}]},
                   {"role": "assistant", "content": "Still red."}]},
               {"id": "broken", "messages": [
                   {"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]},
                   {"role": "assistant", "content": "?"}]}]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SchemaError, match="data: URL images") as refused:  # training reads files, not data: URLs
        read_conversations(source)
    assert refused.value.rule == "inline_image"
    out = tmp_path / "out" / "converted.jsonl"
    out.parent.mkdir()
    assert convert_dataset([source], out, "openai", to="sharegpt") == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == ["inline", "again"]  # the undecodable picture costs its record only
    files = sorted((out.parent / "converted_images").iterdir())
    assert len(files) == 1 and written[0]["images"] == written[1]["images"] == [files[0].name]
    assert written[0]["image_dir"] == "converted_images"
    assert Image.open(files[0]).getpixel((0, 0)) == (255, 0, 0)
    read, report = read_conversations(out)
    assert report.read == 2 and read[0].image_path(read[0].images[0], out.parent) == files[0]


def test_the_stage2_datamodule_trains_on_openai_and_sharegpt_files(tmp_path: Path) -> None:
    from datamodules import ConversationDataModule, ConversationSource
    from heads import LanguageDescriptionHead
    from mim import MIM

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for name, colour in zip("abcd", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]):
        Image.new("RGB", (32, 32), colour).save(pictures / f"{name}.png")
    conversation = from_textbind(RECORD, "x")
    sources = []
    for name in ("textbind", "openai", "sharegpt"):
        path = tmp_path / f"{name}.jsonl"
        write_conversations(path, [conversation], format=name)
        sources.append(ConversationSource(str(path)))
    model = MIM(head=LanguageDescriptionHead(), llm={"preset": "tiny"}, blip2={"preset": "tiny"})
    module = ConversationDataModule(train=sources, batch_size=2, num_workers=0).bind(model.data_interface())
    module.setup("fit")
    rows = [module.train_set[index] for index in range(3)]
    reference = model.data_interface().collate([rows[0]])
    for row in rows[1:]:  # the same samples as from the TextBind file: tokens, labels, pictures
        batch = model.data_interface().collate([row])
        for key in ("input_ids", "labels", "pixel_values"):
            assert batch[key].equal(reference[key]), key
    assert reference["pixel_values"].shape[0] == 4
