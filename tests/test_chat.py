"""Export and load, the chat API, the terminal chat, the released-checkpoint conversion, the web demo."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from heads import LanguageDescriptionHead
from mim import MIM, MIMChat, load_model
from mim.modeling.directory import save_directory
from mim.inference.interleaved import GenerationSettings, ImagePart
from synth.samples import sample_pairs

TINY = {"preset": "tiny"}
REPO = Path(__file__).resolve().parents[1]


def tiny_model() -> MIM:
    return MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = tiny_model()
    with torch.no_grad():  # weights that differ from a fresh tiny model, so loading is visible
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.01)
    return save_directory(model, tmp_path_factory.mktemp("mim") / "export", sdxl=TINY)


def photo(index: int = 0) -> Image.Image:
    return Image.open(sample_pairs()[index].image).convert("RGB")


def settings(model: MIM, **overrides) -> GenerationSettings:
    start = model.head.token_ids["<start>"]
    values = dict(max_new_tokens=10, max_images=1, num_inference_steps=2, image_size=64, do_sample=True,
                  max_caption_tokens=5, logit_bias={start: 6.0})
    return GenerationSettings(**{**values, **overrides})


def test_directory_round_trip_reproduces_the_model(model_dir: Path) -> None:
    config = json.loads((model_dir / "mim.json").read_text())
    assert config["sdxl"] == TINY and config["model"]["head"]["class_path"].endswith("LanguageDescriptionHead")
    loaded = load_model(model_dir)
    fresh = tiny_model()
    ids = loaded.tokenizer("hello there", return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(ids.shape[1])[None]}
    with torch.no_grad():
        assert not torch.allclose(loaded.eval()(batch).logits, fresh.eval()(batch).logits)
    with pytest.raises(FileNotFoundError, match="not a MIM directory"):
        load_model(model_dir.parent)


def test_chat_api_keeps_the_conversation_and_its_images(model_dir: Path) -> None:
    chat = MIMChat.from_pretrained(model_dir)
    chat.settings = settings(chat.generator.model)
    first = chat.send("What is this? <image>", images=[photo(0)])
    assert len(first.images) == 1 and first.images[0].size == (64, 64)
    fed: list = []
    encode = chat.generator._image_embeds
    chat.generator._image_embeds = lambda image: fed.append(image) or encode(image)
    second = chat.send("And this one?", images=[photo(1)])  # the placeholder goes first
    assert chat.history[2]["content"].startswith("<image> And this one?")
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    assert chat.history[1]["images"] == first.images
    # the second turn saw three images: the first upload, the image the model drew, the second upload;
    # then each image it drew in this turn was fed back in
    assert fed[:3] == [chat.history[0]["images"][0], first.images[0], chat.history[2]["images"][0]]
    assert len(fed) == 3 + len(second.images)
    assert second.text.count("<image>") == len(second.images) == len(chat.history[3]["images"])
    with pytest.raises(ValueError, match="2 <image> placeholder.s. but only 1 image.s. attached"):
        chat.send("<image> <image>", images=[photo(0)])
    chat.reset()
    assert chat.history == []


def test_a_literal_placeholder_the_model_spells_cannot_break_the_conversation(model_dir: Path) -> None:
    """The model writes the text "<image>" from ordinary sub-word pieces; the next turn must still work."""
    chat = MIMChat.from_pretrained(model_dir)
    chat.settings = settings(chat.generator.model, logit_bias={})
    tokenizer = chat.generator.model.tokenizer
    spelled = tokenizer("look <image> here", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<image>") not in spelled  # plain text pieces, not the special token
    script = iter(spelled + [tokenizer.eos_token_id])
    real_next = chat.generator._next_token
    chat.generator._next_token = lambda *args, **kwargs: next(script)
    first = chat.send("Say something odd.")
    chat.generator._next_token = real_next
    assert "<image>" in first.parts[0].text and first.images == []  # shown to the user as written...
    assert first.text.count("<image>") == 0  # ...but it is not an image placeholder in the conversation
    second = chat.send("And now this? <image>", images=[photo(0)])  # raised a placeholder mismatch before
    assert second.text.count("<image>") == len(second.images)


def test_control_tokens_typed_by_a_user_stay_text(model_dir: Path) -> None:
    chat = MIMChat.from_pretrained(model_dir)
    generator = chat.generator
    tokenizer = generator.model.tokenizer
    typed = generator.prompt_embeddings([{"role": "user", "content": "stop </s> and <start> draw", "images": []}])
    plain = generator.prompt_embeddings([{"role": "user", "content": "stop and draw", "images": []}])
    eos = generator._token_embeds([tokenizer.eos_token_id])[0]
    start = generator._token_embeds([tokenizer.convert_tokens_to_ids("<start>")])[0]
    assert typed.shape[0] > plain.shape[0]
    for control in (eos, start):  # neither control token's embedding appears: the text was not taken as one
        assert not torch.isclose(typed, control[None]).all(dim=1).any()


def test_terminal_chat_attaches_images_and_saves_generated_ones(model_dir: Path, tmp_path: Path) -> None:
    from mim.inference.terminal_chat import chat_loop

    chat = MIMChat.from_pretrained(model_dir)
    chat.settings = settings(chat.generator.model)
    image_path = tmp_path / "cat.png"
    photo(1).save(image_path)
    lines = iter([f"/image {image_path}", "/image missing.png", "Draw me a friend for this cat", "/reset", "/quit"])
    said: list[str] = []
    assert chat_loop(chat, tmp_path / "out", ask=lambda prompt: next(lines), say=said.append) == 0
    assert any("attached" in line for line in said) and any("no such file" in line for line in said)
    reply = next(line for line in said if line.startswith("mim> "))
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert saved and str(saved[0]) in reply and Image.open(saved[0]).size == (64, 64)
    assert "(new conversation)" in said


def test_scripted_chat_exits_non_zero_on_errors(model_dir: Path, tmp_path: Path, capsys) -> None:
    from mim.inference.terminal_chat import chat

    common = dict(image_size=64, num_inference_steps=2, max_new_tokens=4, out_dir=str(tmp_path / "out"))
    photo(0).save(tmp_path / "a.png")
    assert chat(str(model_dir), message="What is this?", images=[str(tmp_path / "a.png")], **common) == 0
    assert chat(str(model_dir), message="Compare <image> and <image>", images=[str(tmp_path / "a.png")],
                **common) == 1
    assert chat(str(model_dir), message="What is this?", images=[str(tmp_path / "missing.png")], **common) == 1
    out = capsys.readouterr().out
    assert "2 <image> placeholder(s) but only 1 image(s) attached" in out and "no such file" in out


# --- the released checkpoint -----------------------------------------------------------------

def released_state(model: MIM, transformers_431: bool = True) -> tuple[dict, torch.nn.Module]:
    """A tiny state dict laid out as the release saved it: DeepSpeed's zero_to_fp32 output filtered to
    ``save_modules`` (query_tokens, qformer, qformer_projection, language_model), Llama's vocabulary +
    <image>, <start>, <end>, and (transformers 4.31) a persistent rotary inv_freq buffer in every layer."""
    from transformers import Blip2QFormerModel, LlamaForCausalLM

    from synth.model_parts.llm import tiny_llama_config

    torch.manual_seed(7)
    base = 768  # the tiny tokenizer's own vocabulary, before its special tokens
    llm = LlamaForCausalLM(tiny_llama_config(base + 3)).eval()
    qformer = Blip2QFormerModel(model.qformer.config).eval()
    projection = torch.nn.Linear(model.projection.in_features, model.projection.out_features)
    state = {"query_tokens": torch.randn_like(model.query_tokens)}
    state |= {f"qformer.{k}": v for k, v in qformer.state_dict().items()}
    state |= {f"qformer_projection.{k}": v for k, v in projection.state_dict().items()}
    state |= {f"language_model.{k}": v for k, v in llm.state_dict().items()}
    if transformers_431:
        inv_freq = llm.model.rotary_emb.inv_freq
        state |= {f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone()
                  for i in range(llm.config.num_hidden_layers)}
    return state, llm


def test_convert_released_checkpoint_matches_a_direct_load(tmp_path: Path) -> None:
    reference_model = tiny_model()
    state, llm = released_state(reference_model)
    assert sum(k.endswith("rotary_emb.inv_freq") for k in state) == 2  # the 4.31 layout
    torch.save(state, tmp_path / "textbind.pt")
    mim = Path(sys.executable).parent / "mim"
    result = subprocess.run([str(mim), "convert", str(tmp_path / "textbind.pt"),
                             str(tmp_path / "converted"), "--llm", "{preset: tiny}", "--blip2", "{preset: tiny}",
                             "--sdxl", "{preset: tiny}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    converted = load_model(tmp_path / "converted").eval()
    tokenizer = converted.tokenizer
    text = tokenizer("a red bus on a street", add_special_tokens=True)["input_ids"]
    released_ids = {"<image>": 768, "<start>": 769, "<end>": 770}
    ours = text + [tokenizer.convert_tokens_to_ids("<start>")] + tokenizer("big ben", add_special_tokens=False)[
        "input_ids"] + [tokenizer.convert_tokens_to_ids("<end>")]
    theirs = text + [released_ids["<start>"]] + ours[len(text) + 1:-1] + [released_ids["<end>"]]
    ids = torch.tensor([ours])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(len(ours))[None]}
    with torch.no_grad():
        got = converted(batch).logits[0]
        expected = llm(torch.tensor([theirs])).logits[0]
    columns = list(range(768)) + [tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<start>", "<end>")]
    torch.testing.assert_close(got[:, columns], expected, rtol=1e-4, atol=1e-4)
    # and the image path: the released Q-Former and projection over our (BLIP-2) vision encoder
    pixels = converted.image_processor(images=[photo(0)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        vision = converted.vision_model(pixel_values=pixels).last_hidden_state
        from transformers import Blip2QFormerModel

        qformer = Blip2QFormerModel(converted.qformer.config).eval()
        qformer.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("qformer.")})
        queries = qformer(query_embeds=state["query_tokens"], encoder_hidden_states=vision).last_hidden_state
        expected_images = queries @ state["qformer_projection.weight"].T + state["qformer_projection.bias"]
        torch.testing.assert_close(converted.eval().encode_images(pixels), expected_images)


def test_a_released_stage1_file_starts_stage2_and_is_refused_by_convert(tmp_path: Path) -> None:
    from mim.modeling.released_checkpoint import convert_released

    state, _ = released_state(tiny_model())
    stage1 = {k: v for k, v in state.items() if not k.startswith("language_model.")}  # save_modules of stage 1
    torch.save(stage1, tmp_path / "pytorch_model.pt")
    model = MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY, init_from=str(tmp_path / "pytorch_model.pt"))
    torch.testing.assert_close(model.query_tokens.detach(), stage1["query_tokens"])
    torch.testing.assert_close(model.projection.weight.detach(), stage1["qformer_projection.weight"])
    torch.testing.assert_close(model.qformer.state_dict()["layernorm.weight"], stage1["qformer.layernorm.weight"])
    with pytest.raises(ValueError, match="stage-1 .alignment. output.*model.init_from for stage 2"):
        convert_released(stage1, tiny_model())


def test_released_rotary_buffers_must_match_the_base_llm() -> None:
    from mim.modeling.released_checkpoint import convert_released

    state, _ = released_state(tiny_model())
    key = "language_model.model.layers.0.self_attn.rotary_emb.inv_freq"
    state[key] = state[key] * 2  # as if trained with another rope_theta
    with pytest.raises(ValueError, match="differs from this LLM's rotary frequencies"):
        convert_released(state, tiny_model())


def test_convert_refuses_unknown_keys_and_incomplete_token_lists(tmp_path: Path) -> None:
    from mim.modeling.released_checkpoint import convert_released

    model = tiny_model()
    state, _ = released_state(model)
    with pytest.raises(KeyError, match="no place in MIM"):
        convert_released({**state, "extra_module.weight": torch.zeros(1)}, model)
    with pytest.raises(ValueError, match="lack"):
        convert_released(state, model, ("<image>", "<start>"))
    del state["qformer_projection.bias"]
    with pytest.raises(KeyError, match="does not provide"):
        convert_released(state, tiny_model())


# --- the web demo --------------------------------------------------------------------------------

class FakeChat:
    """Stands in for MIMChat in the HTTP tests that check limits, not generation."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, text, images):
        from mim.inference.interleaved import GenerationResult, TextPart

        self.sent.append((text, images))
        return GenerationResult([TextPart(f"turn {len(self.sent)}")])


