"""``synth generate`` through batch files: OpenAI's Batch API (half price), or vLLM offline on a GPU machine.

``export``: every group ``generate/generations.jsonl`` does not hold yet becomes one request line in the
Batch API's input format, which vLLM's ``python -m vllm.entrypoints.openai.run_batch`` reads too::

    {"custom_id": GROUP_ID, "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": ..., "messages": [{"role": "user", "content": PROMPT}], "temperature": ..., ...}}

The prompt is the one ``synth generate`` would send (same examples for the same group and seed).

``import``: a results file (``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
per line) goes into the same resumable state as a live run: each completion is a line of
``generations.jsonl``, each error a line of ``failures.jsonl``; a malformed line, an unknown or repeated
``custom_id`` and a group already generated are counted and skipped; a requested group with no result
stays pending (export again, or run ``synth generate``). Costs are at the batch price (half the table's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from synth.generation.generate import _Appender, generation_record, group_prompt, pending_groups, read_done
from synth.generation.prompt import SeedExample
from synth.generation.structured import Constraint, request_fields

ConstraintFor = Callable[[list[str]], Constraint | None] | None

BATCH_URL = "/v1/chat/completions"
#: OpenAI's Batch API charges half the synchronous price.
BATCH_DISCOUNT = 0.5


def batch_requests(groups: Sequence[dict[str, Any]], seeds: Sequence[SeedExample], num_examples: int, seed: int,
                   model: str, sampling: dict[str, Any], constraint_for: ConstraintFor = None,
                   grammar_field: str = "grammar") -> Iterable[dict[str, Any]]:
    """One Batch API request per group, with the prompt and examples ``synth generate`` would use, and its
    structured-generation constraint in the body when the run asks for one."""
    for group in groups:
        prompt, _, _ = group_prompt(group, seeds, num_examples, seed)
        constraint = constraint_for(_captions(group)) if constraint_for is not None else None
        yield {"custom_id": group["group_id"], "method": "POST", "url": BATCH_URL,
               "body": {"model": model, "messages": [{"role": "user", "content": prompt}], **sampling,
                        **request_fields(constraint, grammar_field)}}


def _captions(group: dict[str, Any]) -> list[str]:
    return [pair["caption"] for pair in group["pairs"]]


def write_batch_requests(path: str | os.PathLike[str], groups: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str],
                         seeds: Sequence[SeedExample], num_examples: int, seed: int, model: str,
                         sampling: dict[str, Any], constraint_for: ConstraintFor = None,
                         grammar_field: str = "grammar") -> int:
    """Write the pending groups' requests to ``path`` (JSONL; never over an existing file); return the count."""
    from synth.atomic import atomic_write_text

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; batch files are never overwritten (choose another --out)")
    todo = pending_groups(groups, out_dir)
    lines = [json.dumps(r, ensure_ascii=False) + "\n"
             for r in batch_requests(todo, seeds, num_examples, seed, model, sampling, constraint_for, grammar_field)]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def _completion(line: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the chat completion body, None) for a successful result line, or (None, why it failed)."""
    error = line.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else error
        code = error.get("code") if isinstance(error, dict) else None
        return None, f"batch error{f' {code}' if code else ''}: {message}"
    response = line.get("response")
    if not isinstance(response, dict):
        return None, "batch result without a response"
    status = response.get("status_code")
    body = response.get("body")
    if status != 200:
        detail = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(
            body.get("error"), dict) else body
        return None, f"HTTP {status}: {str(detail)[:300]}"
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices or not isinstance(choices[0], dict) or not isinstance(
            (choices[0].get("message") or {}).get("content"), str):
        return None, "response body has no choices[0].message.content"
    return body, None


def import_batch_results(path: str | os.PathLike[str], groups: Sequence[dict[str, Any]],
                         out_dir: str | os.PathLike[str], seeds: Sequence[SeedExample], num_examples: int, seed: int,
                         price=None, constraint_for: ConstraintFor = None) -> dict[str, Any]:
    """Read a Batch API / vLLM ``run_batch`` results file into ``out_dir``'s generations and failures (replies
    to constrained requests read back as the live run reads them: JSON into Appendix A's text)."""
    out_dir = Path(out_dir)
    by_id = {group["group_id"]: group for group in groups}
    done = read_done(out_dir / "generations.jsonl")
    generations = _Appender(out_dir / "generations.jsonl")
    failures = _Appender(out_dir / "failures.jsonl")
    report = {"lines": 0, "generated": 0, "failed": 0, "malformed": 0, "unknown_id": 0, "repeated": 0,
              "already_done": 0, "prompt_tokens": 0, "completion_tokens": 0, "problems": []}
    seen: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, text in enumerate(lines, start=1):
                if not text.strip():
                    continue
                report["lines"] += 1
                try:
                    line = json.loads(text)
                    custom_id = line["custom_id"]
                    if not isinstance(custom_id, str):
                        raise TypeError("custom_id is not a string")
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    report["malformed"] += 1
                    report["problems"].append(f"{path}:{number}: not a batch result line ({error})")
                    continue
                if custom_id not in by_id:
                    report["unknown_id"] += 1
                    report["problems"].append(f"{path}:{number}: custom_id {custom_id!r} is no group of this run")
                    continue
                if custom_id in seen:
                    report["repeated"] += 1
                    continue
                seen.add(custom_id)
                if custom_id in done:
                    report["already_done"] += 1
                    continue
                body, failure = _completion(line)
                if failure is not None:
                    report["failed"] += 1
                    failures.write({"group_id": custom_id, "attempts": 1, "error": failure, "retryable": True,
                                    "fatal": False, "batch": {"line": number, "id": line.get("id")}})
                    continue
                usage = body.get("usage") or {}
                prompt_tokens, completion_tokens = int(usage.get("prompt_tokens") or 0), int(
                    usage.get("completion_tokens") or 0)
                group = by_id[custom_id]
                _, examples, _ = group_prompt(group, seeds, num_examples, seed)
                choice = body["choices"][0]
                constraint = constraint_for(_captions(group)) if constraint_for is not None else None
                text = choice["message"]["content"]
                generations.write(generation_record(
                    group, examples, body.get("model"), constraint.decode(text) if constraint else text, 1,
                    prompt_tokens, completion_tokens, finish_reason=choice.get("finish_reason") or "stop",
                    **({"structured": constraint.kind} if constraint else {}),
                    batch={"id": line.get("id"), "request_id": (line.get("response") or {}).get("request_id")}))
                report["generated"] += 1
                report["prompt_tokens"] += prompt_tokens
                report["completion_tokens"] += completion_tokens
    finally:
        generations.close()
        failures.close()
    report["missing"] = sorted(set(by_id) - seen - done)
    if price is not None:
        report["cost_usd"] = round(BATCH_DISCOUNT * price.cost(report["prompt_tokens"], report["completion_tokens"]), 6)
    return report


