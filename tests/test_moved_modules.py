"""The module paths of 0.1 keep working for one release, as the same module objects, with a warning."""

import importlib
import sys

import pytest

from synth.moved_modules import MOVED, new_name


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module_and_warns(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        aliased = importlib.import_module(old)
    assert aliased is importlib.import_module(MOVED[old])


def test_names_imported_from_old_paths_are_the_new_objects():
    sys.modules.pop("mim.export", None)
    sys.modules.pop("synth.zoo.llm", None)
    with pytest.warns(DeprecationWarning):
        from mim.export import load_model as old_load_model
        from synth.zoo.llm import build_llm as old_build_llm
    from mim.modeling.directory import load_model
    from synth.model_parts.llm import build_llm

    assert old_load_model is load_model
    assert old_build_llm is build_llm


def test_submodules_of_a_moved_package_follow_it():
    assert new_name("synth.zoo.llm") == "synth.model_parts.llm"
    assert new_name("synth.zoological") is None  # a prefix of a name is not the package
    assert new_name("synth.data.schema") is None


def test_an_unknown_old_name_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("synth.no_such_module")
