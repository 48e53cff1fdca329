"""Runs the synthesis stages in order, skipping finished ones.

Layout of a run's ``work_dir``::

    ingest/   pairs.jsonl  rejected.jsonl  summary.json  DONE.json
    score/    shard-000000.npz ...                       DONE.json
    cluster/  assignments.npz  clusters.json  centroids.npy  DONE.json
    sample/   groups.jsonl  summary.json                 DONE.json
    generate/ generations.jsonl  failures.jsonl  summary.json  DONE.json
    filter/   conversations.jsonl  images/  rejected.jsonl  summary.json  DONE.json
    stats/    stats.json  table.txt  *.png                DONE.json

A stage is finished when its ``DONE.json`` exists; it records the settings
the stage ran with (its own and every earlier stage's). Rerunning with other
settings is refused, naming what changed, unless ``force`` redoes the stage
and everything after it. An unfinished stage resumes from what it wrote
(the score stage keeps its finished shards).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from synth.atomic import atomic_path, atomic_write_text
from synth.config import SynthConfig
from synth.data.pairs import read_pairs

STAGES = ("ingest", "score", "cluster", "sample", "generate", "filter", "stats")
#: The config sections each stage's output depends on (its own and those upstream).
_SECTIONS = ("ingest", "score", "cluster", "sample", "generate", "filter")
_INPUTS = {stage: list(_SECTIONS[:min(index, len(_SECTIONS) - 1) + 1]) for index, stage in enumerate(STAGES)}
#: Settings that change how fast or how patiently a stage runs, never what it writes.
_SPEED_ONLY = {"score": {"batch_size", "num_workers"},
               "generate": {"concurrency", "requests_per_minute", "tokens_per_minute", "max_attempts",
                            "backoff_seconds", "max_backoff_seconds", "timeout", "api_key_env", "prices",
                            "tokenizer", "expected_completion_tokens", "max_cost", "max_tokens_total",
                            "max_consecutive_failures", "batch_size", "device"}}


def fingerprint(config: SynthConfig, stage: str) -> dict[str, Any]:
    sections = {}
    for name in _INPUTS[stage]:
        section = asdict(getattr(config, name))
        for key in _SPEED_ONLY.get(name, ()):
            section.pop(key, None)
        if name == "generate" and section.get("structured") is None:
            # free text: the structured settings change nothing, and runs made before they existed still match
            for key in ("structured", "grammar_field", "structured_turns", "structured_text_chars"):
                section.pop(key, None)
        sections[name] = section
    return json.loads(json.dumps(sections))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)]
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


class StageMismatch(RuntimeError):
    pass


class EmptyStageError(RuntimeError):
    """A stage that had input produced nothing from it: what it wrote says why (rejections, failures)."""


class StageIncomplete(RuntimeError):
    """A stage stopped cleanly before finishing (a budget was reached); rerunning it continues."""


def stage_dir(config: SynthConfig, stage: str) -> Path:
    return config.work_path / stage


def is_done(config: SynthConfig, stage: str) -> bool:
    marker = stage_dir(config, stage) / "DONE.json"
    if not marker.exists():
        return False
    recorded = json.loads(marker.read_text())["fingerprint"]
    changed = _differences(recorded, fingerprint(config, stage))
    if changed:
        raise StageMismatch(
            f"{marker.parent} was made with other settings ({'; '.join(changed)}). Use --force to redo "
            f"'{stage}' and the stages after it, or choose another work_dir.")
    return True


def _mark_done(config: SynthConfig, stage: str, summary: dict[str, Any], seconds: float) -> None:
    atomic_write_text(stage_dir(config, stage) / "DONE.json", json.dumps(
        {"fingerprint": fingerprint(config, stage), "seconds": round(seconds, 3), "summary": summary}, indent=2))


def _outstanding(config: SynthConfig, stage: str) -> int:
    """Groups a finished generate stage still owes (failed last time): a rerun retries them."""
    if stage != "generate":
        return 0
    summary = json.loads((stage_dir(config, stage) / "DONE.json").read_text())["summary"]
    return int(summary.get("outstanding", 0))


def _require(config: SynthConfig, stage: str) -> None:
    earlier = STAGES[STAGES.index(stage) - 1]
    if not is_done(config, earlier):
        raise RuntimeError(f"stage '{stage}' needs '{earlier}' first: run `synth {earlier}` or `synth run`")


# --- the stages -----------------------------------------------------------------------

def run_ingest(config: SynthConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from synth.selection.ingest import ingest, write_ingest

    section = config.ingest
    result = ingest(section.sources, section.verify_images, section.max_caption_chars, section.max_image_pixels)
    write_ingest(result, stage_dir(config, "ingest"))
    summary = result.summary()
    if not result.pairs:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary["reasons"].items()) or "the sources held nothing"
        raise EmptyStageError(f"ingest kept no pair ({reasons}); see {stage_dir(config, 'ingest') / 'rejected.jsonl'}")
    return summary


def run_score(config: SynthConfig, log: Callable[[str], None] = print,
              on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    from synth.selection.embed import Ranks, embed_pairs, load_shard

    _require(config, "score")
    pairs = list(read_pairs(stage_dir(config, "ingest") / "pairs.jsonl"))
    section = config.score
    paths = embed_pairs(pairs, stage_dir(config, "score"), section.clip, section.batch_size, section.shard_size,
                        section.num_workers, section.store_dtype, on_batch=on_batch)
    if Ranks.from_environment().rank != 0:
        return {}
    shards = [load_shard(path) for path in paths]
    scores = np.concatenate([shard["scores"] for shard in shards]) if shards else np.zeros(0)
    unreadable = [str(i) for shard in shards if "unreadable" in shard for i in shard["ids"][shard["unreadable"]]]
    finite = scores[np.isfinite(scores)]
    summary = {"pairs": int(len(scores)), "shards": len(paths), "kept": int((scores >= section.min_score).sum()),
               "min_score": section.min_score, "unreadable": len(unreadable), "unreadable_ids": unreadable[:20],
               "score_quantiles": {q: round(float(np.quantile(finite, q)), 2) for q in (0.1, 0.5, 0.9)}
               if len(finite) else {}}
    if pairs and not summary["kept"]:
        raise EmptyStageError(
            f"score: none of {len(pairs)} pairs scored >= min_score={section.min_score} ({len(unreadable)} did not "
            f"decode); lower score.min_score (random CLIP weights score near 0) or check the pairs")
    return summary


def run_cluster(config: SynthConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from synth.selection.cluster import kmeans
    from synth.selection.embed import load_embeddings

    _require(config, "cluster")
    shards = sorted(stage_dir(config, "score").glob("shard-*.npz"))
    ids, scores, embeddings, total = load_embeddings(shards, config.score.min_score)
    section = config.cluster
    result = kmeans(embeddings, section.k, section.min_cluster_size, section.niter, section.seed, section.spherical,
                    section.nredo)
    out = stage_dir(config, "cluster")
    with atomic_path(out / "assignments.npz") as temporary, temporary.open("wb") as handle:
        np.savez(handle, ids=ids, clusters=result.assignments, distances=result.distances, scores=scores)
    with atomic_path(out / "centroids.npy") as temporary, temporary.open("wb") as handle:
        np.save(handle, result.centroids)
    summary = {"pairs_scored": total, "pairs_kept": int(len(ids)), "k": section.k,
               # FAISS advises at least 39 points per cluster; the paper's CC3M run has ~700 (section 4.1)
               "points_per_cluster": round(len(ids) / section.k, 1),
               "clusters_kept": int(result.kept.sum()), "images_in_kept_clusters": int(result.sizes[result.kept].sum()),
               "inertia": result.inertia}
    atomic_write_text(out / "clusters.json", json.dumps(
        {**summary, "sizes": result.sizes.tolist(), "kept": np.flatnonzero(result.kept).tolist()}, indent=1))
    return summary


def run_sample(config: SynthConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from synth.selection.sampling import sample_groups

    _require(config, "sample")
    out = stage_dir(config, "cluster")
    with np.load(out / "assignments.npz") as data:
        ids, assignments = data["ids"].tolist(), data["clusters"]
    kept = json.loads((out / "clusters.json").read_text())["kept"]
    section = config.sample
    groups = sample_groups(ids, assignments, kept, section.num_groups, section.group_sizes, section.seed)
    pairs = {pair.id: pair for pair in read_pairs(stage_dir(config, "ingest") / "pairs.jsonl")}
    lines = [json.dumps({"group_id": g.group_id, "cluster": g.cluster,
                         "pairs": [{"id": i, "image": pairs[i].image, "caption": pairs[i].caption}
                                   for i in g.pair_ids]}, ensure_ascii=False) + "\n" for g in groups]
    atomic_write_text(stage_dir(config, "sample") / "groups.jsonl", "".join(lines))
    sizes = {str(n): sum(len(g.pair_ids) == n for g in groups) for n in section.group_sizes}
    summary = {"groups": len(groups), "requested": section.num_groups, "groups_by_size": sizes,
               "clusters_used": len({g.cluster for g in groups})}
    atomic_write_text(stage_dir(config, "sample") / "summary.json", json.dumps(summary, indent=2))
    return summary


def structured_constraint(section) -> Callable[[list[str]], Any] | None:
    """``generate.structured`` as a function of a group's captions (None when off)."""
    from synth.generation.structured import dialogue_constraint

    if section.structured is None:
        return None
    low, high = section.structured_turns
    return lambda captions: dialogue_constraint(section.structured, captions, low, high, section.structured_text_chars)


