"""Scaling past one device: memory per strategy, sharded construction, FSDP, exact resume, LoRA export,
batched inference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_mim import sample_batch  # tests/ is on the path (pytest's rootdir import), as for fixture_images

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUNDLED_ONLY = "[{path: synth/samples/conversations.jsonl, image_root: '${package_dir:skimage}/data'}]"


def test_paper_part_sizes_are_the_known_parameter_counts() -> None:
    from mim.modeling.memory import paper_part_sizes

    sizes = paper_part_sizes(lora_rank=16)
    assert sizes.llm == 6_738_415_616  # Llama-2-7b
    assert sizes.vision == 985_952_256  # EVA ViT-g/14 in BLIP-2
    assert sizes.qformer == 105_137_664 + 32 * 768 + 768 * 4096 + 4096
    # r = 16 on q, k, v, o (4096 -> 4096), gate and up (4096 -> 11008), down (11008 -> 4096), 32 layers
    assert sizes.lora == 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))


def test_memory_per_strategy_by_hand() -> None:
    from mim.modeling.memory import GIB, PartSizes, memory_table, training_bytes

    sizes = PartSizes(llm=1000, vision=100, qformer=10, head=2, lora=20)
    assert training_bytes(sizes, "ddp", 4, "instruction") == (16 * 1012 + 2 * 100, 0.0)
    assert training_bytes(sizes, "deepspeed_stage_2", 4, "alignment") == ((2 + 0.5 + 3) * 10 + 2 * 1102, 0.0)
    assert training_bytes(sizes, "deepspeed_stage_2_offload", 4, "instruction", lora=True) == \
        ((2 + 0.5) * 32 + 2 * 1100, 3 * 32)
    assert training_bytes(sizes, "deepspeed_stage_3", 4, "instruction") == (4 * 1012 + 0.5 * 100, 0.0)
    assert training_bytes(sizes, "fsdp", 4, "alignment") == (4 * 10 + 0.5 * 1002 + 2 * 100, 0.0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        training_bytes(sizes, "zero4", 4, "alignment")
    rows = memory_table(sizes, 4)
    assert len(rows) == 15 and rows[0]["gpu_gib"] == (16 * 10 + 2 * 1102) / GIB


# --- sharded construction (FSDP2) ------------------------------------------------------------------

def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory) -> Path:
    from synth.model_parts import build_llm

    path = tmp_path_factory.mktemp("llm")
    bundle = build_llm("tiny")
    bundle.model.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["preset", "directory+lora"])
def test_sharded_construction_loads_every_shard_and_computes_what_the_whole_model_does(
        variant: str, tiny_llm_dir: Path, tmp_path: Path) -> None:
    """Two gloo processes build the LLM on the meta device, shard it, and receive their slices from rank 0
    (layer by layer from safetensors for a directory). Gathered back, every checkpoint weight equals the
    eagerly built model's, and a forward of the sharded model equals the whole model's on the same weights."""
    import json

    import torch

    from heads import LanguageDescriptionHead
    from mim.modeling.mim_model import MIM

    settings = {"llm": {"preset": "tiny"}} if variant == "preset" else \
        {"llm": {"pretrained": str(tiny_llm_dir)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    eager = MIM(LanguageDescriptionHead(), blip2="tiny", stage="instruction", **settings).eval()
    batch = sample_batch(eager)
    torch.save(batch, tmp_path / "batch.pt")
    result = torchrun("tests/sharded_build_probe.py", str(tmp_path / "out.pt"), json.dumps(settings),
                      str(tmp_path / "batch.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    probe = torch.load(tmp_path / "out.pt", weights_only=True)
    sharded = probe["state"]
    with eager.full_state():
        whole = eager.state_dict()
    assert set(sharded) == set(whole)
    # each rank held half of every LLM matrix, never the whole
    vocab = len(eager.tokenizer)
    assert probe["local_shapes"]["lm_head.weight" if variant == "preset" else
                                 "base_model.model.lm_head.weight"][0] == vocab // 2
    old_vocab = 780  # the tiny tokenizer's before MIM adds <image> and the head's tokens
    for key, value in whole.items():
        if key.startswith(("projection.", "head.")) or "lora_A" in key:
            continue  # random initial weights: rank 0's, compared through the forward below
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            torch.testing.assert_close(sharded[key][:old_vocab], value[:old_vocab], rtol=0, atol=0)
            # added tokens: the mean of the old rows (transformers samples around it with covariance 1e-9)
            torch.testing.assert_close(sharded[key][old_vocab:], value[old_vocab:], rtol=0, atol=1e-3)
        else:
            torch.testing.assert_close(sharded[key], value, rtol=0, atol=0, msg=key)
    eager.load_state_dict(sharded, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(eager(batch).logits, probe["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fsdp_fit_saves_only_what_trained_resumes_and_exports(tmp_path: Path) -> None:
    """mim fit under ModelParallelStrategy (FSDP2) on two CPU processes: a sharded checkpoint without the
    frozen vision tower, a resume from it, and mim export / mim chat from the folder."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    strategy = ("{class_path: lightning.pytorch.strategies.ModelParallelStrategy, "
                "init_args: {data_parallel_size: 2, tensor_parallel_size: 1}}")
    callbacks = (f"[{{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
                 f"{{dirpath: {tmp_path}/checkpoints, every_n_train_steps: 2, save_top_k: -1}}}}]")
    fit = [str(BIN / "mim"), "fit", "--config", str(REPO / "configs" / "textbind" / "tiny_stage2_instruction.yaml"),
           "--model.init_from", "null", "--trainer.strategy", strategy, "--trainer.devices", "2",
           "--data.init_args.train", BUNDLED_ONLY, "--trainer.default_root_dir", str(tmp_path),
           "--trainer.logger", "false", "--trainer.callbacks", callbacks]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(fit + ["--trainer.max_steps", "2"], capture_output=True, text=True, cwd=REPO, env=env,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    weights = {key.removeprefix("state_dict.") for key in stored if key.startswith("state_dict.")}
    assert weights and not any(key.startswith("vision_model.") for key in weights)
    assert {key.split(".")[0] for key in weights} == {"query_tokens", "qformer", "projection", "llm", "head"}
    resumed = subprocess.run(fit + ["--trainer.max_steps", "4", "--ckpt_path", str(folder)], capture_output=True,
                             text=True, cwd=REPO, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr + resumed.stdout
    last = tmp_path / "checkpoints" / "epoch=1-step=4.ckpt"
    # a new run initialised from the sharded folder: rank 0 reads it, every rank gets its shards
    started = subprocess.run([*fit, "--trainer.max_steps", "1", "--model.init_from", str(last),
                              "--trainer.default_root_dir", str(tmp_path / "next"), "--trainer.callbacks", "[]"],
                             capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    assert f"initialised {len(weights)} tensors from {last}" in started.stderr + started.stdout
    exported = subprocess.run([str(BIN / "mim"), "export", str(last), str(tmp_path / "mim")], capture_output=True,
                              text=True, cwd=REPO, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    from mim.modeling.directory import load_model, read_checkpoint

    model = load_model(tmp_path / "mim")
    trained = read_checkpoint(last)["state_dict"]
    with model.full_state():
        state = model.state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


# --- exact resume ---------------------------------------------------------------------------------

class Killed(Exception):
    pass


def recorders(kill_at: int | None):
    """A callback keeping each step's loss, and one that dies like a killed process right after the
    checkpoint of step ``kill_at`` (an exception, so the schedule still plans for every step)."""
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.losses: dict[int, float] = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
            self.losses[trainer.global_step] = float(outputs["loss"])

        def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
            if trainer.global_step == kill_at:
                raise Killed(kill_at)

    return Recorder()


def fit_steps(root: Path, steps: int, ckpt_path: str | None = None, lora: bool = False,
              kill_at: int | None = None) -> dict[int, float]:
    import lightning as L

    from datamodules import ConversationDataModule, ConversationSource
    from heads import LanguageDescriptionHead
    from mim.modeling.mim_model import MIM
    from synth.samples import CONVERSATIONS_FILE, LLAVA_CONVERSATIONS_FILE, sample_image_dir

    L.seed_everything(0)
    model = MIM(LanguageDescriptionHead(), llm="tiny", blip2="tiny", stage="instruction", lazy=True,
                lora={"r": 4, "alpha": 8, "dropout": 0.1} if lora else None, learning_rate=1e-3)
    sources = [ConversationSource(str(path), image_root=str(sample_image_dir()))
               for path in (CONVERSATIONS_FILE, LLAVA_CONVERSATIONS_FILE)]
    data = ConversationDataModule(train=sources, batch_size=2, num_workers=0)
    recorder = recorders(kill_at)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1,
                                                      save_top_k=-1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=[recorder, checkpoints])
    try:
        trainer.fit(model, data, ckpt_path=ckpt_path)
    except Killed:
        pass
    return recorder.losses


@pytest.mark.parametrize("lora, kill_at", [(False, 6), (True, 6), (False, 4)],
                         ids=["mid-epoch", "mid-epoch-lora", "epoch-end"])
def test_a_killed_run_resumed_continues_the_uninterrupted_loss_curve_exactly(lora: bool, kill_at: int,
                                                                             tmp_path: Path) -> None:
    """7 conversations in batches of 2: 4 batches an epoch. Killed right after the checkpoint of step 6
    (inside the second epoch) or step 4 (an epoch's last batch) and resumed, the later steps see the same
    batches and the same dropout draws (Q-Former, LoRA): the losses are equal to the last bit."""
    reference = fit_steps(tmp_path / "a", 10, lora=lora)
    assert sorted(fit_steps(tmp_path / "b", 10, lora=lora, kill_at=kill_at)) == list(range(1, kill_at + 1))
    epoch = (kill_at - 1) // 4
    checkpoint = tmp_path / "b" / "checkpoints" / f"epoch={epoch}-step={kill_at}.ckpt"
    resumed = fit_steps(tmp_path / "b", 10, ckpt_path=str(checkpoint), lora=lora)
    assert sorted(resumed) == list(range(kill_at + 1, 11))
    difference = max(abs(resumed[step] - reference[step]) for step in resumed)
    assert difference == 0.0, {step: (reference[step], resumed[step]) for step in resumed}
    assert len({round(loss, 6) for loss in reference.values()}) > 5  # a moving curve, not a constant


# --- LoRA to a deployable model ---------------------------------------------------------------------

def test_lora_exports_merged_or_not_give_the_trained_modules_logits(tmp_path: Path) -> None:
    """Train with LoRA, export with and without --merge_lora, load each as mim chat and mim serve do."""
    import lightning as L
    import torch
    from transformers import AutoModelForCausalLM

    from datamodules import ConversationDataModule, ConversationSource
    from heads import LanguageDescriptionHead
    from mim.inference.chat import MIMChat
    from mim.modeling.directory import export_checkpoint, load_model
    from mim.modeling.mim_model import MIM
    from synth.samples import CONVERSATIONS_FILE, sample_image_dir

    L.seed_everything(0)
    model = MIM(LanguageDescriptionHead(), llm="tiny", blip2="tiny", stage="instruction",
                lora={"r": 4, "alpha": 8, "dropout": 0.0}, learning_rate=1e-2)
    data = ConversationDataModule(train=[ConversationSource(str(CONVERSATIONS_FILE),
                                                            image_root=str(sample_image_dir()))],
                                  batch_size=2, num_workers=0)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    batch = sample_batch(model)
    with torch.no_grad():
        expected = model.eval()(batch).logits
    lora_b = [p for n, p in model.llm.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapters moved away from zero: merging changes weights

    export_checkpoint(str(tmp_path / "lora.ckpt"), str(tmp_path / "adapters"))
    export_checkpoint(str(tmp_path / "lora.ckpt"), str(tmp_path / "merged"), merge_lora=True)
    assert (tmp_path / "merged" / "llm" / "model.safetensors").is_file()
    merged_llm = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "llm")  # plain transformers reads it
    assert not any("lora" in name for name, _ in merged_llm.named_parameters())
    replies = []
    for directory, tolerance in (("adapters", 0.0), ("merged", 1e-5)):
        loaded = load_model(tmp_path / directory).eval()
        assert (loaded.hparams.lora is None) == (directory == "merged")
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch).logits, expected, rtol=tolerance, atol=tolerance)
        replies.append(MIMChat.from_pretrained(tmp_path / directory, sdxl="tiny", device="cpu").send(
            "What is in this picture?", max_new_tokens=6, image_size=64, num_inference_steps=2).text)
    assert replies[0] == replies[1]  # greedy: merged and unmerged write the same reply
    from mim.modeling.directory import save_merged_directory

    with pytest.raises(ValueError, match="the LLM did not train"):  # stage 1: nothing of the LLM to write
        save_merged_directory(MIM(LanguageDescriptionHead(), llm="tiny", blip2="tiny", stage="alignment"),
                              tmp_path / "x")


# --- batched inference over a file --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_mim_dir(tmp_path_factory) -> Path:
    from heads import LanguageDescriptionHead
    from mim.modeling.directory import save_directory
    from mim.modeling.mim_model import MIM

    path = tmp_path_factory.mktemp("mim")
    save_directory(MIM(LanguageDescriptionHead(), llm="tiny", blip2="tiny"), path, sdxl={"preset": "tiny"})
    return path


def test_mim_generate_answers_every_conversation_once_as_one_by_one_and_resumes(tiny_mim_dir: Path,
                                                                                tmp_path: Path) -> None:
    import json

    from mim.inference.reply_files import conversation_prompts, generate, generate_replies
    from mim.inference.chat import MIMChat
    from mim.inference.interleaved import GenerationSettings, trigger_bias
    from synth.samples import CONVERSATIONS_FILE, LLAVA_CONVERSATIONS_FILE, sample_image_dir

    files = [str(CONVERSATIONS_FILE), str(LLAVA_CONVERSATIONS_FILE)]
    prompts, problems = conversation_prompts(files, str(sample_image_dir()))
    assert len(prompts) == 7 and not problems
    assert all(messages[-1]["role"] == "user" for _, messages in prompts)
    chat = MIMChat.from_pretrained(tiny_mim_dir, device="cpu")
    # a strong push towards images, so the image path (SDXL, the image fed back) runs in the batch too
    chat.settings = GenerationSettings(max_new_tokens=12, image_size=64, num_inference_steps=2, max_images=1,
                                       logit_bias=trigger_bias(chat.generator.model.head, 8.0))
    out = tmp_path / "out"
    summary = generate_replies(chat, prompts, out, batch_size=3, progress=False)
    assert summary["answered"] == 7 and summary["already_done"] == 0
    lines = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(record_id for record_id, _ in prompts)
    assert any(line["images"] for line in lines)
    for line in lines:
        for image in line["images"]:
            assert (out / image["path"]).is_file()
    # each row is what the one-row generator writes for it (greedy, the same seed)
    from dataclasses import replace

    from mim.evaluation.cases import load_message_images

    by_id = {line["id"]: line for line in lines}
    for record_id, messages in prompts[:3]:
        alone = chat.generator.generate(load_message_images(messages),
                                        replace(chat.settings, seed=by_id[record_id]["seed"]))
        assert alone.text == by_id[record_id]["reply"], record_id

    # killed after two replies, the third cut mid-line: a rerun answers only the rest
    text = (out / "replies.jsonl").read_text().splitlines(keepends=True)
    (out / "replies.jsonl").write_text("".join(text[:2]) + text[2][:15])
    again = generate_replies(chat, prompts, out, batch_size=3, progress=False)
    assert again["already_done"] == 2 and again["answered"] == 5
    final = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert sorted(line["id"] for line in final) == sorted(by_id)
    assert {line["id"]: line["reply"] for line in final} == {k: v["reply"] for k, v in by_id.items()}
    # and from the shell's entry point: nothing left to do
    assert generate(str(tiny_mim_dir), files, str(out), image_root=str(sample_image_dir()), device="cpu",
                    image_size=64, num_inference_steps=2, max_new_tokens=12) == 0
    assert len((out / "replies.jsonl").read_text().splitlines()) == 7


# --- memory for chat on one GPU ----------------------------------------------------------------------

@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (pip install bitsandbytes)")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_a_merged_export_chats_with_its_llm_in_8_or_4_bits(bits: str, tiny_llm_dir: Path, tmp_path: Path) -> None:
    """bitsandbytes runs on this CPU: the LLM's Linear layers load quantized, and the replies' logits stay
    close to the full-precision model's."""
    import torch

    from heads import LanguageDescriptionHead
    from mim.inference.chat import MIMChat
    from mim.modeling.directory import save_directory, save_merged_directory
    from mim.modeling.mim_model import MIM

    model = MIM(LanguageDescriptionHead(), llm={"pretrained": str(tiny_llm_dir)}, blip2="tiny",
                lora={"r": 4, "alpha": 8, "dropout": 0.0})
    save_merged_directory(model, tmp_path / "merged", sdxl={"preset": "tiny"})
    full = MIMChat.from_pretrained(tmp_path / "merged", device="cpu")
    small = MIMChat.from_pretrained(tmp_path / "merged", device="cpu", quantization=bits)
    layer = small.generator.model.llm.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[bits]
    batch = sample_batch(full.generator.model)
    with torch.no_grad():
        reference = full.generator.model(batch).logits
        quantized = small.generator.model(batch).logits
    error = (quantized - reference).abs().mean() / reference.abs().mean()
    assert 0 < error < {"8bit": 0.05, "4bit": 0.25}[bits]
    reply = small.send("What is in this picture?", max_new_tokens=4, image_size=64, num_inference_steps=2)
    assert isinstance(reply.text, str)
    # a fully fine-tuned export keeps its LLM weights in trained.safetensors: it says how to quantize it
    save_directory(MIM(LanguageDescriptionHead(), llm="tiny", blip2="tiny"), tmp_path / "full")
    with pytest.raises(ValueError, match="--merge_lora"):
        MIMChat.from_pretrained(tmp_path / "full", device="cpu", quantization=bits)


def test_sdxl_offload_needs_a_gpu_and_says_so(tiny_mim_dir: Path) -> None:
    from mim.inference.chat import MIMChat

    with pytest.raises(ValueError, match="sdxl_offload .* needs device cuda, not cpu"):
        MIMChat.from_pretrained(tiny_mim_dir, device="cpu", sdxl_offload=True)


@pytest.mark.gpu
def test_sdxl_offload_keeps_sdxl_off_the_gpu_between_images(tiny_mim_dir: Path) -> None:
    import torch

    from mim.inference.chat import MIMChat

    chat = MIMChat.from_pretrained(tiny_mim_dir, device="cuda", sdxl_offload=True)
    unet_device = next(chat.generator.sdxl.unet.parameters()).device
    assert unet_device.type == "cpu"  # resident in host memory until it runs
    reply = chat.send("Draw a cat", max_new_tokens=8, image_size=64, num_inference_steps=2)
    assert isinstance(reply.text, str) and torch.cuda.is_available()


# --- on a GPU machine ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="pip install deepspeed")
def test_deepspeed_stage_2_fits_and_saves_only_what_trained(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "mim"), "fit", "--config", str(REPO / "configs" / "textbind" / "tiny_stage2_instruction.yaml"),
         "--model.init_from", "null", "--trainer.accelerator", "cuda", "--trainer.devices", "1",
         "--trainer.strategy", "deepspeed_stage_2", "--trainer.precision", "bf16-mixed",
         "--data.init_args.train", BUNDLED_ONLY, "--trainer.max_steps", "3", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks",
         f"[{{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {{dirpath: {tmp_path}/ck}}}}]"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import torch

    states = next((tmp_path / "ck").rglob("mp_rank_00_model_states.pt"))
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert module and not any(key.startswith("vision_model.") for key in module)


@pytest.mark.gpu
def test_fsdp_on_one_gpu_builds_sharded_and_trains(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "mim"), "fit", "--config", str(REPO / "configs" / "textbind" / "tiny_stage2_instruction.yaml"),
         "--model.init_from", "null", "--trainer.accelerator", "cuda", "--trainer.devices", "1",
         "--trainer.strategy", "{class_path: lightning.pytorch.strategies.ModelParallelStrategy, "
         "init_args: {data_parallel_size: 1, tensor_parallel_size: 1}}",
         "--data.init_args.train", BUNDLED_ONLY, "--trainer.max_steps", "3", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_training_an_mse_head_never_loads_the_sdxl_decoder(tmp_path: Path, monkeypatch) -> None:
    """Only SDXL's text encoders run in training (the heads' targets); the UNet and VAE stay unloaded."""
    import lightning as L

    import synth.model_parts.sdxl as sdxl
    from datamodules import ConversationDataModule, ConversationSource
    from heads import QFormerMediumHead
    from mim.modeling.mim_model import MIM
    from synth.samples import CONVERSATIONS_FILE, sample_image_dir

    def refuse(*args, **kwargs):
        raise AssertionError("training loaded the SDXL pipeline")

    monkeypatch.setattr(sdxl, "build_sdxl", refuse)
    monkeypatch.setattr(sdxl, "build_sdxl_refiner", refuse)
    model = MIM(QFormerMediumHead(target_cache=str(tmp_path / "targets"), sdxl={"preset": "tiny"}, num_layers=1,
                                  hidden_size=32, num_heads=2), llm="tiny", blip2="tiny", lazy=True)
    data = ConversationDataModule(train=[ConversationSource(str(CONVERSATIONS_FILE),
                                                            image_root=str(sample_image_dir()))],
                                  batch_size=2, num_workers=0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, data)
    assert trainer.global_step == 2 and any((tmp_path / "targets").iterdir())  # targets were computed


def test_mim_generate_skips_and_names_a_conversation_the_reader_rejects(tmp_path: Path) -> None:
    import json

    from mim.inference.reply_files import conversation_prompts

    path = tmp_path / "convs.jsonl"
    path.write_text(json.dumps({"id": "only-system", "conversation": [{"role": "system", "content": "Be brief."}]})
                    + "\n" + json.dumps({"id": "ok", "conversation": [{"role": "user", "content": "Hi"},
                                                                      {"role": "assistant", "content": "Hello"}]})
                    + "\n")
    prompts, problems = conversation_prompts([str(path)])
    assert [record_id for record_id, _ in prompts] == ["ok"]
    assert prompts[0][1] == [{"role": "user", "content": "Hi", "images": []}]  # the reply after it is left out
    assert len(problems) == 1 and f"{path}:1 (record 'only-system')" in problems[0]  # skipped, and named
