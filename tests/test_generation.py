"""The prompt, example selection, the OpenAI path against a loopback server, and resumable generation."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth.testing import ChatServer, captions_from_prompt
from synth.generation.backends import BackendError, OfflineComposer, OpenAIChatBackend
from synth.generation.generate import RateLimiter, RetryPolicy, generate_groups, read_done
from synth.generation.prompt import CHARACTERISTICS, SeedExample, choose_examples, read_seed_set, render_prompt, render_template

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "appendix_a.txt"
PAPER = REPO.parent / "shared" / "papers" / "textbind-paper.txt"


def appendix_lines(text: str) -> list[str]:
    """Appendix A's non-empty lines, without the PDF's typesetting marks (bold, code)."""
    return [line.replace("**", "").replace("`", "").strip() for line in text.splitlines() if line.strip()]


def test_prompt_is_appendix_a_word_for_word() -> None:
    rendered = render_template(["museum - the 1st nuclear submarine", "response to the production of heavy"],
                               [("...", "...")] * 3)
    expected = appendix_lines(FIXTURE.read_text(encoding="utf-8"))
    assert appendix_lines(rendered) == expected
    if PAPER.exists():  # and the fixture is the paper's own text
        paper = PAPER.read_text(encoding="utf-8")
        start = paper.index("Please construct a dialogue")
        end = paper.index("without an explicit ending.") + len("without an explicit ending.")
        assert appendix_lines(paper[start:end]) == expected


def test_prompt_holds_the_group_and_three_examples() -> None:
    seeds = read_seed_set()
    prompt = render_prompt(["a red bus", "a london street"], seeds)
    assert "<img0> a red bus </img0>\n<img1> a london street </img1>" in prompt
    assert prompt.count("Output Dialogue: Human:") == 3 and "Case 3:" in prompt and "Case 4:" not in prompt
    assert captions_from_prompt(prompt) == ["a red bus", "a london street"]


def test_bundled_seed_set_is_appendix_b_and_satisfies_section_3_3() -> None:
    seeds = read_seed_set()
    assert [s.id for s in seeds] == ["appendix-b-1", "appendix-b-2", "appendix-b-3"]
    assert "grumpy clown" in seeds[0].dialogue and "informal small business" in seeds[1].dialogue
    for seed in seeds:  # every <imgX> in a seed dialogue is its caption, verbatim
        for index, caption in enumerate(seed.captions):
            assert f"<img{index}> {caption} </img{index}>" in seed.dialogue


def seed(identifier: str, quality: str, *characteristics: str) -> SeedExample:
    return SeedExample(identifier, ["c"], "Human: hi\n\nAssistant: hello", quality, list(characteristics))


def test_example_choice_has_an_excellent_one_and_covers_all_characteristics() -> None:
    creation, comparison, intrinsic, extrinsic = CHARACTERISTICS
    pool = [seed("a", "Excellent", creation), seed("b", "Satisfactory", comparison, intrinsic),
            seed("c", "Satisfactory", extrinsic), seed("d", "Satisfactory", creation, extrinsic),
            seed("e", "Excellent", comparison), seed("f", "Poor", creation, comparison, intrinsic, extrinsic),
            seed("g", "Satisfactory", intrinsic, extrinsic)]
    seen = set()
    for number in range(300):
        chosen = choose_examples(pool, random.Random(number))
        assert len(chosen) == 3 and len({c.id for c in chosen}) == 3
        assert any(c.quality == "Excellent" for c in chosen)
        assert {x for c in chosen for x in c.characteristics} == set(CHARACTERISTICS)
        assert "f" not in {c.id for c in chosen}  # Poor examples are never shown
        seen.add(tuple(sorted(c.id for c in chosen)))
    assert len(seen) > 1  # random, not one fixed triple
    with pytest.raises(ValueError, match="cover all of"):
        choose_examples([seed("x", "Excellent", creation), seed("y", "Excellent", creation),
                         seed("z", "Satisfactory", comparison)], random.Random(0))
    with pytest.raises(ValueError, match="quality must be one of"):
        seed("bad", "Great")


def groups(count: int, images: int = 2) -> list[dict]:
    return [{"group_id": f"g{n:03d}", "cluster": n % 3,
             "pairs": [{"id": f"p{n}-{i}", "image": f"/x/{n}-{i}.png", "caption": f"photo {i} of scene {n}"}
                       for i in range(images)]} for n in range(count)]


def run(coroutine):
    return asyncio.run(coroutine)


def fast_retry(attempts: int = 8) -> RetryPolicy:
    return RetryPolicy(max_attempts=attempts, backoff_seconds=0.01, max_backoff_seconds=0.05)


def test_openai_path_sends_the_papers_sampling_and_never_writes_the_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEXTBIND_TEST_KEY", "sk-secret-value-123")
    with ChatServer() as server:
        backend = OpenAIChatBackend("gpt-test", server.url, api_key_env="TEXTBIND_TEST_KEY", timeout=5)
        tally = run(generate_groups(groups(3), backend, tmp_path, read_seed_set(), concurrency=2))
    assert tally.generated == 3 and tally.failed == 0
    body = server.requests[0]
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["model"] == "gpt-test"  # section 4.1
    assert server.headers[0]["authorization"] == "Bearer sk-secret-value-123"  # sent, as it must be ...
    for path in tmp_path.rglob("*"):  # ... but written nowhere
        assert "sk-secret-value-123" not in path.read_text(encoding="utf-8", errors="replace")
    record = json.loads((tmp_path / "generations.jsonl").read_text().splitlines()[0])
    assert record["output"].startswith("Human:") and record["usage"]["prompt_tokens"] > 0


def test_missing_key_for_the_public_endpoint_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("TEXTBIND_ABSENT_KEY", raising=False)
    with pytest.raises(ValueError, match="TEXTBIND_ABSENT_KEY"):
        OpenAIChatBackend("gpt-4", api_key_env="TEXTBIND_ABSENT_KEY")


@pytest.mark.parametrize("mode, retryable", [("429", True), ("500", True), ("garbage", True), ("empty", True),
                                             ("timeout", True), ("400", False)])
def test_each_failure_kind_is_classified(mode: str, retryable: bool) -> None:
    with ChatServer(plan=lambda n, body: mode, hang_seconds=1.5) as server:
        backend = OpenAIChatBackend("m", server.url, api_key_env="NONE", timeout=0.5)

        async def once():
            try:
                await backend.complete("following input images:\n<img0> a </img0>\nCharacteristics about the "
                                       "assistant", ["a"], 0)
            finally:
                await backend.close()

        with pytest.raises(BackendError) as caught:
            run(once())
    assert caught.value.retryable is retryable


def test_fault_storm_ends_with_every_group_generated_or_recorded_failed(tmp_path: Path) -> None:
    rng = random.Random(7)
    doomed = {"g005", "g013"}  # these always get a 500

    def plan(number: int, body: dict) -> str:
        if any(f"scene {g[1:].lstrip('0') or '0'}" in body["messages"][0]["content"] for g in doomed):
            return "500"
        return rng.choice(["ok", "ok", "429", "500", "timeout", "garbage", "empty", "slow"])

    work = groups(20)
    with ChatServer(plan=plan, slow_seconds=0.05, hang_seconds=0.6) as server:
        backend = OpenAIChatBackend("m", server.url, api_key_env="NONE", timeout=0.3)
        tally = run(generate_groups(work, backend, tmp_path, read_seed_set(), concurrency=6, retry=fast_retry()))
    generated = [json.loads(line)["group_id"] for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    failed = [json.loads(line)["group_id"] for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert sorted(generated + failed) == [g["group_id"] for g in work]  # every group, exactly once
    assert set(failed) >= doomed and tally.failed == len(failed) and tally.generated == len(generated)
    assert len(generated) >= 14  # retries get most of them through the storm (P(fewer) < 1e-4)
    assert {"429", "500", "timeout", "garbage", "empty"} <= set(server.modes)
    record = json.loads((tmp_path / "failures.jsonl").read_text().splitlines()[0])
    assert record["attempts"] == 8 and "HTTP 500" in record["error"]

    # a rerun against a healthy server retries only the failed groups
    with ChatServer() as server:
        backend = OpenAIChatBackend("m", server.url, api_key_env="NONE", timeout=2)
        again = run(generate_groups(work, backend, tmp_path, read_seed_set(), concurrency=6, retry=fast_retry()))
    assert again.generated == len(failed) and again.already_done == len(generated)
    assert len(server.requests) == len(failed)
    assert sorted(read_done(tmp_path / "generations.jsonl")) == [g["group_id"] for g in work]


def test_rate_limiter_bounds_requests_per_window() -> None:
    async def burst():
        limiter = RateLimiter(requests_per_minute=5, window=0.5)
        start = time.monotonic()
        for _ in range(10):
            await limiter.acquire(1)
        return time.monotonic() - start

    assert run(burst()) >= 0.45  # 10 requests at 5 per 0.5 s need a second window


def test_retry_delay_honours_retry_after_and_the_cap() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_seconds=1.0, max_backoff_seconds=8.0)
    rng = random.Random(0)
    assert all(0 <= policy.delay(a, None, rng) <= min(8.0, 2 ** (a - 1)) for a in range(1, 6))
    assert policy.delay(1, 3.0, rng) == 3.0 and policy.delay(1, 100.0, rng) == 8.0


def test_cut_last_line_is_repaired_on_rerun(tmp_path: Path) -> None:
    path = tmp_path / "generations.jsonl"
    path.write_text(json.dumps({"group_id": "g000", "output": "x"}) + "\n" + '{"group_id": "g001", "outp')
    assert read_done(path) == {"g000"}
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 1


def test_offline_composer_output_passes_the_filter() -> None:
    from synth.review.dialogue_parser import parse_dialogue

    for size in (2, 3, 4):
        captions = [f"caption number {i}" for i in range(size)]
        completion = run(OfflineComposer().complete("prompt", captions, seed=size))
        turns = parse_dialogue(completion.text, captions)
        assert isinstance(turns, list) and sorted(i for t in turns for i in t.images) == list(range(size))


@pytest.mark.slow
def test_generation_killed_midway_and_rerun_yields_every_group_exactly_once(tmp_path: Path) -> None:
    """A real process, SIGKILLed while requests are in flight, then run again."""
    synth = str(Path(sys.executable).parent / "synth")
    config = str(REPO / "configs" / "synth" / "sample.yaml")
    overrides = [f"work_dir={tmp_path / 'w'}", "sample.num_groups=30"]
    prepared = subprocess.run([synth, "run", "--config", config, "--until", "sample", *overrides],
                              capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    generations = tmp_path / "w" / "generate" / "generations.jsonl"
    with ChatServer(plan=lambda n, body: "slow", slow_seconds=0.25) as server:
        generate = [synth, "generate", "--config", config, *overrides, "generate.backend=openai",
                    f"generate.base_url={server.url}", "generate.model=test", "generate.api_key_env=NO_KEY_NEEDED",
                    "generate.concurrency=3"]
        process = subprocess.Popen(generate, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if generations.exists() and generations.read_text().count("\n") >= 6:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        first = read_done(generations)
        assert 6 <= len(first) < 30  # killed partway
        server.slow_seconds = 0.0
        finished = subprocess.run(generate, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    ids = [json.loads(line)["group_id"] for line in generations.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 30  # none lost, none duplicated
    summary = json.loads((tmp_path / "w" / "generate" / "summary.json").read_text())
    assert summary["this_run"]["already_done"] == len(first) and summary["outstanding"] == 0


# --- failures that must stop a run, secrets that must not leak, and what a run costs ---------------

KEY = "sk-proj-0123456789abcdefTEST"


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> Path:
    """A work dir whose stages up to sample are done (the bundled photos, tiny CLIP)."""
    from synth.config import load_config
    from synth.pipeline import run_all

    work = tmp_path_factory.mktemp("sampled")
    run_all(load_config(REPO / "configs" / "synth" / "sample.yaml", [f"work_dir={work}"]), until="sample",
            log=lambda line: None)
    return work


def generate_cli(work: Path, tmp_path: Path, *overrides: str) -> int:
    """``synth generate`` in-process on a copy of the sampled work dir; returns its exit status."""
    import shutil

    from synth.cli import run_stages

    copy = tmp_path / "work"
    if not copy.exists():
        shutil.copytree(work, copy)
    return run_stages("generate", REPO / "configs" / "synth" / "sample.yaml",
                      [f"work_dir={copy}", "generate.backend=openai", "generate.api_key_env=TEXTBIND_TEST_KEY",
                       "generate.max_attempts=2", "generate.backoff_seconds=0.01", *overrides], False, None)


@pytest.mark.parametrize("status", ["401", "403", "404"])
def test_a_refused_key_stops_the_run_at_once_and_is_never_written(status: str, sampled: Path, tmp_path: Path,
                                                                  monkeypatch, capsys) -> None:
    monkeypatch.setenv("TEXTBIND_TEST_KEY", KEY)
    with ChatServer(plan=lambda n, body: status) as server:
        code = generate_cli(sampled, tmp_path, f"generate.base_url={server.url}", "generate.model=m",
                            "generate.concurrency=2")
    assert code == 1
    assert len(server.requests) <= 2  # at most the requests already in flight: no group was tried again
    captured = capsys.readouterr()
    assert f"HTTP {status}" in captured.err and "stopped at once" in captured.err
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"  # the server did echo it back...
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert "[REDACTED]" in written  # ...into the error that failures.jsonl keeps
    for text in (written, captured.out, captured.err):
        assert KEY not in text and "Bearer sk-" not in text


def test_a_run_where_every_request_fails_exits_non_zero(sampled: Path, tmp_path: Path, capsys) -> None:
    with ChatServer(plan=lambda n, body: "400") as server:
        code = generate_cli(sampled, tmp_path, f"generate.base_url={server.url}", "generate.model=m")
    assert code == 1 and "none of 12 groups was generated (errors: HTTP 400: 12)" in capsys.readouterr().err


def test_an_endpoint_that_fails_every_group_stops_the_run(tmp_path: Path) -> None:
    from synth.generation.generate import GenerationAborted

    with ChatServer(plan=lambda n, body: "500") as server:
        backend = OpenAIChatBackend("m", server.url, api_key_env="NONE", timeout=2)
        with pytest.raises(GenerationAborted, match="3 groups in a row failed"):
            run(generate_groups(groups(40), backend, tmp_path, read_seed_set(), concurrency=1,
                                retry=fast_retry(2), max_consecutive_failures=3))
    assert len(server.requests) == 6  # 3 groups x 2 attempts, not 40 x 2


def test_a_budget_stops_the_run_cleanly_and_a_rerun_continues(sampled: Path, tmp_path: Path, capsys) -> None:
    from synth.cli import EXIT_INCOMPLETE

    with ChatServer() as server:
        overrides = (f"generate.base_url={server.url}", "generate.model=gpt-4", "generate.concurrency=1",
                     "generate.expected_completion_tokens=100")
        # each request reserves ~0.06 USD at GPT-4 prices (~1,800 prompt tokens): 0.20 allows three
        assert generate_cli(sampled, tmp_path, *overrides, "generate.max_cost=0.20") == EXIT_INCOMPLETE
        first = read_done(tmp_path / "work" / "generate" / "generations.jsonl")
        err = capsys.readouterr().err
        assert "budget is reached" in err and "Rerun" in err
        assert 1 <= len(first) < 12
        summary = json.loads((tmp_path / "work" / "generate" / "summary.json").read_text())
        assert summary["this_run"]["cost_usd"] <= 0.20
        assert generate_cli(sampled, tmp_path, *overrides) == 0  # no budget this time: it finishes
    assert len(read_done(tmp_path / "work" / "generate" / "generations.jsonl")) == 12
    assert len(server.requests) == 12  # nothing was sent twice


def test_an_unknown_or_local_model_is_reported_in_tokens_not_dollars(sampled: Path, tmp_path: Path,
                                                                     capsys) -> None:
    with ChatServer() as server:
        assert generate_cli(sampled, tmp_path, f"generate.base_url={server.url}",
                            "generate.model=SmolLM2-135M-Instruct") == 0
    out = capsys.readouterr().out
    assert "no price is known for 'SmolLM2-135M-Instruct', so no dollar figure" in out
    summary = json.loads((tmp_path / "work" / "generate" / "summary.json").read_text())
    assert "cost_usd" not in summary["this_run"] and "cost_usd" not in summary["estimate"]
    assert summary["this_run"]["prompt_tokens"] > 0 and summary["price_per_million_tokens"] is None


def test_prices_come_from_a_table_the_config_extends() -> None:
    from synth.generation.costs import Price, price_for, price_table

    table = price_table({"my-local-llama": {"prompt": 0.0, "completion": 0.0}, "gpt-4": {"prompt": 1,
                                                                                       "completion": 2}})
    assert price_for("gpt-4-0613", table) == Price(1.0, 2.0)  # the user's entry wins; dated names match
    assert price_for("gpt-4o-2024-08-06", table) == Price(2.5, 10.0)  # gpt-4o, not gpt-4
    assert price_for("my-local-llama", table) == Price(0.0, 0.0)
    assert price_for("llama-3-70b", table) is None
    with pytest.raises(ValueError, match="generate.prices.bad must be"):
        price_table({"bad": {"prompt": 1}})
