"""Files that ship inside the package (recipes, device profiles, claims, eval texts, the chat page).

Read through importlib.resources so an installed wheel finds them as a checkout does; the
files under edgeqwen/data/ are the one editable copy.
"""
from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def data(*parts: str) -> Traversable:
    """edgeqwen/data/<parts>, wherever the package is installed."""
    return files("edgeqwen").joinpath("data", *parts)


def recipe_files() -> list[Traversable]:
    folder = data("recipes")
    return sorted((p for p in folder.iterdir() if p.name.endswith(".toml")), key=lambda p: p.name)
