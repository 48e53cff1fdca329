"""The LightningCLI behind ``mim fit`` / ``validate`` / ``test`` / ``predict``: every Trainer option and every
constructor argument of MIM and of the datamodule is a flag and a YAML key (read with OmegaConf, so
``${...}`` interpolation works). Its own module so that ``mim ablation`` can run fits without importing
the ``mim`` command line that dispatches to it."""

from __future__ import annotations

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(args: list[str] | None = None, run: bool = True, parse_only: bool = False):
    """The LightningCLI behind ``mim fit`` (``run=False`` builds without running, as tests do).

    ``parse_only`` stops after parsing and checking the arguments and configs (``cli.config`` holds the
    result): nothing is instantiated, so a command for 8 GPUs and hub checkpoints can be checked on a laptop,
    as the test of every documented command does.
    """
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from synth.resolvers import register_resolvers
    from mim.modeling.mim_model import MIM

    class MIMCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # parts are built in configure_model, under the strategy's context (FSDP: sharded, per rank)
            parser.set_defaults({"model.lazy": True})

        def _parse_ckpt_path(self) -> None:
            # Lightning would read the checkpoint's hyper_parameters here and apply them over the config,
            # class paths included: a checkpoint file would choose what MIM builds and which code it
            # imports. The command line and its config files decide; the checkpoint only restores state.
            subcommand = self.config.get("subcommand")
            if subcommand:
                check_resume_path(self.config[subcommand].get("ckpt_path"))

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            _count_epochs_without_a_bound(trainer)
            return trainer

        def instantiate_classes(self) -> None:
            if not parse_only:
                super().instantiate_classes()

        def _run_subcommand(self, subcommand: str) -> None:
            if not parse_only:
                super()._run_subcommand(subcommand)

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


def check_resume_path(ckpt_path: str | None) -> None:
    """Refuse a ``--ckpt_path`` that would run code: a remote URL (Lightning loads those with
    ``weights_only=False``, i.e. runs their pickle) or a sharded folder whose metadata names other code
    (torch reads it with a plain ``pickle.load``) or whose non-tensor items would not load with
    ``weights_only=True`` (torch's planner unpickles them fully). Local ``.ckpt`` files are read by torch
    with ``weights_only=True``."""
    from mim.modeling.checkpoint_files import (UnsafeCheckpointError, is_distributed_checkpoint, is_remote_path,
                                               verify_distributed_checkpoint)

    if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):
        return
    if is_remote_path(ckpt_path):
        raise UnsafeCheckpointError(f"--ckpt_path {ckpt_path}: remote checkpoints are refused (Lightning would "
                                    "unpickle them with weights_only=False); download it and pass the local path")
    if is_distributed_checkpoint(ckpt_path):
        verify_distributed_checkpoint(ckpt_path)


def _count_epochs_without_a_bound(trainer) -> None:
    """Rich's bar shows ``Epoch 7/-2`` when a run is bounded by ``max_steps`` (Lightning sets
    ``max_epochs = -1`` and prints ``max_epochs - 1``): give the bar a description without the bound,
    keeping everything else about it (theme, refresh rate: its state is carried over)."""
    from lightning.pytorch.callbacks import RichProgressBar

    bar = trainer.progress_bar_callback  # None when the bar is off (enable_progress_bar: false)
    if not isinstance(bar, RichProgressBar):
        return

    class RichProgressBarForSteps(type(bar)):
        def _get_train_description(self, current_epoch: int) -> str:
            description = super()._get_train_description(current_epoch)
            if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
                description = description.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
            return description

    bar.__class__ = RichProgressBarForSteps
