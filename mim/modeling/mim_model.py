"""MIM: BLIP-2 vision encoder + Q-Former + projection + LLM + generation head (paper section 5).

::

    image -> ViT (frozen) -> Q-Former(query tokens) -> Linear -> Q embeddings at an <image> run
                                                                      |
    text tokens -----------------------------------------> LLM (Llama-2) -> next tokens
                                                                      |
                                                             head -> SDXL condition

Training stages (section 5.2):

- ``alignment``: only the Q-Former, the query tokens and the projection train.
- ``instruction``: those, plus the LLM (full, or LoRA adapters through peft),
  plus the head's parameters.

The vision encoder never trains. Checkpoints hold only what trained, and
loading checks every key against what the stage trains.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from datamodules import IMAGE_TOKEN, ModelInterface
from mim.modeling import directory as mim_directory
from heads import GenerationHead
from synth.model_parts import DEFAULT_BLIP2, DEFAULT_LLM, ModelSource, build_blip2, build_llm
from synth.model_parts.blip2 import blip2_config, blip2_image_processor
from synth.model_parts.llm import build_llm_tokenizer
from synth.model_parts.source import _DTYPES

Stage = Literal["alignment", "head", "instruction"]
STAGES = ("alignment", "head", "instruction")
#: The parts that can have their own learning rate and weight decay.
PARTS = ("llm", "qformer", "head")


@dataclass
class MIMOutput:
    logits: torch.Tensor  # (B, L, V)
    hidden: torch.Tensor  # (B, L, H): the LLM's last hidden states (after its final norm)


@dataclass
class LoraSettings:
    """LoRA on the LLM in the instruction stage (peft); the new token rows train fully.

    Args:
        r: adapter rank.
        alpha: scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: Linear layers that get adapters (Llama names).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MIM(L.LightningModule):
    def __init__(
        self,
        head: GenerationHead,
        llm: ModelSource | None = None,
        blip2: ModelSource | None = None,
        stage: Stage = "instruction",
        lora: LoraSettings | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_ratio: float = 0.03,
        warmup_steps: int | None = None,
        part_learning_rates: dict[str, float] | None = None,
        part_weight_decays: dict[str, float] | None = None,
        new_token_init: Literal["mean", "normal"] = "mean",
        gradient_checkpointing: bool = False,
        init_from: str | list[str] | None = None,
        vision_dtype: str | None = "bfloat16",
        alignment_trains_llm: bool = False,
        lazy: bool = False,
    ) -> None:
        """
        Args:
            head: the image-generation head (``class_path`` in YAML).
            llm: the language model: ``{pretrained: hub id or directory}`` or ``{preset: tiny}``;
                default Llama-2-7b-chat (section 5.1).
            blip2: where the vision encoder, Q-Former and query tokens come from; default
                Salesforce/blip2-flan-t5-xxl (section 5.1).
            stage: ``alignment`` (stage 1) or ``instruction`` (stage 2), section 5.2; or ``head``: head
                pre-training between them, as GILL trains its mapper (LLM frozen, only the generation
                head and its token rows train), so every head starts stage 2 from the same footing.
            lora: LoRA settings for the instruction stage; omit for full fine-tuning.
            learning_rate: peak learning rate (released recipe: 1e-4 alignment, 1e-5 instruction).
            weight_decay: AdamW weight decay (0.001 in the released ds_config_*.json).
            betas: AdamW betas ((0.9, 0.95) in the released ds_config_*.json).
            eps: AdamW epsilon (1e-8 in the released ds_config_*.json).
            warmup_ratio: share of the optimisation steps spent warming up before the cosine decay.
            warmup_steps: warm-up as a step count instead (released: 2000 in stage 1, 100 in stage 2).
            part_learning_rates: peak learning rates by part, over ``learning_rate``: ``llm`` (the LLM
                or its LoRA adapters), ``qformer`` (Q-Former, query tokens, projection), ``head``
                (the generation head and its token rows). A randomly initialised head learns at 1e-4
                or more while a pretrained LLM needs 1e-5 (GILL trains its mapper at 1e-3).
            part_weight_decays: weight decay by part, over ``weight_decay``.
            new_token_init: how the rows of tokens added to the LLM's vocabulary start: ``mean``
                (the mean of the existing rows, transformers' default since 4.46) or ``normal``
                (N(0, 0.02), what transformers 4.31 gave the released model).
            gradient_checkpointing: recompute LLM activations in the backward pass to save memory.
            init_from: checkpoint(s) whose trained weights initialise this model, applied in order (stage 1's
                for stage 2; stage 1's and then the head pre-training's); a Lightning .ckpt, a MIM
                directory's weights or a file of the released layout. Unlike ``ckpt_path`` it starts a
                new run (fresh optimizer and schedule).
            vision_dtype: dtype of the frozen vision tower (bfloat16: half the memory, as the released code
                keeps it in half precision); None keeps the source's.
            alignment_trains_llm: train the LLM in stage 1 too (not the paper's, which freezes Llama-2 there).
                Stage 1 assumes an LLM that a soft prompt can steer; a very small one cannot (the world's
                64-wide, 2-layer LLM: the caption loss with the right pictures stays within 0.02 nats of that
                with shuffled ones, frozen; 0.26 against 0.68 when it trains, docs/world.md).
            lazy: build the parts in :meth:`configure_model` instead of here. Lightning calls that hook
                inside the strategy's context, so under FSDP (``ModelParallelStrategy``) every rank
                builds the LLM on the meta device and loads only its own shard; ``mim fit`` sets it.
                Outside a Trainer, call ``configure_model()`` yourself before use.
        """
        super().__init__()
        # load_from_checkpoint passes the saved plain-data hyperparameters back in
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if isinstance(head, dict):
            head = GenerationHead.from_hparams(head)
        if isinstance(lora, dict):
            lora = LoraSettings(**lora)
        if isinstance(init_from, str):
            init_from = [init_from]
        if lora is not None and stage != "instruction":
            raise ValueError("LoRA applies to the LLM, which trains only in the instruction stage")
        if alignment_trains_llm and stage != "alignment":
            raise ValueError(f"alignment_trains_llm applies to stage 1 (alignment), not to stage {stage!r}")
        for name, parts in (("part_learning_rates", part_learning_rates), ("part_weight_decays", part_weight_decays)):
            unknown = sorted(set(parts or {}) - set(PARTS))
            if unknown:
                raise ValueError(f"{name}: unknown part(s) {unknown}; the parts are {list(PARTS)}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if new_token_init not in ("mean", "normal"):
            raise ValueError(f"new_token_init must be 'mean' or 'normal', got {new_token_init!r}")
        if vision_dtype is not None and vision_dtype not in _DTYPES:
            raise ValueError(f"vision_dtype must be one of {sorted(_DTYPES)} or null, got {vision_dtype!r}")
        llm_source = ModelSource.parse(llm if llm is not None else DEFAULT_LLM)
        blip2_source = ModelSource.parse(blip2 if blip2 is not None else DEFAULT_BLIP2)
        # Plain data only, so a checkpoint reads with torch.load(weights_only=True).
        self.save_hyperparameters({
            "head": head.hparams(), "llm": asdict(llm_source), "blip2": asdict(blip2_source), "stage": stage,
            "lora": asdict(lora) if lora else None, "learning_rate": learning_rate, "weight_decay": weight_decay,
            "betas": tuple(betas), "eps": eps, "warmup_ratio": warmup_ratio, "warmup_steps": warmup_steps,
            "part_learning_rates": dict(part_learning_rates or {}), "part_weight_decays": dict(part_weight_decays or {}),
            "new_token_init": new_token_init, "gradient_checkpointing": gradient_checkpointing, "init_from": init_from,
            "vision_dtype": vision_dtype, "alignment_trains_llm": alignment_trains_llm,
        })
        self.stage = stage
        self.llm_source, self.blip2_source = llm_source, blip2_source
        # What the datamodules need comes first and costs no weights: the datamodule's setup runs
        # before Lightning calls configure_model.
        self.tokenizer = build_llm_tokenizer(llm_source)
        self.tokenizer.add_special_tokens(
            {"additional_special_tokens": [t for t in (IMAGE_TOKEN, *head.special_tokens)
                                           if t not in self.tokenizer.get_vocab()]})
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        vision_config = blip2_config(blip2_source)
        self._num_query_tokens = vision_config.num_query_tokens
        self.image_processor = blip2_image_processor(blip2_source)
        self.head = head
        self.llm: nn.Module | None = None
        self.vision_model: nn.Module | None = None
        self.qformer: nn.Module | None = None
        self.query_tokens: nn.Parameter | None = None
        self.projection: nn.Module | None = None
        self._rng_to_restore: dict | None = None
        self._keep_frozen = False
        self.register_state_dict_post_hook(_drop_frozen_parameters)
        if not lazy:
            self.configure_model()

    @property
    def built(self) -> bool:
        return self.llm is not None

    def configure_model(self) -> None:
        """Build the LLM, the BLIP-2 parts, the projection and the head's LLM-sized parts, then freeze
        for the stage and apply ``init_from``. Idempotent: Lightning calls it once per fit/validate."""
        if self.built:
            return
        _refuse_zero3(self)
        mesh = _data_parallel_mesh(self)
        if mesh is not None:
            from mim.modeling.sharding import build_sharded

            build_sharded(self, mesh)
        else:
            self._build_parts()
        self._freeze_for_stage()
        for path in self.hparams.init_from or []:
            self.load_trained_weights(path)

    def _build_parts(self) -> None:
        """Every part, whole, on this process (single device, DDP, DeepSpeed ZeRO-2)."""
        hp = self.hparams
        self.llm = build_llm(self.llm_source).model
        if self.llm.get_input_embeddings().num_embeddings < len(self.tokenizer):
            self.llm.resize_token_embeddings(len(self.tokenizer), mean_resizing=hp.new_token_init == "mean")
        self._build_vision(self.llm.config.hidden_size)
        self.head.bind(self.tokenizer, self.llm.get_input_embeddings().weight,
                       self.llm.get_output_embeddings().weight)
        self._adapt_llm()

    def _build_vision(self, llm_hidden: int) -> None:
        """The BLIP-2 parts (the frozen tower in ``vision_dtype``) and the projection into the LLM."""
        vision = build_blip2(self.blip2_source)
        self.vision_model = vision.vision_model
        if self.hparams.vision_dtype is not None:
            self.vision_model.to(_DTYPES[self.hparams.vision_dtype])
        self.qformer = vision.qformer
        self.query_tokens = vision.query_tokens
        self.projection = nn.Linear(vision.qformer_hidden_size, llm_hidden)  # Q-Former space -> LLM embeddings

    def _adapt_llm(self) -> None:
        """LoRA adapters and activation checkpointing on the built LLM."""
        hp = self.hparams
        if hp.lora is not None:
            self.llm = self._with_lora(LoraSettings(**hp.lora))
        if hp.gradient_checkpointing:
            # non-reentrant checkpointing lets gradients reach the projection through a frozen LLM (stage 1)
            kwargs = {"use_reentrant": False}
            if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5 name
                self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # --- parts and stages --------------------------------------------------------------

    def _with_lora(self, settings: LoraSettings) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        # the head's token rows live in the head (token_in/token_out) and train with it
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=list(settings.target_modules))
        return get_peft_model(self.llm, config)

    @property
    def num_query_tokens(self) -> int:
        return self._num_query_tokens

    def trained_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the parts this stage trains."""
        parts = ("qformer.", "query_tokens", "projection.")
        llm = ("llm.",) if self._llm_trains else ()
        return {"alignment": parts + llm, "head": ("head.",), "instruction": parts + llm + ("head.",)}[self.stage]

    @property
    def _llm_trains(self) -> bool:
        """The LLM trains in stage 2, and in stage 1 only with ``alignment_trains_llm``."""
        return self.stage == "instruction" or (self.stage == "alignment" and self.hparams.alignment_trains_llm)

    def _freeze_for_stage(self) -> None:
        self.requires_grad_(False)
        assert not any(p.requires_grad for p in self.parameters())
        if self.stage == "head":
            self.head.requires_grad_(True)
        else:
            self.qformer.requires_grad_(True)
            self.query_tokens.requires_grad_(True)
            self.projection.requires_grad_(True)
        if self.stage == "instruction":
            self.head.requires_grad_(True)
        if self._llm_trains:
            self._unfreeze_llm()
        self.train()
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        rank_zero_info(f"MIM stage '{self.stage}': {trainable:,} of {total:,} parameters train")

    def _unfreeze_llm(self) -> None:
        """The whole LLM trains, or only its LoRA adapters; a quantized one stays frozen."""
        if self.llm_source.quantization is not None and self.hparams.lora is None:
            rank_zero_warn(f"the LLM is loaded in {self.llm_source.quantization}: it stays frozen (inference, "
                           "or LoRA adapters on it); full fine-tuning needs it unquantized")
        elif self.hparams.lora is None:
            self.llm.requires_grad_(True)
        else:  # peft's adapters; re-applied after the freeze above
            for name, parameter in self.llm.named_parameters():
                parameter.requires_grad_("lora_" in name)

    def train(self, mode: bool = True) -> "MIM":
        """Frozen parts stay in eval mode (no dropout) whatever mode the trainer asks for."""
        super().train(mode)
        if mode and self.built:
            self.vision_model.eval()
            if not self._llm_trains:
                self.llm.eval()
            if self.stage == "head":
                self.qformer.eval()
        return self

    def trainable_state_keys(self) -> set[str]:
        """State-dict names of the parameters that train (wrapper segments such as FSDP's removed)."""
        return {_clean_name(name) for name, parameter in self.named_parameters(remove_duplicate=False)
                if parameter.requires_grad}

    def frozen_state_keys(self) -> set[str]:
        return {_clean_name(name) for name, parameter in self.named_parameters(remove_duplicate=False)
                if not parameter.requires_grad}

    @contextmanager
    def full_state(self) -> Iterator[None]:
        """``state_dict()`` with the frozen weights too, inside this block.

        Outside it, ``state_dict()`` holds what trains (and persistent buffers): frozen parts come from
        their sources. Every strategy builds its checkpoint from ``state_dict()`` (DDP whole, FSDP as
        DTensor shards, DeepSpeed through its engine), so each writes only what trained, and a sharded
        checkpoint loads back into the same reduced set of keys.
        """
        previous, self._keep_frozen = self._keep_frozen, True
        try:
            yield
        finally:
            self._keep_frozen = previous

    def data_interface(self) -> ModelInterface:
        return ModelInterface(self.tokenizer, self.head, self.image_processor, self.num_query_tokens)

    # --- forward -----------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> LLM input embeddings (N, num_query_tokens, llm_hidden)."""
        with torch.no_grad():  # the vision encoder is frozen in every stage
            pixel_values = pixel_values.to(dtype=next(self.vision_model.parameters()).dtype)
            image_states = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, P+1, Dv)
        queries = self.query_tokens.expand(pixel_values.shape[0], -1, -1)  # (N, Q, Dq)
        query_states = self.qformer(query_embeds=queries, encoder_hidden_states=image_states).last_hidden_state
        return self.projection(query_states)  # (N, Q, H)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image's Q embeddings written over its run of image tokens."""
        image_mask = input_ids == self.image_token_id  # (B, L)
        token_ids = input_ids.masked_fill(image_mask, self.tokenizer.pad_token_id)
        embeds = self.head.embed_tokens(input_ids, self.llm.get_input_embeddings()(token_ids))  # (B, L, H)
        slots = int(image_mask.sum())
        count = 0 if pixel_values is None else pixel_values.shape[0]
        if slots != count * self.num_query_tokens:
            raise ValueError(f"{slots} image-token positions for {count} image(s) x {self.num_query_tokens} queries")
        if count:
            image_embeds = self.encode_images(pixel_values).to(embeds.dtype)  # (N, Q, H)
            # masked_scatter fills positions in row-major order: batch row, then position, which is
            # the order the collate lists the images in.
            embeds = embeds.masked_scatter(image_mask[..., None], image_embeds.reshape(-1, embeds.shape[-1]))
        return embeds

    def forward(self, batch: dict[str, Any]) -> MIMOutput:
        """Logits (B, L, V) and last hidden states (B, L, H) for a collated batch."""
        embeds = self.embed(batch["input_ids"], batch.get("pixel_values"))
        mask = batch["attention_mask"]
        if mask.dim() == 4:  # caption branches: boolean (B, 1, L, L) -> additive, which every attention backend takes
            mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(embeds.dtype).min)
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=batch["position_ids"]).last_hidden_state  # (B, L, H)
        logits = self.head.adjust_logits(hidden, self.llm.get_output_embeddings()(hidden))  # (B, L, V)
        return MIMOutput(logits, hidden)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = self(batch)
        labels = batch["labels"][:, 1:]  # position i predicts label i + 1
        logits = outputs.logits[:, :-1]
        valid = labels != -100
        terms: dict[str, torch.Tensor] = {}
        weight = self.head.trigger_loss_weight
        if weight is not None:  # the decision to draw as a term of its own (GILL weighs it 0.5)
            trigger = labels == self.head.token_ids[self.head.trigger]
            terms["trigger_loss"] = weight * (
                torch.nn.functional.cross_entropy(logits[trigger].float(), labels[trigger]) if trigger.any()
                else outputs.logits.sum() * 0.0)
            valid = valid & ~trigger
        if valid.any():
            lm_loss = torch.nn.functional.cross_entropy(logits[valid].float(), labels[valid])
        else:  # every label truncated away: a zero that keeps the graph
            lm_loss = outputs.logits.sum() * 0.0
        terms = {"lm_loss": lm_loss, **terms, **self.head.loss(outputs.hidden, batch)}
        terms["loss"] = sum(terms.values())
        return terms

    # --- Lightning hooks -------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any] | None, batch_index: int) -> torch.Tensor | None:
        if batch is None:  # every sample of the batch was skipped (on_error: skip)
            return None
        terms = self.losses(batch)
        size = batch["input_ids"].shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=size)
        self.log("train/skipped_samples", float(batch.get("skipped", 0)), reduce_fx="sum", batch_size=size)
        self.log("train/images_without_target", float(batch.get("untargeted", 0)), reduce_fx="sum", batch_size=size)
        return terms["loss"]

    def validation_step(self, batch: dict[str, Any] | None, batch_index: int) -> None:
        if batch is None:
            return
        terms = self.losses(batch)
        for name, value in terms.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", batch_size=batch["input_ids"].shape[0],
                     sync_dist=True)

    def part_of(self, name: str) -> str:
        """Which part a parameter belongs to, for per-part learning rates: llm, qformer or head."""
        if name.startswith("llm."):
            return "llm"
        if name.startswith("head."):
            return "head"
        return "qformer"  # qformer.*, query_tokens, projection.*

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        hp = self.hparams
        groups: dict[str, list] = {}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                groups.setdefault(self.part_of(name), []).append(parameter)
        # named groups: LearningRateMonitor logs each part's rate as lr-AdamW/<part>
        param_groups = [{"name": part, "params": params,
                         "lr": hp.part_learning_rates.get(part, hp.learning_rate),
                         "weight_decay": hp.part_weight_decays.get(part, hp.weight_decay)}
                        for part, params in groups.items()]
        optimizer = torch.optim.AdamW(param_groups, lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps,
                                      weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(hp.warmup_ratio * total)
        schedule = get_cosine_schedule_with_warmup(optimizer, min(warmup, total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- checkpoints: what trained, and strict checks on the way back ------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_state_keys()  # state_dict() already leaves them out; a strategy may not call it
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["mim_stage"] = self.stage
        checkpoint["mim_rng"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (``--ckpt_path``): the random state comes back at the first batch, where the
        uninterrupted run had it (dropout draws then match step for step)."""
        self._rng_to_restore = checkpoint.get("mim_rng")

    def on_train_batch_start(self, batch: Any, batch_index: int) -> None:
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load a checkpoint that holds only trained weights.

        Unknown keys and shape mismatches are errors. Missing keys are allowed only for parts the
        checkpoint's stage did not train (frozen weights come from their sources);
        with ``strict`` every part this model trains must be present.
        """
        with self.full_state():
            own = self.state_dict()
        unexpected = sorted(set(state_dict) - set(own))
        if unexpected:
            raise KeyError(f"checkpoint has weights this model does not: {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''} (another head, LoRA setting or model?)")
        mismatched = [k for k in state_dict if state_dict[k].shape != own[k].shape]
        if mismatched:
            first = mismatched[0]
            raise ValueError(f"checkpoint shapes differ from this model's for {mismatched[:5]}: {first} is "
                             f"{tuple(state_dict[first].shape)} there, {tuple(own[first].shape)} here "
                             "(another model size or vocabulary?)")
        missing_trained = sorted(self.trainable_state_keys() - set(state_dict))
        if strict and missing_trained:
            raise KeyError(f"checkpoint lacks weights this stage trains: {missing_trained[:5]}"
                           f"{' ...' if len(missing_trained) > 5 else ''}")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        return result

    # --- sharing: the MIM directory as the unit users exchange -------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], quantization: str | None = None,
                        trust_remote_code: bool = False, **overrides: Any) -> "MIM":
        """A MIM from a directory (``mim export``, :meth:`save_pretrained`, a downloaded Hub repository), a
        Lightning ``.ckpt`` or a sharded checkpoint folder; ``overrides`` replace saved settings (e.g. ``llm``).
        Nothing in the files chooses code: see :func:`mim.modeling.directory.load_model`."""
        return mim_directory.load_model(path, quantization, trust_remote_code, **overrides)

    def save_pretrained(self, directory: str | os.PathLike[str], sdxl: ModelSource | str | dict | None = None,
                        refiner: ModelSource | str | dict | None = None, training: dict[str, Any] | None = None,
                        evaluation: dict[str, Any] | None = None, repo_id: str | None = None) -> Path:
        """Write the MIM directory (mim.json, trained.safetensors) and its model card (README.md, with the
        ``training`` and ``evaluation`` figures given); :meth:`from_pretrained` reads it back."""
        from mim.modeling.sharing import write_model_card

        out = mim_directory.save_directory(self, directory, mim_directory.source_record(sdxl),
                                           mim_directory.source_record(refiner))
        write_model_card(out, training, evaluation, repo_id)
        return out

    def push_to_hub(self, repo_id: str, sdxl: ModelSource | str | dict | None = None, private: bool = True,
                    token: str | None = None, commit_message: str = "Upload MIM directory",
                    training: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None) -> str:
        """Save to a temporary MIM directory and upload it to the Hub repository ``repo_id`` (created private
        unless ``private=False``); returns the commit URL."""
        import tempfile

        from mim.modeling.sharing import push_directory

        with tempfile.TemporaryDirectory(prefix="mim-push-") as folder:
            self.save_pretrained(folder, sdxl=sdxl, training=training, evaluation=evaluation, repo_id=repo_id)
            return push_directory(folder, repo_id, private, token, commit_message)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any) -> "MIM":
        """Lightning's loader, except that the run's ``init_from`` is not applied again: a checkpoint
        holds every weight its run trained (a superset of what ``init_from`` gave), so it loads from
        itself alone, wherever the earlier stage's files have gone and whatever the working directory."""
        kwargs.setdefault("init_from", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def load_trained_weights(self, path: str) -> None:
        """Initialise from another run's checkpoint (e.g. stage 2 from stage 1)."""
        if not os.path.isfile(path) and not os.path.isfile(os.path.join(path, ".metadata")):
            raise FileNotFoundError(
                f"model.init_from: {path} does not exist (relative paths resolve from {os.getcwd()}). When resuming "
                "with --ckpt_path, pass --model.init_from null: the checkpoint holds every weight its run trained.")
        from mim.modeling.released_checkpoint import is_released_layout, map_released, read_released
        from mim.modeling.checkpoint_files import read_checkpoint

        sharded = _data_parallel_mesh(self) is not None
        reader = not sharded or torch.distributed.get_rank() == 0  # sharded: rank 0 reads, the others receive
        checkpoint, state = {}, {}
        if reader:
            checkpoint = read_released(path) if str(path).endswith((".pt", ".bin", ".safetensors")) else \
                read_checkpoint(path)
            state = checkpoint.get("state_dict", checkpoint)
            if is_released_layout(state):  # the release's own files: its stage-1 output starts our stage 2
                state = map_released(state, self)
        count = len(state)
        if sharded:
            from mim.modeling.sharding import load_broadcast

            load_broadcast(self, state)
        else:
            self.load_state_dict(state, strict=False)
        rank_zero_info(f"MIM: initialised {count} tensors from {path} "
                       f"(stage '{checkpoint.get('mim_stage', 'unknown')}')")


# --- helpers: names under wrappers, the frozen-weight filter, the mesh, random states ----------------

_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_name(name: str) -> str:
    """A parameter name as state_dict keys spell it, whatever wrappers (FSDP1, checkpointing, compile) add."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _drop_frozen_parameters(module: "MIM", state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: frozen weights leave the state dict (see :meth:`MIM.full_state`)."""
    if module._keep_frozen or not module.built:
        return
    frozen = module.frozen_state_keys()
    for key in [k for k in state_dict if k.startswith(prefix) and _clean_name(k[len(prefix):]) in frozen]:
        del state_dict[key]


def _data_parallel_mesh(module: L.LightningModule):
    """The data-parallel device mesh when training under ``ModelParallelStrategy`` (FSDP2) with more than
    one rank in it; None otherwise (one device, DDP, DeepSpeed, or no trainer)."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError("MIM shards with FSDP2 only: set ModelParallelStrategy(tensor_parallel_size=1)")
    mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    return mesh if mesh.size() > 1 else None


def _refuse_zero3(module: L.LightningModule) -> None:
    """DeepSpeed ZeRO-3 partitions every parameter as it is created (``deepspeed.zero.Init`` around
    configure_model): the BLIP-2 parts' strict loads and the head's rows taken from the LLM's
    embeddings would then read empty placeholders. Sharded training goes through FSDP instead."""
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    config = getattr(strategy, "config", None) if type(strategy).__name__ == "DeepSpeedStrategy" else None
    if isinstance(config, dict) and config.get("zero_optimization", {}).get("stage") == 3:
        raise ValueError("DeepSpeed ZeRO-3 is not supported by MIM: its partitioned construction would load the "
                         "BLIP-2 parts and the head's token rows into empty placeholders. For sharded training "
                         "use FSDP: --trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy "
                         "(docs/scaling.md); ZeRO-2 (the released recipe) works as it is.")


def rng_states() -> dict[str, Any]:
    """Every random state a training step draws from (dropout, data augmentation)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    # tensors and plain numbers only: checkpoints must load with torch.load(weights_only=True)
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss))
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


mim_directory.register_model_class(MIM)
