"""``mim``: train with LightningCLI (``mim fit --config ...``); chat, serve, generate, convert, export, ablation, world.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's: every
Trainer option (strategy, precision, devices, accumulate_grad_batches, ...)
and every constructor argument of MIM and of the datamodule is a flag and a
YAML key; ``mim fit --model.head.help heads.LanguageDescriptionHead`` lists a
head's options. YAML is read with OmegaConf, so ``${...}`` interpolation works.
"""

from __future__ import annotations

import sys

from mim.training_cli import LIGHTNING_COMMANDS


def _functions() -> dict:
    """The non-Lightning commands: name -> function whose signature and docstring are its flags."""
    from mim.evaluation.head_ablation import run_ablation
    from mim.experiments.world import world
    from mim.inference.reply_files import generate
    from mim.modeling.directory import convert
    from mim.evaluation.held_out import evaluate
    from mim.quickstart import quickstart
    from mim.serving.server import serve
    from mim.inference.terminal_chat import chat

    def export(ckpt: str, out: str, sdxl: dict | str | None = None, refiner: dict | str | None = None,
               merge_lora: bool = False, trust_remote_code: bool = False) -> int:
        """Write a MIM directory (mim.json + trained.safetensors) from a Lightning checkpoint.

        Args:
            ckpt: the .ckpt file written by ``mim fit``, or a sharded checkpoint folder (FSDP).
            out: the directory to write.
            sdxl: the SDXL that chat and serve should draw with (recorded, not loaded): tiny, a hub id or path.
            refiner: an SDXL refiner to record (stabilityai/stable-diffusion-xl-refiner-1.0 in the released demo).
            merge_lora: fold LoRA adapters into the LLM and write it whole under ``out/llm`` (a plain
                transformers checkpoint); without it a LoRA export holds only the adapters.
            trust_remote_code: let the checkpoint's model sources run their Python code (refused without it).
        """
        from mim.modeling.directory import export_checkpoint, source_record

        export_checkpoint(ckpt, out, sdxl=source_record(sdxl), refiner=source_record(refiner),
                          merge_lora=merge_lora, trust_remote_code=trust_remote_code)
        print(f"exported {ckpt} -> {out}")
        return 0

    return {"quickstart": quickstart, "ablation": run_ablation, "chat": chat, "serve": serve, "convert": convert,
            "export": export, "evaluate": evaluate, "generate": generate, "world": world}


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "--help"
    from synth.library_noise import quiet_library_noise

    quiet_library_noise()
    if command in LIGHTNING_COMMANDS:
        from omegaconf.errors import OmegaConfBaseException

        from mim.modeling.checkpoint_files import UnsafeCheckpointError
        from synth.model_parts.source import UnsafeModelSourceError
        from synth.resolvers import config_error_message

        try:
            from mim.training_cli import lightning_cli

            lightning_cli(None if from_shell else argv)  # None: LightningCLI reads sys.argv itself
        except OmegaConfBaseException as error:  # a config that cannot resolve, e.g. a missing package
            print(f"mim {command}: {config_error_message(error)}", file=sys.stderr)
            sys.exit(2)
        except (UnsafeCheckpointError, UnsafeModelSourceError) as error:
            print(f"mim {command}: {error}", file=sys.stderr)
            sys.exit(2)
        return
    from jsonargparse import CLI

    from synth.resolvers import register_resolvers

    functions = _functions()
    if command in ("-h", "--help"):
        print(__doc__.strip() + "\n\ncommands: " + ", ".join((*LIGHTNING_COMMANDS, *functions)))
        return
    if command not in functions:
        print(f"mim: unknown command {command!r}; run `mim --help`", file=sys.stderr)
        sys.exit(2)
    register_resolvers()
    from mim.modeling.checkpoint_files import UnsafeCheckpointError
    from synth.model_parts.source import UnsafeModelSourceError

    try:
        sys.exit(CLI(functions[command], args=argv[1:], parser_mode="omegaconf"))
    except (UnsafeCheckpointError, UnsafeModelSourceError) as error:  # refused before anything ran
        print(f"mim {command}: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
