"""Download the images of the released TextBind data, as the release prepared them.

The released conversations name their images (``image_list``: ``490272.png``)
and say where they came from (``url_list``, one URL per image, per turn). The
release fetched each URL, resized it to fit 512 x 512 with Lanczos and padded
it to a white square (``PrepUtils.resize_and_pad`` in ``common_utils.py``),
trying each URL up to five times, and dropped the conversations whose images
did not all arrive (``process_mim.py``). This does the same, and more
carefully:

- resumable: an image already on disk that decodes is never fetched again;
- a failure is never fatal: it is retried (capped backoff), then recorded in
  ``download_failures.jsonl`` with its URL and error, and the run goes on;
- bounded: ``http(s)`` only, a timeout, a size cap, and the pixel limit of
  :mod:`synth.data.images` before decoding; files are written atomically.

For the tens of millions of CC3M/LAION URLs of stage 1, use img2dataset into
webdataset shards and ``synth ingest`` those: it is built for that scale. Here the
files must carry the names the conversations give them and the release's
exact padding, which img2dataset does not do.
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from synth.atomic import atomic_path
from synth.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, decode_image_file
from synth.data.schema import Conversation, SchemaError

USER_AGENT = "textbind-image-downloader/0.1 (research dataset preparation)"


def resize_and_pad(image, size: int = 512, fill: str = "white"):
    """Fit within size x size keeping the aspect ratio (Lanczos), then pad to a centred square,
    exactly as the release's ``PrepUtils.resize_and_pad`` (odd padding goes right and bottom)."""
    from PIL import Image, ImageOps

    aspect = image.width / image.height
    if aspect > 1:
        width, height = size, int(size / aspect)
    else:
        width, height = int(size * aspect), size
    resized = image.resize((max(1, width), max(1, height)), Image.LANCZOS)
    width, height = resized.size
    border = ((size - width) // 2, (size - height) // 2, (size - width + 1) // 2, (size - height + 1) // 2)
    return ImageOps.expand(resized, border, fill=fill)


@dataclass
class ImageTask:
    name: str
    url: str
    path: Path
    records: list[str] = field(default_factory=list)


@dataclass
class DownloadReport:
    downloaded: int = 0
    already_there: int = 0
    failed: int = 0
    no_url: int = 0
    complete_conversations: int = 0
    conversations: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def image_tasks(conversations: list[Conversation], image_root: str | os.PathLike[str]
                ) -> tuple[dict[Path, ImageTask], list[str]]:
    """One task per image file (shared images once), and the problems found in the records."""
    tasks: dict[Path, ImageTask] = {}
    problems = []
    for conversation in conversations:
        for index, turn in enumerate(conversation.turns):
            urls = turn.extra.get("url_list") or []
            if len(urls) != len(turn.image_list):
                problems.append(f"record {conversation.id!r} turn {index}: {len(turn.image_list)} image(s) but "
                                f"{len(urls)} url(s) in url_list")
                continue
            for name, url in zip(turn.image_list, urls):
                try:
                    path = conversation.image_path(name, image_root)
                except SchemaError as error:
                    problems.append(f"record {conversation.id!r}: {error.detail}")
                    continue
                task = tasks.setdefault(path, ImageTask(name, url, path))
                task.records.append(conversation.id)
    return tasks, problems


def _on_disk(path: Path, max_pixels: int) -> bool:
    try:
        decode_image_file(path, max_pixels)
        return True
    except OSError:  # missing, unreadable or damaged (ImageDecodeError): fetch it again
        return False


class Unfetchable(ValueError):
    """A URL that no retry can fetch: not http(s), too large, or refused for good (HTTP 4xx)."""


def fetch(url: str, timeout: float, max_bytes: int, user_agent: str = USER_AGENT) -> bytes:
    if not url.lower().startswith(("http://", "https://")):
        raise Unfetchable(f"only http(s) URLs are fetched, not {url[:60]!r}")
    request = urllib.request.Request(url, headers={"User-Agent": user_agent})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked above
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as error:
        if 400 <= error.code < 500 and error.code not in (408, 429):
            raise Unfetchable(f"HTTP {error.code} {error.reason}") from None
        raise
    if len(data) > max_bytes:
        raise Unfetchable(f"more than {max_bytes:,} bytes")
    return data


def download_one(task: ImageTask, size: int, timeout: float, attempts: int, backoff: float, max_bytes: int,
                 max_pixels: int, user_agent: str = USER_AGENT) -> str | None:
    """Fetch, fit and pad one image; None on success, else the last error."""
    error = "no attempt"
    for attempt in range(1, attempts + 1):
        try:
            image = decode_image(fetch(task.url, timeout, max_bytes, user_agent), max_pixels, task.url)
            padded = resize_and_pad(image, size)
            buffer = io.BytesIO()
            padded.save(buffer, format="PNG")
            with atomic_path(task.path) as temporary:
                temporary.write_bytes(buffer.getvalue())
            return None
        except (ImageDecodeError, Unfetchable) as failure:  # retrying will not help
            return f"{type(failure).__name__}: {failure}"
        except OSError as failure:  # URLError, HTTP 5xx/408/429, timeouts, resets: worth another try
            error = f"{type(failure).__name__}: {failure}"
            if attempt < attempts:
                time.sleep(min(30.0, backoff * 2 ** (attempt - 1)))
    return error


def download_images(conversations: list[Conversation], image_root: str | os.PathLike[str],
                    failures_path: str | os.PathLike[str], size: int = 512, workers: int = 16,
                    timeout: float = 20.0, attempts: int = 5, backoff: float = 1.0, max_bytes: int = 50 * 2**20,
                    max_pixels: int = DEFAULT_MAX_PIXELS, user_agent: str = USER_AGENT,
                    ) -> tuple[DownloadReport, list[Conversation]]:
    """Download every missing image; return the report and the conversations whose images are all there."""
    tasks, problems = image_tasks(conversations, image_root)
    report = DownloadReport(conversations=len(conversations), no_url=len(problems))
    todo = [task for task in tasks.values() if not _on_disk(task.path, max_pixels)]
    report.already_there = len(tasks) - len(todo)
    failures_path = Path(failures_path)
    failures_path.parent.mkdir(parents=True, exist_ok=True)
    failed: set[Path] = set()
    with open(failures_path, "a", encoding="utf-8") as failures, ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(tasks), initial=report.already_there, desc="images", unit="image") as progress:
        for problem in problems:
            failures.write(json.dumps({"error": problem, "time": round(time.time(), 3)}) + "\n")
        futures = {pool.submit(download_one, task, size, timeout, attempts, backoff, max_bytes, max_pixels,
                               user_agent): task for task in todo}
        for future in as_completed(futures):
            task, error = futures[future], future.result()
            if error is None:
                report.downloaded += 1
            else:
                report.failed += 1
                failed.add(task.path)
                failures.write(json.dumps({"image": task.name, "url": task.url, "path": str(task.path),
                                           "records": task.records[:10], "error": error,
                                           "time": round(time.time(), 3)}, ensure_ascii=False) + "\n")
                failures.flush()
            progress.update()
            progress.set_postfix(refresh=False, failed=report.failed)
    complete = [c for c in conversations if _complete(c, image_root, failed)]
    report.complete_conversations = len(complete)
    return report, complete


def _complete(conversation: Conversation, image_root: Any, failed: set[Path]) -> bool:
    try:
        paths = [conversation.image_path(name, image_root) for name in conversation.images]
    except SchemaError:
        return False
    return all(path not in failed and path.is_file() for path in paths)