def _setup(config):
    from synth.generation.generate import read_groups
    from synth.generation.prompt import SEED_SET_FILE, read_seed_set
    from synth.pipeline import stage_dir

    section = config.generate
    groups = read_groups(stage_dir(config, "sample") / "groups.jsonl")
    return section, groups, stage_dir(config, "generate"), read_seed_set(section.seed_set or SEED_SET_FILE)


def export_batch(config, out: str | os.PathLike[str]) -> int:
    """``synth batch export``: the config's pending groups as a Batch API input file."""
    from synth.pipeline import structured_constraint

    section, groups, out_dir, seeds = _setup(config)
    sampling = {"temperature": section.temperature, "top_p": section.top_p, "max_tokens": section.max_tokens}
    count = write_batch_requests(out, groups, out_dir, seeds, section.num_examples, section.seed, section.model,
                                 sampling, structured_constraint(section), section.grammar_field)
    print(f"batch export: {count} request(s) of {len(groups)} group(s) -> {out} (model {section.model}); upload it "
          "to the Batch API, or run it with vLLM's run_batch, then `synth batch import`")
    return 0


def import_batch(config, results: str | os.PathLike[str]) -> int:
    """``synth batch import``: a results file into the generate stage's state."""
    from synth.atomic import atomic_write_text
    from synth.generation.costs import price_for, price_table

    section, groups, out_dir, seeds = _setup(config)
    price = price_for(section.model, price_table(section.prices))
    from synth.pipeline import structured_constraint

    report = import_batch_results(results, groups, out_dir, seeds, section.num_examples, section.seed, price,
                                  structured_constraint(section))
    atomic_write_text(out_dir / "batch_import.json", json.dumps(report, indent=2))
    for problem in report["problems"][:20]:
        print(problem)
    cost = f", ${report['cost_usd']:.4f} at the batch price" if "cost_usd" in report else ""
    print(f"batch import: {report['generated']} generated, {report['failed']} failed, {report['malformed']} "
          f"malformed, {report['unknown_id']} unknown, {report['already_done']} already done, "
          f"{len(report['missing'])} still pending{cost}; then `synth filter` (or `synth run`) continues")
    return 0
