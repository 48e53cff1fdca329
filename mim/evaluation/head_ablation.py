"""The head ablation (paper section 5.1): the three heads under one training budget, scored one way.

For every config (stage-2 configs that differ only in ``model.head``):

1. head pre-training (``pretrain``, ``stage: head``): the LLM frozen, the head
   learns to draw from caption requests (the release's image-generation
   templates over image-caption pairs), as GILL pre-trains its mapper. Every
   head gets the same data and steps, the language head included (its token
   rows learn when to open a caption), so the three start level;
2. stage 2 from that checkpoint (``init_from``), same data, seed and steps;
3. :mod:`mim.evaluation.held_out` on held-out conversations (text, when to draw, images);
4. a fixed-context probe: at held-out points where the reference shows an
   image, the head is made to draw there ``continuations`` times. An MSE head
   asks SDXL for one condition per context by construction (its condition is
   a function of the context), which the report states as such; the language
   head samples descriptions, and the probe measures how different the images
   are.

The report states each head's budget: steps, samples seen, trainable
parameters and learning rates per phase, and wall time. With tiny random
models on a CPU it shows the machinery; with the paper's models and data on
GPUs it is the paper's experiment (configs/ablation/paper/).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from synth.model_parts import ModelSource


@dataclass
class Context:
    record_id: str
    messages: list[dict]
    assistant_prefix: str
    caption: str


def probe_contexts(datamodule, limit: int) -> list[Context]:
    """Held-out points where an assistant shows an image: the conversation before it,
    the assistant's words before the image, and the image's reference caption."""
    from PIL import Image

    from synth.data.conversation_io import read_conversations

    sources = datamodule.val_sources or datamodule.train_sources
    contexts: list[Context] = []
    for source in sources:
        conversations, _ = read_conversations(source.path, on_error="skip", format=source.format)
        root = source.image_root or str(Path(source.path).resolve().parent)
        for conversation in conversations:
            messages = []
            for turn in conversation.turns:
                if turn.role == "assistant" and turn.image_list and turn.caption_list:
                    prefix = turn.content.split("<image>", 1)[0]
                    contexts.append(Context(conversation.id, list(messages), prefix, turn.caption_list[0]))
                    break
                images = [Image.open(conversation.image_path(n, root)).convert("RGB") for n in turn.image_list]
                messages.append({"role": turn.role, "content": turn.content, "images": images})
            if len(contexts) >= limit:
                return contexts
    return contexts


def probe_head(model, contexts: list[Context], sdxl, clip, continuations: int, settings) -> dict[str, Any]:
    """Draw ``continuations`` images at each fixed context; CLIP score, diversity, how many distinct conditions."""
    from mim.evaluation.clip_metrics import ClipMetrics, pairwise_distance
    from mim.evaluation.held_out import condition_fingerprint
    from mim.inference.interleaved import InterleavedGenerator

    generator = InterleavedGenerator(model, sdxl)
    metrics = ClipMetrics(clip)
    images, captions, diversities, distinct, kinds = [], [], [], [], set()
    for context in contexts:
        drawn, prints = [], []
        for k in range(continuations):
            part, condition = generator.image_at(context.messages, context.assistant_prefix,
                                                 replace(settings, seed=k))
            drawn.append(part.image)
            prints.append(condition_fingerprint(condition))
            kinds.add(part.condition)
        images += drawn
        captions += [context.caption] * len(drawn)
        diversity = pairwise_distance(metrics.image_features(drawn))
        if diversity is not None:
            diversities.append(diversity)
        distinct.append(len(set(prints)) / len(prints))
    share = sum(distinct) / max(1, len(distinct))
    deterministic = kinds == {"embeddings"}
    return {"probe_contexts": len(contexts), "probe_clip_score": metrics.clip_score(images, captions),
            "probe_image_diversity": sum(diversities) / len(diversities) if diversities else None,
            "probe_distinct_conditions": share,
            "probe_conditions": ("one per context, by construction: the head's condition is a function of the "
                                 "context" if deterministic else f"sampled: {share:.2f} distinct per context")}


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def last_value(rows: list[dict[str, float]], key: str) -> float | None:
    values = [row[key] for row in rows if key in row]
    return values[-1] if values else None


def _budget(cli, seconds: float) -> dict[str, Any]:
    """What one training phase gave a head: steps, samples, parameters, learning rates, time."""
    model, trainer, data = cli.model, cli.trainer, cli.datamodule
    hp = model.hparams
    parts = sorted({model.part_of(name) for name in model.trainable_state_keys()})
    return {"stage": model.stage, "steps": trainer.global_step,
            "samples": trainer.global_step * data.batch_size * trainer.accumulate_grad_batches * trainer.world_size,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "learning_rates": {part: hp.part_learning_rates.get(part, hp.learning_rate) for part in parts},
            "seconds": round(seconds, 1)}


def _fit(args: list[str], run_dir: Path, name: str, max_steps: int | None):
    from mim.training_cli import lightning_cli

    args = [*args, f"--trainer.default_root_dir={run_dir}",
            f"--trainer.logger={{class_path: lightning.pytorch.loggers.CSVLogger, "
            f"init_args: {{save_dir: {run_dir}, name: {name}, version: 0}}}}",
            "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]
    if max_steps is not None:
        args.append(f"--trainer.max_steps={max_steps}")
    start = time.perf_counter()
    cli = lightning_cli(["fit", *args])
    return cli, time.perf_counter() - start


def _head_of(config: str) -> str:
    """The config's ``model.head`` as a flag value (resolved YAML)."""
    from omegaconf import OmegaConf

    from synth.resolvers import register_resolvers

    register_resolvers()
    head = OmegaConf.to_container(OmegaConf.load(config).model.head, resolve=True)
    return json.dumps(head)


