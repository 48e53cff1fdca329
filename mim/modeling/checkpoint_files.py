"""Reading Lightning checkpoints: one ``.ckpt`` file, or a sharded folder written by
``torch.distributed.checkpoint`` (FSDP). Only tensors come back: ``weights_only`` loads, no optimizer states.

A checkpoint may come from anywhere, so reading one never runs code it names. ``.ckpt`` files and ``meta.pt``
are read with ``weights_only=True``. A sharded folder's ``.metadata`` is a plain pickle, which torch reads
with ``pickle.load``: here it is read by :class:`MetadataUnpickler`, which admits only the classes a
checkpoint's metadata is made of and refuses anything else before it is called.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

#: What a ``.metadata`` file may name: torch.distributed.checkpoint's metadata records, torch's dtypes, layouts
#: and sizes, and the paths the writer recorded. Constructing any of these runs no code a file chooses.
ALLOWED_METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "LoadItemType"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                    "PureWindowsPath")),
})

#: A 7B model's sharded metadata is a few MB; anything near this is not a checkpoint's.
MAX_METADATA_BYTES = 256 * 2**20

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would run code, or is not what it claims to be; nothing of it was executed."""


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_METADATA_GLOBALS` (and torch dtypes)."""

    def __init__(self, file, where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.where}: the checkpoint metadata names {module}.{name}, which is not part of a "
            "torch.distributed.checkpoint metadata file; refusing to load it (a pickle that names other "
            "code can run it). Only load sharded checkpoints you wrote, or export them with `mim export` "
            "where they were written.")


def is_distributed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A folder written by ``torch.distributed.checkpoint`` (FSDP with ``save_distributed_checkpoint``)."""
    return (Path(path) / ".metadata").is_file()


def is_remote_path(path: str | os.PathLike[str]) -> bool:
    """``http://``, ``s3://``, ``file://``...: anything fsspec would open rather than a local path."""
    return bool(_REMOTE.match(str(path)))


def read_distributed_metadata(folder: str | os.PathLike[str]):
    """The ``Metadata`` of a sharded checkpoint folder, read without running any code the file names."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(folder) / ".metadata"
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise UnsafeCheckpointError(f"{path}: {size:,} bytes is not checkpoint metadata "
                                    f"(at most {MAX_METADATA_BYTES:,} expected)")
    try:
        with path.open("rb") as handle:
            metadata = MetadataUnpickler(handle, str(path)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - a cut or corrupt pickle raises any of a dozen types
        raise UnsafeCheckpointError(f"{path}: not readable as checkpoint metadata ({type(error).__name__}: "
                                    f"{error}); the folder is damaged or not a sharded checkpoint") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    if getattr(metadata, "storage_meta", None) is None:  # as torch's reader does
        metadata.storage_meta = StorageMeta()
    return metadata


def verify_distributed_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Check a sharded folder before code that trusts it reads it (Lightning's resume): the metadata
    (above), and every non-tensor item, which torch's default load planner unpickles with
    ``weights_only=False``. Each such item must load with ``weights_only=True``, so the full unpickler
    meets only what the restricted one admits; its file must lie inside the folder, untransformed."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    root = Path(folder).resolve()
    metadata = read_distributed_metadata(folder)
    kinds = metadata.state_dict_metadata
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(kinds.get(getattr(index, "fqn", None)), BytesStorageMetadata):
            continue
        where = f"{folder}: item {index.fqn!r}"
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{where} is stored through transforms {info.transform_descriptors}; "
                                        "only untransformed checkpoints are resumed")
        data_file = (root / str(info.relative_path)).resolve()
        if not data_file.is_relative_to(root) or not data_file.is_file():
            raise UnsafeCheckpointError(f"{where} points at {info.relative_path!r}, outside the folder or missing")
        with data_file.open("rb") as handle:
            handle.seek(int(info.offset))
            raw = handle.read(int(info.length))
        try:
            torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - the restricted unpickler refuses with several types
            raise UnsafeCheckpointError(f"{where} does not load with weights_only=True ({type(error).__name__}: "
                                        f"{str(error).splitlines()[0][:200]}); refusing to resume from it") from None


def _safe_reader(folder: str | os.PathLike[str]):
    """torch's FileSystemReader, with the metadata read by :func:`read_distributed_metadata`. The data files
    it reads afterwards are read by torch with ``weights_only=True``."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            if kwargs.get("rank") is not None:
                raise UnsafeCheckpointError(f"{folder}: per-rank metadata files are not supported")
            metadata = read_distributed_metadata(folder)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(folder))


def read_distributed_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The weights and Lightning's metadata of a sharded checkpoint folder, on one process, without the
    optimizer states (for a fully fine-tuned 7B LLM those are twice the weights)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = _safe_reader(folder)
    metadata = reader.read_metadata().state_dict_metadata
    weights = {key.removeprefix("state_dict."): torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
               for key, entry in metadata.items()
               if key.startswith("state_dict.") and isinstance(entry, TensorStorageMetadata)}
    target = {"state_dict": weights}  # only tensors are requested: no BYTE_IO item (a pickle) is ever read
    _load_state_dict(target, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
    extra = torch.load(Path(folder) / "meta.pt", map_location="cpu", weights_only=True)
    return {**extra, "state_dict": target["state_dict"]}


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Lightning checkpoint as a dict: one file, or a sharded folder (see above)."""
    if is_remote_path(path):
        raise UnsafeCheckpointError(f"{path}: remote checkpoints are not read; download it and pass the local path")
    if is_distributed_checkpoint(path):
        return read_distributed_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
