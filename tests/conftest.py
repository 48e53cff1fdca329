"""Checks marked ``gpu`` need a CUDA device; where none is present they are skipped, saying so."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here); run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
