"""Stage 1, ingest: image-caption pairs from folders, tables and webdataset shards.

Nothing is dropped silently and nothing bad is fatal: every pair that cannot
be used (unreadable image, empty caption, duplicate, missing half, a URL that
was never downloaded, a broken line) is written to ``rejected.jsonl`` with its
location and reason, and counted in ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from synth.atomic import atomic_write_text
from synth.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from synth.data.pairs import (TAR_SEPARATOR, ImagePair, TarReadError, pair_id, read_image_bytes, read_member, scan_tar,
                         write_pairs)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclass
class IngestSource:
    """One place to read pairs from.

    Args:
        kind: ``folder`` (images + a sidecar captions file or per-image ``.txt``),
            ``table`` (JSONL, CSV or TSV rows of caption and image path),
            ``webdataset`` (tar shards of ``KEY.jpg``/``KEY.png`` + ``KEY.txt``), or
            ``samples`` (the bundled sample pairs), or ``world`` (the procedural world of
            :mod:`synth.world`, rendered into ``path``; ``options``: ``count``, ``seed``, ``split``
            (train / held_out), ``mismatched`` (share of pairs given another picture's caption),
            ``image_size``).
        path: the folder, table file, or a tar shard / folder of shards.
        captions: for folders, the sidecar file (JSONL or CSV with image and caption
            columns) relative to the folder; omitted means ``IMAGE.txt`` beside each image.
        image_root: where relative image paths of a table resolve (default: the table's folder).
        caption_field: the caption's key or column.
        image_field: the image path's key or column.
        columns: column names of a header-less CSV/TSV; CC3M's layout is ``[caption, image]``.
    """

    kind: str
    path: str | None = None
    captions: str | None = None
    image_root: str | None = None
    caption_field: str = "caption"
    image_field: str = "image"
    columns: list[str] | None = None
    options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in READERS:
            raise ValueError(f"ingest source kind must be one of {', '.join(READERS)}, got {self.kind!r}")
        if self.kind != "samples" and not self.path:
            raise ValueError(f"an ingest source of kind {self.kind!r} needs a 'path'")


@dataclass
class Candidate:
    caption: str | None
    image: str | None
    source: str
    image_bytes: bytes | None = None


@dataclass
class Rejection:
    source: str
    reason: str
    detail: str

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "reason": self.reason, "detail": self.detail}, ensure_ascii=False)


@dataclass
class IngestResult:
    pairs: list[ImagePair] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def summary(self) -> dict:
        return {"kept": len(self.pairs), "rejected": len(self.rejected),
                "reasons": dict(sorted(Counter(r.reason for r in self.rejected).items()))}


# --- readers: each yields Candidates, or Rejections for what it cannot even pair up --------

def _not_utf8(values) -> bool:
    """Whether text read with errors="surrogateescape" held bytes that are not UTF-8."""
    return any("\udc80" <= char <= "\udcff" for value in values for char in value)


def _read_sidecar(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line, row or None, error) for a JSONL or CSV captions file; a bad line costs only itself."""
    # surrogateescape: one invalid byte is a broken line, not a dead stage
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                if _not_utf8(str(value) for value in row.values()):
                    yield number, None, "not valid UTF-8"
                else:
                    yield number, row, ""
        return
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if _not_utf8([line]):
                yield number, None, "not valid UTF-8"
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, None, f"not valid JSON: {error.msg}"
                continue
            except RecursionError:
                yield number, None, "nested deeper than Python's recursion limit allows"
                continue
            yield (number, row, "") if isinstance(row, dict) else (number, None, "not a JSON object")


def read_folder(source: IngestSource) -> Iterator[Candidate | Rejection]:
    folder = Path(source.path)
    if not folder.is_dir():
        yield Rejection(str(folder), "missing_file", "folder does not exist")
        return
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if source.captions is None:
        for image in images:
            sidecar = image.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.is_file() else None
            yield Candidate(caption, str(image), str(image.relative_to(folder)))
        return
    sidecar = folder / source.captions
    captions: dict[str, str] = {}
    for line, row, error in _read_sidecar(sidecar):
        where = f"{sidecar}:{line}"
        if row is None:
            yield Rejection(where, "broken_line", error)
        elif source.image_field not in row or source.caption_field not in row:
            yield Rejection(where, "broken_line", f"needs {source.image_field!r} and {source.caption_field!r}")
        else:
            captions[str(row[source.image_field])] = str(row[source.caption_field] or "")
    on_disk = {str(image.relative_to(folder)): image for image in images}
    for name, image in on_disk.items():
        yield Candidate(captions.get(name), str(image), name)
    for name in sorted(set(captions) - set(on_disk)):
        yield Rejection(f"{sidecar}: {name}", "missing_image", "captioned in the sidecar but not in the folder")


def _table_rows(path: Path, source: IngestSource) -> Iterator[tuple[int, dict | None, str]]:
    kind = TABLE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: table files must end in {', '.join(TABLE_KINDS)}")
    if kind == "jsonl":
        yield from _read_sidecar(path)
        return
    delimiter = "\t" if kind == "tsv" else ","
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = source.columns or next(reader, None) or []
        first_line = 1 if source.columns else 2
        for number, values in enumerate(reader, start=first_line):
            if not values:
                continue
            if _not_utf8(values):
                yield number, None, "not valid UTF-8"
                continue
            if len(values) != len(header):
                yield number, None, f"{len(values)} fields where {len(header)} columns {header} were expected"
                continue
            yield number, dict(zip(header, values)), ""


def read_table(source: IngestSource) -> Iterator[Candidate | Rejection]:
    table = Path(source.path)
    if not table.is_file():
        yield Rejection(str(table), "missing_file", "table file does not exist")
        return
    root = Path(source.image_root) if source.image_root else table.parent
    for line, row, error in _table_rows(table, source):
        where = f"{table}:{line}"
        if row is None:
            yield Rejection(where, "broken_line", error)
            continue
        image = row.get(source.image_field)
        if not isinstance(image, str) or not image:
            yield Rejection(where, "missing_image", f"no {source.image_field!r} value")
            continue
        if image.startswith(("http://", "https://")):
            yield Rejection(where, "url_not_local", f"{image} is a URL: download the corpus first (for CC3M, "
                                                    "img2dataset into webdataset shards) and ingest those")
            continue
        caption = row.get(source.caption_field)
        yield Candidate(caption if isinstance(caption, str) else None, str(root / image), where)


WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp")


def _sample_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member: webdataset's key is the name before the first dot."""
    directory, _, base = name.rpartition("/")
    key, _, extension = base.partition(".")
    return (f"{directory}/{key}" if directory else key), extension.lower()


def _image_of(files: dict):
    """The sample's image entry, in webdataset's order of preference; None without one."""
    return next((files[ext] for ext in WEBDATASET_IMAGES if ext in files), None)


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.tar")) if path.is_dir() else [path]


def _has_trailing_data(shard: Path, offset: int) -> bool:
    with open(shard, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(1 << 16):
            if chunk.strip(b"\0"):
                return True
    return False


def read_webdataset(source: IngestSource) -> Iterator[Candidate | Rejection]:
    """Stream each shard once; samples are members sharing a key (the name before its first dot).

    Only members that lie wholly inside the file are read, and a sample is kept only if
    every member of it read whole: a cut shard keeps the samples before the cut.
    """
    for shard in _shards(Path(source.path)):
        try:
            handle = tarfile.open(shard)
        except (OSError, tarfile.TarError) as error:
            yield Rejection(str(shard), "unreadable_shard", str(error))
            continue
        samples: dict[str, dict[str, tuple[str, bytes]]] = {}
        broken: dict[str, str] = {}
        try:
            members, stopped = scan_tar(handle)
            for name, member in members.items():
                key, extension = _sample_key(name)
                try:
                    samples.setdefault(key, {})[extension] = (name, read_member(handle, member, str(shard)))
                except TarReadError as error:
                    broken[key] = str(error)
            # tarfile stops quietly at a truncated header after the first member; anything
            # but end-of-archive zeros after the last member read means the shard was cut.
            if stopped is not None:
                yield Rejection(str(shard), "unreadable_shard", f"shard ends early ({stopped}); "
                                                                "the samples from there on are lost")
            elif _has_trailing_data(shard, handle.offset):
                yield Rejection(str(shard), "unreadable_shard",
                                f"shard is cut at byte {handle.offset}; the samples after it are lost")
        finally:
            handle.close()
        for key, files in samples.items():
            where = f"{shard}#{key}"
            if key in broken:
                yield Rejection(where, "unreadable_shard", broken[key])
                continue
            image = _image_of(files)
            if image is None:
                yield Rejection(where, "missing_image", f"sample has {sorted(files)} but no jpg/png/webp")
                continue
            caption = files["txt"][1].decode("utf-8", errors="replace") if "txt" in files else None
            yield Candidate(caption, f"{shard}#{image[0]}", where, image_bytes=image[1])


def index_webdataset(path: str | os.PathLike[str]) -> tuple[list[ImagePair], int]:
    """Pairs of tar shards (a shard or a folder of them) from their member headers and captions only.

    Training can read shards directly this way: image bytes are not read (tarfile
    skips over them), so indexing is fast; images are opened later by reference.
    Returns the pairs and how many samples were skipped (no image or no caption, or
    cut off by the end of a damaged shard). Ids hash the member's location and
    caption, not the image bytes, so they differ from ``synth ingest``'s.
    """
    pairs, skipped = [], 0
    for shard in _shards(Path(path)):
        samples: dict[str, dict[str, str]] = {}
        captions: dict[str, str] = {}
        try:
            handle = tarfile.open(shard)
        except (OSError, tarfile.TarError):
            skipped += 1
            continue
        with handle:
            members, stopped = scan_tar(handle)
            if stopped is not None:
                skipped += 1  # the sample cut by the damage; any after it cannot even be counted
            for name, member in members.items():
                key, extension = _sample_key(name)
                samples.setdefault(key, {})[extension] = name
                if extension == "txt":
                    try:
                        captions[key] = read_member(handle, member, str(shard)).decode("utf-8", errors="replace")
                    except TarReadError:
                        continue
        for key, files in samples.items():
            image = _image_of(files)
            caption = " ".join(captions.get(key, "").split())
            if image is None or not caption:
                skipped += 1
                continue
            reference = f"{shard}#{image}"
            pairs.append(ImagePair(pair_id(reference.encode(), caption), reference, caption, reference))
    return pairs, skipped


def read_samples(source: IngestSource) -> Iterator[Candidate | Rejection]:
    from synth.samples import sample_pairs

    for pair in sample_pairs():
        yield Candidate(pair.caption, str(pair.image), f"samples:{pair.id}")


def read_world(source: IngestSource) -> Iterator[Candidate | Rejection]:
    from synth.world.scenes import read_scenes, write_world

    options = dict(source.options or {})
    unknown = set(options) - {"count", "seed", "split", "mismatched", "image_size"}
    if unknown:
        yield Rejection(f"world:{source.path}", "bad_option", f"unknown world option(s) {sorted(unknown)}")
        return
    scenes = read_scenes(write_world(source.path, int(options.pop("count", 1000)), **options))
    for scene in scenes.values():
        yield Candidate(scene.caption, str(Path(source.path) / f"{scene.id}.png"), f"world:{scene.id}")


READERS = {"folder": read_folder, "table": read_table, "webdataset": read_webdataset, "samples": read_samples,
           "world": read_world}


# --- the stage ----------------------------------------------------------------------------

def _check(candidate: Candidate, verify_images: bool, max_caption_chars: int,
           max_image_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePair | Rejection:
    caption = " ".join((candidate.caption or "").split())
    if candidate.caption is None:
        return Rejection(candidate.source, "missing_caption", "image has no caption")
    if not caption:
        return Rejection(candidate.source, "empty_caption", "caption is empty")
    if len(caption) > max_caption_chars:
        return Rejection(candidate.source, "caption_too_long",
                         f"{len(caption)} characters (limit {max_caption_chars}); likely not a caption")
    try:
        data = candidate.image_bytes if candidate.image_bytes is not None else read_image_bytes(candidate.image)
    except OSError as error:
        return Rejection(candidate.source, "missing_image", f"cannot read {candidate.image}: {error}")
    if verify_images:
        try:
            decode_image(data, max_image_pixels, candidate.image)
        except ImageDecodeError as error:
            return Rejection(candidate.source, error.reason, str(error))
    return ImagePair(pair_id(data, caption), candidate.image, caption, candidate.source)


def ingest(sources: list[IngestSource], verify_images: bool = True, max_caption_chars: int = 1000,
           max_image_pixels: int = DEFAULT_MAX_PIXELS) -> IngestResult:
    """Read every source; keep the first of each duplicate pair (same image bytes and caption).

    With ``verify_images`` every kept image has been decoded in full under the pixel limit,
    so later stages meet only images that decode (unless a file changes on disk in between).
    """
    result = IngestResult()
    seen: dict[str, str] = {}
    with tqdm(desc="ingest", unit="pair") as progress:
        for source in sources:
            for item in READERS[source.kind](source):
                progress.update()
                if isinstance(item, Candidate):
                    item = _check(item, verify_images, max_caption_chars, max_image_pixels)
                if isinstance(item, ImagePair) and item.id in seen:
                    item = Rejection(item.source, "duplicate", f"same image and caption as {seen[item.id]}")
                if isinstance(item, Rejection):
                    result.rejected.append(item)
                else:
                    seen[item.id] = item.source
                    result.pairs.append(item)
    return result


def write_ingest(result: IngestResult, out_dir: str | os.PathLike[str]) -> None:
    out_dir = Path(out_dir)
    write_pairs(out_dir / "pairs.jsonl", result.pairs)
    atomic_write_text(out_dir / "rejected.jsonl", "".join(r.to_json() + "\n" for r in result.rejected))
    atomic_write_text(out_dir / "summary.json", json.dumps(result.summary(), indent=2) + "\n")


__all__ = ["IngestSource", "IngestResult", "Rejection", "ingest", "write_ingest", "TAR_SEPARATOR"]
