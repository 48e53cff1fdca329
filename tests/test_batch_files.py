"""synth generate through batch files: the requests in the Batch API's (and vLLM run_batch's) input format,
and a results file, errors and missing lines included, imported into the same resumable state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth.generation.batch_files import import_batch_results, write_batch_requests
from synth.generation.costs import Price
from synth.generation.generate import group_prompt, pending_groups
from synth.generation.prompt import SEED_SET_FILE, read_seed_set

SEEDS = read_seed_set(SEED_SET_FILE)
GROUPS = [{"group_id": f"g{i}", "cluster": i % 2,
           "pairs": [{"id": f"p{i}{j}", "image": f"{i}{j}.png", "caption": f"caption {i} {j}"} for j in range(2)]}
          for i in range(6)]
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 512}


def _ok(group_id: str, text: str, line_id: str = "batch_req_1") -> dict:
    return {"id": line_id, "custom_id": group_id, "error": None,
            "response": {"status_code": 200, "request_id": "req_1",
                         "body": {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}}}}


def test_requests_are_the_prompts_generate_would_send(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    assert write_batch_requests(path, GROUPS, tmp_path / "generate", SEEDS, 3, 0, "gpt-4o", SAMPLING) == 6
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [g["group_id"] for g in GROUPS]
    first = lines[0]
    assert first["method"] == "POST" and first["url"] == "/v1/chat/completions"
    assert first["body"]["model"] == "gpt-4o" and first["body"]["max_tokens"] == 512
    assert first["body"]["messages"] == [{"role": "user", "content": group_prompt(GROUPS[0], SEEDS, 3, 0)[0]}]
    with pytest.raises(FileExistsError):  # a batch file is never overwritten
        write_batch_requests(path, GROUPS, tmp_path / "generate", SEEDS, 3, 0, "gpt-4o", SAMPLING)


def test_results_with_errors_and_missing_lines_import_into_the_resumable_state(tmp_path: Path) -> None:
    out = tmp_path / "generate"
    results = tmp_path / "results.jsonl"
    lines = [
        json.dumps(_ok("g0", "Human: Look <img0> caption 0 0 </img0>\nAssistant: Nice.")),
        json.dumps({"id": "batch_req_2", "custom_id": "g1", "response": None,
                    "error": {"code": "batch_expired", "message": "This request could not be executed"}}),
        json.dumps({"id": "batch_req_3", "custom_id": "g2", "error": None,
                    "response": {"status_code": 429, "request_id": "r",
                                 "body": {"error": {"message": "Rate limit reached"}}}}),
        '{"id": "batch_req_4", "custom_id": "g3", "respo',  # cut short
        json.dumps(_ok("g9", "unknown group")),
        json.dumps(_ok("g0", "a repeat")),
        json.dumps(_ok("g4", "Human: Hi\nAssistant: Hello.")),
        # g5: no line at all
    ]
    results.write_text("\n".join(lines) + "\n")
    report = import_batch_results(results, GROUPS, out, SEEDS, 3, 0, Price(prompt=2.5, completion=10.0))
    assert (report["generated"], report["failed"], report["malformed"], report["unknown_id"], report["repeated"]) \
        == (2, 2, 1, 1, 1)
    assert report["missing"] == ["g3", "g5"]
    # two completions of 1000 + 200 tokens at half of $2.5 / $10 per million
    assert report["cost_usd"] == pytest.approx(0.5 * 2 * (1000 * 2.5 + 200 * 10.0) / 1e6)
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["group_id"] for g in generations] == ["g0", "g4"]
    assert generations[0]["output"].startswith("Human: Look") and generations[0]["pairs"] == GROUPS[0]["pairs"]
    assert generations[0]["examples"] == [e.id for e in group_prompt(GROUPS[0], SEEDS, 3, 0)[1]]
    assert generations[0]["usage"] == {"prompt_tokens": 1000, "completion_tokens": 200}
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["group_id"], f["error"].split(":")[0]) for f in failures] == [("g1", "batch error batch_expired"),
                                                                          ("g2", "HTTP 429")]
    # the state is the live run's: what is not generated is pending, and a second import adds nothing twice
    assert [g["group_id"] for g in pending_groups(GROUPS, out)] == ["g1", "g2", "g3", "g5"]
    again = import_batch_results(results, GROUPS, out, SEEDS, 3, 0)
    assert again["generated"] == 0 and again["already_done"] == 2
    retry = tmp_path / "retry.jsonl"
    assert write_batch_requests(retry, GROUPS, out, SEEDS, 3, 0, "gpt-4o", SAMPLING) == 4


def test_the_cli_exports_and_imports_through_a_run_config(tmp_path: Path, monkeypatch) -> None:
    from synth.cli import main

    work = tmp_path / "work"
    (work / "sample").mkdir(parents=True)
    (work / "sample" / "groups.jsonl").write_text("".join(json.dumps(g) + "\n" for g in GROUPS))
    config = tmp_path / "run.yaml"
    config.write_text(f"work_dir: {work}\ningest:\n  sources: [{{kind: folder, path: {tmp_path}}}]\n"
                      "generate:\n  backend: openai\n  model: gpt-4o\n  max_tokens: 256\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exported:
        main(["batch", "export", str(tmp_path / "requests.jsonl"), "--config", str(config)])
    assert exported.value.code == 0
    requests = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len(requests) == 6 and requests[0]["body"]["max_tokens"] == 256
    (tmp_path / "results.jsonl").write_text(json.dumps(_ok("g2", "Human: Hi\nAssistant: Hello.")) + "\n")
    with pytest.raises(SystemExit) as imported:
        main(["batch", "import", str(tmp_path / "results.jsonl"), "--config", str(config)])
    assert imported.value.code == 0
    summary = json.loads((work / "generate" / "batch_import.json").read_text())
    assert summary["generated"] == 1 and len(summary["missing"]) == 5
