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
- bounded: ``http(s)`` only, public addresses only (every hop, redirects included; see
  :mod:`synth.data.safe_fetch`), a deadline per request, a size cap, the pixel limit of
  :mod:`synth.data.images` before decoding, and a pixel budget shared by the workers, so sixteen
  huge images do not decode at once;
- harmless to what is there: a file is only ever created, never replaced. A name whose file exists and
  is not an image (a notes file, the conversations themselves) is a recorded failure, not overwritten;
- a bad record costs only itself: a malformed URL, a ``null`` in ``url_list``, an error nobody foresaw
  in one image is that image's recorded failure, and the run goes on.

For the tens of millions of CC3M/LAION URLs of stage 1, use img2dataset into
webdataset shards and ``synth ingest`` those: it is built for that scale. Here the
files must carry the names the conversations give them and the release's
exact padding, which img2dataset does not do.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from synth.data.images import DEFAULT_MAX_PIXELS, DecodePool, ImageDecodeError, decode_image, decode_image_file
from synth.data.safe_fetch import FetchPolicy, Unfetchable, fetch
from synth.data.schema import Conversation, SchemaError

USER_AGENT = FetchPolicy.user_agent

#: Pixels the workers may hold decoded at once (about 1.2 GB of RGB with the conversion's copy): 16 workers
#: on images of 9000 x 9000 would otherwise hold 7.8 GB.
DEFAULT_PIXEL_BUDGET = 200_000_000


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
    url: Any  # as the file gives it: fetch refuses anything that is not a well-formed http(s) URL string
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
    peak_decoding_pixels: int = 0  # the most pixels held decoded at once, under the shared budget

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
            if not isinstance(urls, list):
                problems.append(f"record {conversation.id!r} turn {index}: url_list is a {type(urls).__name__}, "
                                "not a list of URLs")
                continue
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


def _state_on_disk(path: Path, max_pixels: int) -> str:
    """``missing``, ``image`` (there and decodes: done), or why the name is taken by something else."""
    if not path.exists() and not path.is_symlink():
        return "missing"
    if path.is_symlink() or not path.is_file():
        return f"{path} exists and is not a regular file; not overwritten"
    try:
        decode_image_file(path, max_pixels)
        return "image"
    except OSError as error:  # ImageDecodeError, unreadable
        return (f"{path} exists and is not a decodable image ({error}); not overwritten: move it away, or fix the "
                "image_list that names it")


def _create_new(path: Path, data: bytes) -> None:
    """Write ``path`` only if nothing is there: a temporary file in the same folder, hard-linked into place
    (the link fails if the name was taken meanwhile), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise FileExistsError(f"{path} appeared while it was downloading; not overwritten") from None
        except OSError:  # a file system without hard links: create exclusively instead
            with open(path, "xb") as out:
                out.write(data)
    finally:
        os.unlink(temporary)


def _fit_and_encode(data: bytes, max_pixels: int, size: int, name: str) -> bytes:
    image = decode_image(data, max_pixels, name)
    padded = resize_and_pad(image, size)
    del image
    buffer = io.BytesIO()
    padded.save(buffer, format="PNG")
    return buffer.getvalue()


def download_one(task: ImageTask, size: int, attempts: int, backoff: float, max_pixels: int,
                 policy: FetchPolicy, decoder: DecodePool | None = None) -> str | None:
    """Fetch, fit and pad one image; None on success, else the last error. Never raises: whatever goes
    wrong with one image is that image's failure."""
    error = "no attempt"
    for attempt in range(1, attempts + 1):
        try:
            data = fetch(task.url, policy)
            arguments = (data, max_pixels, size, str(task.url))
            png = decoder.run(data, _fit_and_encode, *arguments) if decoder else _fit_and_encode(*arguments)
            _create_new(task.path, png)
            return None
        except (ImageDecodeError, Unfetchable, FileExistsError) as failure:  # retrying will not help
            return f"{type(failure).__name__}: {failure}"
        except OSError as failure:  # unreachable, HTTP 5xx/408/429, timeouts, resets: worth another try
            error = f"{type(failure).__name__}: {failure}"
            if attempt < attempts:
                time.sleep(min(30.0, backoff * 2 ** (attempt - 1)))
        except Exception as failure:  # noqa: BLE001 - a bad record costs only itself
            return f"unexpected {type(failure).__name__}: {failure}"
    return error