def run_generate(config: SynthConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    import asyncio

    from synth.generation.endpoint import estimate_record, forecast, open_endpoint, send
    from synth.generation.generate import group_request, pending_groups, read_done, read_groups
    from synth.generation.prompt import SEED_SET_FILE, read_seed_set

    _require(config, "generate")
    section = config.generate
    groups = read_groups(stage_dir(config, "sample") / "groups.jsonl")
    out = stage_dir(config, "generate")
    seeds = read_seed_set(section.seed_set or SEED_SET_FILE)
    endpoint = open_endpoint(section)
    requests = [group_request(group, seeds, section.num_examples, section.seed, structured_constraint(section))
                for group in pending_groups(groups, out)]
    plan = forecast(endpoint, section, [request.prompt for request in requests])
    if not endpoint.offline:
        log(f"[generate] before the run: {plan.describe(endpoint.model)}")
    tally, this_run = asyncio.run(send(endpoint, section, requests, out / "generations.jsonl",
                                       out / "failures.jsonl", len(groups), "generate", "group"))
    generated = len(read_done(out / "generations.jsonl"))
    from synth.review.filtering import FilterRules, format_adherence

    adherence = format_adherence(out / "generations.jsonl", FilterRules(**asdict(config.filter))) \
        if (out / "generations.jsonl").exists() else {}
    price = endpoint.price
    summary = {"groups": len(groups), "generated": generated, "outstanding": len(groups) - generated,
               "this_run": this_run, "backend": section.backend, "model": endpoint.model, "format": adherence,
               "estimate": estimate_record(plan),
               "price_per_million_tokens": None if price is None else {"prompt": price.prompt,
                                                                        "completion": price.completion}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if tally.stopped == "budget":
        raise StageIncomplete(
            f"generate stopped: this run's budget is reached (max_cost={section.max_cost}, max_tokens_total="
            f"{section.max_tokens_total}) after {tally.generated} group(s); {summary['outstanding']} remain. Rerun "
            "`synth generate` (or `synth run`) to continue; every finished group is kept.")
    if groups and not generated:
        errors = ", ".join(f"{kind}: {count}" for kind, count in sorted(tally.errors.items())) or "none recorded"
        raise EmptyStageError(f"generate: none of {len(groups)} groups was generated (errors: {errors}); see "
                              f"{out / 'failures.jsonl'}")
    return summary


def run_filter(config: SynthConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from synth.review.filtering import FilterRules, filter_generations

    _require(config, "filter")
    return filter_generations(stage_dir(config, "generate") / "generations.jsonl", stage_dir(config, "filter"),
                              FilterRules(**asdict(config.filter)))


def run_stats(config: SynthConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from synth.data.conversation_io import read_conversations
    from synth.statistics.plots import plot_counts, plot_image_positions
    from synth.statistics.stats import conversation_diversity, dataset_stats, describe, image_positions, quality_indicators

    _require(config, "stats")
    conversations, _ = read_conversations(stage_dir(config, "filter") / "conversations.jsonl")
    filtered = json.loads((stage_dir(config, "filter") / "summary.json").read_text())
    out = stage_dir(config, "stats")
    report: dict[str, Any] = {"rejections": filtered["reasons"], "kept": filtered["kept"],
                              "rejected": filtered["rejected"], "by_model": filtered.get("by_model", {})}
    if conversations:
        report |= {"table3": dataset_stats(conversations).as_dict(),
                   "diversity": conversation_diversity(conversations),
                   "image_positions": image_positions(conversations), "indicators": quality_indicators(conversations)}
        text = describe(conversations)
        plot_image_positions(report["image_positions"], out / "image_positions.png")
        plot_counts(report["indicators"]["turns_distribution"], "Turns per conversation", "turns",
                    out / "turns.png")
    else:
        text = "No conversation survived the filter.\n"
    text += "Rejected: " + (", ".join(f"{k} {v}" for k, v in filtered["reasons"].items()) or "none") + "\n"
    for name, counts in report["by_model"].items():  # format adherence of each model that wrote dialogues
        reasons = ", ".join(f"{k} {v}" for k, v in counts["reasons"].items()) or "none"
        text += (f"Model {name}: kept {counts['kept']} of {counts['generations']} "
                 f"({100 * counts['kept_share']:.1f}%); rejected: {reasons}\n")
    if filtered["reasons"]:
        plot_counts(filtered["reasons"], "Rejection reasons", "reason", out / "rejections.png")
    reviews_path = config.work_path / "review" / "reviews.jsonl"
    if reviews_path.exists():  # `synth review` ran: the judge's labels, as the paper's Figure 3 and Tables 4-5
        from synth.review.judge import read_reviews, summarize_reviews, summary_table

        report["review"] = summarize_reviews(conversations, read_reviews(reviews_path), _annotations(config))
        text += "Review: " + summary_table(report["review"])
        if report["review"]["judged"]:
            plot_counts({k: v["count"] for k, v in report["review"]["quality"].items()}, "Quality (judge)",
                        "label", out / "quality.png")
    atomic_write_text(out / "stats.json", json.dumps(report, indent=2))
    atomic_write_text(out / "table.txt", text)
    print(text, end="")
    return {"conversations": len(conversations), "plots": sorted(p.name for p in out.glob("*.png"))}


def _annotations(config: SynthConfig) -> list[dict[str, Any]]:
    """The labels people gave in ``synth annotate`` (none when it was not run)."""
    path = config.work_path / "annotate" / "annotations.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if isinstance(row, dict) and "id" in row and "quality" in row]


def run_review(config: SynthConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``synth review``: the judge's verdicts on the filter's conversations (synth.review.judge); resumable."""
    import asyncio

    from synth.data.conversation_io import read_conversations, write_conversations
    from synth.generation.endpoint import estimate_record, forecast, open_endpoint, send
    from synth.review.filtering import IMAGE_DIR
    from synth.review.judge import RUBRIC_FILE, read_reviews, review_requests, summarize_reviews, summary_table

    section = config.review
    kept = stage_dir(config, "filter") / "conversations.jsonl"
    if not kept.exists():
        raise RuntimeError(f"synth review judges the filter's conversations, and {kept} does not exist: run "
                           "`synth filter` (or `synth run`) first")
    if section.backend == "offline":
        raise ValueError("review.backend: there is no offline judge; use openai (any OpenAI-compatible endpoint) "
                         "or local")
    rubric_path = Path(section.rubric) if section.rubric else RUBRIC_FILE
    rubric = rubric_path.read_text(encoding="utf-8")
    if "{dialogue}" not in rubric:
        raise ValueError(f"review.rubric {rubric_path}: the rubric must contain {{dialogue}} (and may contain "
                         "{images}) where the conversation goes")
    conversations, _ = read_conversations(kept)
    out = config.work_path / "review"
    reviews = read_reviews(out / "reviews.jsonl")
    pending = [c for c in conversations if not (reviews.get(c.id) or {}).get("verdict")]
    requests = review_requests(pending, rubric, section.structured, section.seed)
    endpoint = open_endpoint(section)
    plan = forecast(endpoint, section, [request.prompt for request in requests])
    log(f"[review] before the run: {plan.describe(endpoint.model, 'review')}")
    tally, this_run = asyncio.run(send(endpoint, section, requests, out / "reviews.jsonl", out / "failures.jsonl",
                                       len(conversations), "review", "conversation"))
    reviews = read_reviews(out / "reviews.jsonl")
    summary = {**summarize_reviews(conversations, reviews, _annotations(config)), "judge": endpoint.model,
               "backend": section.backend, "rubric": str(rubric_path), "structured": section.structured,
               "this_run": this_run, "estimate": estimate_record(plan)}
    if section.keep:
        chosen = [c for c in conversations if (reviews.get(c.id) or {}).get("verdict")
                  and reviews[c.id]["verdict"]["quality"] in section.keep]
        chosen = [replace(c, meta={**(c.meta or {}), "review": reviews[c.id]["verdict"]}) for c in chosen]
        for name in sorted({name for c in chosen for name in c.images}):  # the images beside them, as the filter
            target = out / IMAGE_DIR / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                source = stage_dir(config, "filter") / IMAGE_DIR / name
                try:
                    os.link(source, target)
                except OSError:  # another file system: a copy
                    shutil.copyfile(source, target)
        write_conversations(out / "conversations.jsonl", chosen)
        summary["kept"] = {"labels": list(section.keep), "conversations": len(chosen)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "table.txt", summary_table(summary))
    log(summary_table(summary).rstrip())
    if tally.stopped == "budget":
        raise StageIncomplete(f"review stopped: this run's budget is reached (max_cost={section.max_cost}, "
                              f"max_tokens_total={section.max_tokens_total}); {summary['pending']} conversation(s) "
                              "remain. Rerun `synth review` to continue; every verdict is kept.")
    return summary


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "ingest": run_ingest, "score": run_score, "cluster": run_cluster, "sample": run_sample,
    "generate": run_generate, "filter": run_filter, "stats": run_stats}


def run_stage(config: SynthConfig, stage: str, force: bool = False, log: Callable[[str], None] = print) -> bool:
    """Run one stage unless it is finished; return whether it ran. ``force`` redoes it and invalidates later ones."""
    from synth.selection.embed import Ranks

    ranks = Ranks.from_environment()
    if ranks.world > 1 and stage != "score":
        raise RuntimeError(f"only the score stage runs on several processes (torchrun); run `synth {stage}` "
                           "as a single process, before (ingest) or after (cluster, sample) the torchrun job")
    if force and ranks.world > 1:
        raise RuntimeError("--force deletes outputs; do that in a single-process run, not under torchrun")
    if force:
        for later in STAGES[STAGES.index(stage):]:
            (stage_dir(config, later) / "DONE.json").unlink(missing_ok=True)
        shutil.rmtree(stage_dir(config, stage), ignore_errors=True)
    elif is_done(config, stage) and not _outstanding(config, stage):
        log(f"[{stage}] already done, skipping ({stage_dir(config, stage)})")
        return False
    for later in STAGES[STAGES.index(stage) + 1:]:  # whatever was built on this stage's old output is stale
        (stage_dir(config, later) / "DONE.json").unlink(missing_ok=True)
    stage_dir(config, stage).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = RUNNERS[stage](config, log=log)
    if ranks.rank == 0:
        _mark_done(config, stage, summary, time.perf_counter() - start)
        log(f"[{stage}] done in {time.perf_counter() - start:.1f} s: {json.dumps(summary)}")
    return True


def produced_nothing(config: SynthConfig) -> list[str]:
    """Finished stages that made nothing from their input (the filter kept no conversation): each a
    message for the user. Such a stage is still finished, so that stats can report why, but the
    command that ran it exits non-zero."""
    marker = stage_dir(config, "filter") / "DONE.json"
    if not marker.exists():
        return []
    summary = json.loads(marker.read_text())["summary"]
    if summary.get("generations") and not summary.get("kept"):
        reasons = ", ".join(f"{k}: {v}" for k, v in summary.get("reasons", {}).items())
        return [f"filter kept none of {summary['generations']} generations ({reasons}); see "
                f"{stage_dir(config, 'filter') / 'rejected.jsonl'}"]
    return []


def run_all(config: SynthConfig, force: bool = False, until: str = STAGES[-1],
            log: Callable[[str], None] = print) -> list[str]:
    """Run every stage up to ``until``; return the stages that ran. ``force`` redoes them all."""
    ran = []
    for stage in STAGES[:STAGES.index(until) + 1]:
        if run_stage(config, stage, force=force and stage == STAGES[0], log=log):
            ran.append(stage)
    return ran
