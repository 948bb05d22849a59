"""Import a recipe script (`recipes/NAME.py`, not a package module) from a benchmark."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str):
    """`recipes/NAME.py` as a module, imported once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve the recipe's string annotations through its module
        spec.loader.exec_module(module)
    return sys.modules[name]
