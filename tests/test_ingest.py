"""Ingest: every source format, with the broken inputs each one meets in practice."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.selection.ingest import IngestSource, ingest, write_ingest
from synth.data.pairs import open_image, pair_id, read_pairs


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def reasons(result) -> dict[str, int]:
    return result.summary()["reasons"]


def test_folder_with_jsonl_sidecar(tmp_path: Path) -> None:
    (tmp_path / "red.png").write_bytes(png_bytes((255, 0, 0)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blue.png").write_bytes(png_bytes((0, 0, 255)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "uncaptioned.png").write_bytes(png_bytes((0, 255, 0)))
    (tmp_path / "empty.png").write_bytes(png_bytes((9, 9, 9)))
    (tmp_path / "captions.jsonl").write_text("\n".join([
        json.dumps({"image": "red.png", "caption": "a red square"}),
        json.dumps({"image": "sub/blue.png", "caption": "  a   blue square "}),
        json.dumps({"image": "broken.png", "caption": "a broken file"}),
        json.dumps({"image": "empty.png", "caption": "   "}),
        json.dumps({"image": "gone.png", "caption": "deleted image"}),
        "{not json",
        json.dumps({"file": "red.png"}),
    ]) + "\n")
    result = ingest([IngestSource(kind="folder", path=str(tmp_path), captions="captions.jsonl")])
    assert sorted(p.caption for p in result.pairs) == ["a blue square", "a red square"]  # whitespace normalised
    assert reasons(result) == {"broken_line": 2, "empty_caption": 1, "missing_caption": 1, "missing_image": 1,
                               "unreadable_image": 1}
    broken = next(r for r in result.rejected if r.reason == "broken_line" and "not valid JSON" in r.detail)
    assert broken.source.endswith("captions.jsonl:6")


def test_folder_with_csv_sidecar_and_with_txt_sidecars(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes((1, 2, 3)))
    (tmp_path / "b.png").write_bytes(png_bytes((4, 5, 6)))
    (tmp_path / "caps.csv").write_text('image,caption\na.png,"a, with comma"\nb.png,plain\n')
    result = ingest([IngestSource(kind="folder", path=str(tmp_path), captions="caps.csv")])
    assert sorted(p.caption for p in result.pairs) == ["a, with comma", "plain"]
    (tmp_path / "a.txt").write_text("from a text file\n")
    result = ingest([IngestSource(kind="folder", path=str(tmp_path))])
    assert [p.caption for p in result.pairs] == ["from a text file"]
    assert reasons(result) == {"missing_caption": 1}


def test_cc3m_style_tsv_with_urls_and_broken_rows(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.jpg").write_bytes(jpeg_bytes(1))
    (tmp_path / "img" / "2.jpg").write_bytes(jpeg_bytes(2))
    (tmp_path / "train.tsv").write_text(
        "actor arrives at the premiere\timg/1.jpg\n"
        "a dog on the beach\thttp://example.invalid/2.jpg\n"
        "only one field\n"
        "the same photo again\timg/1.jpg\n"
        "actor arrives at the premiere\timg/1.jpg\n"  # exact duplicate of the first pair
        "a missing file\timg/404.jpg\n"
        "a second photo\timg/2.jpg\n")
    result = ingest([IngestSource(kind="table", path=str(tmp_path / "train.tsv"), columns=["caption", "image"])])
    assert [p.caption for p in result.pairs] == ["actor arrives at the premiere", "the same photo again",
                                                 "a second photo"]
    assert reasons(result) == {"broken_line": 1, "duplicate": 1, "missing_image": 1, "url_not_local": 1}
    duplicate = next(r for r in result.rejected if r.reason == "duplicate")
    assert duplicate.source.endswith("train.tsv:5") and "train.tsv:1" in duplicate.detail
    assert "img2dataset" in next(r.detail for r in result.rejected if r.reason == "url_not_local")


def test_jsonl_and_csv_tables_with_image_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "x.png").write_bytes(png_bytes((7, 7, 7)))
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "grey square", "path": "x.png"}) + "\n")
    (tmp_path / "t.csv").write_text("url,text\nx.png,grey square again\n")
    result = ingest([
        IngestSource(kind="table", path=str(tmp_path / "t.jsonl"), image_root=str(root), caption_field="text",
                     image_field="path"),
        IngestSource(kind="table", path=str(tmp_path / "t.csv"), image_root=str(root), caption_field="text",
                     image_field="url"),
    ])
    assert [p.caption for p in result.pairs] == ["grey square", "grey square again"]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_missing_caption_image_and_corrupt_image(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        add(tar, "000000000.jpg", jpeg_bytes(0))
        add(tar, "000000000.txt", b"a noisy jpeg")
        add(tar, "000000000.json", b'{"key": "000000000"}')
        add(tar, "000000001.png", png_bytes((0, 0, 0)))  # no caption
        add(tar, "000000002.txt", b"caption without image")
        add(tar, "000000003.jpg", b"not a jpeg at all")
        add(tar, "000000003.txt", b"corrupt image")
    with tarfile.open(shards / "00001.tar", "w") as tar:
        add(tar, "dir/000000004.png", png_bytes((50, 60, 70)))
        add(tar, "dir/000000004.txt", "un café".encode())
    (shards / "00002.tar").write_bytes(b"garbage that is not a tar")
    result = ingest([IngestSource(kind="webdataset", path=str(shards))])
    assert [p.caption for p in result.pairs] == ["a noisy jpeg", "un café"]
    assert reasons(result) == {"missing_caption": 1, "missing_image": 1, "unreadable_image": 1,
                               "unreadable_shard": 1}
    pair = result.pairs[1]
    assert pair.image == f"{shards / '00001.tar'}#dir/000000004.png"
    assert open_image(pair.image).getpixel((0, 0)) == (50, 60, 70)  # random access back into the shard
    assert pair.id == pair_id(png_bytes((50, 60, 70)), "un café")


@pytest.mark.parametrize("cut", [1536 + 700, 2560 + 100], ids=["in a header", "in a member's data"])
def test_truncated_shard_keeps_what_came_before(cut: int, tmp_path: Path) -> None:
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "a.png", png_bytes((1, 1, 1)))
        add(tar, "a.txt", b"first")
        add(tar, "b.png", png_bytes((2, 2, 2)) * 40)
        add(tar, "b.txt", b"second")
    data = path.read_bytes()
    path.write_bytes(data[:cut])  # a.png and a.txt take bytes 0-2047; b.png's header starts at 2048
    result = ingest([IngestSource(kind="webdataset", path=str(path))])
    assert [p.caption for p in result.pairs] == ["first"]
    assert "unreadable_shard" in reasons(result)


def test_ids_are_stable_across_order_and_source(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes((3, 3, 3)))
    (tmp_path / "a.txt").write_text("three")
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "a.png", "caption": "three"}) + "\n")
    from_folder = ingest([IngestSource(kind="folder", path=str(tmp_path))]).pairs[0]
    from_table = ingest([IngestSource(kind="table", path=str(tmp_path / "t.jsonl"))]).pairs[0]
    assert from_folder.id == from_table.id


def test_outputs_are_written_with_reasons(tmp_path: Path) -> None:
    result = ingest([IngestSource(kind="samples")])
    write_ingest(result, tmp_path)
    assert len(list(read_pairs(tmp_path / "pairs.jsonl"))) == 19
    assert json.loads((tmp_path / "summary.json").read_text()) == {"kept": 19, "rejected": 0, "reasons": {}}


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "s3"}, "kind must be"),
    ({"kind": "table"}, "needs a 'path'"),
])
def test_bad_sources_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IngestSource(**kwargs)


def test_missing_source_paths_are_rejections_not_crashes(tmp_path: Path) -> None:
    result = ingest([IngestSource(kind="table", path=str(tmp_path / "nope.tsv")),
                     IngestSource(kind="folder", path=str(tmp_path / "nothing"))])
    assert reasons(result) == {"missing_file": 2}


def test_tar_reads_keep_a_bounded_set_of_open_shards(tmp_path: Path, monkeypatch) -> None:
    from synth import pairs as pairs_module

    cache = pairs_module._TarCache()
    monkeypatch.setattr(cache, "limit", 2)
    for number in range(3):
        with tarfile.open(tmp_path / f"{number}.tar", "w") as tar:
            add(tar, "x.png", png_bytes((number, number, number)))
    for _ in range(2):
        for number in range(3):
            assert cache.read(str(tmp_path / f"{number}.tar"), "x.png") == png_bytes((number, number, number))
            assert len(cache.handles) <= 2
    monkeypatch.setattr(cache, "pid", -1)  # as if in a forked worker: nothing inherited is reused
    cache.read(str(tmp_path / "0.tar"), "x.png")
    assert list(cache.handles) == [str(tmp_path / "0.tar")]


# --- hostile and damaged images, and what later stages make of them --------------------------------

def test_a_decompression_bomb_and_a_truncated_jpeg_are_rejected_pairs(tmp_path: Path) -> None:
    from fixture_images import claimed_png, truncated_jpeg

    (tmp_path / "bomb.png").write_bytes(claimed_png(30000, 30000))
    (tmp_path / "big.png").write_bytes(claimed_png(5000, 5000))
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "fine.png").write_bytes(png_bytes((5, 5, 5)))
    for name in ("bomb", "big", "cut", "fine"):
        (tmp_path / f"{name}.txt").write_text(f"a {name} picture")
    result = ingest([IngestSource(kind="folder", path=str(tmp_path))], max_image_pixels=1_000_000)
    assert [p.caption for p in result.pairs] == ["a fine picture"]
    assert reasons(result) == {"too_many_pixels": 2, "unreadable_image": 1}
    big = next(r for r in result.rejected if r.source == "big.png")
    assert "5000 x 5000 = 25,000,000 pixels, over the limit of 1,000,000" in big.detail
    assert "truncated" in next(r.detail for r in result.rejected if r.source == "cut.jpg")
    write_ingest(result, tmp_path / "out")  # the stage writes its outputs; nothing died
    assert len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 3


def test_the_score_stage_records_an_image_that_stopped_decoding_and_goes_on(tmp_path: Path) -> None:
    from fixture_images import truncated_jpeg

    from synth.selection.embed import embed_pairs, load_embeddings, load_shard

    (tmp_path / "a.png").write_bytes(png_bytes((1, 2, 3)))
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(4))
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    pairs = ingest([IngestSource(kind="folder", path=str(tmp_path))]).pairs
    assert len(pairs) == 2
    (tmp_path / "b.jpg").write_bytes(truncated_jpeg())  # the file changed on disk after ingest
    shards = embed_pairs(pairs, tmp_path / "score", {"preset": "tiny"}, batch_size=2, shard_size=8, num_workers=0)
    shard = load_shard(shards[0])
    assert shard["unreadable"].tolist() == [False, True]
    ids, scores, _, total = load_embeddings(shards, min_score=-1000.0)
    assert total == 2 and ids.tolist() == [pairs[0].id]  # the broken one can never be clustered


def test_a_cut_shard_keeps_only_whole_samples_and_later_readers_do_not_crash(tmp_path: Path) -> None:
    from datamodules import CaptionDataModule
    from synth.selection.embed import embed_pairs
    from synth.selection.ingest import index_webdataset

    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as tar:
        for index in range(4):
            add(tar, f"{index:03d}.png", png_bytes((index, index, index)))
            add(tar, f"{index:03d}.txt", f"sample {index}".encode())
        add(tar, "004.png", png_bytes((9, 9, 9), size=64))
        add(tar, "004.txt", b"sample 4")
    with tarfile.open(path) as tar:
        member = tar.getmember("004.png")
        cut = member.offset_data + member.size // 2
    path.write_bytes(path.read_bytes()[:cut])  # cut inside 004.png's data
    result = ingest([IngestSource(kind="webdataset", path=str(path))])
    assert [p.caption for p in result.pairs] == [f"sample {i}" for i in range(4)]
    assert "unreadable_shard" in reasons(result)
    # the score stage reads the kept samples back out of the cut shard (this raised tarfile.ReadError)
    shards = embed_pairs(result.pairs, tmp_path / "score", {"preset": "tiny"}, batch_size=4, shard_size=8,
                         num_workers=0)
    assert len(shards) == 1
    # and stage 1 reading the shard directly
    indexed, skipped = index_webdataset(path)
    assert sorted(p.caption for p in indexed) == [f"sample {i}" for i in range(4)] and skipped == 1
    from mim import MIM
    from heads import LanguageDescriptionHead

    model = MIM(head=LanguageDescriptionHead(), llm={"preset": "tiny"}, blip2={"preset": "tiny"}, stage="alignment")
    module = CaptionDataModule(train=[str(path)], batch_size=2, num_workers=0).bind(model.data_interface())
    module.setup("fit")
    batch = model.data_interface().collate([module.train_set[i] for i in range(4)])
    assert batch["pixel_values"].shape[0] == 4


def test_a_bad_byte_or_absurd_nesting_in_a_captions_file_costs_one_line(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        (tmp_path / f"{name}.png").write_bytes(png_bytes((ord(name), 0, 0)))
    lines = [json.dumps({"image": "a.png", "caption": "fine"}).encode(),
             json.dumps({"image": "b.png", "caption": "caf_"}).encode().replace(b"_", b"\xe9"),
             b"[" * 50_000 + b"]" * 50_000,
             json.dumps({"image": "d.png", "caption": "also fine"}).encode()]
    (tmp_path / "caps.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "caps.csv").write_bytes(b"image,caption\na.png,fine\nb.png,caf\xe9\nd.png,also fine\n")
    for sidecar in ("caps.jsonl", "caps.csv"):
        result = ingest([IngestSource(kind="folder", path=str(tmp_path), captions=sidecar)])
        assert sorted(p.caption for p in result.pairs) == ["also fine", "fine"], sidecar
        broken = [r for r in result.rejected if r.reason == "broken_line"]
        assert any("not valid UTF-8" in r.detail for r in broken), sidecar
    (tmp_path / "t.tsv").write_bytes(b"fine\ta.png\ncaf\xe9\tb.png\nalso fine\td.png\n")
    result = ingest([IngestSource(kind="table", path=str(tmp_path / "t.tsv"), columns=["caption", "image"])])
    assert [p.caption for p in result.pairs] == ["fine", "also fine"]
    assert next(r for r in result.rejected if r.reason == "broken_line").source.endswith("t.tsv:2")
