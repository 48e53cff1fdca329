"""The instruction datasets the released stage 2 mixed in, read in each source's own published format.

The released model was trained on TextBind plus five public datasets
(``process_instruction_data.py`` in SihengLi99/TextBind; counts from the file
name in ``scripts/run_second_stage.sh``):

==================  ============================================  =======  =====================================
format              published as                                  records  becomes
==================  ============================================  =======  =====================================
``llava``           LLaVA-Instruct-150K ``llava_instruct_150k``   157,712  the conversation (``synth.data.schema``)
``platypus``        Open-Platypus (HF: JSON, JSONL or parquet)     24,926  an Alpaca prompt, text only
``minigpt4``        MiniGPT-4 ``cc_sbu_align/filter_cap.json``      3,439  "describe this image in detail"
``shikra``          Shikra GPT4Gen ``*_BoxCoT_*.jsonl``             7,081  question and chain-of-thought answer
``multiinstruct``   MultiInstruct ``train_N.jsonl``/``test_N``    105,745  "<image>\\n" prompt, target
(textbind)          TextBind ``train.json``                        21,629  as it is
==================  ============================================  =======  =====================================

Each conversion does what the release's did, word for word where it wrote
text (the Alpaca templates, MiniGPT-4's instruction, Shikra's clean-up).
Image paths are kept as the source gives them; point the source's
``image_root`` at the folder they live in. Every parser names the record and
the field it could not use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from synth.data.schema import IMAGE_PLACEHOLDER, Conversation, SchemaError, Turn, validate

#: process_instruction_data.py's Alpaca prompts for Open-Platypus (and alpaca-gpt4).
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_WITHOUT_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
#: process_instruction_data.py's instruction for MiniGPT-4's detailed descriptions.
MINIGPT4_INSTRUCTION = ("Describe this image in detail. Give as many details as possible. Say everything you see.")


def _text(record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise SchemaError("missing_field" if value is None else "bad_type", f"{field!r} must be a string, got {value!r}")
    return value


def _record(raw: object) -> dict:
    if not isinstance(raw, dict):
        raise SchemaError("bad_type", f"a record must be a JSON object, got {type(raw).__name__}")
    return raw


def _conversation(record_id: str, user: str, assistant: str, images: list[str], extra: dict) -> Conversation:
    conversation = Conversation(record_id, [Turn("user", user, images), Turn("assistant", assistant)], extra=extra)
    validate(conversation)
    return conversation


def _id(record: dict, field: str | None, default_id: str) -> str:
    value = record.get(field) if field else None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else default_id


def from_platypus(raw: object, default_id: str) -> Conversation:
    """Open-Platypus: ``instruction``, ``input``, ``output`` -> an Alpaca prompt and its answer, no image.
    A literal ``<image>`` in the text is removed, as the release removed it (there is no image to place)."""
    record = _record(raw)
    instruction, output = _text(record, "instruction"), _text(record, "output")
    given = record.get("input") or ""
    if not isinstance(given, str):
        raise SchemaError("bad_type", f"'input' must be a string, got {given!r}")
    prompt = (ALPACA_WITH_INPUT if given else ALPACA_WITHOUT_INPUT).format(instruction=instruction, input=given)
    extra = {key: value for key, value in record.items() if key not in ("instruction", "input", "output")}
    return _conversation(default_id, prompt.replace(IMAGE_PLACEHOLDER, ""), output.replace(IMAGE_PLACEHOLDER, ""),
                         [], {"source_format": "platypus", **extra})


def from_minigpt4(raw: object, default_id: str) -> Conversation:
    """MiniGPT-4 cc_sbu_align: ``image_id``, ``caption`` -> the detailed-description instruction and answer;
    the image is ``<image_id>.jpg`` (the dataset's ``image/`` folder)."""
    record = _record(raw)
    image_id = record.get("image_id")
    if not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or str(image_id) == "":
        raise SchemaError("missing_field", f"'image_id' must be a string or number, got {image_id!r}")
    caption = _text(record, "caption")
    return _conversation(_id(record, "image_id", default_id), f"{IMAGE_PLACEHOLDER}\n{MINIGPT4_INSTRUCTION}",
                         caption, [f"{image_id}.jpg"], {"source_format": "minigpt4"})


def _shikra_clean(text: str) -> str:
    """process_instruction_data.py's clean-up: phrase marks dropped (so the boxes are), spacing fixed."""
    return (text.replace("<ph_st>", "").replace("<ph_ed>", "").replace("  ", "").replace(" ,", ",")
            .replace(" .", "."))


def from_shikra(raw: object, default_id: str) -> Conversation:
    """Shikra GPT4Gen (BoxCoT, RD_BoxCoT): ``img_path``, ``question``, ``cot_with_ans`` -> one turn pair. As in
    the release, the box coordinates are not written into the text; they are kept in the record's extra fields."""
    record = _record(raw)
    question, answer = _text(record, "question"), _text(record, "cot_with_ans")
    extra = {"source_format": "shikra", **{k: record[k] for k in ("boxes", "question_boxes_seq", "answer_boxes_seq",
                                                                    "answer") if k in record}}
    return _conversation(default_id, f"{IMAGE_PLACEHOLDER}\n{_shikra_clean(question)}", _shikra_clean(answer),
                         [_text(record, "img_path")], extra)


def from_multiinstruct(raw: object, default_id: str) -> Conversation:
    """MultiInstruct: ``image_path``, ``prompt``, ``target`` (``target_txt`` in its 1.0 files) -> one turn pair."""
    record = _record(raw)
    target_field = "target" if "target" in record else "target_txt"
    extra = {"source_format": "multiinstruct", **{k: record[k] for k in ("task_name", "unique_id") if k in record}}
    return _conversation(_id(record, "unique_id", default_id), f"{IMAGE_PLACEHOLDER}\n{_text(record, 'prompt')}",
                         _text(record, target_field), [_text(record, "image_path")], extra)


#: The field that names a record in each source (for messages); "id" elsewhere.
SOURCE_ID_FIELDS = {"minigpt4": "image_id", "multiinstruct": "unique_id"}

SOURCE_PARSERS = {"platypus": from_platypus, "minigpt4": from_minigpt4, "shikra": from_shikra,
                  "multiinstruct": from_multiinstruct}


def container_records(path: Path) -> Iterator[tuple[int | None, Any]] | None:
    """Records of files that are not a JSON array or JSONL: parquet tables (Open-Platypus on the hub) and
    MiniGPT-4's ``{"annotations": [...]}``. None for the usual layouts."""
    if path.suffix == ".parquet":
        return _parquet_records(path)
    head = path.read_bytes()[:4096].lstrip()
    if head.startswith(b"{") and b'"annotations"' in head:
        return _annotation_records(path)
    return None


def _parquet_records(path: Path) -> Iterator[tuple[int | None, Any]]:
    """Rows of a parquet table, one record batch at a time, with every value made JSON-safe. A file that is
    not parquet, or is cut, is one reported error: the other files of the run are still read."""
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ImportError:
        raise ImportError(f"{path} is a parquet file; reading it needs pyarrow (pip install 'textbind[data]'), or "
                          "export the dataset to JSON/JSONL") from None
    number = 0
    try:
        table = parquet.ParquetFile(path)
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield number, json_safe(row)
    except (pyarrow.ArrowException, OSError, ValueError) as error:
        where = f"after row {number}" if number else "before its first row"
        yield None, SchemaError("unreadable", f"not a readable parquet file ({type(error).__name__}: "
                                              f"{str(error).splitlines()[0][:200]}; {where})")


def json_safe(value: Any) -> Any:
    """A parquet value as JSON can hold it, losing nothing a reader needs: timestamps and dates as ISO 8601,
    decimals as their exact string, bytes as base64 (``{"base64": ...}``), other objects as ``str``."""
    import base64
    import datetime
    import decimal

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    return str(value)


def _annotation_records(path: Path) -> Iterator[tuple[int | None, Any]]:
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        yield None, SchemaError("unreadable", f"not a readable JSON document ({type(error).__name__}: {error})")
        return
    annotations = document.get("annotations") if isinstance(document, dict) else None
    if not isinstance(annotations, list):
        yield None, SchemaError("missing_field", "expected {\"annotations\": [...]}, as MiniGPT-4's filter_cap.json")
        return
    for record in annotations:  # no line numbers here: messages name the entry by its index id
        yield None, record
