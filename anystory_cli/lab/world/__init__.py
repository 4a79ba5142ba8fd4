"""The sprite world of the default model: characters, scenes, exact masks and captions.

Torch-free (numpy + Pillow). Everything is deterministic from integer seeds.

    identity_from_seed(seed).attributes()   -> {"silhouette": 3, ...}  (judge targets)
    split_of(seed)                           -> "train" | "heldout"
    sample_scene(rng_seed, n_characters, split="train", size=64) -> Scene
    sample_pair(rng_seed, split="train", size=64)                -> Pair  (AnyStory stage 1)
    reference_image(identity_seed, size=64)  -> uint8 (size, size, 4)
    vocabulary()                             -> every word captions and story prompts may use
    write_samples(out_dir, n, seed)          -> example scenes, masks, captions, contact sheets
"""

from .background import PLACES, PROPS, TIMES
from .identity import (
    ATTRIBUTE_CLASSES,
    IDENTITY_SEED_SPACE,
    NOT_APPLICABLE,
    Identity,
    count_possible_identities,
    heldout_identity_seeds,
    identity_from_seed,
    iter_identity_seeds,
    num_classes,
    split_of,
    train_identity_seeds,
)
from .sample import contact_sheet, mask_overlay, write_samples
from .scenes import (
    Instance,
    Pair,
    Scene,
    caption_vocabulary,
    cut_out,
    random_reference,
    reference_image,
    sample_pair,
    sample_scene,
    vocabulary,
)
from .sprites import POSES, Sprite, draw_character

__all__ = [
    "ATTRIBUTE_CLASSES",
    "IDENTITY_SEED_SPACE",
    "NOT_APPLICABLE",
    "PLACES",
    "POSES",
    "PROPS",
    "TIMES",
    "Identity",
    "Instance",
    "Pair",
    "Scene",
    "Sprite",
    "caption_vocabulary",
    "contact_sheet",
    "count_possible_identities",
    "cut_out",
    "draw_character",
    "heldout_identity_seeds",
    "identity_from_seed",
    "iter_identity_seeds",
    "mask_overlay",
    "num_classes",
    "random_reference",
    "reference_image",
    "sample_pair",
    "sample_scene",
    "split_of",
    "train_identity_seeds",
    "vocabulary",
    "write_samples",
]
