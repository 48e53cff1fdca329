"""``mim world``: the world experiment, end to end, on a CPU.

world pictures -> world parts (LLM, CLIP, vision tower, and an SDXL whose text encoders are the world CLIP's
text side; :mod:`synth.world.parts`) -> the synthesis pipeline on the training pairs (``synth run``'s stages:
ingest, the section 3.2 match filter with the world CLIP at its calibrated threshold, FAISS clusters,
topic-aware groups, the world's composer writing a dialogue per group, the filter) -> stage 1 on the kept
pairs -> for every head and seed: head pre-training, stage 2 on the synthesized conversations ->
``mim evaluate``'s answer keys on new pictures of seen and of held-out colour-shape pairs, with the pictures
blanked (the language-prior control) and with the pictures of every "which" question in reverse order, and
image generation in conditioning space (what each head asks SDXL for retrieves the requested caption) ->
a report (mean and 95% interval over seeds, and what the head comparison says).

Every step leaves its result on disk and is skipped when it is there; an interrupted fit resumes from its
``last.ckpt``. The parts and stage 1 are shared by every head and seed (as the paper's stage 1 is shared by
its heads); seeds vary head pre-training and stage 2.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from synth.atomic import atomic_write_text

#: the three heads of section 5.1; the MSE heads' targets come from the world SDXL's text encoders.
HEADS = {"language": "heads.LanguageDescriptionHead", "qformer_medium": "heads.QFormerMediumHead",
         "prompt_tokens": "heads.PromptTokensHead"}


@dataclass
class WorldPlan:
    """The experiment's sizes and budgets (configs/world/experiment.yaml)."""

    out_dir: str = "runs/world"
    scenes: int = 3000  # training pictures
    mismatched: float = 0.1  # share of training pairs given another picture's caption (the filter must drop them)
    calibration_scenes: int = 400  # half mismatched: sets the world CLIP's match threshold
    conversations: int = 6000
    eval_scenes: int = 300
    eval_conversations: int = 200
    llm_steps: int = 800
    #: the world LLM's width and depth (the tiny preset's 64 x 2 by default)
    llm_hidden_size: int = 64
    llm_layers: int = 2
    #: the world CLIP's and the vision tower's training steps; at 600 the CLIP barely tells shapes apart
    #: (synth.world.caption_checks), and the tower learns only what it tells apart
    clip_steps: int = 1500
    tower_steps: int = 1500
    pretrain_qformer: bool = True  # BLIP-2's image-text contrastive stage for the Q-Former, with the tower
    #: > 0 also trains the Q-Former to keep the patch layout (synth.world.parts.pretrain_vision_tower); not BLIP-2's
    qformer_layout_weight: float = 0.0
    #: > 0 adds BLIP-2's image-grounded caption generation (ITG) to the Q-Former's pre-training
    qformer_caption_weight: float = 0.0
    stage1_steps: int = 1000  # 0 skips stage 1 (stage 2 then starts from a new projection)
    stage1_learning_rate: float = 2.0e-3
    #: stage 1 trains the LLM too (MIM's ``alignment_trains_llm``; the paper freezes it)
    stage1_trains_llm: bool = False
    head_steps: int = 200
    head_learning_rate: float = 1.0e-3
    stage2_steps: int = 4000
    stage2_learning_rate: float = 1.0e-3
    #: stage 2's peak rates by part over ``stage2_learning_rate`` (``llm``, ``qformer``, ``head``: MIM's
    #: ``part_learning_rates``); empty: one rate for all
    stage2_part_learning_rates: dict[str, float] = field(default_factory=dict)
    batch_size: int = 8
    heads: list[str] = field(default_factory=lambda: list(HEADS))
    #: the MSE heads' Q-Former (GILL's mapper is 512 wide and 4 layers deep over a 4096-wide LLM; the world
    #: LLM is 64 wide)
    mse_hidden_size: int = 64
    mse_layers: int = 2
    mse_attention_heads: int = 4
    clusters: int = 16  # section 3.1's k-means over the kept pairs (4096 for CC3M)
    min_cluster_size: int = 16  # section 4.1's outlier rule, scaled (32 for CC3M)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    world_seed: int = 0
    max_cases: int | None = None
    max_new_tokens: int = 24
    #: what is evaluated: test (seen pairs), held_out, swapped; each of test and held_out also blanked
    splits: list[str] = field(default_factory=lambda: ["test", "held_out", "swapped"])

    def __post_init__(self) -> None:
        unknown = [h for h in self.heads if h not in HEADS]
        if unknown:
            raise ValueError(f"heads {unknown}: the world experiment builds {sorted(HEADS)}")
        if set(self.splits) - {"test", "held_out", "swapped"}:
            raise ValueError(f"splits {self.splits}: choose among test, held_out, swapped")
        if not self.seeds:
            raise ValueError("seeds: give at least one")
        from mim.modeling.mim_model import PARTS

        if unknown := sorted(set(self.stage2_part_learning_rates) - set(PARTS)):
            # said now, not after the parts and the synthesis have run
            raise ValueError(f"stage2_part_learning_rates: unknown part(s) {unknown}; the parts are {list(PARTS)}")


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, record: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return record


