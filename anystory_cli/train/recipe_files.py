"""Reading a training recipe file: one place for both trainers (AnyStory and the base models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..story import UniqueKeyLoader


def read_recipe_yaml(path: str | Path) -> Any:
    """The parsed YAML of a recipe file; InputError for a missing file, bad YAML or a key given
    twice (plain YAML would silently keep the last one)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe not found")
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None


def recipe_error(exc, source: str, skip: int = 0) -> InputError:
    """One InputError naming every bad field of a pydantic ValidationError, '; '-separated.
    `skip` drops leading parts of each error's location (a tagged union's tag)."""
    lines = []
    for error in exc.errors():
        # nothing left after the tag: the whole recipe; no location at all under a tag: the tag itself
        fallback = "model" if skip and not error["loc"] else "(recipe)"
        loc = ".".join(str(p) for p in error["loc"][skip:]) or fallback
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"{source}: {loc}: {message}")
    return InputError("; ".join(lines))


def recipe_kind(path: str | Path, kinds: tuple[str, ...]) -> str:
    """The recipe's `kind:` (one of `kinds`); InputError naming the file and the choices otherwise."""
    data = read_recipe_yaml(path)
    choices = ", ".join(f"`kind: {k}`" for k in kinds)
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe is a mapping of keys to values, starting with one of {choices}")
    if "kind" not in data:
        raise InputError(f"{path}: kind: missing; say what the recipe trains with one of {choices}")
    if data["kind"] not in kinds:
        raise InputError(f"{path}: kind: {data['kind']!r} is not one of {', '.join(kinds)}")
    return data["kind"]