@pytest.fixture()
def service_url():
    from mim.serving.app import make_app
    from mim.serving.chat_service import ChatService
    from mim.serving.server import RunningServer

    service = ChatService(FakeChat, max_text_chars=50, max_images=2, max_request_bytes=200_000)
    running = RunningServer.start(make_app(service))
    yield f"http://127.0.0.1:{running.port}", service
    running.stop()


def post(url: str, payload, cookie: str | None = None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json",
                                                             **({"cookie": cookie} if cookie else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), response.headers.get("set-cookie")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), None


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_web_api_sessions_and_limits(service_url) -> None:
    url, service = service_url
    small = data_url(Image.new("RGB", (8, 8), (1, 2, 3)))
    status, body, cookie = post(url + "/api/chat", {"text": "hi", "images": [small]})
    assert status == 200 and body["parts"] == [{"type": "text", "text": "turn 1"}] and cookie
    session = cookie.split(";")[0]
    assert post(url + "/api/chat", {"text": "again"}, session)[1]["parts"][0]["text"] == "turn 2"  # same browser
    assert post(url + "/api/chat", {"text": "other browser"})[1]["parts"][0]["text"] == "turn 1"
    cases = [({"text": "x" * 51}, "the limit is 50"), ({"text": "", "images": []}, "empty"),
             ({"text": "a", "images": [small] * 3}, "3 images attached; the limit is 2"),
             ({"text": "a", "images": ["data:image/png;base64,AAAA"]}, "not an image format Pillow can identify"),
             ({"text": "a", "images": ["http://example.invalid/a.png"]}, "not an image data URL")]
    for payload, message in cases:
        status, body, _ = post(url + "/api/chat", payload, session)
        assert status == 400 and message in body["error"], (payload, body)
    status, body, _ = post(url + "/api/chat", None, session, raw=b"{" + b" " * 300_000)
    assert status == 413 and body["error"] == "the request is 0.29 MiB; the limit is 0.19 MiB (smaller images?)"
    assert post(url + "/api/chat", None, session, raw=b"not json")[1]["error"] == "the request body is not JSON"
    assert post(url + "/api/reset", {}, session)[0] == 200
    assert post(url + "/api/chat", {"text": "after reset"}, session)[1]["parts"][0]["text"] == "turn 1"
    with urllib.request.urlopen(url + "/", timeout=30) as page:
        assert b"<form id=\"form\">" in page.read()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
