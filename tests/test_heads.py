"""The three heads: SDXL-ready conditions, forced prompt tokens, cached targets, losses, ablation configs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from datamodules import ConversationDataModule, ConversationSource
from heads import LanguageDescriptionHead, PromptTokensHead, QFormerMediumHead, SDXLTargetCache
from heads.embedding_medium import regression_loss
from mim import MIM
from mim.inference.interleaved import GenerationSettings, InterleavedGenerator
from synth.samples import CONVERSATIONS_FILE, sample_image_dir, sample_pairs
from synth.model_parts import build_sdxl

REPO = Path(__file__).resolve().parents[1]
TINY = {"preset": "tiny"}
SMALL = dict(sdxl=TINY, hidden_size=32, num_layers=1, num_heads=4)


def mse_heads(cache: Path):
    return [QFormerMediumHead(target_cache=str(cache), **SMALL), PromptTokensHead(target_cache=str(cache), **SMALL)]


@pytest.fixture(scope="module")
def sdxl():
    pipe = build_sdxl("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["qformer", "prompt_tokens"])
def test_mse_head_conditions_have_sdxl_shapes_and_make_an_image(kind: str, sdxl, tmp_path: Path) -> None:
    head = dict(zip(["qformer", "prompt_tokens"], mse_heads(tmp_path)))[kind]
    model = MIM(head=head, llm=TINY, blip2=TINY).eval()
    condition = head.condition("", torch.randn(12, model.llm.config.hidden_size))
    reference, _, pooled, _ = sdxl.encode_prompt("a cat", do_classifier_free_guidance=False)
    assert condition.prompt_embeds.shape == reference.shape == (1, 77, 64)  # SDXL base: (1, 77, 2048)
    assert condition.pooled_prompt_embeds.shape == pooled.shape == (1, 32)  # SDXL base: (1, 1280)
    image = sdxl(**condition.pipeline_kwargs(), num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_language_head_condition_is_the_caption_text() -> None:
    condition = LanguageDescriptionHead().condition("<start>  a red   bus <end>", None)
    assert condition.prompt == "a red bus" and condition.pipeline_kwargs() == {"prompt": "a red bus"}


def test_prompt_token_head_forces_its_whole_token_run(tmp_path: Path, sdxl) -> None:
    head = PromptTokensHead(target_cache=str(tmp_path), **SMALL)
    model = MIM(head=head, llm=TINY, blip2=TINY)
    generator = InterleavedGenerator(model, sdxl)
    seen = []
    original = head.condition

    def spy(text, hidden):
        seen.append(hidden.shape[0])
        return original(text, hidden)

    head.condition = spy
    messages = [{"role": "user", "content": "Draw a bus."}]
    prompt_length = generator.prompt_embeddings(messages).shape[0]
    settings = GenerationSettings(max_new_tokens=6, max_images=1, num_inference_steps=2, image_size=64,
                                  logit_bias={head.token_ids["<IMG1>"]: 100.0})
    result = generator.generate(messages, settings)
    assert len(result.images) == 1
    assert seen == [prompt_length + 8]  # <IMG1> was sampled, <IMG2>..<IMG8> forced after it
    assert head.forced_tokens() == [head.token_ids[f"<IMG{i}>"] for i in range(2, 9)]


def test_cached_targets_equal_the_text_encoders_outputs(tmp_path: Path, sdxl) -> None:
    cache = SDXLTargetCache(tmp_path, TINY, store_dtype=torch.float32)
    captions = ["a red bus", "big ben at sunset", "a red bus"]
    assert cache.compute(captions) == 2 and cache.compute(captions) == 0  # once per caption, then resumed
    loaded = cache.load(["big ben at sunset", "a red bus"])
    with torch.no_grad():
        prompt, _, pooled, _ = sdxl.encode_prompt(["big ben at sunset", "a red bus"],
                                                  do_classifier_free_guidance=False)
    torch.testing.assert_close(loaded["prompt_embeds"], prompt)
    torch.testing.assert_close(loaded["pooled_prompt_embeds"], pooled)
    with pytest.raises(FileNotFoundError, match="no SDXL target"):
        cache.load(["never computed"])


def test_regression_loss_options() -> None:
    predicted, target = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert regression_loss("mse", predicted, target).item() == pytest.approx(12.5)
    assert regression_loss("l2", predicted, target).item() == pytest.approx(5.0)
    assert regression_loss("cosine", predicted, torch.tensor([[-3.0, -4.0]])).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mse, l2 or cosine"):
        QFormerMediumHead(loss="huber", **SMALL)


def sample_module(model: MIM) -> ConversationDataModule:
    module = ConversationDataModule(
        train=[ConversationSource(str(CONVERSATIONS_FILE), image_root=str(sample_image_dir()))],
        batch_size=5, num_workers=0).bind(model.data_interface())
    module.prepare_data()  # computes the SDXL targets the MSE heads need
    module.setup("fit")
    return module


@pytest.mark.parametrize("index", [0, 1], ids=["qformer", "prompt_tokens"])
def test_mse_heads_train_their_tokens_and_qformer_even_with_a_frozen_llm(index: int, tmp_path: Path) -> None:
    head = mse_heads(tmp_path)[index]
    model = MIM(head=head, llm=TINY, blip2=TINY, lora={"r": 2, "alpha": 4})
    batch = next(iter(sample_module(model).train_dataloader()))
    assert len(batch["output_slots"]) == batch["target_prompt_embeds"].shape[0] == 4  # assistant images
    terms = model.losses(batch)
    assert set(terms) == {"lm_loss", "mse_prompt", "mse_pooled", "loss"}
    terms["loss"].backward()
    assert head.token_in.grad.abs().sum() > 0 and head.queries.grad.abs().sum() > 0
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" not in n)


def test_prompt_token_labels_train_only_the_first_token(tmp_path: Path) -> None:
    head = PromptTokensHead(target_cache=str(tmp_path), **SMALL)
    model = MIM(head=head, llm=TINY, blip2=TINY)
    batch = next(iter(sample_module(model).train_dataloader()))
    for row, start, count in batch["output_slots"].tolist():
        assert count == 8
        labels = batch["labels"][row, start:start + count].tolist()
        assert labels[0] == head.token_ids["<IMG1>"] and labels[1:] == [-100] * 7


def test_mse_head_checkpoint_round_trip(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = MIM(head=QFormerMediumHead(target_cache=str(tmp_path / "cache"), **SMALL), llm=TINY, blip2=TINY)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    module = sample_module(model)
    trainer.fit(model, module)
    trainer.save_checkpoint(tmp_path / "mse.ckpt")
    state = torch.load(tmp_path / "mse.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("head.qformer.") for k in state) and "head.token_in" in state
    loaded = MIM.load_from_checkpoint(tmp_path / "mse.ckpt").eval()
    assert isinstance(loaded.head, QFormerMediumHead)
    batch = next(iter(sample_module(loaded).train_dataloader()))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.losses(batch)["loss"], model.losses(batch)["loss"])


@pytest.mark.parametrize("folder", ["ablation", "ablation/paper"])
def test_ablation_configs_differ_only_in_the_head(folder: str) -> None:
    directory = REPO / "configs" / folder
    configs = {path.stem: yaml.safe_load(path.read_text()) for path in directory.glob("*.yaml")
               if not path.stem.startswith(("run", "pretrain"))}
    assert set(configs) == {"language", "qformer_medium", "prompt_tokens"}
    heads = {name: config["model"].pop("head")["class_path"] for name, config in configs.items()}
    assert heads == {"language": "heads.LanguageDescriptionHead", "qformer_medium": "heads.QFormerMediumHead",
                     "prompt_tokens": "heads.PromptTokensHead"}
    first, *rest = configs.values()
    assert all(config == first for config in rest)
    run = yaml.safe_load(next(directory.glob("run*.yaml")).read_text())
    assert sorted(Path(p).stem for p in run["configs"]) == sorted(configs)
    assert yaml.safe_load((REPO / run["pretrain"]).read_text())["model"]["stage"] == "head"


@pytest.mark.slow
def test_ablation_command_writes_the_report_with_budgets_evaluation_and_probe(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    mim = Path(sys.executable).parent / "mim"
    result = subprocess.run([str(mim), "ablation", "--config", str(REPO / "configs" / "ablation" / "run_tiny.yaml"),
                             "--out_dir", str(tmp_path), "--max_contexts", "2", "--continuations", "3",
                             "--max_steps", "6", "--pretrain_max_steps", "4", "--eval_max_cases", "3"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"language", "qformer_medium", "prompt_tokens"}
    budgets = {name: [(p["stage"], p["steps"], p["samples"]) for p in row["budget"]] for name, row in report.items()}
    assert budgets["language"] == budgets["qformer_medium"] == budgets["prompt_tokens"] == [
        ("head", 4, 16), ("instruction", 6, 12)]  # the same budget for every head
    for name, row in report.items():
        assert row["probe_contexts"] == 2 and "train/loss" in row
        assert row["drawing"]["turns"] == 3 and row["text"]["bleu4"] is not None
        assert row["images"]["images_generated"] > 0 and row["images"]["clip_score_reference_caption"] is not None
        assert all(p["trainable_parameters"] > 0 for p in row["budget"])
    # the one-to-many probe: an MSE head's condition is one per context, whatever the seed
    for mse in ("qformer_medium", "prompt_tokens"):
        assert report[mse]["probe_distinct_conditions"] == pytest.approx(1 / 3)
        assert report[mse]["probe_conditions"].startswith("one per context, by construction")
    assert report["language"]["probe_conditions"].startswith("sampled")
    assert {p.name for p in tmp_path.glob("*.png")} == {"training_curves.png", "generation.png"}
    text = (tmp_path / "report.md").read_text()
    assert "## Training budget" in text and "| language | head | 4 | 16 |" in text
    assert (tmp_path / "language" / "eval" / "eval.json").is_file()


def test_an_mse_head_trains_on_a_batch_with_a_caption_less_image(tmp_path: Path) -> None:
    """A batch with one captioned and one caption-less assistant image: the step runs, the latter is counted."""
    from datamodules import ConversationDataModule, ConversationSource

    pairs = sample_pairs()
    records = [{"id": "with", "conversation": [{"role": "user", "content": "Draw a cat."},
                                               {"role": "assistant", "content": "Here: <image>",
                                                "image_list": [pairs[1].image.name], "caption_list": [pairs[1].caption]}]},
               {"id": "without", "conversation": [{"role": "user", "content": "Draw a rocket."},
                                                  {"role": "assistant", "content": "Here: <image>",
                                                   "image_list": [pairs[2].image.name]}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model = MIM(head=PromptTokensHead(target_cache=str(tmp_path / "cache"), **SMALL), llm=TINY, blip2=TINY)
    module = ConversationDataModule(train=[ConversationSource(str(tmp_path / "d.jsonl"),
                                                              image_root=str(pairs[1].image.parent))],
                                    batch_size=2, num_workers=0).bind(model.data_interface())
    module.prepare_data()
    module.setup("fit")
    with pytest.warns(UserWarning, match="record 'without'"):
        batch = model.data_interface().collate([module.train_set[0], module.train_set[1]])
    assert batch["untargeted"] == 1 and batch["output_captions"] == [pairs[1].caption]
    terms = model.losses(batch)
    terms["loss"].backward()
    assert torch.isfinite(terms["mse_prompt"]) and model.head.queries.grad.abs().sum() > 0


def test_parameter_groups_get_their_own_learning_rates(tmp_path: Path) -> None:
    model = MIM(head=PromptTokensHead(target_cache=str(tmp_path), **SMALL), llm=TINY, blip2=TINY,
                learning_rate=1e-5, part_learning_rates={"head": 1e-3, "qformer": 1e-4},
                part_weight_decays={"head": 0.0})
    from types import SimpleNamespace

    model._trainer = SimpleNamespace(estimated_stepping_batches=10)  # all configure_optimizers asks of it
    optimizer = model.configure_optimizers()["optimizer"]
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert set(groups) == {"llm", "qformer", "head"}
    assert (groups["llm"]["lr"], groups["qformer"]["lr"], groups["head"]["lr"]) == (1e-5, 1e-4, 1e-3)
    assert (groups["head"]["weight_decay"], groups["llm"]["weight_decay"]) == (0.0, 0.001)
    assert groups["head"]["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("head.") for p in groups["head"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(model.trainable_state_keys())
    with pytest.raises(ValueError, match="unknown part.*'vision'"):
        MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY, part_learning_rates={"vision": 1.0})


def held_out_mse(model: MIM, module) -> float:
    model.eval()
    with torch.no_grad():
        batch = model.data_interface().collate([module.val_set[i] for i in range(len(module.val_set))])
        return float(model.losses(batch)["mse_prompt"])


@pytest.mark.slow
def test_head_pretraining_lowers_the_mse_on_held_out_captions(tmp_path: Path) -> None:
    """GILL-style: the LLM frozen, only the head learns caption -> SDXL embedding, on the release's
    image-generation requests; then captions it never saw are predicted better than before."""
    from datamodules import CaptionDataModule
    from synth.selection.ingest import IngestSource, ingest, write_ingest

    write_ingest(ingest([IngestSource(kind="samples")]), tmp_path)
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:15]) + "\n")
    (tmp_path / "held_out.jsonl").write_text("\n".join(lines[15:]) + "\n")
    L.seed_everything(0)
    model = MIM(head=PromptTokensHead(target_cache=str(tmp_path / "cache"), **SMALL), llm=TINY, blip2=TINY,
                stage="head", learning_rate=3e-3, warmup_steps=0)
    assert {name.split(".")[0] for name in model.trainable_state_keys()} == {"head"}
    module = CaptionDataModule(train=[str(tmp_path / "train.jsonl")], val=[str(tmp_path / "held_out.jsonl")],
                               batch_size=5, num_workers=0, task="generate")
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    module.bind(model.data_interface())
    module.prepare_data()
    module.setup("fit")
    before = held_out_mse(model, module)
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    trainer.fit(model, module)
    after = held_out_mse(model, module)
    print(f"held-out mse before {before:.4f} after {after:.4f}")
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in llm_before.items())  # the LLM stayed frozen


def test_gill_options_of_the_prompt_token_head(tmp_path: Path) -> None:
    gill = PromptTokensHead(target_cache=str(tmp_path), input_residual=True, encoder_layers=2, loss="l2",
                            query_init_std=1.0, dropout=0.0, trigger_loss_weight=0.5, **SMALL)
    model = MIM(head=gill, llm=TINY, blip2=TINY)
    assert model.head.queries.std() > 0.5 and len(model.head.state_encoder.layers) == 2
    hidden = torch.randn(2, 12, 64)
    slots = torch.tensor([[0, 2, 8], [1, 3, 8]])
    states, _ = model.head.encoder_states(hidden, slots)
    assert states.shape == (2, 8, 32)  # projected to the head's width, then self-attended
    plain = PromptTokensHead(target_cache=str(tmp_path), **SMALL)
    MIM(head=plain, llm=TINY, blip2=TINY)
    shifted = hidden.clone()
    shifted[0, 2:10] += 1.0
    assert not torch.allclose(plain.encoder_states(shifted, slots)[0], plain.encoder_states(hidden, slots)[0])
    residual = PromptTokensHead(target_cache=str(tmp_path), input_residual=True, **SMALL)
    MIM(head=residual, llm=TINY, blip2=TINY)
    torch.testing.assert_close(residual.encoder_states(hidden, slots)[0] - plain.encoder_states(hidden, slots)[0],
                               residual.token_in.detach()[None].expand(2, -1, -1))
    assert gill.hparams()["init_args"]["encoder_layers"] == 2  # a checkpoint rebuilds it
    # l2 is GILL's: the Euclidean norm of each token's error, averaged
    predicted, target = torch.zeros(1, 2, 3), torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]])
    assert float(regression_loss("l2", predicted, target)) == pytest.approx(3.0)
    assert float(regression_loss("mse", predicted, target)) == pytest.approx(26 / 6)


def test_a_trigger_loss_weight_makes_the_decision_to_draw_its_own_term(tmp_path: Path) -> None:
    from mim.modeling.mim_model import MIM as Model

    torch.manual_seed(0)
    weighted = Model(head=LanguageDescriptionHead(trigger_loss_weight=0.5), llm=TINY, blip2=TINY).eval()
    plain = Model(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY).eval()
    plain.load_state_dict(weighted.state_dict())
    module = ConversationDataModule(train=[ConversationSource(str(CONVERSATIONS_FILE),
                                                              image_root=str(sample_image_dir()))],
                                    batch_size=2, num_workers=0).bind(plain.data_interface())
    module.setup("fit")
    batch = plain.data_interface().collate([module.train_set[i] for i in range(3)])
    with torch.no_grad():
        split, joint = weighted.losses(batch), plain.losses(batch)
    start = plain.head.token_ids["<start>"]
    labels = batch["labels"][:, 1:]
    logits = plain(batch).logits[:, :-1].detach()
    trigger = labels == start
    assert trigger.any() and "trigger_loss" not in joint
    expected = 0.5 * torch.nn.functional.cross_entropy(logits[trigger], labels[trigger])
    torch.testing.assert_close(split["trigger_loss"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.isclose(split["lm_loss"], joint["lm_loss"])
