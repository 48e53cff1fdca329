"""Sharing a MIM: save_pretrained / from_pretrained give back the trained module's logits, the directory
carries a model card stating only what was recorded, and push_to_hub reaches the upload call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heads import LanguageDescriptionHead
from mim import MIM
from test_mim import sample_batch

TINY = {"preset": "tiny"}


@pytest.fixture(scope="module")
def trained() -> MIM:
    model = MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY)
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: every trained tensor moved away from its preset value
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def test_from_pretrained_gives_the_saved_modules_logits(trained: MIM, tmp_path: Path) -> None:
    directory = trained.save_pretrained(tmp_path / "mim", sdxl="tiny",
                                        training={"global step": 40}, evaluation={"answer accuracy": 0.5})
    loaded = MIM.from_pretrained(directory).eval()
    batch = sample_batch(trained)
    with torch.no_grad():
        expected, got = trained(batch).logits, loaded(batch).logits
        fresh = MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY).eval()(batch).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(fresh, expected)  # the weights came from the directory, not the presets
    card = (directory / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: textbind")
    assert "heads.language.LanguageDescriptionHead" in card and "| global step | 40 |" in card
    assert "| answer accuracy | 0.5 |" in card and "tiny random-weight presets" in card
    assert "base_model" not in card  # presets are not hub models


def test_the_card_names_hub_base_models_and_never_local_paths(tmp_path: Path) -> None:
    import json

    from mim.modeling.sharing import model_card

    (tmp_path / "mim.json").write_text(json.dumps({
        "model": {"head": {"class_path": "heads.PromptTokensHead"}, "stage": "instruction",
                  "llm": {"pretrained": "meta-llama/Llama-2-7b-chat-hf"}, "blip2": {"pretrained": str(tmp_path)},
                  "lora": {"r": 16}},
        "weights": ["projection.weight"], "sdxl": None}))
    card = model_card(tmp_path)
    assert "base_model: [meta-llama/Llama-2-7b-chat-hf]" in card
    assert "LoRA r=16" in card and "## Evaluation" not in card and "## Training" not in card


def test_push_to_hub_creates_the_repository_and_uploads_the_directory(trained: MIM, monkeypatch) -> None:
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message, revision):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload", repo_id, files, Path(folder_path, "README.md").read_text()))
            return "https://huggingface.co/user/world-mim/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = trained.push_to_hub("user/world-mim", token="t0ken")
    assert url.endswith("/commit/abc")
    assert calls[0] == ("init", "t0ken") and calls[1] == ("create", "user/world-mim", True, True)
    kind, repo, files, card = calls[2]
    assert files == ["README.md", "mim.json", "trained.safetensors"] and "# user/world-mim" in card


def test_export_writes_the_card_with_the_checkpoints_figures(tmp_path: Path, trained: MIM) -> None:
    import lightning as L

    from mim.modeling.directory import export_checkpoint

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(trained)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    directory = export_checkpoint(str(tmp_path / "model.ckpt"), str(tmp_path / "exported"), sdxl={"preset": "tiny"})
    card = (directory / "README.md").read_text()
    assert "| global step | 0 |" in card and "| stage | instruction |" in card


def test_a_tied_embedding_llm_trained_in_stage_2_saves_and_loads(tmp_path: Path) -> None:
    """SmolLM2 ties its lm_head to its input embedding: both names share one tensor, which safetensors
    refuses to write as it is (`mim export` failed on the README's longer job); each name is written, and
    loading gives back the saved module's logits with the two still tied."""
    from synth.model_parts import build_llm

    bundle = build_llm(TINY)
    bundle.model.config.tie_word_embeddings = True
    bundle.model.tie_weights()
    bundle.model.save_pretrained(tmp_path / "llm")
    bundle.tokenizer.save_pretrained(tmp_path / "llm")
    llm = {"pretrained": str(tmp_path / "llm")}
    model = MIM(head=LanguageDescriptionHead(), llm=llm, blip2=TINY, stage="instruction")
    embedding, head = model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight
    assert embedding.data_ptr() == head.data_ptr()  # tied
    with torch.no_grad():
        embedding.add_(torch.randn_like(embedding) * 0.05)
    directory = model.save_pretrained(tmp_path / "mim", sdxl="tiny")
    loaded = MIM.from_pretrained(directory).eval()
    batch = sample_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, model.eval()(batch).logits)
    assert loaded.llm.get_input_embeddings().weight.data_ptr() == loaded.llm.get_output_embeddings().weight.data_ptr()