def download_images(conversations: list[Conversation], image_root: str | os.PathLike[str],
                    failures_path: str | os.PathLike[str], size: int = 512, workers: int = 16,
                    timeout: float = 20.0, attempts: int = 5, backoff: float = 1.0, max_bytes: int = 50 * 2**20,
                    max_pixels: int = DEFAULT_MAX_PIXELS, user_agent: str = USER_AGENT,
                    deadline: float = 60.0, allow_private_addresses: bool = False,
                    pixel_budget: int = DEFAULT_PIXEL_BUDGET, policy: FetchPolicy | None = None,
                    decode_threads: int = 2) -> tuple[DownloadReport, list[Conversation]]:
    """Download every missing image; return the report and the conversations whose images are all there.

    ``timeout`` bounds each connect and read, ``deadline`` each request as a whole; loopback, private,
    link-local and reserved addresses are refused unless ``allow_private_addresses`` (a local mirror).
    Images decode on ``decode_threads`` threads under ``pixel_budget`` (see :class:`DecodePool`), whatever
    the number of download ``workers``.
    """
    policy = policy or FetchPolicy(timeout=timeout, deadline=deadline, max_bytes=max_bytes,
                                   allow_private_addresses=allow_private_addresses, user_agent=user_agent)
    decoder = DecodePool(pixel_budget, threads=max(1, min(decode_threads, workers)))
    tasks, problems = image_tasks(conversations, image_root)
    report = DownloadReport(conversations=len(conversations), no_url=len(problems))
    failures_path = Path(failures_path)
    failures_path.parent.mkdir(parents=True, exist_ok=True)
    failed: set[Path] = set()
    states = {path: _state_on_disk(path, max_pixels) for path in tasks}
    todo = [task for path, task in tasks.items() if states[path] == "missing"]
    report.already_there = sum(state == "image" for state in states.values())
    with open(failures_path, "a", encoding="utf-8") as failures, ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(tasks), initial=report.already_there, desc="images", unit="image") as progress:

        def record(task: ImageTask, error: str) -> None:
            report.failed += 1
            failed.add(task.path)
            failures.write(json.dumps({"image": task.name, "url": task.url, "path": str(task.path),
                                       "records": task.records[:10], "error": error,
                                       "time": round(time.time(), 3)}, ensure_ascii=False, default=repr) + "\n")
            failures.flush()

        for problem in problems:
            failures.write(json.dumps({"error": problem, "time": round(time.time(), 3)}) + "\n")
        for path, state in states.items():
            if state not in ("missing", "image"):  # the name is taken by a file the downloader did not make
                record(tasks[path], state)
                progress.update()
        futures = {pool.submit(download_one, task, size, attempts, backoff, max_pixels, policy, decoder): task
                   for task in todo}
        for future in as_completed(futures):
            task, error = futures[future], future.result()
            if error is None:
                report.downloaded += 1
            else:
                record(task, error)
            progress.update()
            progress.set_postfix(refresh=False, failed=report.failed)
    complete = [c for c in conversations if _complete(c, image_root, failed)]
    report.complete_conversations = len(complete)
    decoder.close()
    report.peak_decoding_pixels = decoder.budget.peak
    return report, complete


def _complete(conversation: Conversation, image_root: Any, failed: set[Path]) -> bool:
    try:
        paths = [conversation.image_path(name, image_root) for name in conversation.images]
    except SchemaError:
        return False
    return all(path not in failed and path.is_file() for path in paths)
