"""A checkpoint or MIM directory someone else wrote never chooses what code runs.

Each test builds the hostile input for real (a pickle that runs a command, a model folder with its own
Python file, a class path naming a module with side effects) and checks that loading it is refused
before anything executes: the marker file the payload would write never appears.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from heads import LanguageDescriptionHead
from mim import MIM, load_model
from mim.modeling.checkpoint_files import (UnsafeCheckpointError, read_checkpoint, read_distributed_checkpoint,
                                           verify_distributed_checkpoint)
from mim.modeling.directory import check_loaded_settings, save_directory
from mim.training_cli import check_resume_path
from synth.model_parts.source import UnsafeModelSourceError

TINY = {"preset": "tiny"}


class Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def sharded_folder(folder: Path, extra: dict | None = None) -> Path:
    """A real torch.distributed.checkpoint folder as Lightning's FSDP writes it (weights + meta.pt)."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"head.weight": torch.arange(6.0).reshape(2, 3), "projection.bias": torch.ones(4)},
             **(extra or {})}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"epoch": 1, "global_step": 7}, folder / "meta.pt")
    return folder


def test_a_real_sharded_checkpoint_reads_and_verifies(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "ckpt", extra={"loops": {"step": 7, "names": ["a", "b"]}})
    checkpoint = read_distributed_checkpoint(folder)
    assert torch.equal(checkpoint["state_dict"]["head.weight"], torch.arange(6.0).reshape(2, 3))
    assert checkpoint["global_step"] == 7
    verify_distributed_checkpoint(folder)  # plain data in a bytes item is fine
    check_resume_path(str(folder))


def test_metadata_that_runs_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    for read in (read_distributed_checkpoint, read_checkpoint, verify_distributed_checkpoint, load_model):
        with pytest.raises(UnsafeCheckpointError, match="names io.open"):
            read(folder)
    assert not marker.exists()
    # what torch's own reader does with the same folder (the reason for ours): it runs the payload
    from torch.distributed.checkpoint import FileSystemReader

    FileSystemReader(str(folder)).read_metadata()
    assert marker.exists()


def test_metadata_hiding_code_inside_real_metadata_is_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    folder = sharded_folder(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    metadata = FileSystemReader(str(folder)).read_metadata()
    metadata.planner_data = {"x": Payload(marker)}  # a field torch leaves free-form
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="not part of a torch.distributed.checkpoint"):
        read_distributed_checkpoint(folder)
    assert not marker.exists()


def test_damaged_metadata_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "ckpt")
    good = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(good[: len(good) // 2])
    with pytest.raises(UnsafeCheckpointError, match="damaged or not a sharded checkpoint"):
        read_distributed_checkpoint(folder)
    (folder / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(UnsafeCheckpointError, match="holds a dict, not checkpoint metadata"):
        read_distributed_checkpoint(folder)


def test_resume_refuses_a_bytes_item_that_would_run_code(tmp_path: Path) -> None:
    """Lightning resumes a sharded folder through torch's planner, which unpickles every non-tensor item
    with weights_only=False; the metadata can be clean while a data file carries the payload."""
    marker = tmp_path / "ran"
    folder = sharded_folder(tmp_path / "ckpt", extra={"loops": Payload(marker)})
    assert not marker.exists()  # saving pickles the payload without running it
    read_distributed_checkpoint(folder)  # ours reads tensors only: safe, and the payload is never touched
    with pytest.raises(UnsafeCheckpointError, match="does not load with weights_only=True"):
        check_resume_path(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/last.ckpt", "https://example.com/x.ckpt", "s3://b/x.ckpt",
                                 "file:///tmp/x.ckpt"])
def test_remote_checkpoint_paths_are_refused(url: str) -> None:
    with pytest.raises(UnsafeCheckpointError, match="remote"):
        check_resume_path(url)
    with pytest.raises(UnsafeCheckpointError, match="remote"):
        read_checkpoint(url)
    with pytest.raises(UnsafeCheckpointError, match="remote"):
        load_model(url)


def test_mim_fit_refuses_a_remote_ckpt_path_before_training(capsys) -> None:
    from mim.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/textbind/tiny_stage1_alignment.yaml", "--ckpt_path",
              "http://127.0.0.1:9/last.ckpt", "--trainer.default_root_dir", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    assert "remote checkpoints are refused" in capsys.readouterr().err


def test_mim_fit_does_not_take_hyperparameters_from_the_checkpoint(tmp_path: Path) -> None:
    """Lightning's CLI would parse a checkpoint's hyper_parameters over the config (class paths included)."""
    from mim.training_cli import lightning_cli

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"stage": "head", "learning_rate": 123.0,
                                                        "head": {"class_path": "os.system"}}}, ckpt)
    cli = lightning_cli(["fit", "--config", "configs/textbind/tiny_stage1_alignment.yaml", "--ckpt_path", str(ckpt)],
                        parse_only=True)
    assert cli.config.fit.model.stage == "alignment" and cli.config.fit.model.learning_rate == 1.0e-3


# --- MIM directories --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_llm(tmp_path_factory) -> Path:
    """The tiny Llama saved as a real transformers checkpoint: a `pretrained:` source, as a hub model is."""
    from synth.model_parts import build_llm

    bundle = build_llm("tiny")
    folder = tmp_path_factory.mktemp("llm") / "tiny-llama"
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    return folder


