"""The seams tests use to put tiny real models in place of the loaders; None means the real one.

    PIPELINE_FACTORY(model_value, story_dir) -> AnyStoryPipeline (with plan=flux.memory.Plan too
        when a FLUX render has a memory plan)
    MODEL_FINGERPRINT(model_value, story_dir) -> str (keys panels without loading the model)
    BASE_PIPELINE_FACTORY(assets_dir or None) -> a diffusers text-to-image pipeline (`evaluate base`)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

PIPELINE_FACTORY: Optional[Callable[[str, Path], Any]] = None
MODEL_FINGERPRINT: Optional[Callable[[str, Path], str]] = None
BASE_PIPELINE_FACTORY: Optional[Callable[[Optional[Path]], Any]] = None