# --- data ----------------------------------------------------------------------------------------------


def build_world(plan: WorldPlan) -> dict[str, Path]:
    """Pictures and records: training pairs (with mismatches), calibration pairs, and evaluation
    conversations on new pictures of seen (``test``) and held-out combinations, plus ``test`` with every
    "which" question's pictures reversed (``swapped``)."""
    from synth.world.dialogues import swapped_which, write_conversations
    from synth.world.scenes import read_scenes, write_world

    root, seed = Path(plan.out_dir) / "world", plan.world_seed
    files = {"train": write_world(root / "train", plan.scenes, seed, "train", plan.mismatched),
             "calibration": write_world(root / "calibration", plan.calibration_scenes, seed + 500, "train", 0.5)}
    for name, split, offset in (("test", "train", 1000), ("held_out", "held_out", 2000)):
        scenes = read_scenes(write_world(root / name, plan.eval_scenes, seed + offset, split))
        files[name] = write_conversations(scenes, root / name / "conversations.jsonl", plan.eval_conversations,
                                          seed + offset, prefix=name)
    swapped = root / "test" / "swapped.jsonl"
    records = [json.loads(line) for line in files["test"].read_text().splitlines() if line.strip()]
    atomic_write_text(swapped, "".join(json.dumps(swapped_which(r)) + "\n" for r in records))
    files["swapped"] = swapped
    return files


def build_parts(plan: WorldPlan, files: dict[str, Path]) -> dict[str, Path]:
    """The world LLM, CLIP and vision tower (cached in ``out_dir/parts``)."""
    from synth.model_parts.text_tokenizers import tiny_llama_tokenizer
    from synth.world.dialogues import write_conversations
    from synth.world.parts import (build_world_sdxl, pretrain_clip, pretrain_language_model, pretrain_vision_tower,
                                   world_texts)
    from synth.world.scenes import read_scenes

    parts = Path(plan.out_dir) / "parts"
    train = [s for s in read_scenes(files["train"]).values() if not s.mismatched]
    calibration = list(read_scenes(files["calibration"]).values())

    def llm_texts() -> list[str]:  # built only if the LLM is to be trained
        # the LLM reads the world's text: captions, and dialogues about training pictures (their own draw)
        text_file = write_conversations({s.id: s for s in train}, parts / "llm_dialogues.jsonl",
                                        plan.conversations, plan.world_seed + 7, prefix="text")
        dialogues = [json.loads(line) for line in text_file.read_text().splitlines() if line.strip()]
        return world_texts(train, dialogues, tiny_llama_tokenizer())

    llm = pretrain_language_model(parts / "llm", llm_texts, plan.llm_steps, seed=plan.world_seed,
                                  hidden_size=plan.llm_hidden_size, layers=plan.llm_layers)
    clip = pretrain_clip(parts / "clip", train, files["train"].parent, calibration, files["calibration"].parent,
                         plan.clip_steps, seed=plan.world_seed)
    blip2 = pretrain_vision_tower(parts / "blip2", clip, train, files["train"].parent, plan.tower_steps,
                                  seed=plan.world_seed, train_qformer=plan.pretrain_qformer,
                                  layout_weight=plan.qformer_layout_weight,
                                  caption_weight=plan.qformer_caption_weight)
    sdxl = build_world_sdxl(parts / "sdxl", clip, seed=plan.world_seed)
    return {"llm": llm, "clip": clip, "blip2": blip2, "sdxl": sdxl}


