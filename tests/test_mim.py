"""The MIM model: stages, image placement, the branch mask in the real forward pass,
training on a fixed batch, checkpoints, and the LightningCLI configs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import ConversationDataModule, ConversationSource, render_conversation
from heads import GenerationHead, LanguageDescriptionHead, SDXLCondition
from datamodules.rendering import OutputImage
from mim import MIM
from synth.samples import CONVERSATIONS_FILE, sample_image_dir
from synth.data.schema import Conversation, Turn

REPO = Path(__file__).resolve().parents[1]
TINY = {"preset": "tiny"}


def tiny_mim(**kwargs) -> MIM:
    return MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY, **kwargs)


@pytest.fixture(scope="module")
def model() -> MIM:
    return tiny_mim().eval()  # eval: the Q-Former's dropout would make two passes differ


def sample_batch(model: MIM, batch_size: int = 3) -> dict:
    module = ConversationDataModule(
        train=[ConversationSource(str(CONVERSATIONS_FILE), image_root=str(sample_image_dir()))],
        batch_size=batch_size, num_workers=0).bind(model.data_interface())
    module.setup("fit")
    items = [module.train_set[i] for i in range(batch_size)]
    return model.data_interface().collate(items)


def trainable_prefixes(model: MIM) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


def test_alignment_trains_only_qformer_queries_and_projection() -> None:
    model = tiny_mim(stage="alignment")
    assert trainable_prefixes(model) == {"qformer", "query_tokens", "projection"}
    assert all(p.requires_grad for p in model.qformer.parameters())
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not model.vision_model.training and not model.llm.training and model.qformer.training


def test_alignment_trains_the_llm_only_when_told_and_stage2_starts_from_it(tmp_path: Path) -> None:
    """``alignment_trains_llm`` (for an LLM too small for a soft prompt to steer): the LLM trains in stage 1,
    its weights are in the stage-1 checkpoint, and stage 2 starts from them; never the vision encoder."""
    model = tiny_mim(stage="alignment", alignment_trains_llm=True)
    assert trainable_prefixes(model) == {"qformer", "query_tokens", "projection", "llm"}
    assert model.llm.training and not model.vision_model.training
    with pytest.raises(ValueError, match="alignment_trains_llm applies to stage 1"):
        tiny_mim(stage="instruction", alignment_trains_llm=True)

    from datamodules import CaptionDataModule
    from synth.selection.ingest import IngestSource, ingest, write_ingest

    L.seed_everything(0)
    write_ingest(ingest([IngestSource(kind="samples")]), tmp_path / "ingest")
    data = CaptionDataModule(train=[str(tmp_path / "ingest" / "pairs.jsonl")], batch_size=2, num_workers=0)
    start = {k: v.clone() for k, v in model.llm.state_dict().items()}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "stage1.ckpt")
    state = torch.load(tmp_path / "stage1.ckpt", weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in state} == {"qformer", "query_tokens", "projection", "llm"}
    moved = [k for k, v in model.llm.state_dict().items() if not torch.equal(v, start[k])]
    assert moved  # the LLM did train
    stage2 = tiny_mim(init_from=str(tmp_path / "stage1.ckpt"))
    for name in moved:
        torch.testing.assert_close(stage2.llm.state_dict()[name], model.llm.state_dict()[name], rtol=0, atol=0)


def test_instruction_trains_llm_and_head_but_never_the_vision_encoder(model: MIM) -> None:
    assert trainable_prefixes(model) == {"qformer", "query_tokens", "projection", "llm", "head"}
    assert all(p.requires_grad for p in model.llm.parameters())
    assert model.head.token_in.requires_grad and model.head.token_out.requires_grad
    assert not any(p.requires_grad for p in model.vision_model.parameters())


def test_instruction_with_lora_trains_adapters_and_the_heads_token_rows() -> None:
    model = tiny_mim(lora={"r": 4, "alpha": 8})
    llm_trainable = [name for name, p in model.llm.named_parameters() if p.requires_grad]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    assert model.head.token_in.requires_grad  # <start>/<end> rows train although the LLM's do not
    with pytest.raises(ValueError, match="LoRA applies to the LLM"):
        tiny_mim(stage="alignment", lora={"r": 4})


def test_image_embeddings_land_exactly_at_their_placeholders(model: MIM) -> None:
    batch = sample_batch(model)
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.embed(ids, batch["pixel_values"])
        images = model.encode_images(batch["pixel_values"])  # (N, Q, H)
        tokens = model.llm.get_input_embeddings()(ids)
    q = model.num_query_tokens
    image_mask = ids == model.image_token_id
    image_index = 0
    for row in range(ids.shape[0]):
        positions = image_mask[row].nonzero().flatten()
        for start in positions[::q].tolist():  # images in order: several per turn, user and assistant turns
            torch.testing.assert_close(embeds[row, start:start + q], images[image_index])
            image_index += 1
    assert image_index == images.shape[0] == batch["pixel_values"].shape[0] >= 4
    # the pictures are told apart, so a misplaced or dropped one would fail the comparison above
    flat = images.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert distances.min() > 100 * 1e-5 * flat.norm(dim=1).max()
    torch.testing.assert_close(embeds[~image_mask], tokens[~image_mask])  # every other position: its token
    with pytest.raises(ValueError, match="image-token positions for"):
        model.embed(ids, batch["pixel_values"][:-1])


def test_forward_matches_the_hugging_face_model_outside_the_heads_tokens(model: MIM) -> None:
    batch = sample_batch(model, batch_size=2)
    batch["attention_mask"] = batch["attention_mask"] if batch["attention_mask"].dim() == 2 else None
    with torch.no_grad():
        ours = model(batch if batch["attention_mask"] is not None else {**batch, "attention_mask":
                                                                          torch.ones_like(batch["input_ids"])})
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        reference = model.llm(inputs_embeds=embeds, position_ids=batch["position_ids"],
                              attention_mask=torch.ones_like(batch["input_ids"])).logits
    other = torch.ones(reference.shape[-1], dtype=torch.bool)
    other[model.head.special_ids] = False
    torch.testing.assert_close(ours.logits[..., other], reference[..., other])


def test_forward_pass_respects_the_caption_branch(model: MIM) -> None:
    """Changing a caption leaves every main-sequence logit alone; changing text after the
    image leaves the caption's logits alone."""
    head = model.head
    tokenizer = model.tokenizer

    def render(caption: str, after: str):
        conversation = Conversation("b", [
            Turn("user", "Show me a cat."),
            Turn("assistant", f"Here it is: <image> {after}", ["chelsea.png"], [caption]),
        ])
        sample = render_conversation(conversation, tokenizer, head, model.num_query_tokens, str(sample_image_dir()))
        from datamodules.datasets import RenderedDataset

        pixels = RenderedDataset(model.data_interface(), 768)._pixels(sample)
        return sample, model.data_interface().collate([{"sample": sample, "pixel_values": pixels}])

    def logits(batch):
        with torch.no_grad():
            return model(batch).logits[0]

    base_sample, base = render("a tabby cat", "Isn't it sweet?")
    _, other_caption = render("a dog on grass", "Isn't it sweet?")
    main = len(base_sample.input_ids)
    torch.testing.assert_close(logits(base)[:main], logits(other_caption)[:main])
    other_text_sample, other_text = render("a tabby cat", "Look at its whiskers, so soft!")
    (_, branch, _), = base_sample.branches
    other_main = len(other_text_sample.input_ids)
    assert other_main != main
    torch.testing.assert_close(logits(base)[main:main + len(branch)],
                               logits(other_text)[other_main:other_main + len(branch)])