def run_ablation(configs: list[str], out_dir: str = "runs/ablation", pretrain: str | None = None,
                 eval_data: list[str] | None = None, eval_image_root: str | None = None,
                 sdxl: ModelSource | None = None, clip: ModelSource | None = None, continuations: int = 4,
                 max_contexts: int = 8, num_inference_steps: int = 40, image_size: int = 1024, top_p: float = 0.9,
                 max_new_tokens: int = 64, max_steps: int | None = None, pretrain_max_steps: int | None = None,
                 eval_max_cases: int | None = None, batch_size: int = 8, image_bias: float = 0.0) -> int:
    """Pre-train each head, train it, evaluate it with mim evaluate, probe its images, write a report.

    Args:
        configs: ``mim fit`` stage-2 configs that differ only in ``model.head`` (configs/ablation/*.yaml).
        out_dir: where runs, answers, images and the report (report.md, report.json, *.png) go.
        pretrain: a head pre-training config (``stage: head``) run first for every head, with that head.
        eval_data: held-out conversation files for ``mim evaluate`` (default: the configs' val files).
        eval_image_root: where their image paths resolve.
        sdxl: the SDXL that draws the images (default SDXL base 1.0; ``{preset: tiny}`` on a CPU).
        clip: the CLIP for the image metrics (default openai/clip-vit-large-patch14).
        continuations: images per fixed context in the probe (the one-to-many probe).
        max_contexts: held-out contexts to probe.
        num_inference_steps: SDXL steps.
        image_size: SDXL image size.
        top_p: nucleus sampling while evaluating and probing.
        max_new_tokens: tokens per evaluated answer.
        max_steps: override the configs' stage-2 trainer.max_steps (same for every head).
        pretrain_max_steps: override the pre-training config's trainer.max_steps.
        eval_max_cases: evaluate only this many held-out turns.
        batch_size: turns generated together while evaluating.
        image_bias: added to each head's trigger logit while evaluating (the same for every head; tiny
            models that never draw can still be compared on images).
    """
    from mim.evaluation.held_out import ModelResponder, evaluate_cases, replay_cases
    from mim.inference.interleaved import GenerationSettings, trigger_bias
    from synth.model_parts import DEFAULT_SDXL, build_clip, build_sdxl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sdxl_pipeline = build_sdxl(sdxl if sdxl is not None else ModelSource(pretrained=DEFAULT_SDXL))
    clip_bundle = build_clip(clip if clip is not None else ModelSource(pretrained="openai/clip-vit-large-patch14"))
    settings = GenerationSettings(do_sample=True, top_p=top_p, num_inference_steps=num_inference_steps,
                                  image_size=image_size, max_new_tokens=max_new_tokens)
    results: dict[str, dict] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    for config in configs:
        name = Path(config).stem
        run_dir = out / name
        budget = []
        init_args: list[str] = []
        if pretrain:
            cli, seconds = _fit(["--config", pretrain, f"--model.head={_head_of(config)}"], run_dir, "pretrain",
                                pretrain_max_steps)
            budget.append(_budget(cli, seconds))
            cli.trainer.save_checkpoint(run_dir / "pretrain.ckpt")
            init_args = [f"--model.init_from={run_dir / 'pretrain.ckpt'}"]
        cli, seconds = _fit(["--config", config, *init_args], run_dir, "logs", max_steps)
        budget.append(_budget(cli, seconds))
        rows = read_metrics(Path(cli.trainer.logger.log_dir) / "metrics.csv")
        curves[name] = rows
        model = cli.model.eval()
        datamodule = cli.datamodule
        head_settings = replace(settings, logit_bias=trigger_bias(model.head, image_bias))
        data = eval_data or [s.path for s in (datamodule.val_sources or datamodule.train_sources)]
        root = eval_image_root or next((s.image_root for s in (datamodule.val_sources or datamodule.train_sources)),
                                       None)
        cases, _ = replay_cases(data, root, max_cases=eval_max_cases)
        evaluation = evaluate_cases(cases, ModelResponder(model, sdxl_pipeline, settings=head_settings),
                                    run_dir / "eval", clip_bundle, batch_size=batch_size)
        probe = probe_head(model, probe_contexts(datamodule, max_contexts), sdxl_pipeline, clip_bundle,
                           continuations, settings)
        terms = sorted({k for row in rows for k in row if k.startswith(("train/", "val/"))})
        tiny = any((model.hparams[part] or {}).get("preset") for part in ("llm", "blip2"))
        results[name] = {"head": model.hparams.head["class_path"], "budget": budget, "tiny_models": tiny,
                         **{term: last_value(rows, term) for term in terms},
                         "text": evaluation["text"], "drawing": evaluation["drawing"], "images": evaluation["images"],
                         **probe}
    write_report(out, results, curves, continuations)
    print(f"ablation report: {out / 'report.md'}")
    return 0


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def write_report(out: Path, results: dict[str, dict], curves: dict[str, list[dict[str, float]]],
                 continuations: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report.json").write_text(json.dumps(results, indent=2))
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, rows in curves.items():
        points = [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]
        if points:
            axes.plot(*zip(*points), label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("train/loss")
    axes.set_title("Stage-2 training loss by head")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "training_curves.png")
    plt.close(figure)
    names = list(results)
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(11, 3.5), dpi=100)
    left.bar(names, [results[n]["drawing"]["f1"] or 0 for n in names])
    left.set_title("When to draw (F1)")
    middle.bar(names, [(results[n]["images"] or {}).get("clip_score_reference_caption") or 0 for n in names])
    middle.set_title("CLIP score vs reference caption")
    right.bar(names, [results[n]["probe_image_diversity"] or 0 for n in names])
    right.set_title(f"Probe: diversity over {continuations} images")
    for axis in (left, middle, right):
        axis.tick_params(axis="x", rotation=20)
    figure.tight_layout()
    figure.savefig(out / "generation.png")
    plt.close(figure)
    notes = ["> computed with tiny random-weight models: the numbers show the machinery works, not which head is "
             "better", ""] if any(row.get("tiny_models") for row in results.values()) else []
    lines = ["# Head ablation", "", *notes, "## Training budget", "",
             "| config | phase | steps | samples | trainable parameters | learning rates | seconds |", "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        for phase in row["budget"]:
            rates = ", ".join(f"{part} {rate:g}" for part, rate in phase["learning_rates"].items())
            lines.append(f"| {name} | {phase['stage']} | {phase['steps']} | {phase['samples']} | "
                         f"{phase['trainable_parameters']:,} | {rates} | {phase['seconds']} |")
    lines += ["", "## Results", "", "| config | train/loss | val/loss | BLEU-4 | ROUGE-L | draw F1 | CLIP vs caption "
              "| CLIP vs reference image | probe diversity | conditions at a fixed context |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        images = row["images"] or {}
        cells = [row.get("train/loss"), row.get("val/loss"), row["text"]["bleu4"], row["text"]["rougeL"],
                 row["drawing"]["f1"], images.get("clip_score_reference_caption"),
                 images.get("clip_image_similarity_to_reference"), row["probe_image_diversity"], row["probe_conditions"]]
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "![training curves](training_curves.png)", "", "![generation](generation.png)", "",
              "Every head got the budget above: the same head pre-training (caption requests, LLM frozen) and "
              "the same stage-2 data, seed and steps. Text, drawing and image metrics are `mim evaluate`'s on the "
              f"held-out conversations (each head's `eval/`). The probe draws {continuations} images at fixed "
              "held-out contexts: an MSE head's condition there is one per context by construction, which is the "
              "one-to-many argument of section 5.1; the language head samples its descriptions."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