def hostile_directory(tmp_path: Path, llm: Path, marker: Path) -> Path:
    """A MIM directory whose LLM folder ships its own code, and whose mim.json asks to run it."""
    model = MIM(head=LanguageDescriptionHead(), llm={"pretrained": str(llm)}, blip2=TINY)
    directory = save_directory(model, tmp_path / "downloaded", sdxl=TINY)
    code_dir = tmp_path / "llm-with-code"
    code_dir.mkdir()
    for item in llm.iterdir():
        (code_dir / item.name).write_bytes(item.read_bytes())
    (code_dir / "evil.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()
        from transformers import LlamaConfig
        class EvilConfig(LlamaConfig):
            pass
    """))
    config = json.loads((code_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (code_dir / "config.json").write_text(json.dumps(config))
    mim_json = json.loads((directory / "mim.json").read_text())
    mim_json["model"]["llm"] = {**mim_json["model"]["llm"], "pretrained": str(code_dir),
                                "options": {"trust_remote_code": True}}
    (directory / "mim.json").write_text(json.dumps(mim_json))
    return directory


def test_a_directory_cannot_opt_itself_into_remote_code(tmp_path: Path, pretrained_llm: Path) -> None:
    marker = tmp_path / "ran"
    directory = hostile_directory(tmp_path, pretrained_llm, marker)
    with pytest.raises(UnsafeModelSourceError, match="llm sets options.trust_remote_code"):
        load_model(directory)
    assert not marker.exists()


def test_mim_chat_on_such_a_directory_exits_with_the_reason(tmp_path: Path, pretrained_llm: Path, capsys) -> None:
    from mim.cli import main

    marker = tmp_path / "ran"
    directory = hostile_directory(tmp_path, pretrained_llm, marker)
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", str(directory), "--message", "hello", "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "cannot opt itself into running code" in error and "--trust_remote_code true" in error
    assert not marker.exists()


@pytest.mark.parametrize("options", [{"trust_remote_code": True}, {"custom_pipeline": "evil/pipeline"},
                                     {"use_kernels": True}, {"attn_implementation": "kernels-community/flash-attn"}])
@pytest.mark.parametrize("part", ["llm", "blip2", "sdxl", "refiner"])
def test_every_code_loading_option_of_every_part_is_refused(part: str, options: dict) -> None:
    settings = {part: {"pretrained": "some/model", "options": options}}
    with pytest.raises(UnsafeModelSourceError, match=f"{part} sets options"):
        check_loaded_settings(settings, "mim.json")
    check_loaded_settings(settings, "mim.json", trust_remote_code=True)  # the user's opt-in
    check_loaded_settings(settings, "mim.json", overrides={part: {"pretrained": "mine"}})  # the user's source
    check_loaded_settings({part: {"pretrained": "x", "options": {"attn_implementation": "sdpa"}}}, "mim.json")


def test_a_checkpoint_cannot_opt_itself_into_remote_code(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {
        "llm": {"pretrained": "x", "options": {"trust_remote_code": True}}, "blip2": TINY}}, ckpt)
    with pytest.raises(UnsafeModelSourceError, match="last.ckpt: llm sets options.trust_remote_code"):
        load_model(ckpt)


# --- head class paths ------------------------------------------------------------------------------------


def write_module(folder: Path, name: str, marker: Path, head: bool) -> None:
    body = f"open({str(marker)!r}, 'w').close()\n"
    if head:
        body += "from heads import LanguageDescriptionHead\nclass MyHead(LanguageDescriptionHead):\n    pass\n"
    (folder / f"{name}.py").write_text(body)


def directory_with_head(tmp_path: Path, class_path: str) -> Path:
    model = MIM(head=LanguageDescriptionHead(), llm=TINY, blip2=TINY)
    directory = save_directory(model, tmp_path / "downloaded", sdxl=TINY)
    config = json.loads((directory / "mim.json").read_text())
    config["model"]["head"]["class_path"] = class_path
    (directory / "mim.json").write_text(json.dumps(config))
    return directory


def test_a_head_class_path_cannot_import_a_module(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    write_module(tmp_path, "side_effect_module", marker, head=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    directory = directory_with_head(tmp_path, "side_effect_module.MyHead")
    with pytest.raises(TypeError, match="heads load from the heads package"):
        load_model(directory)
    assert not marker.exists() and "side_effect_module" not in sys.modules


@pytest.mark.parametrize("class_path", ["os.system", "subprocess.Popen", "builtins.eval", "heads", "heads.base.torch"])
def test_a_head_class_path_naming_something_else_is_refused_before_any_call(tmp_path: Path, class_path: str) -> None:
    directory = directory_with_head(tmp_path, class_path)
    with pytest.raises(TypeError):
        load_model(directory)


def test_a_researchers_own_head_loads_when_imported_or_trusted(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    write_module(tmp_path, "my_project_heads", marker, head=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TEXTBIND_TRUSTED_HEAD_MODULES", "other, my_project_heads")
    directory = directory_with_head(tmp_path, "my_project_heads.MyHead")
    try:
        assert type(load_model(directory).head).__name__ == "MyHead"
        assert marker.exists()  # the user named it: its code ran, as they asked
        monkeypatch.delenv("TEXTBIND_TRUSTED_HEAD_MODULES")
        assert type(load_model(directory).head).__name__ == "MyHead"  # already imported by this program
    finally:
        sys.modules.pop("my_project_heads", None)


def test_the_payload_class_is_real() -> None:
    """The tests above would pass vacuously if Payload did not run on unpickling."""
    target = io.BytesIO()
    pickle.dump(Payload(Path(os.devnull)), target)
    assert hasattr(pickle.loads(target.getvalue()), "write")  # open(os.devnull, "w") ran and returned a file