def test_training_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = tiny_mim()
    batch = sample_batch(model, batch_size=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.losses(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_vision_encoder_gets_no_gradient_and_alignment_reaches_the_qformer() -> None:
    model = tiny_mim(stage="alignment")
    batch = sample_batch(model, batch_size=2)
    model.losses(batch)["loss"].backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    assert model.query_tokens.grad is not None and model.projection.weight.grad.abs().sum() > 0


def fit_tiny(tmp_path: Path, stage: str, init_from: str | None = None, steps: int = 3) -> tuple[Path, MIM]:
    """Train a tiny MIM for a few steps; its checkpoint and the trained module itself."""
    from datamodules import CaptionDataModule
    from synth.selection.ingest import IngestSource, ingest, write_ingest

    L.seed_everything(0)
    model = tiny_mim(stage=stage, init_from=init_from)
    if stage == "alignment":
        write_ingest(ingest([IngestSource(kind="samples")]), tmp_path / "ingest")
        data = CaptionDataModule(train=[str(tmp_path / "ingest" / "pairs.jsonl")], batch_size=2, num_workers=0)
    else:
        data = ConversationDataModule(
            train=[ConversationSource(str(CONVERSATIONS_FILE), image_root=str(sample_image_dir()))],
            batch_size=2, num_workers=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    path = tmp_path / f"{stage}.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_checkpoints_hold_what_trained_load_safely_and_reproduce_logits(tmp_path: Path, monkeypatch) -> None:
    stage1, _ = fit_tiny(tmp_path, "alignment")
    checkpoint = torch.load(stage1, weights_only=True)  # no arbitrary objects to unpickle
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"qformer", "query_tokens", "projection"}

    stage2, trained = fit_tiny(tmp_path, "instruction", init_from=str(stage1))
    checkpoint = torch.load(stage2, weights_only=True)
    assert not any(k.startswith("vision_model") for k in checkpoint["state_dict"])
    # stage 2 started from stage 1: its Q-Former began at stage 1's weights
    untrained = tiny_mim(init_from=str(stage1))
    stage1_state = torch.load(stage1, weights_only=True)["state_dict"]
    torch.testing.assert_close(untrained.query_tokens.detach(), stage1_state["query_tokens"])

    # the checkpoint loads from itself alone: stage 1's file gone, another working directory
    stage1.unlink()
    monkeypatch.chdir(tmp_path.parent)
    loaded = MIM.load_from_checkpoint(stage2)
    assert loaded.stage == "instruction" and isinstance(loaded.head, LanguageDescriptionHead)
    batch = sample_batch(loaded)
    with torch.no_grad():
        # the loaded model is the trained module: the same logits, to the last bit
        torch.testing.assert_close(loaded.eval()(batch).logits, trained.eval()(batch).logits, rtol=0, atol=0)
        # and not the model stage 2 started from: training moved it
        assert not torch.allclose(loaded(batch).logits, untrained.eval()(batch).logits)


def test_export_of_a_stage2_checkpoint_needs_no_stage1_file(tmp_path: Path) -> None:
    from mim.modeling.directory import export_checkpoint, load_model

    stage1, _ = fit_tiny(tmp_path, "alignment", steps=1)
    stage2, trained = fit_tiny(tmp_path, "instruction", init_from=str(stage1), steps=1)
    stage1.unlink()
    export_checkpoint(str(stage2), str(tmp_path / "export"))
    exported = load_model(tmp_path / "export").eval()
    batch = sample_batch(exported, batch_size=1)
    with torch.no_grad():
        torch.testing.assert_close(exported(batch).logits, trained.eval()(batch).logits, rtol=0, atol=0)


def test_a_missing_init_from_says_how_to_resume(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--model.init_from null"):
        tiny_mim(init_from=str(tmp_path / "gone.ckpt"))


def test_loading_refuses_unknown_or_missing_trained_weights(model: MIM) -> None:
    with pytest.raises(KeyError, match="does not"):
        model.load_state_dict({"head.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="lacks weights this stage trains"):
        model.load_state_dict({"projection.bias": model.projection.bias.detach().clone()})
    with pytest.raises(ValueError, match=r"projection.bias is \(3,\) there"):
        model.load_state_dict({"projection.bias": torch.zeros(3)}, strict=False)


# --- the command line ------------------------------------------------------------------------


class EchoHead(GenerationHead):
    """A second head, only to show that YAML swaps heads by class_path."""

    special_tokens = ("<img>",)

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale=scale)

    def render_output_image(self, caption, record_id):
        return OutputImage()

    def condition(self, generated_text: str) -> SDXLCondition:
        return SDXLCondition(prompt=generated_text)


def cli(args: list[str]):
    from mim.training_cli import lightning_cli

    return lightning_cli(args, run=False)


def test_tiny_configs_build_and_a_different_head_class_path_is_accepted() -> None:
    config = str(REPO / "configs" / "textbind" / "tiny_stage2_instruction.yaml")
    built = cli(["--config", config, "--model.init_from", "null"])
    assert isinstance(built.model.head, LanguageDescriptionHead)
    assert isinstance(built.datamodule, ConversationDataModule)
    assert built.datamodule.train_sources[0].path.endswith("runs/synth-sample/filter/conversations.jsonl")
    assert built.datamodule.train_sources[1].image_root.endswith("skimage/data")  # ${package_dir:...} resolved
    swapped = cli(["--config", config, "--model.init_from", "null",
                   "--model.head", "test_mim.EchoHead", "--model.head.scale", "2.0"])
    assert type(swapped.model.head).__name__ == "EchoHead" and swapped.model.head.hparams()["init_args"] == {
        "scale": 2.0}
    assert not swapped.model.built  # mim fit builds the parts in configure_model, under the strategy
    swapped.model.configure_model()
    assert swapped.model.tokenizer.convert_tokens_to_ids("<img>") == swapped.model.head.token_ids["<img>"]


@pytest.mark.parametrize("name", ["stage1_alignment.yaml", "stage2_instruction.yaml"])
def test_paper_configs_parse_and_build_from_local_checkpoints(name: str, tmp_path: Path) -> None:
    """The real configs, with only the sources pointed at tiny checkpoints saved here:
    the from_pretrained path runs; nothing is downloaded."""
    from transformers import Blip2ForConditionalGeneration

    from synth.model_parts import build_blip2, build_llm
    from synth.model_parts.blip2 import tiny_blip2_config

    llm = build_llm("tiny")
    llm.model.save_pretrained(tmp_path / "llm")
    llm.tokenizer.save_pretrained(tmp_path / "llm")
    Blip2ForConditionalGeneration(tiny_blip2_config()).save_pretrained(tmp_path / "blip2")
    build_blip2("tiny").image_processor.save_pretrained(tmp_path / "blip2")
    config = str(REPO / "configs" / "textbind" / name)
    built = cli(["--config", config, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                 "--trainer.strategy", "auto", "--trainer.precision", "32-true",
                 "--model.llm", f"{{pretrained: {tmp_path / 'llm'}}}",
                 "--model.blip2", f"{{pretrained: {tmp_path / 'blip2'}}}", "--model.init_from", "null"])
    stage = "alignment" if "stage1" in name else "instruction"
    assert built.model.stage == stage
    built.model.configure_model()  # what the trainer calls: the from_pretrained path runs here
    assert built.model.llm.config.hidden_size == 64
    assert next(built.model.vision_model.parameters()).dtype == torch.bfloat16  # frozen tower in bf16
    hp = built.model.hparams  # the released recipe (ds_config_*.json, run_*_stage.sh)
    assert (hp.learning_rate, tuple(hp.betas), hp.eps, hp.weight_decay) == (
        1e-4 if stage == "alignment" else 1e-5, (0.9, 0.95), 1e-8, 0.001)
    assert hp.warmup_steps == (2000 if stage == "alignment" else 100) and hp.new_token_init == "normal"
    assert built.datamodule.max_length == (256 if stage == "alignment" else 768)
    if stage == "alignment":
        assert built.datamodule.samples_per_epoch == 10_000_000


@pytest.mark.parametrize("name, epochs, micro_batch, accumulate, strategy", [
    ("stage1_alignment.yaml", 2, 16, 2, "deepspeed_stage_2"),
    ("stage2_instruction.yaml", 3, 1, 8, "deepspeed_stage_2_offload"),
])
def test_released_trainer_settings_are_in_the_configs(name: str, epochs: int, micro_batch: int, accumulate: int,
                                                      strategy: str) -> None:
    import yaml

    config = yaml.safe_load((REPO / "configs" / "textbind" / name).read_text())
    trainer = config["trainer"]
    assert (trainer["max_epochs"], trainer["accumulate_grad_batches"], trainer["strategy"]) == (
        epochs, accumulate, strategy)
    assert trainer["gradient_clip_val"] == 1.0 and trainer["precision"] == "bf16-mixed" and trainer["devices"] == 8
    assert config["data"]["init_args"]["batch_size"] == micro_batch
    assert micro_batch * accumulate * trainer["devices"] == (256 if "stage1" in name else 64)  # README's batch


def test_the_released_mixture_layers_over_stage2() -> None:
    built = cli(["--config", str(REPO / "configs" / "textbind" / "stage2_instruction.yaml"),
                 "--config", str(REPO / "configs" / "textbind" / "stage2_released_mix.yaml"),
                 "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.precision", "32-true", "--model.llm", "{pretrained: null, preset: tiny, dtype: null}",
                 "--model.blip2", "{pretrained: null, preset: tiny}", "--model.init_from", "null"])
    formats = [source.format for source in built.datamodule.train_sources]
    assert formats == ["auto", "llava", "platypus", "minigpt4", "shikra", "shikra", "shikra", "multiinstruct",
                       "multiinstruct"]
    assert built.datamodule.batch_size == 1 and built.datamodule.max_length == 768  # stage 2's, kept


def test_fit_runs_from_the_shell_and_writes_a_checkpoint(tmp_path: Path) -> None:
    import subprocess
    import sys

    from synth.selection.ingest import IngestSource, ingest, write_ingest

    write_ingest(ingest([IngestSource(kind="samples")]), tmp_path / "ingest")
    mim = Path(sys.executable).parent / "mim"
    result = subprocess.run(
        [str(mim), "fit", "--config", str(REPO / "configs" / "textbind" / "tiny_stage1_alignment.yaml"),
         "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
         "--trainer.logger", "false", "--trainer.callbacks", "[]",
         "--data.init_args.train", f"[{tmp_path / 'ingest' / 'pairs.jsonl'}]"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.rglob("*.ckpt"))


def test_gradient_checkpointing_still_trains_through_a_frozen_llm() -> None:
    model = tiny_mim(stage="alignment", gradient_checkpointing=True)
    assert model.llm.is_gradient_checkpointing
    batch = sample_batch(model, batch_size=2)
    model.losses(batch)["loss"].backward()
    assert model.projection.weight.grad is not None and model.projection.weight.grad.abs().sum() > 0


#: The bundled conversations alone (the tiny stage-2 config also reads synth's output, absent in a clean clone).
BUNDLED_ONLY = ("[{path: synth/samples/conversations.jsonl, image_root: '${package_dir:skimage}/data'}]")


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    """The multi-GPU path, simulated: DDP over gloo with two processes, stage 2 (every part trains)."""
    import subprocess
    import sys

    mim = Path(sys.executable).parent / "mim"
    result = subprocess.run(
        [str(mim), "fit", "--config", str(REPO / "configs" / "textbind" / "tiny_stage2_instruction.yaml"),
         "--model.init_from", "null", "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--data.init_args.train", BUNDLED_ONLY,
         "--trainer.max_steps", "4", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
         "--trainer.callbacks", "[]"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in result.stderr + result.stdout
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in result.stderr + result.stdout
