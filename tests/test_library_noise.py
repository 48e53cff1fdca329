"""The command lines quiet other libraries' noise that users cannot act on, and nothing else."""

import logging
import warnings

import pytest

from synth.library_noise import IGNORED_LOG_RECORDS, IGNORED_WARNINGS, quiet_library_noise

SAMPLES = {
    r"`isinstance\(treespec, LeafSpec\)` is deprecated":
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.",
    r"'set_vital' is deprecated": "'set_vital' is deprecated, please do not call",
    r"Total length of `list` across ranks is zero": "Total length of `list` across ranks is zero. Please make sure.",
    r"Found \d+ module\(s\) in eval mode at the start of training":
        "Found 59 module(s) in eval mode at the start of training. This may lead to unexpected behavior.",
}


def test_each_ignored_warning_is_swallowed_and_others_are_not() -> None:
    assert set(SAMPLES) == {pattern for pattern, _ in IGNORED_WARNINGS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        for message in SAMPLES.values():
            warnings.warn(message, UserWarning)
        warnings.warn("Total length of `StatefulDataLoader` across ranks is zero.", UserWarning)  # an empty val set
        warnings.warn("synth.zoo moved to synth.model_parts", DeprecationWarning)
    assert [str(w.message) for w in caught] == ["Total length of `StatefulDataLoader` across ranks is zero.",
                                                 "synth.zoo moved to synth.model_parts"]


@pytest.mark.parametrize("name", sorted(IGNORED_LOG_RECORDS))
def test_each_ignored_log_record_is_dropped_and_others_pass(name: str, caplog) -> None:
    quiet_library_noise()
    quiet_library_noise()  # idempotent: one filter per logger
    logger = logging.getLogger(name)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=name):
        for fragment in IGNORED_LOG_RECORDS[name]:
            logger.warning("before %s after", fragment)
        logger.warning("something the user should read")
    assert [record.getMessage() for record in caplog.records] == ["something the user should read"]


def test_a_steps_bounded_run_shows_no_negative_epoch_bound() -> None:
    pytest.importorskip("rich")
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    from mim.training_cli import _count_epochs_without_a_bound

    # max_epochs=-1: what Lightning sets at the start of fit when only max_steps bounds the run
    trainer = L.Trainer(max_steps=40, max_epochs=-1, callbacks=[RichProgressBar(refresh_rate=3)], logger=False,
                        enable_checkpointing=False)
    trainer.progress_bar_callback.setup(trainer, None, "fit")  # what fit does first
    assert trainer.progress_bar_callback._get_train_description(7).strip() == "Epoch 7/-2"  # Lightning's own
    _count_epochs_without_a_bound(trainer)
    bar = trainer.progress_bar_callback
    assert bar._get_train_description(7).strip() == "Epoch 7"
    assert bar.refresh_rate == 3  # the configured bar, not a new one
    bounded = L.Trainer(max_epochs=3, callbacks=[RichProgressBar()], logger=False, enable_checkpointing=False)
    _count_epochs_without_a_bound(bounded)
    bounded.progress_bar_callback.setup(bounded, None, "fit")
    assert bounded.progress_bar_callback._get_train_description(1).strip() == "Epoch 1/2"
    quiet = L.Trainer(max_steps=4, enable_progress_bar=False, logger=False, enable_checkpointing=False)
    _count_epochs_without_a_bound(quiet)  # no bar: nothing to do
    assert quiet.progress_bar_callback is None
