"""Scenes of the sprite world: a background, 1 to 4 characters, exact masks and a caption.

Everything is deterministic from integer seeds (see rng.py). Captions say the place, the time of
day, a prop, how many characters there are and, from left to right, what each one is doing; they
never say what a character looks like, because that is what AnyStory's reference images carry.

Samplers never place a held-out identity in a "train" scene: identities are drawn from the split
asked for, and explicit identity seeds are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import raster
from .background import PLACES, PROPS, TIMES, Setting, draw_background, prop_mask, sample_setting, shadow_mask
from .identity import check_split, draw_identity_seed, identity_from_seed, split_of
from .rng import WorldRng
from .sprites import POSES, Sprite, draw_character

MAX_CHARACTERS = 4
MIN_VISIBLE_FRACTION = 0.6  # an occluded character keeps at least this share of its pixels
MIN_PROP_VISIBLE_FRACTION = 0.5
MAX_LAYOUT_ATTEMPTS = 200

# Body height as a share of the scene height, by number of characters: smaller when crowded.
SCALE_RANGE = {1: (0.4, 0.54), 2: (0.36, 0.48), 3: (0.33, 0.43), 4: (0.32, 0.39)}
# Horizontal centres (share of the width) of a lone character at each named position.
SINGLE_POSITIONS = {"left": (0.2, 0.34), "center": (0.44, 0.56), "right": (0.66, 0.8)}
# Smallest gap between neighbours' centres (share of the width), so "the left one" is clear.
MIN_GAP = {2: 0.24, 3: 0.2, 4: 0.17}

COUNT_WORDS = ("one", "two", "three", "four")
PLACE_PHRASES = {
    "grass": "on grass",
    "hill": "on a hill",
    "forest": "in a forest",
    "beach": "on a beach",
    "snow": "in the snow",
}
TIME_PHRASES = {"day": "during the day", "sunset": "at sunset", "night": "at night"}
PROP_PHRASES = {"none": "", "house": "near a house", "tree": "near a tree", "rock": "near a rock"}
# Names of the characters from left to right, by how many there are.
ORDER_WORDS = {
    2: ("left", "right"),
    3: ("left", "middle", "right"),
    4: ("left", "second", "third", "right"),
}
# Words a user's story prompt may use beyond the captions' own (the CLIP tokenizer knows them).
PROMPT_EXTRA_WORDS = (
    "a an and are at both by center character characters day first fourth from front"
    " ground grass hill in is it jump jumps left looking middle moon near next night of on one"
    " right rock sand sea second sky snow stand standing stands sun sunny sunset the they third"
    " to together tree trees two wave waves waving with forest beach house houses clouds cloud"
    " three four jumping evening morning big small side rocks"
).split()


@dataclass(frozen=True)
class Instance:
    """One character as placed in a scene."""

    identity_seed: int
    pose: str
    flip: bool
    scale: int  # body height in pixels
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the visible mask, exclusive ends
    full_box: tuple[int, int, int, int]  # the whole sprite, occluded parts included
    depth: int  # 0 is drawn first (farthest back)
    position: str  # the word the caption uses for it: left, center, right, middle, second, third


@dataclass(frozen=True)
class Scene:
    """A rendered scene; instances and masks are ordered left to right, like the caption."""

    image: np.ndarray  # uint8 (H, W, 3)
    masks: np.ndarray  # bool (K, H, W): visible pixels of each character, never overlapping
    instances: tuple[Instance, ...]
    caption: str
    background: np.ndarray  # uint8 (H, W, 3): the image without characters (shadows included)
    setting: Setting = field(repr=False)
    seed: int
    split: str

    @property
    def identity_seeds(self) -> list[int]:
        return [inst.identity_seed for inst in self.instances]

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [inst.box for inst in self.instances]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return self.image.shape[0], self.image.shape[1]


@dataclass(frozen=True)
class Pair:
    """AnyStory stage-1 sample: the same identity in two views, and a segmented reference.

    `reference` is the character cut out of `source` with its exact mask and centred on a
    transparent canvas: uint8 (size, size, 4), alpha 0 or 255. The model learns to draw the
    identity of `reference` into `target`, whose pose, flip, scale and scene differ.
    """

    identity_seed: int
    target: Scene
    source: Scene
    reference: np.ndarray


def _scene_size(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    if min(height, width) < 32:
        raise ValueError(f"scenes need at least 32x32 pixels, got {height}x{width}")
    return int(height), int(width)


def sample_scene(
    rng_seed: int,
    n_characters: int,
    split: str = "train",
    size: int | tuple[int, int] = 64,
    identity_seeds: list[int] | None = None,
) -> Scene:
    """A random scene with `n_characters` (1-4) different identities of `split`.

    `size` is the side of a square scene or (height, width). `identity_seeds` places chosen
    identities (left to right in the order given), which must belong to `split`.
    """
    check_split(split)
    if not 1 <= n_characters <= MAX_CHARACTERS:
        raise ValueError(f"a scene has 1 to {MAX_CHARACTERS} characters, got {n_characters}")
    rng = WorldRng("scene", int(rng_seed), n_characters, split)
    seeds = _pick_identities(rng, n_characters, split, identity_seeds)
    poses = [rng.choice(POSES) for _ in seeds]
    flips = [rng.chance(0.5) for _ in seeds]
    return compose_scene(rng, seeds, poses, flips, split, size, seed=int(rng_seed))


LONE_CHARACTER_TRIES = 30


def placeable_scene(rng: WorldRng, seed: int, characters: int, split: str = "train",
                    size: int | tuple[int, int] = 64, tries: int = 3) -> Scene:
    """The scene of `seed`, or, where that many characters do not fit side by side (a tall
    scene's characters are as wide as its width allows), another seed's drawn from `rng`, then
    fewer characters. Squares always fit: they never draw from `rng`. A lone character gets
    LONE_CHARACTER_TRIES seeds: a tall frame turns it down now and then, and there is no fewer."""
    while True:
        for _ in range(tries if characters > 1 else max(tries, LONE_CHARACTER_TRIES)):
            try:
                return sample_scene(seed, characters, split, size)
            except RuntimeError:
                seed = rng.integer(1 << 40)
        if characters == 1:
            raise RuntimeError(f"no character fits a {size} scene")
        characters -= 1


def pool_scene(job: tuple[int, int, tuple[int, int]]) -> tuple[np.ndarray, str]:
    """A training pool's scene from its drawn (seed, characters, (height, width)): pixels and
    caption only (whole Scenes add up). It depends on nothing else, so worker processes can render
    a pool in any order; a tall scene that must retry draws from its own seed's stream. Here, not
    in train_base, so that a worker imports the world alone (no torch)."""
    seed, characters, size = job
    scene = placeable_scene(WorldRng("scene-pool-retry", seed), seed, characters, "train", size)
    return scene.image, scene.caption


def _pick_identities(rng: WorldRng, count: int, split: str, given: list[int] | None) -> list[int]:
    if given is not None:
        if len(given) != count:
            raise ValueError(f"{count} characters but {len(given)} identity seeds")
        for seed in given:
            if split_of(seed) != split:
                raise ValueError(f"identity seed {seed} is {split_of(seed)}, not {split}")
        return [int(s) for s in given]
    seeds: list[int] = []
    looks: set[tuple[int, ...]] = set()
    while len(seeds) < count:
        seed = draw_identity_seed(rng, split)
        look = identity_from_seed(seed).key()
        if look not in looks:  # two identical looks in one scene would make blending unmeasurable
            seeds.append(seed)
            looks.add(look)
    return seeds


def compose_scene(
    rng: WorldRng,
    identity_seeds: list[int],
    poses: list[str],
    flips: list[bool],
    split: str,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
) -> Scene:
    """Place the given characters (left to right) in a random setting drawn from `rng`."""
    height, width = _scene_size(size)
    count = len(identity_seeds)
    setting = sample_setting(rng, width / height)
    props = prop_mask(setting, height, width)
    placement = None
    for attempt in range(MAX_LAYOUT_ATTEMPTS):
        layout = _sample_layout(rng, count, setting.horizon)
        placement = _place(identity_seeds, poses, flips, layout, height, width)
        if placement is not None and _prop_visible_enough(placement, props):
            break
        if placement is not None and attempt >= MAX_LAYOUT_ATTEMPTS // 2:
            # Crowded scenes that keep hiding the prop lose it (and the caption stops naming it).
            setting = replace(setting, prop="none")
            break
    if placement is None:  # squares always have room; tall scenes have none for 3-4 side by side
        raise RuntimeError(f"could not place {count} characters in a {height}x{width} scene")
    background = draw_background(setting, height, width)
    _draw_shadows(background, placement)
    image, masks, depth_of = _draw_characters(background, placement)
    instances = tuple(
        Instance(
            identity_seed=int(identity_seeds[i]),
            pose=poses[i],
            flip=bool(flips[i]),
            scale=placement.scales[i],
            box=raster.bounding_box(masks[i]),
            full_box=placement.full_box(i),
            depth=depth_of[i],
            position=layout["positions"][i],
        )
        for i in range(count)
    )
    return Scene(
        image=image,
        masks=masks,
        instances=instances,
        caption=make_caption(setting, instances),
        background=background,
        setting=setting,
        seed=seed,
        split=split,
    )


def _sample_layout(rng: WorldRng, count: int, horizon: float) -> dict:
    """Centres (share of width), ground lines and body scales (shares of height), position words."""
    if count == 1:
        position = rng.choice(tuple(SINGLE_POSITIONS))
        centres = [rng.uniform(*SINGLE_POSITIONS[position])]
        positions = [position]
    else:
        gap = MIN_GAP[count]
        free = (0.88 - 0.12) - gap * (count - 1)
        starts = sorted(rng.uniform(0.0, free) for _ in range(count))
        centres = [0.12 + s + i * gap for i, s in enumerate(starts)]
        positions = list(ORDER_WORDS[count])
    grounds = [rng.uniform(horizon + 0.16, 0.97) for _ in range(count)]
    low, high = SCALE_RANGE[count]
    # Nearer characters (lower ground line) are a little bigger: a hint of depth.
    scales = [rng.uniform(low, high) * (0.92 + 0.12 * (g - horizon) / (1.0 - horizon)) for g in grounds]
    return {"centres": centres, "grounds": grounds, "scales": scales, "positions": positions}


@dataclass
class _Placement:
    """Characters in pixels: sprite i's top-left corner is (lefts[i], tops[i])."""

    height: int
    width: int
    sprites: list[Sprite] = field(default_factory=list)
    lefts: list[int] = field(default_factory=list)
    tops: list[int] = field(default_factory=list)
    grounds: list[int] = field(default_factory=list)  # the row under the feet (before any jump)
    scales: list[int] = field(default_factory=list)

    def full_box(self, i: int) -> tuple[int, int, int, int]:
        sprite = self.sprites[i]
        return (self.lefts[i], self.tops[i], self.lefts[i] + sprite.width, self.tops[i] + sprite.height)

    def full_mask(self, i: int) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        x0, y0, x1, y1 = self.full_box(i)
        mask[y0:y1, x0:x1] = self.sprites[i].mask
        return mask

    def paint_order(self) -> list[int]:
        """Farther characters (higher ground line) first; ties keep the left-to-right order."""
        return sorted(range(len(self.sprites)), key=lambda i: (self.grounds[i], i))


def _place(identity_seeds, poses, flips, layout: dict, height: int, width: int) -> _Placement | None:
    """Pixel placement; None when the drawn sprites break the layout's rules (caller retries)."""
    placement = _Placement(height, width)
    for i, seed in enumerate(identity_seeds):
        scale = max(12, int(round(layout["scales"][i] * height)))
        sprite = draw_character(seed, scale, poses[i], flips[i])
        if sprite.height + sprite.lift > height or sprite.width > width:
            return None
        # Keep the whole sprite inside the frame: masks then show whole characters.
        ground = int(round(layout["grounds"][i] * height))
        ground = min(max(ground, sprite.foot_y + sprite.lift), height - (sprite.height - sprite.foot_y))
        left = int(round(layout["centres"][i] * width - sprite.foot_x))
        left = min(max(left, 0), width - sprite.width)
        placement.sprites.append(sprite)
        placement.lefts.append(left)
        placement.grounds.append(ground)
        placement.tops.append(ground - sprite.lift - sprite.foot_y)
        placement.scales.append(scale)
    centres = [left + sprite.foot_x for left, sprite in zip(placement.lefts, placement.sprites)]
    if len(centres) > 1:
        min_gap = MIN_GAP[len(centres)] * width * 0.7
        if any(b - a < min_gap for a, b in zip(centres, centres[1:])):
            return None  # clamping at the frame edge squeezed two characters together
    if not _all_visible_enough(placement):
        return None
    return placement


def _all_visible_enough(placement: _Placement) -> bool:
    covered = np.zeros((placement.height, placement.width), dtype=bool)
    for i in reversed(placement.paint_order()):  # front to back
        full = placement.full_mask(i)
        if (full & ~covered).sum() < MIN_VISIBLE_FRACTION * full.sum():
            return False
        covered |= full
    return True


def _prop_visible_enough(placement: _Placement, props: np.ndarray) -> bool:
    """A prop the caption names must stay visible (half of it at least)."""
    if not props.any():
        return True
    covered = np.zeros_like(props)
    for i in range(len(placement.sprites)):
        covered |= placement.full_mask(i)
    return (props & ~covered).sum() >= MIN_PROP_VISIBLE_FRACTION * props.sum()


def _draw_shadows(background: np.ndarray, placement: _Placement) -> None:
    height = placement.height
    u, v = raster.pixel_grid(height, placement.width, 0.0, 0.0, float(height))
    for sprite, left, ground in zip(placement.sprites, placement.lefts, placement.grounds):
        half = sprite.width * (0.3 if sprite.lift else 0.4) / height
        shadow = shadow_mask(u, v, (left + sprite.foot_x) / height, (ground - 0.5) / height, half)
        background[shadow] = (background[shadow].astype(np.float32) * 0.7).astype(np.uint8)


def _draw_characters(background: np.ndarray, placement: _Placement):
    """Paint back to front; each pixel belongs to the last character drawn on it."""
    image = background.copy()
    owner = np.full(background.shape[:2], -1, dtype=np.int64)
    order = placement.paint_order()
    for i in order:
        x0, y0, x1, y1 = placement.full_box(i)
        sprite = placement.sprites[i]
        drawn = sprite.mask
        image[y0:y1, x0:x1][drawn] = sprite.rgba[..., :3][drawn]
        owner[y0:y1, x0:x1][drawn] = i
    masks = np.stack([owner == i for i in range(len(placement.sprites))])
    depth_of = {i: depth for depth, i in enumerate(order)}
    return image, masks, depth_of


def make_caption(setting: Setting, instances: tuple[Instance, ...]) -> str:
    """e.g. 'two characters on a beach at sunset near a rock , the left one is jumping , ...'"""
    count = len(instances)
    noun = "character" if count == 1 else "characters"
    words = [COUNT_WORDS[count - 1], noun, PLACE_PHRASES[setting.place], TIME_PHRASES[setting.time]]
    if PROP_PHRASES[setting.prop]:
        words.append(PROP_PHRASES[setting.prop])
    if count == 1:
        where = "in the center" if instances[0].position == "center" else f"on the {instances[0].position}"
        clauses = [f"it is {instances[0].pose} {where}"]
    else:
        clauses = [f"the {inst.position} one is {inst.pose}" for inst in instances]
    return " , ".join([" ".join(words)] + clauses)


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain (',' included), sorted."""
    words: set[str] = {",", "it", "is", "the", "one", "in", "on", "character", "characters", "center"}
    words.update(COUNT_WORDS, POSES)
    for phrases in (PLACE_PHRASES, TIME_PHRASES, PROP_PHRASES):
        for phrase in phrases.values():
            words.update(phrase.split())
    for names in ORDER_WORDS.values():
        words.update(names)
    words.update(SINGLE_POSITIONS)
    return sorted(words)


def vocabulary() -> list[str]:
    """Caption words plus the words a story prompt may need (left, hill, jumping, ...), sorted."""
    return sorted(set(caption_vocabulary()) | set(PROMPT_EXTRA_WORDS) | set(PLACES) | set(TIMES) | set(PROPS[1:]) | {"sky"})


def sample_pair(rng_seed: int, split: str = "train", size: int | tuple[int, int] = 64) -> Pair:
    """One identity of `split` in two scenes that differ in pose or facing, scale and setting."""
    check_split(split)
    rng = WorldRng("pair", int(rng_seed), split)
    identity_seed = draw_identity_seed(rng, split)
    target_view = (rng.choice(POSES), rng.chance(0.5))
    source_view = target_view
    while source_view == target_view:
        source_view = (rng.choice(POSES), rng.chance(0.5))
    target = compose_scene(rng, [identity_seed], [target_view[0]], [target_view[1]], split, size, seed=int(rng_seed))
    source = compose_scene(rng, [identity_seed], [source_view[0]], [source_view[1]], split, size, seed=int(rng_seed))
    side = min(_scene_size(size))
    return Pair(identity_seed=identity_seed, target=target, source=source, reference=cut_out(source, 0, side))


def cut_out(scene: Scene, index: int, size: int) -> np.ndarray:
    """Character `index` of `scene` alone, centred on a transparent (size, size, 4) canvas."""
    mask = scene.masks[index]
    x0, y0, x1, y1 = raster.bounding_box(mask)
    crop_h, crop_w = y1 - y0, x1 - x0
    if crop_h > size or crop_w > size:
        raise ValueError(f"a {crop_w}x{crop_h} character does not fit a {size}x{size} reference")
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    top, left = (size - crop_h) // 2, (size - crop_w) // 2
    window = rgba[top : top + crop_h, left : left + crop_w]
    visible = mask[y0:y1, x0:x1]
    window[..., :3][visible] = scene.image[y0:y1, x0:x1][visible]
    window[..., 3][visible] = 255
    return rgba


REFERENCE_BODY_SHARE = 0.55


def reference_image(identity_seed: int, size: int = 64) -> np.ndarray:
    """The canonical view of an identity (standing, facing front, centred): uint8 (size, size, 4)."""
    return _centred_sprite(identity_seed, REFERENCE_BODY_SHARE, "standing", False, size)


def random_reference(identity_seed: int, rng_seed: int, size: int = 64) -> np.ndarray:
    """A reference in a random pose, facing and scale (e.g. for stage-2 training), like `reference_image`."""
    rng = WorldRng("reference", int(identity_seed), int(rng_seed))
    share = rng.uniform(SCALE_RANGE[4][0], REFERENCE_BODY_SHARE)
    return _centred_sprite(identity_seed, share, rng.choice(POSES), rng.chance(0.5), size)


def _centred_sprite(identity_seed: int, body_share: float, pose: str, flip: bool, size: int) -> np.ndarray:
    sprite = draw_character(identity_seed, max(12, int(round(body_share * size))), pose, flip)
    if sprite.height > size or sprite.width > size:
        raise ValueError(f"size {size} is too small for a reference image")
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    top = (size - sprite.height) // 2
    left = size // 2 - sprite.foot_x  # the body's axis on the canvas's middle line
    left = min(max(left, 0), size - sprite.width)
    rgba[top : top + sprite.height, left : left + sprite.width] = sprite.rgba
    return rgba
