"""Load one of the pack's files (or the pack itself) by path: the pack's directory name is not an
importable package name, and several modules are meant to be tested alone (no ComfyUI import)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from .paths import REPO_ROOT


def load_file(relative: str, name: str) -> ModuleType:
    """The module at REPO_ROOT/relative under `name`, loaded once per process (sys.modules)."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(REPO_ROOT, relative)
    package = path.name == "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if package else None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def load_pack(name: str = "barycenter_pack") -> ModuleType:
    """The whole pack as ComfyUI loads it (its __init__.py, submodules under `name`)."""
    return load_file("__init__.py", name)
