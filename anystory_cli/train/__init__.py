"""Training AnyStory adapters (stage 1: subject encoder, stage 2: router) with accelerate.

    loop.py          the recipe, the samples, the components and the training loop
    manifest.py      the dataset's manifest, checked row by row before any model loads
    report.py        loss curves, sample previews with their routing maps
    recipe_files.py  reading a recipe's YAML (shared with the lab's trainers)
"""

from .loop import Components, TrainResult, check_dataset, load_recipe, recipe_from_dict, train
from .manifest import read_manifest, validate_manifest

__all__ = ["Components", "TrainResult", "check_dataset", "load_recipe", "read_manifest", "recipe_from_dict", "train",
           "validate_manifest"]
