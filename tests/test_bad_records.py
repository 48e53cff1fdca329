"""mim generate and mim evaluate: a bad record costs only itself, is named with its id and reason, and a rerun
retries it; ids are unique across inputs; limits are checked before work; outputs never collide."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from heads import LanguageDescriptionHead
from mim.evaluation.cases import Case
from mim.evaluation.held_out import AnswerStore, ReferenceResponder, answer_cases
from mim.inference.reply_files import FAILURES_FILE, generate
from mim.modeling.directory import save_directory
from mim.modeling.mim_model import MIM


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mim")
    save_directory(MIM(LanguageDescriptionHead(), llm="tiny", blip2="tiny"), path, sdxl={"preset": "tiny"})
    return path


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def record(record_id: str, content: str, images: list[str]) -> dict:
    return {"id": record_id, "conversation": [{"role": "user", "content": content, "image_list": images},
                                              {"role": "assistant", "content": "An answer."}]}


@pytest.fixture()
def hostile_file(tmp_path: Path) -> Path:
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "bomb.png").write_bytes(bomb_png(20000, 20000))
    records = [
        record("good-1", "What is this? <image>", ["good.png"]),
        record("missing", "And this? <image>", ["nowhere.png"]),
        record("cut", "This? <image>", ["cut.png"]),
        record("bomb", "This? <image>", ["bomb.png"]),
        record("many-images", "<image>" * 10_000, ["good.png"] * 10_000),
        record("huge-turn", "word " * 1_000_000, []),
        record("good-2", "Describe <image> please.", ["good.png"]),
    ]
    path = tmp_path / "convs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_generate(tiny_dir: Path, inputs, out: Path, **options) -> int:
    return generate(str(tiny_dir), inputs, str(out), device="cpu", max_new_tokens=4, max_images=0,
                    image_size=64, num_inference_steps=2, batch_size=8, **options)


def test_generate_answers_the_good_records_and_names_each_bad_one(tiny_dir: Path, hostile_file: Path,
                                                                   tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    start = time.perf_counter()
    assert run_generate(tiny_dir, str(hostile_file), out) == 1  # some records failed: scripts notice
    assert time.perf_counter() - start < 60  # the 10,000-image and 5 MB records are refused before any work
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in replies) == ["good-1", "good-2"]
    failures = {f["id"]: f["error"] for f in map(json.loads, (out / FAILURES_FILE).read_text().splitlines())}
    assert set(failures) == {"missing", "cut", "bomb", "many-images", "huge-turn"}
    assert failures["missing"].startswith("bad_image") and "nowhere.png" in failures["missing"]
    assert failures["cut"].startswith("bad_image") and failures["bomb"].startswith("bad_image")
    assert "over the limit" in failures["bomb"]
    assert failures["many-images"].startswith("too_many_images")
    assert failures["huge-turn"].startswith("prompt_too_long")
    assert "could not be answered" in capsys.readouterr().err
    # fix one image: the rerun answers it, and only what is missing
    Image.new("RGB", (32, 32), (0, 0, 200)).save(hostile_file.parent / "cut.png")
    assert run_generate(tiny_dir, str(hostile_file), out) == 1
    replies = [json.loads(line)["id"] for line in (out / "replies.jsonl").read_text().splitlines()]
    assert sorted(replies) == ["cut", "good-1", "good-2"]


def test_ids_are_unique_across_input_files(tiny_dir: Path, tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (0, 200, 0)).save(tmp_path / "g.png")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (16, 16), (0, 200, 0)).save(tmp_path / folder / "g.png")
        (tmp_path / folder / "test.jsonl").write_text(json.dumps(
            {"conversation": [{"role": "user", "content": "Hi <image>", "image_list": ["g.png"]},
                              {"role": "assistant", "content": "Hello."}]}) + "\n")
    out = tmp_path / "out"
    assert run_generate(tiny_dir, [str(tmp_path / "a" / "test.jsonl"), str(tmp_path / "b" / "test.jsonl")], out) == 0
    ids = [json.loads(line)["id"] for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert sorted(ids) == sorted(["test-000000", f"{tmp_path / 'b' / 'test.jsonl'}::test-000000"])


def test_a_long_id_and_an_output_path_that_is_a_file(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    long_id = "x" * 300
    Image.new("RGB", (16, 16)).save(tmp_path / "g.png")
    (tmp_path / "c.jsonl").write_text(json.dumps(record(long_id, "Hi <image>", ["g.png"])) + "\n")
    out = tmp_path / "out"
    assert generate(str(tiny_dir), str(tmp_path / "c.jsonl"), str(out), device="cpu", max_new_tokens=4,
                    image_size=64, num_inference_steps=2, image_bias=50.0, max_images=1) == 0
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert replies[0]["id"] == long_id and replies[0]["images"]  # the trigger is pushed: it drew
    assert all(len(Path(i["path"]).name) < 120 for i in replies[0]["images"])
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    start = time.perf_counter()
    assert generate("/nonexistent/model", str(tmp_path / "c.jsonl"), str(taken)) == 2  # before loading a model
    assert time.perf_counter() - start < 5 and taken.read_text() == "mine"
    assert "is a file, not a folder" in capsys.readouterr().err


# --- evaluate ------------------------------------------------------------------------------------------


def cases_for(tmp_path: Path, names: list[str], key_length: int = 10) -> list[Case]:
    return [Case(f"{'k' * key_length}{index}/1", f"r{index}", 1,
                 [{"role": "user", "content": "Show me", "images": []}], "Here <image>", [str(tmp_path / name)],
                 ["a picture"]) for index, name in enumerate(names)]


def test_evaluate_fails_only_the_bad_case_and_retries_it_after_a_fix(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cases = cases_for(tmp_path, ["ok.png", "bad.png", "ok.png"])
    store = AnswerStore(tmp_path / "eval")
    answer_cases(cases, ReferenceResponder(), store, batch_size=8)
    errors = {key: record["error"] for (key, _), record in store.records.items()}
    assert [errors[c.key] is None for c in cases] == [True, False, True]  # the batch's good cases answered
    assert "bad.png" in errors[cases[1].key]
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "bad.png")  # fixed
    again = AnswerStore(tmp_path / "eval")
    assert answer_cases(cases, ReferenceResponder(), again, batch_size=8) == 1  # only the failed one
    assert all(again.records[(c.key, 0)]["error"] is None for c in cases)


def test_evaluate_takes_long_keys_and_trims_a_cut_line(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    cases = cases_for(tmp_path, ["ok.png", "ok.png"], key_length=300)
    store = AnswerStore(tmp_path / "eval")
    answer_cases(cases[:1], ReferenceResponder(), store)
    assert store.records[(cases[0].key, 0)]["error"] is None
    answers = tmp_path / "eval" / "answers.jsonl"
    answers.write_bytes(answers.read_bytes() + b'{"key": "cut by a ki')  # a kill mid-line
    store = AnswerStore(tmp_path / "eval")
    answer_cases(cases, ReferenceResponder(), store)
    lines = answers.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["error"] is None for line in lines)
