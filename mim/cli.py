"""``mim``: train with LightningCLI (``mim fit --config ...``); chat, serve, generate, convert, export, ablation.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's: every
Trainer option (strategy, precision, devices, accumulate_grad_batches, ...)
and every constructor argument of MIM and of the datamodule is a flag and a
YAML key; ``mim fit --model.head.help heads.LanguageDescriptionHead`` lists a
head's options. YAML is read with OmegaConf, so ``${...}`` interpolation works.
"""

from __future__ import annotations

import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _functions() -> dict:
    """The non-Lightning commands: name -> function whose signature and docstring are its flags."""
    from mim.ablation import run_ablation
    from mim.batch_inference import generate
    from mim.convert import convert
    from mim.evaluate import evaluate
    from mim.quickstart import quickstart
    from mim.serve import serve
    from mim.terminal import chat

    def export(ckpt: str, out: str, sdxl: dict | str | None = None, refiner: dict | str | None = None,
               merge_lora: bool = False) -> int:
        """Write a MIM directory (mim.json + trained.safetensors) from a Lightning checkpoint.

        Args:
            ckpt: the .ckpt file written by ``mim fit``, or a sharded checkpoint folder (FSDP).
            out: the directory to write.
            sdxl: the SDXL that chat and serve should draw with (recorded, not loaded): tiny, a hub id or path.
            refiner: an SDXL refiner to record (stabilityai/stable-diffusion-xl-refiner-1.0 in the released demo).
            merge_lora: fold LoRA adapters into the LLM and write it whole under ``out/llm`` (a plain
                transformers checkpoint); without it a LoRA export holds only the adapters.
        """
        from mim.export import export_checkpoint, source_record

        export_checkpoint(ckpt, out, sdxl=source_record(sdxl), refiner=source_record(refiner),
                          merge_lora=merge_lora)
        print(f"exported {ckpt} -> {out}")
        return 0

    return {"quickstart": quickstart, "ablation": run_ablation, "chat": chat, "serve": serve, "convert": convert,
            "export": export, "evaluate": evaluate, "generate": generate}


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI behind ``mim fit`` (``run=False`` builds without running, as tests do)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from synth.resolvers import register_resolvers
    from mim.model import MIM

    class MIMCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # parts are built in configure_model, under the strategy's context (FSDP: sharded, per rank)
            parser.set_defaults({"model.lazy": True})

    register_resolvers()
    return MIMCLI(
        MIM,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        parser_kwargs={"parser_mode": "omegaconf"} if run else {"parser_mode": "omegaconf", "exit_on_error": False},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "--help"
    if command in LIGHTNING_COMMANDS:
        from omegaconf.errors import OmegaConfBaseException

        from synth.resolvers import config_error_message

        try:
            lightning_cli(None if from_shell else argv)  # None: LightningCLI reads sys.argv itself
        except OmegaConfBaseException as error:  # a config that cannot resolve, e.g. a missing package
            print(f"mim {command}: {config_error_message(error)}", file=sys.stderr)
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
    sys.exit(CLI(functions[command], args=argv[1:], parser_mode="omegaconf"))


if __name__ == "__main__":
    main()
