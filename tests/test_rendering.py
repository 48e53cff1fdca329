"""Rendering, labels, truncation, the caption-branch mask and the datamodules, on the tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    CaptionDataModule,
    CaptionDataset,
    ConversationDataModule,
    ConversationSource,
    ModelInterface,
    SampleError,
    collate,
    render_conversation,
    truncate,
)
from datamodules.modules import weighted_indices
from heads import LanguageDescriptionHead
from synth.samples import CONVERSATIONS_FILE, LLAVA_CONVERSATIONS_FILE, sample_image_dir
from synth.data.schema import Conversation, Turn
from synth.model_parts import build_blip2
from synth.model_parts.text_tokenizers import tiny_llama_tokenizer

Q = 4  # query tokens per image in these tests


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_llama_tokenizer()


@pytest.fixture(scope="module")
def head(tokenizer):
    head = LanguageDescriptionHead()
    head.bind(tokenizer, torch.zeros(len(tokenizer), 64), torch.zeros(len(tokenizer), 64))
    return head


def conversation() -> Conversation:
    return Conversation("c1", [
        Turn("system", "Be kind."),
        Turn("user", "Two photos: <image> and <image>. Compare them.", ["a.png", "b.png"]),
        Turn("assistant", "The first is warmer. Here is a third: <image> Enjoy.", ["c.png"], ["a red circle"]),
        Turn("user", "And this one? <image>", ["d.png"]),
        Turn("assistant", "It is blue."),
    ])


def test_images_become_runs_and_only_assistant_tokens_are_labelled(tokenizer, head) -> None:
    sample = render_conversation(conversation(), tokenizer, head, Q)
    ids, labels = torch.tensor(sample.input_ids), torch.tensor(sample.labels)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    runs = (ids == image_id).nonzero().flatten().tolist()
    assert len(runs) == 4 * Q and sample.images == ["a.png", "b.png", "c.png", "d.png"]
    for start in runs[::Q]:  # each run is Q consecutive positions
        assert runs[runs.index(start):runs.index(start) + Q] == list(range(start, start + Q))
    trained = tokenizer.decode(ids[labels != IGNORE_INDEX].tolist())
    assert "The first is warmer" in trained and "It is blue" in trained and "</s>" in trained
    assert "Compare" not in trained and "Be kind" not in trained and "And this one" not in trained
    assert "[INST]" not in trained
    # the output image (c.png): its first image position is labelled <start>, the rest ignored
    third = runs[2 * Q]
    assert labels[third].item() == tokenizer.convert_tokens_to_ids("<start>")
    assert (labels[third + 1:third + Q] == IGNORE_INDEX).all()
    # input images are never labelled
    assert (labels[runs[0]:runs[0] + 2 * Q] == IGNORE_INDEX).all()
    (anchor, branch_ids, branch_labels), = sample.branches
    assert anchor == third
    assert tokenizer.decode(branch_ids).replace(" ", "") == "<start>aredcircle<end>"
    assert branch_labels[0] == IGNORE_INDEX and branch_labels[1:] == branch_ids[1:]


def test_trailing_user_turn_is_dropped_and_chat_template_is_used(tokenizer, head) -> None:
    conv = Conversation("c2", [Turn("user", "Hi"), Turn("assistant", "Hello!"), Turn("user", "Bye")])
    sample = render_conversation(conv, tokenizer, head, Q)
    text = tokenizer.decode(sample.input_ids)
    assert text.replace(" ", "").startswith("<s>[INST]Hi[/INST]Hello!</s>")
    assert "Bye" not in text


@pytest.mark.parametrize("head_class", ["LanguageDescriptionHead", "QFormerMediumHead", "PromptTokensHead"])
def test_an_output_image_without_caption_stays_an_image_without_target(head_class: str, tokenizer,
                                                                       tmp_path: Path) -> None:
    """Every head alike: no caption, no target; the image stays in the context, counted, never a crash."""
    import heads

    options = {} if head_class == "LanguageDescriptionHead" else dict(
        target_cache=str(tmp_path), sdxl={"preset": "tiny"}, hidden_size=32, num_layers=1, num_heads=4)
    renderer = getattr(heads, head_class)(**options)
    conv = Conversation("no-caption-7", [Turn("user", "Show me"), Turn("assistant", "Here: <image>", ["x.png"])])
    with pytest.warns(UserWarning, match="record 'no-caption-7': an assistant image has no caption"):
        sample = render_conversation(conv, tokenizer, renderer, Q)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert sample.images == ["x.png"] and sample.input_ids.count(image_id) == Q
    assert sample.untargeted == 1 and sample.outputs == [] and sample.branches == []


def test_truncation_never_splits_an_image_and_keeps_branches_with_their_image(tokenizer, head) -> None:
    sample = render_conversation(conversation(), tokenizer, head, Q)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for max_length in range(1, sample.length + 2):
        cut = truncate(sample, max_length, Q, image_id)
        assert cut.length <= max(max_length, 0)
        ids = cut.input_ids
        count = ids.count(image_id)
        assert count % Q == 0 and count // Q == len(cut.images)
        assert not ids or ids[-1] != image_id or ids[-Q:] == [image_id] * Q
        for anchor, _, _ in cut.branches:
            assert ids[anchor:anchor + Q] == [image_id] * Q
        assert cut.images == sample.images[:len(cut.images)]


def test_released_truncation_cuts_as_preprocess_mim_did(tokenizer, head) -> None:
    """The release appended branches, then cut the whole at max_length, moving forward out of an image run
    (data_utils.preprocess_mim); its input_ids and labels, written out here from that loop."""
    sample = render_conversation(conversation(), tokenizer, head, Q)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    flat_ids = sample.input_ids + [t for _, ids, _ in sample.branches for t in ids]
    flat_labels = sample.labels + [t for _, _, labels in sample.branches for t in labels]
    for max_length in range(1, len(flat_ids) + 2):
        end = len(flat_ids)
        if len(flat_ids) > max_length:
            end = max_length
            while flat_ids[end] == image_id:
                end += 1
        cut = truncate(sample, max_length, Q, image_id, mode="released")
        assert cut.input_ids + [t for _, ids, _ in cut.branches for t in ids] == flat_ids[:end], max_length
        assert cut.labels + [t for _, _, labels in cut.branches for t in labels] == flat_labels[:end]
        assert len(cut.images) * Q == cut.input_ids.count(image_id)


def test_branch_mask_caption_sees_only_prefix_and_nobody_sees_the_caption(tokenizer, head) -> None:
    sample = render_conversation(conversation(), tokenizer, head, Q)
    plain = render_conversation(Conversation("p", [Turn("user", "Hi"), Turn("assistant", "Yo")]), tokenizer, head, Q)
    batch = collate([sample, plain], tokenizer.pad_token_id)
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, sample.length, sample.length) and mask.dtype == torch.bool
    main = len(sample.input_ids)
    (anchor, branch_ids, _), = sample.branches
    m = mask[0, 0]
    branch = range(main, main + len(branch_ids))
    for q in branch:
        assert m[q, :anchor].all() and not m[q, anchor:main].any()  # prefix only, not the image or later text
        assert m[q, main:q + 1].all() and not m[q, q + 1:].any()  # its own branch, causally
    assert not m[:main, main:].any()  # no main-sequence token sees the caption
    assert torch.equal(m[:main, :main], torch.tril(torch.ones(main, main, dtype=torch.bool)))
    assert batch["position_ids"][0, main:main + len(branch_ids)].tolist() == list(
        range(anchor, anchor + len(branch_ids)))
    # the plain sample in the same batch: causal over its tokens, nothing after its end
    n = plain.length
    assert torch.equal(mask[1, 0, :n, :n], torch.tril(torch.ones(n, n, dtype=torch.bool)))
    assert not mask[1, 0, :n, n:].any()
    assert mask[1, 0, n:].sum(dim=-1).eq(1).all()  # padding rows see themselves only: no empty softmax row


def test_batches_without_branches_use_the_plain_causal_path(tokenizer, head) -> None:
    plain = render_conversation(Conversation("p", [Turn("user", "Hi <image>", ["a.png"]), Turn("assistant", "Yo")]),
                                tokenizer, head, Q)
    batch = collate([plain], tokenizer.pad_token_id)
    assert batch["attention_mask"].dim() == 2 and batch["attention_mask"].all()


@pytest.fixture(scope="module")
def interface(tokenizer, head):
    return ModelInterface(tokenizer, head, build_blip2("tiny").image_processor, Q)


def test_conversation_datamodule_mixes_formats_with_weights(interface) -> None:
    root = str(sample_image_dir())
    module = ConversationDataModule(
        train=[ConversationSource(str(CONVERSATIONS_FILE), weight=2.0, image_root=root),
               ConversationSource(str(LLAVA_CONVERSATIONS_FILE), weight=0.5, image_root=root)],
        batch_size=3, num_workers=0).bind(interface)
    module.setup("fit")
    assert len(module.train_set) == 5 * 2 + 1
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3
    image_id = interface.image_token_id
    assert int((batch["input_ids"] == image_id).sum()) == batch["pixel_values"].shape[0] * Q
    assert batch["pixel_values"].shape[1:] == (3, 32, 32)


def test_weighted_indices_follow_weights() -> None:
    chosen = weighted_indices([10, 10, 4], [1.0, 2.5, 0.0], seed=0)
    assert [len(c) for c in chosen] == [10, 25, 0]
    assert sorted(chosen[1][:10].tolist()) == list(range(10))
    with pytest.raises(ValueError, match=">= 0"):
        weighted_indices([3], [-1.0], seed=0)


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_broken_sample_names_the_record_or_is_skipped_and_counted(interface, tmp_path: Path) -> None:
    records = [
        {"id": "fine", "conversation": [{"role": "user", "content": "Hello"},
                                        {"role": "assistant", "content": "Hi"}]},
        {"id": "lost-image", "conversation": [{"role": "user", "content": "<image>", "image_list": ["gone.png"]},
                                              {"role": "assistant", "content": "Nice"}]},
    ]
    source = ConversationSource(str(write(tmp_path / "d.jsonl", records)), image_root=str(tmp_path))
    strict = ConversationDataModule(train=[source], batch_size=2, num_workers=0).bind(interface)
    strict.setup("fit")
    with pytest.raises(SampleError, match="record 'lost-image': cannot load image .*gone.png"):
        next(iter(strict.train_dataloader()))
    lenient = ConversationDataModule(train=[source], batch_size=2, num_workers=0, on_error="skip").bind(interface)
    lenient.setup("fit")
    batch = next(iter(lenient.train_dataloader()))
    assert batch["record_ids"] == ["fine"] and batch["skipped"] == 1


def test_records_whose_image_dir_escapes_the_root_are_rejected_at_setup(interface, tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "<image>", "image_list": ["passwd"]}, {"role": "assistant", "content": "Hi"}]
    records = [{"id": "escape", "image_dir": "../../../etc", "conversation": turns},
               {"id": "absolute", "image_dir": "/etc", "conversation": turns},
               {"id": "fine", "conversation": [{"role": "user", "content": "Hello"},
                                               {"role": "assistant", "content": "Hi"}]}]
    source = ConversationSource(str(write(tmp_path / "d.jsonl", records)), image_root=str(tmp_path))
    strict = ConversationDataModule(train=[source], num_workers=0).bind(interface)
    with pytest.raises(ValueError, match=r"d.jsonl \(record 'escape'\): image_dir '../../../etc' leads outside"):
        strict.setup("fit")
    lenient = ConversationDataModule(train=[source], num_workers=0, on_error="skip").bind(interface)
    lenient.setup("fit")
    assert len(lenient.train_set) == 1 and "path_escape: 2" in lenient.read_reports[source.path]


def test_a_source_with_no_usable_conversation_is_an_error(interface, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    module = ConversationDataModule(train=[ConversationSource(str(tmp_path / "empty.jsonl"))],
                                    num_workers=0).bind(interface)
    with pytest.raises(ValueError, match="empty.jsonl gave no usable conversation .*held no record"):
        module.setup("fit")


def test_schema_errors_surface_at_setup_with_file_and_line(interface, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.jsonl", [{"id": "x", "conversation": [{"role": "assistant", "content": "Hi"}]}])
    module = ConversationDataModule(train=[ConversationSource(str(bad))], num_workers=0).bind(interface)
    with pytest.raises(ValueError, match=r"bad.jsonl:1 \(record 'x'\)"):
        module.setup("fit")


def test_caption_datamodule_renders_pairs_with_templates(interface, tmp_path: Path) -> None:
    from synth.selection.ingest import IngestSource, ingest, write_ingest

    write_ingest(ingest([IngestSource(kind="samples")]), tmp_path)
    module = CaptionDataModule(train=[str(tmp_path / "pairs.jsonl")], batch_size=4, num_workers=0).bind(interface)
    module.setup("fit")
    assert len(module.train_set) == 19
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].shape[0] == 4
    labelled = [interface.tokenizer.decode(row[lab != IGNORE_INDEX].tolist())
                for row, lab in zip(batch["input_ids"], batch["labels"])]
    captions = {json.loads(line)["caption"] for line in (tmp_path / "pairs.jsonl").read_text().splitlines()}
    assert all(any(c in text for c in captions) for text in labelled)  # the answer is the caption
    with pytest.raises(ValueError, match="a caption template has one <image>.*'no image here'"):
        CaptionDataset([], interface, 10, templates=["no image here"])
    with pytest.raises(FileNotFoundError, match="synth ingest"):
        CaptionDataModule(train=[str(tmp_path / "missing.jsonl")], num_workers=0).bind(interface).setup("fit")


def test_caption_datamodule_reads_webdataset_shards_directly(interface, tmp_path: Path) -> None:
    import io
    import tarfile

    from PIL import Image

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    shards = tmp_path / "shards"
    shards.mkdir()
    for number in range(2):
        with tarfile.open(shards / f"{number:05d}.tar", "w") as tar:
            for index in range(3):
                buffer = io.BytesIO()
                Image.new("RGB", (20, 20), (number * 100, index * 80, 50)).save(buffer, format="PNG")
                add(tar, f"{number}{index:03d}.png", buffer.getvalue())
                if index != 2:  # one sample per shard without a caption
                    add(tar, f"{number}{index:03d}.txt", f"square {number}-{index}".encode())
    module = CaptionDataModule(train=[str(shards)], batch_size=4, num_workers=0).bind(interface)
    module.setup("fit")
    assert len(module.train_set) == 4 and module.skipped_in_shards == {str(shards): 2}
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)


def test_prepare_data_reads_nothing_for_a_head_without_targets(interface, tmp_path: Path) -> None:
    """The language head has no targets: prepare_data must not read (or even find) the data files;
    a head that has them gets every assistant caption, once each."""
    absent = ConversationDataModule(train=[ConversationSource(str(tmp_path / "absent.jsonl"))]).bind(interface)
    absent.prepare_data()  # would raise FileNotFoundError if it read the file

    class Recorder:
        needs_targets = True

        def __init__(self):
            self.seen = None

        def prepare_targets(self, captions):
            self.seen = captions

    recorder = Recorder()
    module = ConversationDataModule(
        train=[ConversationSource(str(CONVERSATIONS_FILE), image_root=str(sample_image_dir()))]).bind(
        ModelInterface(interface.tokenizer, recorder, interface.image_processor, Q))
    module.prepare_data()
    assert recorder.seen == sorted({"a rocket standing on the launch pad",
                                    "the hubble deep field showing thousands of distant galaxies",
                                    "close-up of a brick wall", "close-up of the cratered surface of the moon"})


def test_generate_task_asks_for_each_caption_and_shows_the_image(interface, tmp_path: Path) -> None:
    """Head pre-training data: the release's ImageGenerationTemplates; the caption is the output image's."""
    from datamodules import GENERATION_TEMPLATES, CaptionDataModule
    from synth.selection.ingest import IngestSource, ingest, write_ingest

    assert len(GENERATION_TEMPLATES) == 20
    write_ingest(ingest([IngestSource(kind="samples")]), tmp_path)
    module = CaptionDataModule(train=[str(tmp_path / "pairs.jsonl")], num_workers=0, task="generate").bind(interface)
    module.setup("fit")
    pairs = {json.loads(line)["caption"] for line in (tmp_path / "pairs.jsonl").read_text().splitlines()}
    assert set(module.output_captions()) == pairs  # every caption is an image to draw: the MSE heads' targets
    conversation, _ = module.train_set.conversation(0)
    user, assistant = conversation.turns
    assert assistant.caption_list[0] in user.content and assistant.caption_list[0] in pairs
    assert not user.image_list and assistant.num_placeholders == 1
    item = module.train_set[0]
    assert len(item["sample"].branches) == 1  # the language head learns to write the caption there


def test_stage1_resamples_pairs_and_redraws_templates_every_epoch(interface, tmp_path: Path) -> None:
    """As the released stage 1: a fixed number of draws per epoch, with replacement, a template per draw."""
    from datamodules import CAPTION_TEMPLATES, CaptionDataModule
    from datamodules.samplers import EpochSampler
    from synth.selection.ingest import IngestSource, ingest, write_ingest

    assert len(CAPTION_TEMPLATES) == 20  # the release's ImageCaptionTemplates
    write_ingest(ingest([IngestSource(kind="samples")]), tmp_path)
    module = CaptionDataModule(train=[str(tmp_path / "pairs.jsonl")], batch_size=4, num_workers=0,
                               samples_per_epoch=50).bind(interface)
    module.setup("fit")
    loader = module.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler) and len(sampler) == 50 and len(loader) == 13
    first = list(sampler)
    assert len(first) == 50 and len(set(first)) < 19 + 1 and max(first) < 19  # draws with replacement, epoch 0
    assert list(sampler) == first  # the same seed and epoch give the same draws
    sampler.set_epoch(1)
    second = list(sampler)
    assert all(19 <= index < 38 for index in second) and [i - 19 for i in second] != first
    dataset = module.train_set
    templates = {dataset.conversation(item + 19 * epoch)[0].turns[0].content for item in range(19)
                 for epoch in range(3)}
    assert len(templates) > 10  # templates vary over pairs and epochs


def test_each_rank_draws_its_own_share(interface, tmp_path: Path) -> None:
    from datamodules.samplers import EpochSampler

    ranks = [EpochSampler(list(range(7)), draws=10, seed=3) for _ in range(2)]
    for rank, sampler in enumerate(ranks):
        sampler.num_replicas, sampler.rank = 2, rank
    shares = [list(sampler) for sampler in ranks]
    assert [len(share) for share in shares] == [5, 5] and shares[0] != shares[1]
    permutation = EpochSampler(list(range(7)), shuffle=True, seed=3)
    assert sorted(permutation) == list(range(7))


def test_released_image_dirs_load_with_one_setting_and_a_wrong_root_names_the_path(interface, tmp_path: Path) -> None:
    """The release's records say image_dir "./data/mim_images", relative to its working directory."""
    from PIL import Image

    images = tmp_path / "release" / "data" / "mim_images"
    images.mkdir(parents=True)
    records = []
    for index in range(4):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(images / f"{index}.png")
        records.append({"conversation": [{"role": "user", "content": "What is this? <image>",
                                          "image_list": [f"{index}.png"], "caption_list": []},
                                         {"role": "assistant", "content": "A square.", "image_list": [],
                                          "caption_list": []}], "image_dir": "./data/mim_images"})
    data = write(tmp_path / "release" / "data" / "train.jsonl", records)
    right = ConversationDataModule(train=[ConversationSource(str(data), image_root=str(tmp_path / "release"))],
                                   num_workers=0).bind(interface)
    right.setup("fit")
    assert right.train_set[0]["pixel_values"].shape[0] == 1
    wrong = ConversationDataModule(train=[ConversationSource(str(data))], num_workers=0).bind(interface)
    tried = tmp_path / "release" / "data" / "data" / "mim_images" / "0.png"
    with pytest.raises(FileNotFoundError, match=f"was looked for at {tried}"):
        wrong.setup("fit")
