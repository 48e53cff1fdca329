"""Old module paths, kept importable for one release (0.2) with a DeprecationWarning.

The packages were regrouped by job in 0.2 (CHANGELOG.md). ``import synth.schema`` or
``from mim.export import load_model`` still work: a finder on ``sys.meta_path`` answers the old name with
the new module itself (one module object, so monkeypatching either name patches both) and says where it
went. Class paths in YAML files (``class_path: synth.backends...``) resolve the same way.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

#: old dotted path -> new dotted path; a moved package's submodules follow it (synth.zoo.llm -> synth.model_parts.llm).
MOVED = {
    "synth.schema": "synth.data.schema", "synth.conversation_io": "synth.data.conversation_io",
    "synth.pairs": "synth.data.pairs", "synth.sources": "synth.data.sources", "synth.images": "synth.data.images",
    "synth.download": "synth.data.download",
    "synth.ingest": "synth.selection.ingest", "synth.embed": "synth.selection.embed",
    "synth.cluster": "synth.selection.cluster", "synth.sampling": "synth.selection.sampling",
    "synth.prompt": "synth.generation.prompt", "synth.generate": "synth.generation.generate",
    "synth.backends": "synth.generation.backends", "synth.local_backend": "synth.generation.local_backend",
    "synth.dialogue_parser": "synth.review.dialogue_parser", "synth.costs": "synth.generation.costs",
    "synth.filtering": "synth.review.filtering", "synth.annotate": "synth.review.annotate",
    "synth.stats": "synth.statistics.stats", "synth.plots": "synth.statistics.plots",
    "synth.loopback_server": "synth.testing", "synth.zoo": "synth.model_parts",
    "mim.model": "mim.modeling.mim_model", "mim.sharding": "mim.modeling.sharding", "mim.memory": "mim.modeling.memory",
    "mim.convert": "mim.modeling.directory", "mim.export": "mim.modeling.directory",
    "mim.generation": "mim.inference.interleaved", "mim.batched": "mim.inference.batched",
    "mim.batch_inference": "mim.inference.reply_files", "mim.chat": "mim.inference.chat",
    "mim.terminal": "mim.inference.terminal_chat", "mim.serve": "mim.serving.server", "mim.serving.web_demo": "mim.serving.server",
    "mim.evaluate": "mim.evaluation.held_out", "mim.clip_metrics": "mim.evaluation.clip_metrics",
    "mim.benchmarks": "mim.evaluation.mme_mmbench", "mim.ablation": "mim.evaluation.head_ablation",
    # moved in 0.3: the parser belongs to the filter (section 3.2's post-processing), beside it
    "synth.generation.dialogue_parser": "synth.review.dialogue_parser",
}


def new_name(old: str) -> str | None:
    """Where a module that moved in 0.2 lives now (None if ``old`` did not move)."""
    if old in MOVED:
        return MOVED[old]
    for before, after in MOVED.items():
        if old.startswith(before + "."):
            return after + old[len(before):]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # the target ran its own code already
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers an old module name with the module at its new path, warning once per name."""

    def find_spec(self, fullname: str, path=None, target=None):
        target_name = new_name(fullname)
        if target_name is None:
            return None
        warnings.warn(f"{fullname} moved to {target_name} in textbind 0.2; the old name goes in 0.3",
                      DeprecationWarning, stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _Alias(target_name))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): the old files are gone, so it must answer
    before the path finder reports them missing."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
