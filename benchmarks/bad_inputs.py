"""A corpus of broken inputs through ingest and the conversation reader: is each one rejected by name?

Corrupt and truncated images (a truncated JPEG that ``Image.verify`` accepts),
a decompression bomb (a PNG whose header claims 30000 x 30000 pixels), a tar
shard cut short, a sample without a caption, an absurdly long caption, broken
JSON lines and arrays, a record nested past the recursion limit, a bad UTF-8
byte inside a JSON array, a duplicate id, image placeholders that do not
match, paths and an ``image_dir`` that escape their root. For every
rejection the script checks that the message names where the record is (file
and line, or shard and member, or the record id) and prints it.

    python benchmarks/bad_inputs.py
"""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from synth.data.conversation_io import read_conversations
from synth.selection.ingest import IngestSource, ingest
from synth.data.schema import SchemaError


def png(color=(10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9)) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:buffer.tell() // 2]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build(root: Path) -> tuple[list[IngestSource], list[Path]]:
    images = root / "images"
    images.mkdir()
    (images / "good.png").write_bytes(png())
    (images / "truncated.png").write_bytes(png()[:40])
    (images / "noise.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    (images / "empty.png").write_bytes(b"")
    (images / "bomb.png").write_bytes(bomb_png())
    (images / "cut.jpg").write_bytes(truncated_jpeg())
    table = root / "pairs.tsv"
    table.write_text("a good photo\timages/good.png\n"
                     "a decompression bomb\timages/bomb.png\n"
                     "a truncated jpeg\timages/cut.jpg\n"
                     "a truncated png\timages/truncated.png\n"
                     "random bytes\timages/noise.jpg\n"
                     "an empty file\timages/empty.png\n"
                     "missing file\timages/nothere.png\n"
                     "\timages/good.png\n"
                     f"{'very long caption ' * 6000}\timages/good.png\n"
                     "a url\thttp://example.invalid/x.jpg\n"
                     "one field only\n")
    shard = root / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.png", png((1, 1, 1)))
        add(tar, "a.txt", b"first")
        add(tar, "b.png", png((2, 2, 2)))  # no caption
        add(tar, "c.txt", b"no image")
        add(tar, "d.png", png((3, 3, 3)) * 30)
        add(tar, "d.txt", b"cut off")
    with tarfile.open(shard) as tar:
        cut_member = tar.getmember("d.png")
    shard.write_bytes(shard.read_bytes()[:cut_member.offset_data + cut_member.size // 2])  # cut inside d.png
    sources = [IngestSource(kind="table", path=str(table), columns=["caption", "image"]),
               IngestSource(kind="webdataset", path=str(shard))]

    def turn(role, content, images=()):
        return {"role": role, "content": content, "image_list": list(images), "caption_list": []}

    good = {"id": "ok", "conversation": [turn("user", "hi"), turn("assistant", "hello")]}
    records = [
        good,
        {"id": "mismatch", "conversation": [turn("user", "<image> <image>", ["a.png"]), turn("assistant", "x")]},
        {"id": "escape", "conversation": [turn("user", "<image>", ["../../etc/passwd"]), turn("assistant", "x")]},
        {"id": "absolute", "conversation": [turn("user", "<image>", ["/etc/passwd"]), turn("assistant", "x")]},
        {"id": "order", "conversation": [turn("assistant", "x"), turn("user", "y")]},
        {"id": "no-role", "conversation": [{"content": "x"}, turn("assistant", "y")]},
        good,  # a duplicate id
        {"id": "image-dir", "image_dir": "../../../etc", "conversation": [turn("user", "<image>", ["passwd"]),
                                                                          turn("assistant", "x")]},
    ]
    jsonl = root / "conversations.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"id": "cut", "conversation": [\n'
                     + "\xff not utf8\n".encode("latin-1").decode("latin-1") + "[" * 50_000 + "]" * 50_000 + "\n")
    array = root / "conversations.json"
    array.write_text(json.dumps([good, records[1]], indent=1)[:-20])  # a truncated JSON array
    encoded = root / "encoding.json"
    bad_byte = json.dumps({**good, "id": "latin-1"}).encode().replace(b"hello", b"h\xe9llo")
    encoded.write_bytes(b"[" + bad_byte + b",\n" + json.dumps({**good, "id": "after"}).encode() + b"]")
    return sources, [jsonl, array, encoded]


def main() -> None:
    root = Path(tempfile.mkdtemp())
    sources, files = build(root)
    located = re.compile(r"(\.tsv:\d+|\.tar(#|\b)|\.jsonl?:\d+|record ')")
    rows = []
    result = ingest(sources)
    rows += [(r.reason, f"{r.source}: {r.detail}") for r in result.rejected]
    conversations, report = read_conversations(files, on_error="skip")
    rows += [(e.rule, str(e)) for e in report.rejected]
    for conversation in conversations:  # what a datamodule checks against its image root
        try:
            conversation.image_base(root)
        except SchemaError as error:
            rows.append((error.rule, f"record {conversation.id!r}: {error.detail}"))
    named = sum(bool(located.search(message)) for _, message in rows)
    for reason, message in rows:
        print(f"[{reason}] {message[:150]}")
    print(f"\nkept: {len(result.pairs)} pair(s), {report.read} conversation(s); rejected: {len(rows)}; "
          f"rejections naming their record: {named}/{len(rows)}")


if __name__ == "__main__":
    main()
