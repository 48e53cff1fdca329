"""Run a MIM on the interleaved-generation benchmarks and score it: answers first (resumable, a record that
fails costs only itself), then the judge (resumable, a reply that cannot be read is a recorded failure).

Layout under ``out_dir``::

    opening/gen_outputs/<MODEL>_output/<uid>.json (+ <uid>-o-<k>.jpg)   what OpenING's judge scripts read
    opening/data_instance_modelAB.json, opening/judge_modelAB_results.json   battles and verdicts
    isg/answers.jsonl (+ isg/images/)                                     what ISG-eval.py --input_file reads
    isg/judged.jsonl                                                      ISG-eval.py's output, one item a line
    */failures.jsonl                                                      records that could not be answered
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mim.evaluation.cases import Case, RecordError, generate_isolated
from mim.evaluation.interleaved import isg as isg_bench
from mim.evaluation.interleaved import opening as opening_bench
from mim.evaluation.interleaved.judge import Judge, judge_prompt
from synth.atomic import atomic_write_text


def answer_prompts(prompts: list[tuple[str, str, list[Path]]], responder, save: Callable[[str, Any], None],
                   failures: Path, batch_size: int = 8, seed: int = 0, desc: str = "answer") -> dict[str, int]:
    """Answer each ``(key, user message, its images)`` as one user turn; ``save(key, result)`` keeps an answer,
    and a record that cannot be answered (too long, a bad image, a failed generation) goes to ``failures``."""
    answered = failed = 0
    with tqdm(total=len(prompts), desc=desc, unit="item") as progress:
        for start in range(0, len(prompts), batch_size):
            batch = [Case(key, key, 1, [{"role": "user", "content": text, "images": [str(p) for p in images]}], "")
                     for key, text, images in prompts[start:start + batch_size]]
            for case, outcome in zip(batch, generate_isolated(responder.respond, batch, [seed] * len(batch))):
                if isinstance(outcome, RecordError):
                    failures.parent.mkdir(parents=True, exist_ok=True)
                    with open(failures, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps({"id": case.key, "error": str(outcome)}) + "\n")
                    failed += 1
                else:
                    save(case.key, outcome)
                    answered += 1
            progress.update(len(batch))
    return {"answered_now": answered, "failed_now": failed}


def run_opening(data: str | Path, responder, out_dir: str | Path, judge: Judge | None = None,
                model_name: str = "MIM", opponents: dict[str, str] | None = None, battles_per_instance: int = 1,
                prompts_dir: str | Path | None = None, max_items: int | None = None, batch_size: int = 8,
                seed: int = 0
                ) -> dict[str, Any]:
    """OpenING: answer every instance of ``data`` (``test_data.jsonl``), then, with a judge, battle the model
    against the human reference (and ``opponents``: name -> a ``<MODEL>_output`` folder) and report win rates.
    ``prompts_dir``: a folder whose ``opening_pairwise.txt`` replaces our judge prompt."""
    out = Path(out_dir) / "opening"
    instances, rejected = opening_bench.load_opening(data)
    instances = instances[:max_items] if max_items is not None else instances
    answers = out / "gen_outputs" / f"{opening_bench.check_model_name(model_name)}_output"
    by_uid = {instance.uid: instance for instance in instances}
    todo = [(i.uid, *opening_bench.instance_message(i)) for i in instances if not (answers / f"{i.uid}.json").is_file()]
    counts = answer_prompts(todo, responder, lambda uid, result: opening_bench.write_opening_answer(
        by_uid[uid], result, answers), out / "failures.jsonl", batch_size, seed, "OpenING")
    report: dict[str, Any] = {"instances": len(instances), "rejected": len(rejected), "rejections": rejected[:5],
                              "answered": sum((answers / f"{i.uid}.json").is_file() for i in instances), **counts,
                              "answers": str(answers)}
    if judge is None:
        report["win_rates"] = None
        report["note"] = "answers written; no judge given (--judge_model), so nothing was judged"
        return report
    models: dict[str, str | Path | None] = {model_name: answers, opening_bench.HUMAN: None, **(opponents or {})}
    battles_path = out / "data_instance_modelAB.json"
    battles = json.loads(battles_path.read_text(encoding="utf-8")) if battles_path.is_file() else []
    if not battles:  # drawn once, so a rerun judges the same pairs
        battles = opening_bench.sample_battles(instances, models, battles_per_instance, seed)
        atomic_write_text(battles_path, json.dumps(battles, indent=2))
    battles = [b for b in battles if b["data_id"] in by_uid and b["model_A"]["name"] in models
               and b["model_B"]["name"] in models]
    results = opening_bench.judge_battles(battles, instances, models, judge, out / "judge_modelAB_results.json",
                                          judge_prompt("opening_pairwise", prompts_dir), seed)
    report.update(battles=len(battles), judged=len(results), win_rates=opening_bench.win_rates(results))
    return report


def run_isg(data: str | Path, responder, out_dir: str | Path, judge: Judge | None = None,
            root: str | Path | None = None, prompts_dir: str | Path | None = None, dependencies: str = "released",
            max_items: int | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """ISG-Bench: answer every item of ``data`` (``ISG-Bench.jsonl``; images under ``root``, default its
    folder), score the structure level, and with a judge the block, image and holistic levels."""
    out = Path(out_dir) / "isg"
    items, rejected = isg_bench.load_isg(data, root)
    items = items[:max_items] if max_items is not None else items
    by_id = {item.id: item for item in items}
    answers_path = out / "answers.jsonl"
    answered = isg_bench.read_answers(answers_path)
    out.mkdir(parents=True, exist_ok=True)

    def save(item_id: str, result) -> None:
        blocks = isg_bench.answer_blocks(result, out / "images", item_id)
        with open(answers_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**by_id[item_id].record, "output": blocks}, ensure_ascii=False) + "\n")

    todo = [(i.id, *isg_bench.query_message(i)) for i in items if i.id not in answered]
    counts = answer_prompts(todo, responder, save, out / "failures.jsonl", batch_size, seed, "ISG-Bench")
    answered = isg_bench.read_answers(answers_path)
    prompts = isg_bench.load_prompts(prompts_dir)
    judged_path = out / "judged.jsonl"
    judged: dict[str, dict] = {}
    for line in judged_path.read_text(encoding="utf-8").splitlines() if judged_path.is_file() else []:
        try:
            record = json.loads(line)
            judged[str(record["id"])] = record["result"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    failures = 0
    for item in tqdm(items, desc="ISG-Bench judge" if judge else "ISG-Bench structure", unit="item"):
        answer = answered.get(item.id)
        if answer is None:
            continue
        previous = judged.get(item.id)
        if previous is not None and (judge is None or ("holistic" in previous and not previous["failures"])):
            continue  # judged whole before (a run without a judge keeps whatever was judged); failures are retried
        result = isg_bench.judge_item(item, answer, judge, prompts, dependencies)
        failures += len(result["failures"])
        judged[item.id] = result
        with open(judged_path, "a", encoding="utf-8") as handle:
            output = [{"type": b.type, "content": str(b.content)} for b in answer]
            handle.write(json.dumps({**item.record, "output": output, "result": result}, ensure_ascii=False) + "\n")
    scores = {item.id: isg_bench.item_scores(answered.get(item.id), judged.get(item.id)) for item in items}
    summary = isg_bench.summarize(items, scores)
    if judge is None:  # without a judge only the structure level means anything
        summary = {category: {"items": row["items"], "structure": row["structure"]}
                   for category, row in summary.items()}
    return {"items": len(items), "rejected": len(rejected), "rejections": rejected[:5], "answered": len(
        [i for i in items if i.id in answered]), **counts, "judge_failures_now": failures,
            "dependencies": dependencies, "answers": str(answers_path), "scores": summary,
            "note": None if judge else "structure only: no judge given (--judge_model)"}
