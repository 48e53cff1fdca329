"""Quiet the warnings that other libraries print on every run and that no user of ours can act on.

Installed by the ``synth`` and ``mim`` command lines only (``quiet_library_noise()``), never on import:
code that imports the packages keeps every warning its libraries give. Each entry says why it is noise
here; anything that tells the user something (their data, their config, a real deprecation in our code)
is left alone.
"""

from __future__ import annotations

import logging
import warnings

#: (message regex, why it is noise for our users)
IGNORED_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning's own use of a torch API that torch 2.13 deprecates; fixed by upgrading Lightning, not by us"),
    (r"'set_vital' is deprecated",
     "torchdata's StatefulDataLoader calls a deprecated torch function in its constructor"),
    (r"Total length of `list` across ranks is zero",
     "our datamodules return [] for val_dataloader when no validation files are configured (Lightning's way "
     "to skip validation); a configured validation source that yields nothing is an error of its own"),
    (r"Found \d+ module\(s\) in eval mode at the start of training",
     "MIM keeps its frozen parts (vision tower, frozen LLM, SDXL targets) in eval mode on purpose (section 5.2)"),
)

#: substrings of transformers log records that are noise here
IGNORED_LOG_RECORDS = {
    "transformers.utils.import_utils": (
        # this project must not install torchvision (it breaks transformers with the CPU torch); the PIL
        # image processors it falls back to are the ones our model parts use anyway
        "requires torchvision (not installed); falling back to",
    ),
    # an advertisement for a hosted logging service, on every fit
    # (lightning.pytorch points lightning_utilities' rank-zero logger at this name on import)
    "lightning.pytorch.utilities.rank_zero": ("try installing [litlogger]",),
    # bitsandbytes (the quant extra) on import, on CPUs with AVX512-BF16: an optional faster 4-bit CPU kernel is
    # missing; printed whether or not anything is quantised, and the fallback it uses works
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _DropRecords(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_library_noise() -> None:
    """Install the filters above (idempotent)."""
    for pattern, _ in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, fragments in IGNORED_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropRecords) for existing in logger.filters):
            logger.addFilter(_DropRecords(fragments))