def synthesis_config(plan: WorldPlan, files: dict[str, Path], clip: Path):
    """The world's ``synth run`` config: the training pictures through section 3.1-3.2's stages, the world CLIP
    scoring at its calibrated threshold, the world's composer writing the dialogues."""
    from synth.config import ClusterConfig, FilterConfig, GenerateConfig, IngestConfig, SampleConfig, \
        ScoreConfig, SynthConfig
    from synth.selection.ingest import IngestSource

    threshold = json.loads((clip / "world_threshold.json").read_text())["threshold"]
    options = {"count": plan.scenes, "seed": plan.world_seed, "split": "train", "mismatched": plan.mismatched}
    return SynthConfig(
        work_dir=str(Path(plan.out_dir) / "synth"),
        ingest=IngestConfig(sources=[IngestSource(kind="world", path=str(files["train"].parent), options=options)]),
        score=ScoreConfig(clip={"pretrained": str(clip)}, min_score=threshold, batch_size=128, shard_size=1024,
                          num_workers=0),
        cluster=ClusterConfig(k=plan.clusters, min_cluster_size=plan.min_cluster_size, seed=plan.world_seed),
        sample=SampleConfig(num_groups=plan.conversations, seed=plan.world_seed + 3),
        generate=GenerateConfig(backend="world", world=str(files["train"]), concurrency=64, seed=plan.world_seed),
        filter=FilterConfig())


def synthesize(plan: WorldPlan, files: dict[str, Path], clip: Path) -> dict[str, Any]:
    """``synth run`` on the world (skipping finished stages), the kept pairs for stage 1, and what the match
    filter and the rest of the pipeline kept."""
    from synth.pipeline import run_all, stage_dir
    from synth.world.scenes import read_scenes

    out = Path(plan.out_dir) / "filter"
    if (record := _done(out / "filter.json")) is not None:
        return record
    config = synthesis_config(plan, files, clip)
    run_all(config, log=lambda line: print(line, flush=True))
    scored, kept_ids = _scored_ids(config)
    every_scene = read_scenes(files["train"])
    kept = {i: s for i, s in every_scene.items() if i in kept_ids}
    lines = [json.dumps({**s.record(), "image": f"{s.id}.png"}) + "\n" for s in kept.values()]
    atomic_write_text(out / "pairs.jsonl", "".join(lines))
    # the match filter's figures are over the pairs it scored (ingest drops pictures identical to another)
    scenes = {i: s for i, s in every_scene.items() if i in scored}
    mismatched = [s for s in scenes.values() if s.mismatched]
    generated = json.loads((stage_dir(config, "generate") / "summary.json").read_text())
    filtered = json.loads((stage_dir(config, "filter") / "summary.json").read_text())
    return _write(out / "filter.json", {
        "threshold": config.score.min_score, "pairs": len(scenes), "kept": len(kept),
        "identical_pictures_dropped_by_ingest": len(every_scene) - len(scenes),
        "mismatched": len(mismatched),
        "mismatched_rejected": sum(s.id not in kept_ids for s in mismatched) / max(1, len(mismatched)),
        "matched_kept": sum(s.id in kept_ids for s in scenes.values() if not s.mismatched)
        / max(1, len(scenes) - len(mismatched)),
        "groups": generated["groups"], "conversations": filtered["kept"], "filter_rejections": filtered["reasons"],
        "conversations_file": str(stage_dir(config, "filter") / "conversations.jsonl")})


def _scored_ids(config) -> tuple[set[str], set[str]]:
    """Scene ids of the pairs the score stage scored, and of those that passed its threshold."""
    from synth.data.pairs import read_pairs
    from synth.pipeline import stage_dir
    from synth.selection.embed import load_embeddings

    shards = sorted((stage_dir(config, "score")).glob("shard-*.npz"))
    ids = set(load_embeddings(shards, config.score.min_score)[0].tolist())
    pairs = list(read_pairs(stage_dir(config, "ingest") / "pairs.jsonl"))
    return {Path(p.image).stem for p in pairs}, {Path(p.image).stem for p in pairs if p.id in ids}


