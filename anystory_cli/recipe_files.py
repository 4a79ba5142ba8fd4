"""Reading a training recipe file: one place for both trainers (AnyStory and the base models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import InputError
from .story import UniqueKeyLoader


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
