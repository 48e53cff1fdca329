"""synth convert-dataset on files that are not what they claim: each bad file costs only itself."""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import os
from pathlib import Path

import pytest

from synth.cli import main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def platypus_table(rows: int = 3, extra: dict | None = None):
    data = {"instruction": [f"Question {i}?" for i in range(rows)], "input": [""] * rows,
            "output": [f"Answer {i}." for i in range(rows)]}
    return pa.table({**data, **(extra or {})})


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_truncated_random_and_missing_files_cost_only_themselves(tmp_path: Path, capsys) -> None:
    pq.write_table(platypus_table(), tmp_path / "good.parquet")
    whole = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "random.parquet").write_bytes(os.urandom(4096))
    out = tmp_path / "out.jsonl"
    files = [tmp_path / "cut.parquet", tmp_path / "random.parquet", tmp_path / "missing.parquet",
             tmp_path / "missing.json", tmp_path / "good.parquet"]
    assert run(["convert-dataset", *map(str, files), "--format", "platypus", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3  # the good file, whole
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert all(name in text for name in ("cut.parquet", "random.parquet", "missing.parquet", "missing.json"))
    assert "not a readable parquet file" in text and "Traceback" not in text


def test_timestamp_decimal_and_binary_columns_are_written_losslessly(tmp_path: Path) -> None:
    moment = datetime.datetime(2023, 9, 7, 12, 30, tzinfo=datetime.timezone.utc)
    extra = {"created": pa.array([moment] * 2, pa.timestamp("us", tz="UTC")),
             "price": pa.array([decimal.Decimal("1.10"), decimal.Decimal("2.25")], pa.decimal128(5, 2)),
             "blob": pa.array([b"\x00\xff", b"hi"], pa.binary()), "day": pa.array([datetime.date(2023, 1, 2)] * 2)}
    pq.write_table(platypus_table(2, extra), tmp_path / "typed.parquet")
    out = tmp_path / "out.jsonl"
    assert run(["convert-dataset", str(tmp_path / "typed.parquet"), "--format", "platypus", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    meta = records[1]  # a source's extra columns travel as the record's own fields
    assert meta["created"] == "2023-09-07T12:30:00+00:00" and meta["price"] == "2.25" and meta["day"] == "2023-01-02"
    assert base64.b64decode(meta["blob"]["base64"]) == b"hi"


def test_out_that_is_a_folder_or_an_input_is_refused(tmp_path: Path, capsys) -> None:
    pq.write_table(platypus_table(), tmp_path / "good.parquet")
    (tmp_path / "a-folder").mkdir()
    assert run(["convert-dataset", str(tmp_path / "good.parquet"), "--format", "platypus",
                "--out", str(tmp_path / "a-folder")]) == 2
    assert "is a folder" in capsys.readouterr().err
    before = (tmp_path / "good.parquet").read_bytes()
    assert run(["convert-dataset", str(tmp_path / "good.parquet"), "--format", "platypus",
                "--out", str(tmp_path / "good.parquet")]) == 2
    assert (tmp_path / "good.parquet").read_bytes() == before