# --- training --------------------------------------------------------------------------------------------


def head_config(head: str, plan: WorldPlan | None = None, sdxl: Path | None = None) -> dict[str, Any]:
    """The head's ``class_path`` and, for the MSE heads, their targets: the world SDXL's text encoders (cached
    under ``out_dir/sdxl_targets``) and a Q-Former sized for the world."""
    if head == "language":
        return {"class_path": HEADS[head]}
    if sdxl is None or plan is None:
        raise ValueError(f"the {head} head regresses SDXL text embeddings: give the world SDXL")
    return {"class_path": HEADS[head], "init_args": {
        "sdxl": {"pretrained": str(sdxl)}, "target_cache": str(Path(plan.out_dir) / "sdxl_targets"),
        "hidden_size": plan.mse_hidden_size, "num_layers": plan.mse_layers,
        "num_heads": plan.mse_attention_heads}}


def fit_config(run: Path, stage: str, head: str | dict, steps: int, learning_rate: float,
               models: dict[str, dict], data: dict[str, Any], seed: int, init_from: list[str],
               part_learning_rates: dict[str, float] | None = None, alignment_trains_llm: bool = False
               ) -> dict[str, Any]:
    """A ``mim fit`` config for one run of the experiment: ``models`` are the ``llm`` and ``blip2`` sources
    (the world's parts, or presets), checkpoints and CSV logs under ``run``; ``head`` a name of
    :data:`HEADS` (the language head) or a :func:`head_config`."""
    return {
        "seed_everything": seed,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "log_every_n_steps": 20,
                    "default_root_dir": str(run), "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run), "name": "logs", "version": 0}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True,
                                                 "enable_version_counter": False}}]},
        "model": {"stage": stage, "head": head_config(head) if isinstance(head, str) else head,
                  "llm": models["llm"], "blip2": models["blip2"],
                  "learning_rate": learning_rate, "warmup_ratio": 0.1, "init_from": init_from or None,
                  **({"part_learning_rates": dict(part_learning_rates)} if part_learning_rates else {}),
                  **({"alignment_trains_llm": True} if alignment_trains_llm else {})},
        "data": data,
    }


def fit(run: Path, config: dict[str, Any]) -> Path:
    """One ``mim fit`` run, skipped when done, resumed from ``last.ckpt`` when interrupted."""
    import yaml

    from mim.training_cli import lightning_cli

    done = run / "done.json"
    checkpoint = run / "checkpoints" / "last.ckpt"
    if done.is_file():
        return checkpoint
    run.mkdir(parents=True, exist_ok=True)
    config_file = run / "fit.yaml"
    atomic_write_text(config_file, yaml.safe_dump(config, sort_keys=False))
    args = ["fit", "--config", str(config_file)]
    if checkpoint.is_file():
        args += ["--ckpt_path", str(checkpoint)]
    start = time.perf_counter()
    lightning_cli(args)
    _write(done, {"seconds": round(time.perf_counter() - start, 1), "steps": config["trainer"]["max_steps"]})
    return checkpoint


# --- evaluation ------------------------------------------------------------------------------------------


