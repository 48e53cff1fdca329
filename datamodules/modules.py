"""The two LightningDataModules: image-caption pairs (stage 1) and conversations (stage 2).

Neither knows the model or the head. At ``setup`` they ask the LightningModule
for a :class:`~datamodules.datasets.ModelInterface` (tokenizer, head, image
processor, query-token count) through its ``data_interface()`` method; outside
a Trainer, pass one to ``bind``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from datamodules.datasets import CaptionDataset, ConversationDataset, ModelInterface
from datamodules.samplers import EpochSampler
from synth.data.conversation_io import read_conversations
from synth.data.pairs import read_pairs
from synth.data.schema import Location, SchemaError


@dataclass
class ConversationSource:
    """One conversation file in a training mixture.

    Args:
        path: JSON, JSONL (or parquet) file in the TextBind, LLaVA or a source format (synth.data.sources).
        weight: expected passes over this file per epoch (2.0 doubles it, 0.5 samples half).
        image_root: where its image paths resolve (default: the file's folder); a
            record's ``image_dir`` is taken relative to this.
        format: auto (TextBind or LLaVA), or a source's own: platypus, minigpt4, shikra, multiinstruct.
    """

    path: str
    weight: float = 1.0
    image_root: str | None = None
    format: str = "auto"


def check_image_root(conversations: list, root: str, source: str, sample: int = 8, enough: int = 3) -> None:
    """Fail at setup, naming the path tried, when a source's images are not where its records say.

    The first ``sample`` records with images are looked up; if at least ``enough`` were looked up and
    none was found, the image root is wrong (one missing image is a data error, reported when its
    sample loads). The released TextBind data's ``image_dir`` ("./data/mim_images") is relative to the
    release's working directory: set ``image_root`` to the folder that holds ``data/``.
    """
    tried = []
    for conversation in conversations:
        if not conversation.images:
            continue
        path = conversation.image_path(conversation.images[0], root)
        if path.is_file():
            return
        tried.append((conversation, path))
        if len(tried) >= sample:
            break
    if len(tried) >= enough:
        conversation, path = tried[0]
        raise FileNotFoundError(
            f"{source}: none of the first {len(tried)} records' images was found. Record {conversation.id!r}: "
            f"{conversation.images[0]!r} was looked for at {path} (image_root {os.path.abspath(root)}, image_dir "
            f"{conversation.image_dir!r}). Set the source's image_root to the folder those paths are relative to.")


def weighted_indices(lengths: list[int], weights: list[float], seed: int) -> list[np.ndarray]:
    """Per source, the record indices one epoch uses: ``floor(w)`` full passes plus a
    seeded random ``frac(w)`` share, so a source's share of the mixture follows its weight."""
    rng = np.random.default_rng(seed)
    chosen = []
    for length, weight in zip(lengths, weights):
        if weight < 0:
            raise ValueError(f"source weights must be >= 0, got {weight}")
        whole, fraction = divmod(weight, 1.0)
        parts = [np.arange(length)] * int(whole)
        parts.append(rng.permutation(length)[:int(round(fraction * length))])
        chosen.append(np.concatenate(parts).astype(np.int64))
    return chosen


class _BindingDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int, num_workers: int, max_length: int, on_error: Literal["raise", "skip"],
                 truncation: Literal["whole", "released"] = "whole"):
        super().__init__()
        if truncation not in ("whole", "released"):
            raise ValueError(f"truncation must be 'whole' or 'released', got {truncation!r}")
        self.truncation = truncation
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.on_error = on_error
        self.interface: ModelInterface | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def bind(self, interface: ModelInterface) -> "_BindingDataModule":
        self.interface = interface
        return self

    def _resolve_interface(self) -> ModelInterface:
        if self.interface is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            if module is None or not hasattr(module, "data_interface"):
                raise RuntimeError(f"{type(self).__name__} needs a model interface: train it with a model that has "
                                   "data_interface() (mim.MIM), or call bind(ModelInterface(...)) first")
            self.interface = module.data_interface()
        return self.interface

    def prepare_data(self) -> None:
        """Once per node, before training: let the head compute what its targets need
        (the MSE heads' SDXL embeddings of every output-image caption)."""
        renderer = self._resolve_interface().renderer
        if not renderer.needs_targets:  # e.g. the language head: nothing to read the data for
            return
        captions = self.output_captions()
        if captions:
            renderer.prepare_targets(captions)

    def output_captions(self) -> list[str]:
        """Captions of every image an assistant shows in this data."""
        return []

    def setup(self, stage: str) -> None:
        self._resolve_interface()
        self.train_set, self.val_set = self.build_datasets()

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        raise NotImplementedError

    #: Whether the datasets read the epoch from their indices (CaptionDataset's per-epoch templates).
    tag_epochs = False

    def _loader(self, dataset: Dataset, shuffle: bool, draws: int | None = None) -> DataLoader:
        """A resumable loader: torchdata's ``StatefulDataLoader``, whose position Lightning saves in every
        checkpoint and restores with ``--ckpt_path``, so a run killed mid-epoch continues with the very next
        batch. Its own generator keeps worker seeding off the global random state (which the model's
        dropout draws from, and which the checkpoint restores)."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        sampler = EpochSampler(dataset, draws=draws, shuffle=shuffle, seed=self.seed, tag_epochs=self.tag_epochs)
        return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                  num_workers=self.num_workers, collate_fn=self.interface.collate,
                                  persistent_workers=self.num_workers > 0,
                                  generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


class ConversationDataModule(_BindingDataModule):
    """Stage 2 (instruction tuning): conversation files mixed with weights."""

    def __init__(self, train: list[ConversationSource], val: list[ConversationSource] | None = None,
                 batch_size: int = 8, num_workers: int = 4, max_length: int = 768,
                 on_error: Literal["raise", "skip"] = "raise", seed: int = 0,
                 truncation: Literal["whole", "released"] = "whole"):
        """
        Args:
            train: the training mixture.
            val: validation files (weights ignored: every record once).
            batch_size: per device; the global batch is this x devices x accumulate_grad_batches.
            num_workers: data-loading processes per device.
            max_length: tokens per sample, branches included (768 in the released recipe).
            on_error: what a broken record or image does: stop with its name, or skip and be counted.
            seed: for the fractional parts of source weights.
            truncation: ``whole`` (ours: an image and its caption branch are kept or dropped together,
                branches count towards max_length) or ``released`` (the released preprocess_mim: branches
                appended, then everything cut at max_length, a partial caption kept, an image run finished).
        """
        super().__init__(batch_size, num_workers, max_length, on_error, truncation)
        if not train:
            raise ValueError("ConversationDataModule needs at least one training source")
        self.train_sources = train
        self.val_sources = val or []
        self.seed = seed
        self.read_reports: dict[str, str] = {}

    def _read(self, sources: list[ConversationSource], weighted: bool) -> Dataset:
        records, lengths = [], []
        for source in sources:
            conversations, report = read_conversations(source.path, on_error=self.on_error, format=source.format)
            root = source.image_root or str(Path(source.path).resolve().parent)
            conversations = self._within_root(conversations, root, source, report)
            check_image_root(conversations, root, source.path)
            self.read_reports[source.path] = report.summary()
            if not conversations:
                raise ValueError(f"{source.path} gave no usable conversation ({report.summary()}); fix or drop "
                                 "this source")
            records.append([(conversation, root) for conversation in conversations])
            lengths.append(len(conversations))
        datasets = [ConversationDataset(r, self.interface, self.max_length, self.on_error, self.truncation)
                    for r in records]
        if not weighted:
            return ConcatDataset(datasets)
        chosen = weighted_indices(lengths, [s.weight for s in sources], self.seed)
        return ConcatDataset([Subset(d, idx.tolist()) for d, idx in zip(datasets, chosen)])

    def _within_root(self, conversations: list, root: str, source: ConversationSource, report) -> list:
        """Records whose ``image_dir`` stays inside the source's image root; the others are rejected."""
        kept = []
        for conversation in conversations:
            try:
                conversation.image_base(root)
            except SchemaError as error:
                located = error.at(Location(source.path, None, conversation.id))
                if self.on_error == "raise":
                    raise located from None
                report.rejected.append(located)
                continue
            kept.append(conversation)
        return kept

    def output_captions(self) -> list[str]:
        captions = set()
        for source in [*self.train_sources, *self.val_sources]:
            conversations, _ = read_conversations(source.path, on_error="skip", format=source.format)
            captions.update(caption for conversation in conversations for turn in conversation.turns
                            if turn.role == "assistant" for caption in turn.caption_list if caption)
        return sorted(captions)

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        train = self._read(self.train_sources, weighted=True)
        if len(train) == 0:
            raise ValueError(f"no training conversations in {[s.path for s in self.train_sources]}: "
                             f"{self.read_reports}")
        return train, (self._read(self.val_sources, weighted=False) if self.val_sources else None)


