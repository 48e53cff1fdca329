"""Real LLMs in the loop: the in-process ``local`` backend, a third-party OpenAI-compatible server
(``transformers serve``), speaker-name variants open models write, and real SmolLM2 outputs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from synth.review.dialogue_parser import ParseRejection, parse_dialogue
from synth.generation.generate import generate_groups, read_done
from synth.generation.local_backend import LocalChatBackend
from synth.generation.prompt import read_seed_set

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CORPUS = Path(__file__).parent / "fixtures" / "smollm2_outputs.jsonl"


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """The tiny Llama preset saved as a model directory (safetensors, tokenizer, chat template), sampling on."""
    from synth.model_parts import build_llm

    path = tmp_path_factory.mktemp("tiny_llm")
    bundle = build_llm({"preset": "tiny"})
    bundle.model.generation_config.do_sample = True  # transformers serve ignores temperature otherwise
    bundle.model.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
    return path


def groups(count: int) -> list[dict]:
    return [{"group_id": f"g{n:03d}", "cluster": 0,
             "pairs": [{"id": f"p{n}-{i}", "image": f"/x/{n}-{i}.png", "caption": f"photo {i} of scene {n}"}
                       for i in range(2)]} for n in range(count)]


def outputs(path: Path) -> dict[str, str]:
    return {record["group_id"]: record["output"]
            for record in map(json.loads, (path / "generations.jsonl").read_text().splitlines())}


# --- the local backend ---------------------------------------------------------------------------------

def test_local_backend_batches_groups_and_matches_transformers_greedy_decoding(tiny_llm_dir: Path,
                                                                                 tmp_path: Path) -> None:
    backend = LocalChatBackend({"pretrained": str(tiny_llm_dir)}, temperature=0.0, max_tokens=12, batch_size=4)
    tally = asyncio.run(generate_groups(groups(6), backend, tmp_path / "batched", read_seed_set(), concurrency=6))
    assert tally.generated == 6 and sorted(backend.batch_sizes, reverse=True)[0] == 4  # 4 groups in one forward
    assert sum(backend.batch_sizes) == 6
    batched = outputs(tmp_path / "batched")

    one = LocalChatBackend({"pretrained": str(tiny_llm_dir)}, temperature=0.0, max_tokens=12, batch_size=1)
    asyncio.run(generate_groups(groups(6), one, tmp_path / "single", read_seed_set(), concurrency=6))
    assert set(one.batch_sizes) == {1}
    assert outputs(tmp_path / "single") == batched  # left padding changes nothing

    # greedy decoding as transformers' own generate() does it, on the same chat-templated prompt
    from synth.generation.generate import group_prompt

    prompt = group_prompt(groups(6)[2], read_seed_set(), 3, 0)[0]
    ids = one.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    reference = one.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                   pad_token_id=one.tokenizer.pad_token_id)
    expected = one.tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
    assert batched["g002"] == expected and expected.strip()


def test_local_backend_sampling_is_seeded_per_group(tiny_llm_dir: Path) -> None:
    backend = LocalChatBackend({"pretrained": str(tiny_llm_dir)}, temperature=1.0, top_p=1.0, max_tokens=16,
                               batch_size=3)

    async def three(seeds: list[int]) -> list[str]:
        texts = await asyncio.gather(*(backend.complete("Describe a bus.", [], seed) for seed in seeds))
        return [completion.text for completion in texts]

    first, again = asyncio.run(three([1, 2, 1])), asyncio.run(three([1, 2, 1]))
    assert first == again and first[0] == first[2]  # a seed fixes the sample, whatever shares its batch
    assert first[0] != first[1]  # sampling at temperature 1, not greedy
    assert backend.batch_sizes == [3, 3]
    greedy = LocalChatBackend({"pretrained": str(tiny_llm_dir)}, temperature=0.0, max_tokens=16)
    assert len({c.text for c in asyncio.run(_complete_all(greedy, "Describe a bus.", [1, 2]))}) == 1


async def _complete_all(backend: LocalChatBackend, prompt: str, seeds: list[int]):
    return await asyncio.gather(*(backend.complete(prompt, [], seed) for seed in seeds))


def test_local_backend_rejects_a_bad_batch_size(tiny_llm_dir: Path) -> None:
    with pytest.raises(ValueError, match="generate.batch_size must be at least 1"):
        LocalChatBackend({"pretrained": str(tiny_llm_dir)}, batch_size=0)


@pytest.mark.slow
def test_local_backend_killed_midway_resumes_with_every_group_exactly_once(tiny_llm_dir: Path,
                                                                           tmp_path: Path) -> None:
    """``synth generate`` with the local backend in a real process, SIGKILLed mid-run, then run again."""
    config = str(REPO / "configs" / "synth" / "sample.yaml")
    overrides = [f"work_dir={tmp_path / 'w'}", "sample.num_groups=30"]
    prepared = subprocess.run([str(BIN / "synth"), "run", "--config", config, "--until", "sample", *overrides],
                              capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    generations = tmp_path / "w" / "generate" / "generations.jsonl"
    generate = [str(BIN / "synth"), "generate", "--config", config, *overrides, "generate.backend=local",
                f"generate.local.pretrained={tiny_llm_dir}", "generate.device=cpu", "generate.batch_size=4",
                "generate.concurrency=4", "generate.max_tokens=160"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(generate, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if generations.exists() and generations.read_text().count("\n") >= 4:
            break
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]  # still running: killed partway
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    first = read_done(generations)
    assert 4 <= len(first) < 30
    finished = subprocess.run(generate, capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr[-2000:]
    ids = [json.loads(line)["group_id"] for line in generations.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 30  # none lost, none duplicated
    summary = json.loads((tmp_path / "w" / "generate" / "summary.json").read_text())
    assert summary["this_run"]["already_done"] == len(first) and summary["outstanding"] == 0
    assert max(summary["this_run"]["batch_sizes"]) == 4 and summary["backend"] == "local"
    assert summary["this_run"]["completion_tokens"] > 0 and "cost_usd" not in summary["this_run"]
    # a random tiny model writes no dialogue: the summary says so, per model
    (adherence,) = summary["format"].values()
    assert adherence["outputs"] == 30 and adherence["parse_share"] == 0.0 and adherence["reasons"]


# --- a third-party OpenAI-compatible server -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_server(tiny_llm_dir: Path):
    """``transformers serve`` (the dev extras' ``transformers[serving]``) on the tiny model, loopback only."""
    executable = BIN / "transformers"
    port = free_port()
    log = open(tiny_llm_dir.parent / "serve.log", "w")
    process = subprocess.Popen([str(executable), "serve", str(tiny_llm_dir), "--host", "127.0.0.1", "--port",
                                str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {Path(log.name).read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("transformers serve did not start within 120 s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> Path:
    from synth.config import load_config
    from synth.pipeline import run_all

    work = tmp_path_factory.mktemp("sampled")
    run_all(load_config(REPO / "configs" / "synth" / "sample.yaml", [f"work_dir={work}", "sample.num_groups=4"]),
            until="sample", log=lambda line: None)
    return work


def generate_through(server: str, model: Path, sampled: Path, work: Path, *overrides: str) -> dict:
    import shutil

    from synth.cli import run_stages

    shutil.copytree(sampled, work)
    code = run_stages("generate", REPO / "configs" / "synth" / "sample.yaml",
                      [f"work_dir={work}", "sample.num_groups=4", "generate.backend=openai",
                       f"generate.base_url={server}", f"generate.model={model}", "generate.api_key_env=NO_KEY",
                       "generate.concurrency=2", *overrides], False, None)
    assert code == 0
    return json.loads((work / "generate" / "summary.json").read_text())


@pytest.mark.slow
def test_synth_generate_through_transformers_serve_with_the_sampling_reaching_it(
        transformers_server: str, tiny_llm_dir: Path, sampled: Path, tmp_path: Path) -> None:
    """Near-zero temperature makes two runs agree word for word; the paper's temperature 1 does not;
    max_tokens bounds what the server writes. Each only holds if the server received the parameter."""
    near_greedy = ("generate.temperature=0.00001", "generate.max_tokens=24")
    first = generate_through(transformers_server, tiny_llm_dir, sampled, tmp_path / "a", *near_greedy)
    again = generate_through(transformers_server, tiny_llm_dir, sampled, tmp_path / "b", *near_greedy)
    paper = generate_through(transformers_server, tiny_llm_dir, sampled, tmp_path / "c", "generate.max_tokens=24")
    assert first["generated"] == again["generated"] == paper["generated"] == 4
    greedy_a, greedy_b = outputs(tmp_path / "a" / "generate"), outputs(tmp_path / "b" / "generate")
    sampled_text = outputs(tmp_path / "c" / "generate")
    assert greedy_a == greedy_b and all(text.strip() for text in greedy_a.values())
    assert sum(sampled_text[group] != greedy_a[group] for group in greedy_a) >= 3
    assert 0 < first["this_run"]["completion_tokens"] <= 4 * 24  # the server's own usage counts
    assert "cost_usd" not in first["this_run"] and first["price_per_million_tokens"] is None
    assert list(first["format"].values())[0]["outputs"] == 4


# --- speaker-name variants open models write -----------------------------------------------------------

CAPTIONS = ["a red bus on a street", "a clock tower at sunset"]
DIALOGUE = ("{u}: Look at this <img0> a red bus on a street </img0>\n\n{a}: Nice! Here is another: "
            "<img1> a clock tower at sunset </img1>\n\n{u}: Lovely.\n\n{a}: Thank you.")


@pytest.mark.parametrize("user,assistant", [("**Human**", "**Assistant**"), ("**Human:**", "**Assistant:**"),
                                            ("__Human__", "__Assistant__"), ("HUMAN", "ASSISTANT")])
def test_markdown_and_case_variants_of_appendix_a_names_parse_by_default(user: str, assistant: str) -> None:
    text = DIALOGUE.format(u=user, a=assistant).replace(":**:", ":**")
    turns = parse_dialogue(text, CAPTIONS)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0].content == "Look at this <image>" and turns[1].images == [1]


@pytest.mark.parametrize("user", ["User", "USER", "**User**"])
def test_user_names_parse_only_when_configured(user: str) -> None:
    text = DIALOGUE.format(u=user, a="Assistant")
    rejected = parse_dialogue(text, CAPTIONS)
    assert isinstance(rejected, ParseRejection)  # the paper's format by default
    turns = parse_dialogue(text, CAPTIONS, user_names=("Human", "User"))
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]


def test_configured_names_reach_the_filter_stage(tmp_path: Path) -> None:
    from PIL import Image

    from synth.review.filtering import FilterRules, filter_generations

    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    pairs = [{"id": f"p{i}", "image": str(tmp_path / f"{i}.png"), "caption": caption}
             for i, caption in enumerate(CAPTIONS)]
    record = {"group_id": "g0", "pairs": pairs, "output": DIALOGUE.format(u="USER", a="ASSISTANT"), "model": "m"}
    (tmp_path / "generations.jsonl").write_text(json.dumps(record) + "\n")
    default = filter_generations(tmp_path / "generations.jsonl", tmp_path / "a")
    # "USER:" is no speaker by default: the first turn is ASSISTANT, with an image before it
    assert default["kept"] == 0 and default["by_model"]["m"]["reasons"] == {"text_outside_turns": 1}
    configured = filter_generations(tmp_path / "generations.jsonl", tmp_path / "b",
                                    FilterRules(user_names=("Human", "User")))
    assert configured["kept"] == 1 and configured["by_model"]["m"]["kept_share"] == 1.0


# --- real SmolLM2-135M-Instruct outputs (tests/fixtures/make_smollm2_corpus.py) ------------------------

def corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]


def test_the_parser_on_real_smollm2_outputs() -> None:
    """A 135M model does not follow Appendix A: the paper's filter must reject every one, each for a
    stated reason, and never crash. The counts are this corpus's; a parser change that moves them fails."""
    records = corpus()
    assert len(records) == 24 and all(record["output"].strip() for record in records)
    reasons = Counter()
    for record in records:
        result = parse_dialogue(record["output"], record["captions"])
        assert isinstance(result, (list, ParseRejection))
        reasons[result.reason if isinstance(result, ParseRejection) else "parsed"] += 1
    assert dict(reasons) == SMOLLM2_REASONS
    loosened = Counter()  # accepting User:/USER: (configured) must not make these outputs pass either
    for record in records:
        result = parse_dialogue(record["output"], record["captions"], user_names=("Human", "User"))
        loosened[result.reason if isinstance(result, ParseRejection) else "parsed"] += 1
    assert loosened["parsed"] == SMOLLM2_REASONS.get("parsed", 0)


def test_format_adherence_reports_smollm2s_share(tmp_path: Path) -> None:
    from synth.review.filtering import format_adherence

    with open(tmp_path / "generations.jsonl", "w") as handle:
        for record in corpus():
            pairs = [{"id": f"{record['group_id']}-{i}", "image": f"/x/{i}.png", "caption": caption}
                     for i, caption in enumerate(record["captions"])]
            handle.write(json.dumps({"group_id": record["group_id"], "pairs": pairs, "output": record["output"],
                                     "model": record["model"]}) + "\n")
    report = format_adherence(tmp_path / "generations.jsonl")
    entry = report["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert entry["outputs"] == 24 and entry["parsed"] == SMOLLM2_REASONS.get("parsed", 0)
    assert entry["reasons"] == {k: v for k, v in SMOLLM2_REASONS.items() if k != "parsed"}


SMOLLM2_REASONS = {"no_turns": 24}  # every output: no "Human:"/"Assistant:" turn at a line start