def caption_retrieval(pairs: list[tuple[Any, dict]], captions: list[str], text_side) -> dict[str, Any] | None:
    """Image generation in conditioning space: for each draw request the model answered with an image, what
    it asked SDXL for (the language head: its caption, through SDXL's text encoders; an MSE head: the pooled
    embedding it predicted) retrieves the requested caption among ``captions`` by cosine similarity of pooled
    embeddings (R@1, R@5). ``text_side``: a pipeline whose ``encode_prompt`` gives SDXL's pooled embedding."""
    import torch

    rows = []
    for case, answer in pairs:
        if not (case.answer and case.answer.get("type") == "draw" and answer.get("images")):
            continue
        caption = (answer.get("descriptions") or [None])[0]
        pooled = (answer.get("pooled") or [None])[0]
        if caption is not None or pooled is not None:
            rows.append((case, caption, pooled))
    if not rows:
        return None

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        vectors = [text_side.encode_prompt(texts[i:i + 256], device="cpu", do_classifier_free_guidance=False)[2]
                   for i in range(0, len(texts), 256)]
        return torch.cat(vectors).float()

    library = sorted(set(captions))
    index = {c: i for i, c in enumerate(library)}
    written = [caption for _, caption, _ in rows if caption is not None]
    from_text = iter(embed(written)) if written else iter(())
    asked = torch.stack([next(from_text) if caption is not None else torch.tensor(pooled, dtype=torch.float32)
                         for _, caption, pooled in rows])
    similarity = torch.nn.functional.normalize(asked, dim=-1) @ torch.nn.functional.normalize(embed(library), dim=-1).T
    ranks = [int((similarity[i] > similarity[i, index[case.answer["answer"]]]).sum())
             for i, (case, _, _) in enumerate(rows)]
    draw_turns = sum(1 for case, _ in pairs if case.answer and case.answer.get("type") == "draw")
    return {"r_at_1": sum(r < 1 for r in ranks) / len(ranks), "r_at_5": sum(r < 5 for r in ranks) / len(ranks),
            "drawn": len(rows), "draw_turns": draw_turns, "captions": len(library),
            "exact_caption": (sum(caption.strip() == case.answer["answer"] for case, caption, _ in rows
                                  if caption is not None) / len(written)) if written else None}


def generation_settings(max_new_tokens: int):
    """How a world MIM answers in evaluation: greedy, one picture a turn at 64 px, two denoising steps (what it
    draws is scored in conditioning space, not in pixels)."""
    from mim.inference.interleaved import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False, max_images=1, image_size=64,
                              num_inference_steps=2)


def evaluate_run(checkpoint: Path, files: dict[str, Path], out: Path, plan: WorldPlan, sdxl: Path
                 ) -> dict[str, Any]:
    """Answer keys on seen and held-out pictures, blanked, and with the "which" pictures reversed; the draw
    requests' conditions retrieved among the split's captions."""
    from mim.evaluation.held_out import ModelResponder, answer_correctness, evaluate_cases, replay_cases
    from mim.evaluation.significance import paired_p
    from mim.modeling.directory import load_model
    from synth.model_parts.sdxl import build_sdxl
    from synth.world.scenes import read_scenes

    if (record := _done(out / "evaluation.json")) is not None:
        return record
    model = load_model(checkpoint).eval()
    # the world SDXL (text encoders: the world CLIP's; UNet untrained): the check is in conditioning space
    pipeline = build_sdxl({"pretrained": str(sdxl)})
    settings = generation_settings(plan.max_new_tokens)
    results: dict[str, Any] = {}
    for name in plan.splits:
        cases, _ = replay_cases([str(files[name])], max_cases=plan.max_cases)
        # the split's own captions are the library a drawn caption must find its request in
        captions = [s.caption for s in read_scenes(files[name].parent / "scenes.jsonl").values()]
        correct: dict[str, bool] = {}  # the split's turns answered right with their pictures
        for blank in ((False, True) if name != "swapped" else (False,)):
            label = f"{name}{'_blank' if blank else ''}"
            metrics = {"correct": answer_correctness}
            if not blank:
                metrics["retrieval"] = lambda pairs: caption_retrieval(pairs, captions, pipeline)
            report = evaluate_cases(cases, ModelResponder(model, pipeline, settings=settings, blank_images=blank),
                                    out / label, metrics=metrics)
            results[label] = {"answers": report["answers"], "drawing": report["drawing"],
                              "retrieval": report.get("retrieval")}
            if blank:  # the control, paired: do the same turns go better with their pictures than without?
                results[label]["pictures_matter"] = paired_p(correct, report["correct"])
            correct = report["correct"]
    return _write(out / "evaluation.json", results)


def export_world_mim(checkpoint: Path, directory: Path, sdxl: Path) -> Path:
    """A MIM directory for ``mim chat`` and ``mim serve``, drawing with the world SDXL (its text encoders are
    the world CLIP's, its UNet untrained: what is drawn is checked in conditioning space, not in pixels)."""
    from mim.modeling.directory import export_checkpoint

    if not (directory / "mim.json").is_file():
        export_checkpoint(str(checkpoint), str(directory), sdxl={"pretrained": str(sdxl)})
    return directory