class CaptionDataModule(_BindingDataModule):
    """Stage 1 (alignment): image-caption pairs from ``synth ingest`` (``pairs.jsonl``) or
    webdataset tar shards read directly (``KEY.jpg``/``KEY.png`` + ``KEY.txt``)."""

    tag_epochs = True

    def __init__(self, train: list[str], val: list[str] | None = None, templates: list[str] | None = None,
                 batch_size: int = 32, num_workers: int = 4, max_length: int = 768,
                 on_error: Literal["raise", "skip"] = "raise", seed: int = 0, samples_per_epoch: int | None = None,
                 truncation: Literal["whole", "released"] = "whole",
                 task: Literal["caption", "generate"] = "caption", image_root: str | None = None):
        """
        Args:
            train: ``pairs.jsonl`` files written by ``synth ingest``, or ``.tar`` shards / folders of
                them (indexed from their headers; samples without image or caption are skipped and counted).
            val: validation pair files or shards.
            templates: instructions, each with one ``<image>``; default: the released code's 20, one drawn
                per sample and epoch.
            batch_size: per device; the global batch is this x devices x accumulate_grad_batches.
            num_workers: data-loading processes per device.
            max_length: tokens per sample.
            on_error: a broken image stops the run naming the pair, or is skipped and counted.
            seed: picks each pair's template and the order (or the draws) of every epoch.
            samples_per_epoch: draw this many pairs per epoch with replacement (over all ranks), as the
                released stage 1 did (webdataset resampled, 10M per epoch); None: every pair once.
            truncation: ``whole`` (ours) or ``released``, as for :class:`ConversationDataModule`.
            task: ``caption`` (stage 1: the image, then its caption) or ``generate`` (head pre-training:
                a request to draw the caption, then the image, which the head learns to produce; the
                release's ImageGenerationTemplates).
            image_root: where relative image paths of pairs files resolve (default: as written, i.e. from
                the working directory, which is what ``synth ingest`` writes).
        """
        super().__init__(batch_size, num_workers, max_length, on_error, truncation)
        if not train:
            raise ValueError("CaptionDataModule needs at least one pairs.jsonl file")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.samples_per_epoch = samples_per_epoch
        if task not in ("caption", "generate"):
            raise ValueError(f"task must be 'caption' or 'generate', got {task!r}")
        self.task = task
        self.image_root = image_root
        self.train_files = train
        self.val_files = val or []
        self.templates = templates
        self.seed = seed
        self.skipped_in_shards: dict[str, int] = {}

    def _pairs(self, path: str) -> list:
        from synth.selection.ingest import index_webdataset

        if path.endswith(".tar") or os.path.isdir(path):
            shard_pairs, skipped = index_webdataset(path)
            self.skipped_in_shards[path] = skipped
            return shard_pairs
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such pairs file (write one with `synth ingest`)")
        return list(read_pairs(path, self.image_root))

    def _read(self, files: list[str]) -> Dataset:
        pairs = [pair for path in files for pair in self._pairs(path)]
        return CaptionDataset(pairs, self.interface, self.max_length, self.templates, self.seed, self.on_error,
                              self.truncation, self.task)

    def output_captions(self) -> list[str]:
        """With ``task="generate"`` every pair's caption is an image to draw: the heads' targets."""
        if self.task != "generate":
            return []
        return sorted({pair.caption for path in [*self.train_files, *self.val_files]
                       for pair in self._pairs(path)})

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        return self._read(self.train_files), (self._read(self.val_files) if self.val_files else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, draws=self.samples_per_epoch)
