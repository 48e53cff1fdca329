"""A corpus of broken inputs through ingest and the conversation reader: is each one rejected by name?

Corrupt and truncated images (a truncated JPEG that ``Image.verify`` accepts),
a decompression bomb (a PNG whose header claims 30000 x 30000 pixels), a tar
shard cut short, a sample without a caption, an absurdly long caption, broken
JSON lines and arrays, a record nested past the recursion limit, a bad UTF-8
byte inside a JSON array, a duplicate id, image placeholders that do not
match, paths and an ``image_dir`` that escape their root. For every
rejection the script checks that the message names where the record is (file
and line, or shard and member, or the record id) and prints it.

Round two (what a downloaded checkpoint, model folder, URL list or dataset can try): a sharded checkpoint
whose ``.metadata`` pickle runs code, a MIM directory that asks for ``trust_remote_code`` or names a head
class outside the heads package, URL lists with malformed entries, loopback and metadata addresses and
names that collide with the user's files, conversations with a missing, cut or bomb image, 10,000 images
or a 5 MB turn for ``mim generate``, and cut or random parquet files for ``convert-dataset``. Each must be
refused by name without running anything, and nothing good may be lost.

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


def round_two() -> list[tuple[str, str, bool]]:
    """(case, message, handled) for the round-two corpus; handled: refused by name, nothing run or lost."""
    import os
    import pickle

    import torch.distributed.checkpoint as dcp

    from heads import LanguageDescriptionHead
    from mim.inference.chat import MIMChat
    from mim.inference.reply_files import FAILURES_FILE, conversation_prompts, generate_replies
    from mim.modeling.checkpoint_files import read_distributed_checkpoint
    from mim.modeling.directory import load_model, save_directory
    from mim.modeling.mim_model import MIM
    from synth.data.download import download_images

    root = Path(tempfile.mkdtemp())
    rows: list[tuple[str, str, bool]] = []
    marker = root / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = root / "sharded"
    import torch

    dcp.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint_id=str(folder), no_dist=True)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    try:
        read_distributed_checkpoint(folder)
        rows.append(("checkpoint .metadata runs code", "loaded", False))
    except ValueError as error:
        rows.append(("checkpoint .metadata runs code", str(error), not marker.exists()))

    model = MIM(head=LanguageDescriptionHead(), llm="tiny", blip2="tiny")
    directory = save_directory(model, root / "mim", sdxl={"preset": "tiny"})
    config_path = directory / "mim.json"
    original = config_path.read_text()
    for case, edit in [("mim.json asks for trust_remote_code",
                        lambda c: c["model"].update(llm={"pretrained": str(root), "options": {"trust_remote_code": True}})),
                       ("mim.json head class outside heads", lambda c: c["model"]["head"].update(class_path="os.system"))]:
        config = json.loads(original)
        edit(config)
        config_path.write_text(json.dumps(config))
        try:
            load_model(directory)
            rows.append((case, "loaded", False))
        except (ValueError, TypeError) as error:
            rows.append((case, str(error), True))
    config_path.write_text(original)

    images = root / "images"
    images.mkdir()
    (images / "notes.txt").write_text("the user's notes")
    urls = [("a.png", "http://exa mple.com/a.png"), ("b.png", None), ("c.png", 42), ("d.png", "http://[::1"),
            ("e.png", "ftp://example.com/e.png"), ("f.png", "http://127.0.0.1:9/f.png"),
            ("g.png", "http://169.254.169.254/latest/meta-data/"), ("notes.txt", "http://example.com/n.png")]
    records = [{"conversation": [{"role": "user", "content": "<image>", "image_list": [name], "url_list": [url]},
                                 {"role": "assistant", "content": "ok"}]} for name, url in urls]
    (root / "urls.json").write_text(json.dumps(records))
    conversations, _ = read_conversations(root / "urls.json")
    report, _ = download_images(conversations, images, root / "failures.jsonl", attempts=1, workers=4)
    failures = {f["image"]: f["error"] for f in map(json.loads, (root / "failures.jsonl").read_text().splitlines())}
    for name, url in urls:
        rows.append((f"download {url!r:.45}", failures.get(name, "not recorded"), name in failures))
    rows[-1] = (rows[-1][0] + " (names the user's notes)", rows[-1][1],
                rows[-1][2] and (images / "notes.txt").read_text() == "the user's notes")

    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "good.png")
    good = (root / "good.png").read_bytes()
    (root / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "bomb.png").write_bytes(bomb_png(20000, 20000))
    cases = {"missing image": ("<image>", ["nowhere.png"]), "cut image": ("<image>", ["cut.png"]),
             "bomb image": ("<image>", ["bomb.png"]), "10,000 images": ("<image>" * 10_000, ["good.png"] * 10_000),
             "5 MB turn": ("word " * 1_000_000, []), "good": ("What is it? <image>", ["good.png"])}
    lines = [json.dumps({"id": case, "conversation": [{"role": "user", "content": text, "image_list": names},
                                                      {"role": "assistant", "content": "ok"}]})
             for case, (text, names) in cases.items()]
    (root / "convs.jsonl").write_text("\n".join(lines) + "\n")
    prompts, _ = conversation_prompts([str(root / "convs.jsonl")])
    chat = MIMChat(model, None)
    chat.settings = chat.settings.__class__(max_new_tokens=4, max_images=0)
    generate_replies(chat, prompts, root / "generated", progress=False)
    failed = {f["id"]: f["error"] for f in map(json.loads, (root / "generated" / FAILURES_FILE).read_text().splitlines())}
    answered = {json.loads(line)["id"] for line in (root / "generated" / "replies.jsonl").read_text().splitlines()}
    for case in cases:
        if case == "good":
            rows.append(("mim generate: the good record of the batch", "answered" if case in answered else "lost",
                         case in answered))
        else:
            rows.append((f"mim generate: {case}", failed.get(case, "not recorded"), case in failed))

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"instruction": ["q"], "input": [""], "output": ["a"]}), root / "good.parquet")
        whole = (root / "good.parquet").read_bytes()
        (root / "cut.parquet").write_bytes(whole[: len(whole) // 2])
        (root / "random.parquet").write_bytes(os.urandom(2048))
        for name in ("cut.parquet", "random.parquet"):
            _, parquet_report = read_conversations(root / name, on_error="skip", format="platypus")
            message = str(parquet_report.rejected[0]) if parquet_report.rejected else "not recorded"
            rows.append((f"convert-dataset {name}", message, bool(parquet_report.rejected)))
    except ImportError:
        rows.append(("convert-dataset parquet", "pyarrow not installed: not run", False))
    return rows


if __name__ == "__main__":
    main()
    second = round_two()
    print("\nround two")
    for case, message, handled in second:
        print(f"[{'ok' if handled else 'NOT HANDLED'}] {case}: {message[:130]}")
    print(f"\nround two: {sum(h for _, _, h in second)}/{len(second)} refused by name, nothing run or lost")
