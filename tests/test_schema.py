"""The conversation schema: every validation rule with a bad input, readers, writer, round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from synth import (
    Conversation,
    ReadReport,
    SchemaError,
    iter_conversations,
    read_conversations,
    validate,
    write_conversations,
)
from synth.samples import CONVERSATIONS_FILE, LLAVA_CONVERSATIONS_FILE
from synth.data.schema import from_textbind, to_textbind


def good_record(record_id: str = "tb-000001") -> dict:
    return {
        "id": record_id,
        "conversation": [
            {"role": "system", "content": "Be helpful.", "image_list": [], "caption_list": []},
            {"role": "user", "content": "Here they are: <image> and <image>", "image_list": ["a.png", "sub/b.png"],
             "caption_list": ["museum - the 1st nuclear submarine", "response to the production of heavy"]},
            {"role": "assistant", "content": "Here is a third: <image>", "image_list": ["c.png"],
             "caption_list": ["a red circle"]},
        ],
        "image_dir": "images/",
        "meta": {"cluster": 17, "generator": "gpt-4", "seed": 3},
    }


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def rejection(record: dict, tmp_path: Path) -> SchemaError:
    path = write_jsonl(tmp_path / "data.jsonl", [good_record("ok-1"), record])
    with pytest.raises(SchemaError) as caught:
        list(iter_conversations(path))
    return caught.value


def mutate(change) -> dict:
    record = good_record("bad-1")
    change(record)
    return record


TURN = "conversation"
# case -> (the rule it breaks, how to break a good record)
BAD_RECORDS = {
    "placeholder_mismatch": ("placeholder_mismatch", lambda r: r[TURN][1].update(content="Only one: <image>")),
    "placeholder_extra": ("placeholder_mismatch", lambda r: r[TURN][2].update(content="<image> <image>")),
    "caption_mismatch": ("caption_mismatch", lambda r: r[TURN][1].update(caption_list=["just one caption"])),
    "role_order": ("role_order", lambda r: r[TURN].reverse()),
    "role_order_two_users": ("role_order", lambda r: r[TURN][2].update(role="user")),
    "role_order_system_late": ("role_order", lambda r: r[TURN].append({"role": "system", "content": "late"})),
    "bad_role": ("bad_role", lambda r: r[TURN][2].update(role="bot")),
    "missing_role": ("missing_field", lambda r: r[TURN][1].pop("role")),
    "missing_content": ("missing_field", lambda r: r[TURN][2].pop("content")),
    "missing_conversation": ("unknown_format", lambda r: r.pop(TURN)),
    "image_list_not_a_list": ("bad_type", lambda r: r[TURN][1].update(image_list="a.png")),
    "meta_not_an_object": ("bad_type", lambda r: r.update(meta=["not", "a", "dict"])),
    "empty_turn": ("empty_turn", lambda r: r[TURN][2].update(content="   ", image_list=[], caption_list=[])),
    "empty_conversation": ("empty_conversation", lambda r: r.update(conversation=[])),
    "no_assistant_turn": ("no_assistant_turn", lambda r: r.update(conversation=r[TURN][:2])),
    "path_dotdot": ("path_escape", lambda r: r[TURN][1].update(image_list=["../secret.png", "b.png"])),
    "path_nested_dotdot": ("path_escape", lambda r: r[TURN][1].update(image_list=["a/../../secret.png", "b.png"])),
    "path_absolute": ("path_escape", lambda r: r[TURN][1].update(image_list=["/etc/passwd", "b.png"])),
    "path_windows_drive": ("path_escape", lambda r: r[TURN][1].update(image_list=["C:\\secret.png", "b.png"])),
    "path_backslash_dotdot": ("path_escape", lambda r: r[TURN][1].update(image_list=["..\\secret.png", "b.png"])),
    "path_empty": ("bad_image_path", lambda r: r[TURN][1].update(image_list=["", "b.png"])),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_each_rule_rejects_its_bad_input_naming_file_line_and_id(case: str, tmp_path: Path) -> None:
    rule, change = BAD_RECORDS[case]
    error = rejection(mutate(change), tmp_path)
    assert error.rule == rule
    message = str(error)
    assert "data.jsonl:2" in message  # the file and the line of the bad record
    assert "'bad-1'" in message  # the record id
    assert error.location.line == 2 and error.location.record_id == "bad-1"


def test_good_record_passes_and_keeps_everything(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [good_record()])
    (conversation,) = list(iter_conversations(path))
    assert conversation.id == "tb-000001"
    assert [t.role for t in conversation.turns] == ["system", "user", "assistant"]
    assert conversation.images == ["a.png", "sub/b.png", "c.png"]
    assert conversation.meta == {"cluster": 17, "generator": "gpt-4", "seed": 3}


def test_unreadable_lines_are_reported_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_bytes(
        json.dumps(good_record("a")).encode() + b"\n"
        + b'{"id": "half", "conversation": [\n'  # truncated JSON
        + b"\n"  # blank lines are not records
        + b'{"id": "bytes", "x": "\xff\xfe"}\n'  # not UTF-8
        + b"[1, 2]\n"  # JSON, but not an object
        + json.dumps(good_record("b")).encode() + b"\n"
    )
    report = ReadReport()
    kept = list(iter_conversations(path, on_error="skip", report=report))
    assert [c.id for c in kept] == ["a", "b"]
    assert [(e.rule, e.location.line) for e in report.rejected] == [
        ("unreadable", 2), ("unreadable", 4), ("unknown_format", 5)]
    assert "not valid UTF-8" in str(report.rejected[1])
    with pytest.raises(SchemaError, match=r"broken.jsonl:2: line is not valid JSON"):
        list(iter_conversations(path))


def test_skip_mode_counts_every_reason_and_raise_mode_stops_at_first(tmp_path: Path) -> None:
    records = [good_record("ok-1"), mutate(BAD_RECORDS["placeholder_mismatch"][1]),
               mutate(BAD_RECORDS["role_order"][1]), good_record("ok-2"), mutate(BAD_RECORDS["path_dotdot"][1]),
               mutate(BAD_RECORDS["placeholder_extra"][1])]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    conversations, report = read_conversations(path, on_error="skip")
    assert [c.id for c in conversations] == ["ok-1", "ok-2"]
    assert report.read == 2
    assert report.reasons() == {"placeholder_mismatch": 2, "role_order": 1, "path_escape": 1}
    assert report.summary() == ("2 conversation(s) read, 4 rejected "
                                "(path_escape: 1, placeholder_mismatch: 2, role_order: 1)")
    seen = []
    with pytest.raises(SchemaError, match="mixed.jsonl:2"):
        for conversation in iter_conversations(path, on_error="raise"):
            seen.append(conversation.id)
    assert seen == ["ok-1"]


def test_json_array_records_know_their_lines(tmp_path: Path) -> None:
    records = [good_record("first"), mutate(BAD_RECORDS["bad_role"][1]), good_record("third")]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    text_lines = path.read_text().splitlines()
    bad_line = next(i for i, line in enumerate(text_lines, 1) if '"bad-1"' in line) - 1  # the record's '{'
    conversations, report = read_conversations(path, on_error="skip")
    assert [c.id for c in conversations] == ["first", "third"]
    (error,) = report.rejected
    assert error.rule == "bad_role" and error.location.line == bad_line
    assert f"data.json:{bad_line} (record 'bad-1')" in str(error)


@pytest.mark.parametrize("text, message", [
    ("[", "not valid JSON"),
    ('[{"conversation": []}', "expected ',' or ']'"),
    ('[{"conversation": []} {"conversation": []}]', "expected ',' or ']'"),
    ('[{"conversation": [}]', "not valid JSON"),
])
def test_broken_json_arrays_are_reported_not_crashed(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(text)
    _, report = read_conversations(path, on_error="skip")
    assert any(message in str(e) for e in report.rejected), report.rejected


def test_empty_array_and_empty_file_read_as_nothing_and_say_so(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[ ]")
    (tmp_path / "b.jsonl").write_text("\n\n")
    (tmp_path / "c.jsonl").write_text(json.dumps(good_record()) + "\n")
    conversations, report = read_conversations([tmp_path / "a.json", tmp_path / "b.jsonl", tmp_path / "c.jsonl"])
    assert len(conversations) == 1 and report.rejected == []
    assert report.empty == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]
    assert report.summary().endswith(f"held no record: {tmp_path / 'a.json'}, {tmp_path / 'b.jsonl'}")


def test_absurdly_nested_records_are_skipped_like_any_bad_record(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    good, other = json.dumps(good_record("a")), json.dumps(good_record("b"))
    (tmp_path / "x.jsonl").write_text(f"{good}\n{deep}\n{other}\n")
    (tmp_path / "y.json").write_text(f"[{good},\n{deep},\n{other}]")
    for name in ("x.jsonl", "y.json"):
        conversations, report = read_conversations(tmp_path / name, on_error="skip")
        assert [c.id for c in conversations] == ["a", "b"], name
        assert len(report.rejected) == 1 and "recursion limit" in str(report.rejected[0])
        assert str(report.rejected[0]).startswith(f"{tmp_path / name}:2:")


def test_one_bad_utf8_byte_in_an_array_costs_only_its_record(tmp_path: Path) -> None:
    bad = json.dumps(good_record("b")).encode().replace(b"museum", b"mus\xe9um")
    data = b"[" + json.dumps(good_record("a")).encode() + b",\n" + bad + b",\n" + \
        json.dumps(good_record("c")).encode() + b"]"
    (tmp_path / "x.json").write_bytes(data)
    conversations, report = read_conversations(tmp_path / "x.json", on_error="skip")
    assert [c.id for c in conversations] == ["a", "c"]
    assert len(report.rejected) == 1 and "not valid UTF-8" in str(report.rejected[0])
    assert str(report.rejected[0]).startswith(f"{tmp_path / 'x.json'}:2:")


def test_duplicate_ids_in_a_file_are_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [good_record("same"), good_record("other"), good_record("same")])
    conversations, report = read_conversations(path, on_error="skip")
    assert [c.id for c in conversations] == ["same", "other"]
    assert str(report.rejected[0]) == (f"{path}:3 (record 'same'): id 'same' was already used by the record at "
                                       "line 1; ids must be unique within a file")
    with pytest.raises(SchemaError, match="already used"):
        read_conversations(path)


def test_round_trip_read_write_read_is_lossless(tmp_path: Path) -> None:
    record = good_record()
    record["conversation"][1]["score"] = 0.93  # unknown turn field
    record["source"] = {"name": "cc3m", "split": "train"}  # unknown record field
    record["conversation"][2]["content"] = "Ünïcödé ✓ and an image: <image>"
    source = write_jsonl(tmp_path / "in.jsonl", [record])
    first, _ = read_conversations(source)
    assert write_conversations(tmp_path / "out.jsonl", first) == 1
    second, _ = read_conversations(tmp_path / "out.jsonl")
    assert first == second
    assert json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8")) == record  # byte-level fields too


def test_round_trip_of_the_bundled_samples(tmp_path: Path) -> None:
    first, report = read_conversations([CONVERSATIONS_FILE, LLAVA_CONVERSATIONS_FILE])
    assert report.rejected == [] and len(first) == 7
    write_conversations(tmp_path / "samples.jsonl", first)
    second, _ = read_conversations(tmp_path / "samples.jsonl")
    assert first == second


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    write_conversations(target, [from_textbind(good_record("old"), "x")])

    def failing():
        yield from_textbind(good_record("new"), "x")
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        write_conversations(target, failing())
    assert [c.id for c in read_conversations(target)[0]] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_records_without_id_get_stable_file_based_ids(tmp_path: Path) -> None:
    record = good_record()
    del record["id"]
    path = write_jsonl(tmp_path / "released.jsonl", [record, record])
    conversations, _ = read_conversations(path)
    assert [c.id for c in conversations] == ["released-000000", "released-000001"]


def test_released_layout_loads_unchanged(tmp_path: Path) -> None:
    # The released data: no id, empty caption_list for mixed-in sources, a relative
    # image_dir, a trailing user turn in some records.
    released = [
        {"conversation": [
            {"role": "user", "content": "<image>\nDescribe this image.", "image_list": ["1.jpg"], "caption_list": []},
            {"role": "assistant", "content": "A cat.", "image_list": [], "caption_list": []},
            {"role": "user", "content": "Thanks!", "image_list": [], "caption_list": []}],
         "image_dir": "./data/minigpt4_images"},
        {"conversation": [
            {"role": "user", "content": "Write a poem.", "image_list": [], "caption_list": []},
            {"role": "assistant", "content": "Roses are red.", "image_list": [], "caption_list": []}]},
    ]
    path = tmp_path / "released.json"
    path.write_text(json.dumps(released, indent=4))
    conversations, report = read_conversations(path)
    assert report.read == 2
    assert conversations[0].image_path("1.jpg", tmp_path) == tmp_path / "data/minigpt4_images/1.jpg"


def test_llava_records_become_conversations(tmp_path: Path) -> None:
    conversations, report = read_conversations(LLAVA_CONVERSATIONS_FILE)
    assert report.read == 2
    first, second = conversations
    assert [t.role for t in first.turns] == ["user", "assistant", "user", "assistant"]
    assert first.turns[0].image_list == ["chelsea.png"] and first.turns[0].caption_list == []
    # no placeholder in the record: one is put before the first human turn, as LLaVA does
    assert second.turns[0].content.startswith("<image>\n") and second.turns[0].image_list == ["rocket.jpg"]


@pytest.mark.parametrize("record, rule", [
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                          {"from": "gpt", "value": "x"}]}, "placeholder_mismatch"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "bad_role"),
    ({"conversations": [{"from": "human"}]}, "missing_field"),
    ({"image": "../a.png", "conversations": [{"from": "human", "value": "<image>"},
                                             {"from": "gpt", "value": "x"}]}, "path_escape"),
])
def test_llava_rejections(record: dict, rule: str, tmp_path: Path) -> None:
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([record]))
    _, report = read_conversations(path, on_error="skip")
    assert [e.rule for e in report.rejected] == [rule]


def test_forced_format_rejects_the_other_format(tmp_path: Path) -> None:
    _, report = read_conversations(LLAVA_CONVERSATIONS_FILE, format="textbind", on_error="skip")
    assert report.reasons() == {"missing_field": 2}


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="on_error must be"):
        list(iter_conversations(CONVERSATIONS_FILE, on_error="ignore"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format must be"):
        list(iter_conversations(CONVERSATIONS_FILE, format="vicuna"))  # type: ignore[arg-type]


def test_image_path_resolution_stays_under_image_dir(tmp_path: Path) -> None:
    conversation = from_textbind(good_record(), "x")
    assert conversation.image_path("sub/b.png", tmp_path) == tmp_path / "images" / "sub" / "b.png"
    with pytest.raises(SchemaError, match="climbs out"):
        conversation.image_path("../../etc/passwd", tmp_path)


@pytest.mark.parametrize("image_dir", ["/etc", "../../../etc", "images/../../etc"])
def test_an_image_dir_outside_the_root_is_refused(image_dir: str, tmp_path: Path) -> None:
    conversation = from_textbind({**good_record(), "image_dir": image_dir}, "x")
    with pytest.raises(SchemaError, match="leads outside the image root") as refused:
        conversation.image_path("passwd", tmp_path)
    assert refused.value.rule == "path_escape"


def test_image_dirs_inside_the_root_resolve(tmp_path: Path) -> None:
    inside = from_textbind({**good_record(), "image_dir": str(tmp_path / "imgs")}, "x")  # absolute, but inside
    assert inside.image_path("a.png", tmp_path) == tmp_path / "imgs" / "a.png"
    released = from_textbind({**good_record(), "image_dir": "./data/mim_images"}, "x")  # the released layout
    assert released.image_path("a.png", tmp_path) == tmp_path / "data" / "mim_images" / "a.png"


def test_a_symlink_leading_out_of_the_image_folder_is_refused(tmp_path: Path) -> None:
    images = tmp_path / "root" / "images"
    images.mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("private")
    (images / "a.png").symlink_to(tmp_path / "secret.txt")
    (images / "b.png").write_bytes(b"fine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere")  # the folder itself may be a link
    (tmp_path / "elsewhere" / "c.png").write_bytes(b"fine too")
    conversation = from_textbind(good_record(), "x")
    assert conversation.image_path("b.png", tmp_path / "root").read_bytes() == b"fine"
    with pytest.raises(SchemaError, match="symbolic link to .*secret.txt, outside the image folder"):
        conversation.image_path("a.png", tmp_path / "root")
    linked = from_textbind({**good_record(), "image_dir": "linked"}, "x")
    assert linked.image_path("c.png", tmp_path / "root").read_bytes() == b"fine too"


def test_validate_works_on_records_built_in_code() -> None:
    conversation = from_textbind(good_record(), "x")
    broken = copy.deepcopy(conversation)
    broken.turns[1].image_list.append("extra.png")
    validate(conversation)
    with pytest.raises(SchemaError, match="2 <image> placeholder\\(s\\) in content but 3 entries"):
        validate(broken)
    assert isinstance(to_textbind(conversation), dict) and isinstance(conversation, Conversation)
