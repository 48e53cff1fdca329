"""Image-caption pairs as the pipeline passes them between stages.

An image is referenced, never copied: a filesystem path, or ``SHARD.tar#MEMBER``
for a file inside a webdataset tar shard. A pair's id is derived from the
image bytes and the caption, so it is the same on every run and on every
machine, whatever the order or the source the pair was read from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from synth.data.images import DEFAULT_MAX_PIXELS, decode_image

TAR_SEPARATOR = ".tar#"


@dataclass(frozen=True)
class ImagePair:
    id: str
    image: str  # a path, or SHARD.tar#MEMBER
    caption: str
    source: str  # where the pair was read from (file:line, folder entry, tar member)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def pair_id(image_bytes: bytes, caption: str) -> str:
    """16 hex digits of SHA-1 over the image bytes and the caption: stable, order-free."""
    digest = hashlib.sha1(hashlib.sha1(image_bytes).digest() + b"\0" + caption.encode("utf-8"))
    return digest.hexdigest()[:16]


class TarReadError(OSError):
    """A member of a tar shard that cannot be read whole (the shard is cut or damaged)."""


def scan_tar(handle: tarfile.TarFile) -> tuple[dict[str, tarfile.TarInfo], str | None]:
    """The members of an open shard that read whole, and why the scan stopped early (None if it did not).

    ``tarfile`` stops quietly at a cut header, and raises ``ReadError`` when it
    steps past the end of the file after a member; that last member is kept only
    if its data reads whole (the cut may fall in its block padding). Never calls
    ``getmembers()``, which raises on a cut shard and so loses every member.
    """
    members: dict[str, tarfile.TarInfo] = {}
    last = None
    try:
        for member in handle:
            if member.isfile():
                members[member.name] = last = member
    except (tarfile.TarError, OSError, EOFError) as error:
        if last is not None:
            try:
                read_member(handle, last, "")
            except TarReadError:
                del members[last.name]
        return members, f"{error} after member {last.name!r}" if last else str(error)
    return members, None


def read_member(handle: tarfile.TarFile, member: tarfile.TarInfo, shard: str) -> bytes:
    try:
        extracted = handle.extractfile(member)
        if extracted is None:
            raise TarReadError(f"{member.name} in {shard} is not a regular file")
        return extracted.read()
    except (tarfile.TarError, EOFError) as error:
        raise TarReadError(f"{member.name} in {shard} cannot be read whole ({error}); the shard is cut or damaged"
                           ) from None


class _TarCache(threading.local):
    """One open TarFile and its member index per shard per thread and process: random access by
    member name without rescanning. Handles are never shared across a fork (DataLoader workers):
    a forked child would share the parent's file offsets."""

    limit = 64  # open shards per thread; the least recently used is closed beyond this

    def __init__(self) -> None:
        self.handles: OrderedDict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = OrderedDict()
        self.pid = os.getpid()

    def read(self, shard: str, member: str) -> bytes:
        if self.pid != os.getpid():
            self.handles, self.pid = OrderedDict(), os.getpid()
        entry = self.handles.pop(shard, None)
        if entry is None:
            try:
                handle = tarfile.open(shard)
            except tarfile.TarError as error:
                raise TarReadError(f"{shard} is not a readable tar shard ({error})") from None
            entry = (handle, scan_tar(handle)[0])
            while len(self.handles) >= self.limit:
                self.handles.popitem(last=False)[1][0].close()
        self.handles[shard] = entry
        handle, members = entry
        if member not in members:
            raise FileNotFoundError(f"{member} is not a whole member of {shard} (missing, or past a cut)")
        return read_member(handle, members[member], shard)


_tars = _TarCache()


def read_image_bytes(ref: str) -> bytes:
    """The bytes of a referenced image; any failure is an ``OSError`` naming the reference."""
    if TAR_SEPARATOR in ref:
        shard, member = ref.split("#", 1)
        return _tars.read(shard, member)
    return Path(ref).read_bytes()


def open_image(ref: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The referenced image as a fully decoded RGB ``PIL.Image`` (:func:`synth.data.images.decode_image`)."""
    return decode_image(read_image_bytes(ref), max_pixels, ref)


def read_pairs(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None) -> Iterator[ImagePair]:
    """Pairs of a JSONL file: ``synth ingest``'s ``pairs.jsonl``, or any file of ``{"image", "caption"}``
    lines (``id`` and ``source`` are filled in when absent). ``image_root``: where relative image paths
    resolve (paths inside tar shards and absolute paths are kept as they are)."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("image"), str) or \
                    not isinstance(record.get("caption"), str):
                raise ValueError(f"{path}:{number}: a pair needs string 'image' and 'caption' fields, got {line[:200]!r}")
            image = record["image"]
            if image_root is not None and TAR_SEPARATOR not in image and not os.path.isabs(image):
                image = str(Path(image_root) / image)
            yield ImagePair(id=str(record.get("id") or pair_id(image.encode(), record["caption"])), image=image,
                            caption=record["caption"], source=str(record.get("source") or f"{path}:{number}"))


def write_pairs(path: str | os.PathLike[str], pairs: Iterable[ImagePair]) -> int:
    from synth.atomic import atomic_write_text

    lines = [pair.to_json() + "\n" for pair in pairs]
    atomic_write_text(Path(path), "".join(lines))
    return len(lines)