# --- the report --------------------------------------------------------------------------------------------


def interval(values: list[float]) -> dict[str, float | int]:
    """Mean and the half-width of its 95% t-interval (0 for one seed: no spread measured)."""
    import math

    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "half_width": 0.0, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "half_width": float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)), "n": n}


def summarise(evaluations: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Per head: every measured figure as mean and 95% interval over seeds."""
    summary: dict[str, Any] = {}
    for head, by_seed in evaluations.items():
        runs = list(by_seed.values())
        table: dict[str, Any] = {}
        for label in runs[0]:
            for kind in runs[0][label]["answers"] or {}:
                table[f"{label}/{kind}"] = {
                    **interval([r[label]["answers"][kind]["accuracy"] for r in runs]),
                    "chance": runs[0][label]["answers"][kind]["chance"],
                    "turns": runs[0][label]["answers"][kind]["turns"]}
            f1 = [r[label]["drawing"]["f1"] for r in runs]
            if all(v is not None for v in f1):
                table[f"{label}/draw_f1"] = interval(f1)
            retrieval = [r[label]["retrieval"] for r in runs]
            if all(retrieval):
                table[f"{label}/r_at_1"] = interval([v["r_at_1"] for v in retrieval])
                table[f"{label}/r_at_5"] = interval([v["r_at_5"] for v in retrieval])
        summary[head] = table
    return summary


def blank_controls(evaluations: dict[str, dict[int, dict]]) -> dict[str, dict[str, list[float]]]:
    """Per head and split, each seed's exact one-sided p-value that the pictures change nothing (the same
    turns answered with and without them, :func:`paired_p`)."""
    return {head: {label.removesuffix("_blank"): [run[label]["pictures_matter"]["p"] for run in by_seed.values()]
                   for label in next(iter(by_seed.values())) if label.endswith("_blank")
                   and all("pictures_matter" in run[label] for run in by_seed.values())}
            for head, by_seed in evaluations.items()}


def head_comparison(summary: dict[str, Any]) -> dict[str, Any]:
    """What the ablation says about the paper's finding (section 5.1: the MSE heads generalise poorly, the
    language description works), read from the 95% intervals: for image generation on held-out colour-shape
    pairs (R@1, the finding's measure) and on seen ones, and for answer accuracy over every type, whether the
    language head is above each MSE head (intervals apart), below it, or not told apart."""
    if "language" not in summary:
        return {"verdict": "the language head was not run: nothing to compare"}
    measures = {"held_out/r_at_1": "image generation, held-out pairs (R@1)",
                "test/r_at_1": "image generation, seen pairs (R@1)", "held_out/all": "answers, held-out pairs",
                "test/all": "answers, seen pairs"}
    rows: dict[str, dict[str, str]] = {}
    for key, name in measures.items():
        language = summary["language"].get(key)
        for head, table in summary.items():
            other = table.get(key)
            if head == "language" or language is None or other is None:
                continue
            low, high = language["mean"] - language["half_width"], language["mean"] + language["half_width"]
            other_low, other_high = other["mean"] - other["half_width"], other["mean"] + other["half_width"]
            verdict = ("language above" if low > other_high else "language below" if high < other_low
                       else "not told apart")
            rows.setdefault(name, {})[head] = (f"{verdict} ({language['mean']:.2f} +- {language['half_width']:.2f} "
                                               f"vs {other['mean']:.2f} +- {other['half_width']:.2f})")
    held_out = rows.get(measures["held_out/r_at_1"], {})
    if held_out and all(v.startswith("language above") for v in held_out.values()):
        verdict = "holds here: the language head generalises to held-out pairs better than every MSE head"
    elif any(v.startswith("language below") for v in held_out.values()):
        verdict = "does not hold here: an MSE head generalises to held-out pairs better than the language head"
    elif held_out:
        verdict = "not answered at this budget: the heads' held-out R@1 intervals overlap"
    else:
        verdict = "not answered: no head drew on held-out pairs"
    return {"verdict": verdict, "by_measure": rows}


TARGETS = {"attribute accuracy (colour, shape, count, position)": ">= 0.90", "which": ">= 0.90",
           "blank control": "within 0.10 of chance", "draw F1": ">= 0.95", "R@1 (seen)": ">= 0.80"}


def write_report(out: Path, plan: WorldPlan, summary: dict[str, Any], steps: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparison = head_comparison(summary)
    _write(out / "report.json", {"plan": asdict(plan), "summary": summary, "steps": steps,
                                 "head_comparison": comparison})
    lines = ["# The world experiment", "",
             f"{len(plan.seeds)} seed(s) per head; each cell is the mean over seeds and its 95% t-interval "
             "(+- half-width). Chance is one over the number of choices.", "",
             f"Match filter (world CLIP, threshold {steps['filter']['threshold']}): kept "
             f"{steps['filter']['matched_kept']:.3f} of matched pairs, rejected "
             f"{steps['filter']['mismatched_rejected']:.3f} of mismatched ones.", ""]
    if steps.get("clip_prefers_own_caption"):  # what the world CLIP tells apart (chance 0.5)
        lines += ["World CLIP: a calibration picture scores its own caption above the same caption with one word "
                  "changed (chance 0.50): " + ", ".join(f"{word} {share:.2f}" for word, share
                                                         in steps["clip_prefers_own_caption"].items()) + ".", ""]
    columns = ("test", "held_out", "test_blank", "held_out_blank", "swapped")
    names = {"test": "seen", "held_out": "held-out pairs", "test_blank": "seen, blanked",
             "held_out_blank": "held-out, blanked", "swapped": "seen, pictures swapped"}
    for head, table in summary.items():
        rows = sorted({key.split("/", 1)[1] for key in table}, key=lambda r: (r in ("all",) or "_" in r, r))
        lines += [f"## {head}", "", "| measure | chance | " + " | ".join(names[c] for c in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for row in rows:
            cells = [table.get(f"{column}/{row}") for column in columns]
            chance = next((f"{c['chance']:.2f}" for c in cells if c and "chance" in c), "-")
            lines.append(f"| {row} | {chance} | " + " | ".join(
                f"{c['mean']:.2f} +- {c['half_width']:.2f}" if c else "-" for c in cells) + " |")
        lines.append("")
    controls = steps.get("pictures_matter") or {}
    if controls:
        lines += ["## Do the answers come from the pictures?", "",
                  "Each seed's exact one-sided McNemar p-value that the same turns go no better with their "
                  "pictures than with them blanked:", ""]
        lines += [f"- {head}, {split}: " + ", ".join(f"{p:.1g}" for p in values)
                  for head, by_split in controls.items() for split, values in by_split.items()]
        lines.append("")
    lines += ["## The heads compared (the paper's finding, section 5.1)", "",
              f"The paper's finding (the MSE heads generalise poorly, the language description works) "
              f"{comparison['verdict']}.", ""]
    for measure, by_head in comparison.get("by_measure", {}).items():
        lines += [f"- {measure}: " + "; ".join(f"{head}: {text}" for head, text in by_head.items())]
    lines += ["", "## Targets (issue 21)", "", *[f"- {k}: {v}" for k, v in TARGETS.items()], "",
              "![accuracy by question type](accuracy.png)", "",
              f"Wall time: {steps['seconds']:.0f} s.", ""]
    figure, axis = plt.subplots(figsize=(9, 3.5), dpi=100)
    width = 0.8 / max(1, 3 * len(summary))
    for h, (head, table) in enumerate(summary.items()):
        kinds = sorted({k.split("/")[1] for k in table if k.startswith("test/") and "chance" in table[k]})
        for s, label in enumerate(("test", "held_out", "test_blank")):
            cells = [table.get(f"{label}/{k}", {"mean": 0, "half_width": 0}) for k in kinds]
            axis.bar([i + (3 * h + s) * width for i in range(len(kinds))], [c["mean"] for c in cells], width,
                     yerr=[c["half_width"] for c in cells], label=f"{head} {label}")
        axis.scatter([i + width for i in range(len(kinds))],
                     [table[f"test/{k}"]["chance"] for k in kinds], marker="_", s=400, color="black",
                     label="chance" if h == 0 else None, zorder=3)
        axis.set_xticks([i + width for i in range(len(kinds))], kinds)
    axis.set_ylabel("answer accuracy")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "accuracy.png")
    plt.close(figure)
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"


def _clip_preference(clip: Path) -> dict[str, float] | None:
    """The world CLIP's word-change check, as its marker records it (None for a part trained before it was)."""
    from synth.world.parts import MARKER

    return json.loads((clip / MARKER).read_text()).get("prefers_own_caption")


def run_world(plan: WorldPlan) -> Path:
    """Every step of the experiment, each skipped when its result is on disk; returns the report's path."""
    start = time.perf_counter()
    out = Path(plan.out_dir)
    files = build_world(plan)
    parts = build_parts(plan, files)
    filtered = synthesize(plan, files, parts["clip"])
    preference = _clip_preference(parts["clip"])
    if preference:
        print(f"world CLIP: a picture prefers its own caption over one with a word changed: {preference}", flush=True)
    print(f"world: match filter kept {filtered['kept']} of {filtered['pairs']} pairs "
          f"(rejected {filtered['mismatched_rejected']:.1%} of the mismatched); {filtered['conversations']} "
          f"conversations synthesized from {filtered['groups']} groups", flush=True)
    pairs_file = str(out / "filter" / "pairs.jsonl")
    models = {part: {"pretrained": str(parts[part])} for part in ("llm", "blip2")}
    # stage 1 trains no head (section 5.2): one run, shared by every head, as the paper's
    stage1 = None if not plan.stage1_steps else fit(out / "stage1", fit_config(
        out / "stage1", "alignment", "language", plan.stage1_steps, plan.stage1_learning_rate, models,
        {"class_path": "datamodules.CaptionDataModule",
         "init_args": {"train": [pairs_file], "image_root": str(files["train"].parent), "batch_size": 16,
                       "num_workers": 0}}, plan.world_seed, [], alignment_trains_llm=plan.stage1_trains_llm))
    evaluations: dict[str, dict[int, dict]] = {}
    for name in plan.heads:
        head = head_config(name, plan, parts["sdxl"])
        for seed in plan.seeds:
            run = out / "runs" / f"{name}-seed{seed}"
            init = [str(stage1)] if stage1 else []
            if plan.head_steps:
                pretrained = fit(run / "head", fit_config(
                    run / "head", "head", head, plan.head_steps, plan.head_learning_rate, models,
                    {"class_path": "datamodules.CaptionDataModule",
                     "init_args": {"train": [pairs_file], "image_root": str(files["train"].parent),
                                   "task": "generate", "batch_size": 16, "num_workers": 0, "seed": seed}},
                    seed, init))
                init.append(str(pretrained))
            checkpoint = fit(run / "stage2", fit_config(
                run / "stage2", "instruction", head, plan.stage2_steps, plan.stage2_learning_rate, models,
                {"class_path": "datamodules.ConversationDataModule",
                 "init_args": {"train": [{"path": filtered["conversations_file"]}],
                               "batch_size": plan.batch_size, "num_workers": 0, "seed": seed}}, seed, init,
                plan.stage2_part_learning_rates))
            evaluations.setdefault(name, {})[seed] = evaluate_run(checkpoint, files, run / "eval", plan,
                                                                  parts["sdxl"])
            export_world_mim(checkpoint, out / "mim" / f"{name}-seed{seed}", parts["sdxl"])
    report = write_report(out, plan, summarise(evaluations),
                          {"filter": filtered, "pictures_matter": blank_controls(evaluations),
                           "clip_prefers_own_caption": preference,
                           "seconds": time.perf_counter() - start})
    print(f"world report: {report}")
    return report


def world(plan: WorldPlan) -> int:
    """Run the world experiment: world, parts, match filter, stage 1, heads x seeds, evaluation, report.
    Resumable: rerun the same command after an interruption; a step whose result is on disk is skipped.

    ``mim world --config configs/world/experiment.yaml`` (its ``plan:`` holds :class:`WorldPlan`'s fields);
    any field is a flag too, e.g. ``--plan.seeds '[0]'`` or ``--plan.out_dir runs/world-b``.

    Args:
        plan: the experiment's sizes, budgets, heads and seeds.
    """
    run_world(plan)
    return 0