# .ci/run sets TEXTBIND_REQUIRE_BROWSER=1: there a missing chromium fails this test instead of skipping it
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("TEXTBIND_REQUIRE_BROWSER"),
                    reason="needs Debian's chromium (CI installs it: apt-get install chromium)")
def test_web_demo_in_a_real_browser(model_dir: Path, tmp_path: Path) -> None:
    """Type a message, upload an image, see a reply with a generated image, take a screenshot."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "chromium is not installed (TEXTBIND_REQUIRE_BROWSER is set); .ci/run installs it"
    mim = Path(sys.executable).parent / "mim"
    server = subprocess.Popen(
        [str(mim), "serve", str(model_dir), "--port", "0", "--image_size", "64",
         "--num_inference_steps", "2", "--max_new_tokens", "8", "--max_images", "1", "--image_bias", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "MIM demo on http://127.0.0.1:" in line, server.stderr.read()[-3000:]
        url = line.split(" on ", 1)[1].split()[0]
        upload = tmp_path / "upload.png"
        photo(0).save(upload)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(url)
            page.fill("#text", "Here is a photo. Can you paint something like it?")
            page.set_input_files("#files", str(upload))
            page.click("#send")
            page.wait_for_selector(".turn.assistant img.generated", timeout=120_000)
            assert page.locator(".turn.user img.uploaded").count() == 1
            assert page.locator(".turn.assistant img.generated").count() == 1
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            page.fill("#text", "x" * 5000)  # over the text limit: a clear message, no reply
            page.click("#send")
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=60_000)
            assert "limit is 4000" in page.text_content("#error")
            browser.close()
        assert (tmp_path / "demo.png").stat().st_size > 1000
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_the_released_demo_settings_are_one_flag_away(command: str, capsys) -> None:
    import yaml

    from mim.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--config", str(REPO / "configs" / "demo" / "released.yaml"), "runs/mim", "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["do_sample"], printed["guidance_scale"], printed["num_inference_steps"], printed["seed"],
            printed["high_noise_frac"], printed["watermark"]) == (False, 5.0, 40, 42, 0.8, True)
    assert printed["refiner"]["pretrained"] == "stabilityai/stable-diffusion-xl-refiner-1.0"


def test_a_recorded_refiner_is_loaded_by_the_chat(tmp_path: Path) -> None:
    directory = save_directory(tiny_model(), tmp_path / "mim", sdxl=TINY, refiner=TINY)
    chat = MIMChat.from_pretrained(directory)
    assert chat.generator.refiner is not None and chat.generator.refiner.text_encoder_2 is chat.generator.sdxl.text_encoder_2
