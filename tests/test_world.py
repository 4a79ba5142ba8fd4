"""The sprite world: deterministic, exact masks, a clean train/held-out split, safe captions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

from anystory_cli.lab.world import (
    ATTRIBUTE_CLASSES,
    NOT_APPLICABLE,
    POSES,
    caption_vocabulary,
    count_possible_identities,
    draw_character,
    heldout_identity_seeds,
    identity_from_seed,
    num_classes,
    random_reference,
    reference_image,
    sample_pair,
    sample_scene,
    split_of,
    train_identity_seeds,
    vocabulary,
    write_samples,
)
from anystory_cli.lab.world.identity import COLOURS_RGB, PATTERNS, Identity
from anystory_cli.lab.world.rng import WorldRng
from anystory_cli.lab.world.scenes import Scene
from anystory_cli.lab.world.sprites import MIN_PATTERN_PX

# ---------------------------------------------------------------- identities


def test_attributes_are_class_indices_of_known_attributes():
    classes = num_classes()
    assert list(classes) == list(ATTRIBUTE_CLASSES)
    for seed in range(300):
        attributes = identity_from_seed(seed).attributes()
        assert list(attributes) == list(ATTRIBUTE_CLASSES)
        for name, index in attributes.items():
            assert index == NOT_APPLICABLE or 0 <= index < classes[name], (seed, name, index)


def test_not_applicable_exactly_where_nothing_is_drawn():
    for seed in range(300):
        identity = identity_from_seed(seed)
        no_pattern = ATTRIBUTE_CLASSES["pattern"][identity.pattern] == "none"
        no_accessory = ATTRIBUTE_CLASSES["accessory"][identity.accessory] == "none"
        assert (identity.pattern_colour == NOT_APPLICABLE) == no_pattern
        assert (identity.pattern_scale == NOT_APPLICABLE) == no_pattern
        assert (identity.accessory_colour == NOT_APPLICABLE) == no_accessory
        assert identity.secondary_colour != identity.body_colour


def test_thousands_of_distinct_identities():
    assert count_possible_identities() > 1_000_000
    keys = [identity_from_seed(seed).key() for seed in range(2000)]
    assert len(set(keys)) >= 0.99 * len(keys)


def test_identity_is_stable_across_versions():
    # Shipped weights and stored references depend on these exact draws: change them on purpose only.
    digest = hashlib.sha256(repr([identity_from_seed(s).key() for s in range(50)]).encode()).hexdigest()
    assert digest == IDENTITY_DIGEST


def test_split_is_about_ten_percent_and_follows_the_look():
    splits = [split_of(seed) for seed in range(5000)]
    share = splits.count("heldout") / len(splits)
    assert 0.07 < share < 0.13
    split_by_look: dict[tuple[int, ...], str] = {}
    for seed in range(20000):
        key = identity_from_seed(seed).key()
        assert split_by_look.setdefault(key, split_of(seed)) == split_of(seed)
    assert all(split_of(s) == "train" for s in train_identity_seeds(50))
    assert all(split_of(s) == "heldout" for s in heldout_identity_seeds(50))


# ---------------------------------------------------------------- sprites


def test_sprite_alpha_is_binary_and_flip_mirrors():
    for seed in range(20):
        for pose in POSES:
            sprite = draw_character(seed, 28, pose)
            assert set(np.unique(sprite.rgba[..., 3])) <= {0, 255}
            flipped = draw_character(seed, 28, pose, flip=True)
            assert np.array_equal(flipped.rgba, sprite.rgba[:, ::-1])
            assert flipped.foot_x == sprite.width - sprite.foot_x


def test_every_attribute_changes_the_pixels():
    base = Identity(seed=0, silhouette=2, build=1, body_colour=3, secondary_colour=0, pattern=1,
                    pattern_colour=5, pattern_scale=0, accessory=1, accessory_colour=7, eyes=0)
    reference = draw_character(base, 30).rgba
    for name, classes in ATTRIBUTE_CLASSES.items():
        for other in range(len(classes)):
            if other == getattr(base, name) or (name.endswith("colour") and other == base.body_colour):
                continue
            if name == "body_colour" and other in (base.secondary_colour, base.pattern_colour, base.accessory_colour):
                continue
            changed = replace(base, **{name: other})
            fields = {f: getattr(changed, f) for f in ("pattern_colour", "pattern_scale", "accessory_colour")}
            if PATTERNS[changed.pattern] == "none":
                fields.update(pattern_colour=NOT_APPLICABLE, pattern_scale=NOT_APPLICABLE)
            changed = replace(changed, **fields)
            drawn = draw_character(changed, 30).rgba
            assert drawn.shape != reference.shape or not np.array_equal(drawn, reference), (name, other)


def test_stripes_are_at_least_three_pixels_wide():
    stripes = Identity(seed=0, silhouette=2, build=2, body_colour=5, secondary_colour=0, pattern=1,
                       pattern_colour=8, pattern_scale=0, accessory=0, accessory_colour=NOT_APPLICABLE, eyes=2)
    for scale in (18, 24, 32, 40):
        sprite = draw_character(stripes, scale)
        column = sprite.rgba[:, sprite.foot_x + int(0.25 * scale), :3]  # beside the eyes and mouth
        is_stripe = np.all(column == COLOURS_RGB[8], axis=-1).astype(int)
        runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], is_stripe, [0]]))))[::2]
        assert len(runs) >= 2 and runs.min() >= MIN_PATTERN_PX, (scale, runs)


# ---------------------------------------------------------------- scenes


def _same_scene(a: Scene, b: Scene) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
            and a.caption == b.caption and a.instances == b.instances)


def test_dilate_grows_by_one_pixel_in_the_four_directions():
    from anystory_cli.lab.world.raster import dilate

    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random(tuple(rng.integers(1, 16, 2))) < rng.uniform(0.02, 0.5)
        padded = np.pad(mask, 1)
        expected = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1]
                    | padded[1:-1, :-2] | padded[1:-1, 2:])
        np.testing.assert_array_equal(dilate(mask), expected)


def test_scenes_are_deterministic_and_seeds_matter():
    for n in (1, 2, 3, 4):
        assert _same_scene(sample_scene(7, n), sample_scene(7, n))
        assert not np.array_equal(sample_scene(7, n).image, sample_scene(8, n).image)
    pair_a, pair_b = sample_pair(3, "train"), sample_pair(3, "train")
    assert _same_scene(pair_a.target, pair_b.target) and np.array_equal(pair_a.reference, pair_b.reference)
    assert np.array_equal(reference_image(11), reference_image(11))


def test_scene_pixels_are_stable_across_versions():
    scene = sample_scene(0, 2)
    digest = hashlib.sha256(scene.image.tobytes() + scene.masks.tobytes() + scene.caption.encode()).hexdigest()
    assert digest == SCENE_DIGEST


@pytest.mark.parametrize("seed", range(40))
def test_masks_are_exact_and_disjoint(seed):
    scene = sample_scene(seed, 1 + seed % 4)
    height, width = scene.size
    assert scene.masks.dtype == bool and scene.masks.shape == (len(scene.instances), height, width)
    assert scene.masks.sum(axis=0).max() <= 1  # occlusion: a pixel shows one character at most
    union = np.zeros((height, width), dtype=bool)
    for mask, instance in zip(scene.masks, scene.instances):
        sprite = draw_character(instance.identity_seed, instance.scale, instance.pose, instance.flip)
        x0, y0, x1, y1 = instance.full_box
        footprint = np.zeros((height, width), dtype=bool)
        footprint[y0:y1, x0:x1] = sprite.mask
        assert not (mask & ~footprint).any()  # visible pixels are drawn pixels of this character
        visible = mask[y0:y1, x0:x1]
        assert np.array_equal(scene.image[y0:y1, x0:x1][visible], sprite.rgba[..., :3][visible])
        assert mask.sum() >= 0.6 * footprint.sum()
        assert instance.box == _box(mask)
        union |= footprint
    # Every drawn character pixel is in some mask, and everything else is background.
    assert np.array_equal(scene.masks.any(axis=0), union)
    assert np.array_equal(scene.image[~union], scene.background[~union])
    if len(scene.instances) == 1:
        assert np.array_equal(scene.masks[0], union)


def _box(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)


def test_instances_are_left_to_right_and_distinct():
    for seed in range(60):
        scene = sample_scene(seed, 2 + seed % 3)
        centres = [(inst.full_box[0] + inst.full_box[2]) / 2 for inst in scene.instances]
        assert centres == sorted(centres)
        looks = {identity_from_seed(s).key() for s in scene.identity_seeds}
        assert len(looks) == len(scene.instances)


def test_training_samplers_never_produce_heldout_identities():
    rng = WorldRng("test-split")
    for i in range(300):
        scene = sample_scene(rng.integer(1 << 30), 1 + i % 4, "train")
        assert all(split_of(s) == "train" for s in scene.identity_seeds)
    for i in range(150):
        pair = sample_pair(i, "train")
        assert split_of(pair.identity_seed) == "train"
        assert pair.target.identity_seeds == pair.source.identity_seeds == [pair.identity_seed]
    for i in range(30):
        assert all(split_of(s) == "heldout" for s in sample_scene(i, 3, "heldout").identity_seeds)
        assert split_of(sample_pair(i, "heldout").identity_seed) == "heldout"


def test_heldout_identity_cannot_be_forced_into_training():
    heldout = heldout_identity_seeds(1)[0]
    with pytest.raises(ValueError):
        sample_scene(0, 1, "train", identity_seeds=[heldout])
    scene = sample_scene(0, 1, "heldout", identity_seeds=[heldout])
    assert scene.identity_seeds == [heldout]


def test_captions_use_the_vocabulary_and_never_say_identity():
    identity_words = {name for classes in ATTRIBUTE_CLASSES.values() for name in classes}
    caption_words, prompt_words = set(caption_vocabulary()), set(vocabulary())
    assert caption_words <= prompt_words
    assert not identity_words & prompt_words
    for word in "left right center standing jumping waving hill forest night sunset day sky snow beach".split():
        assert word in prompt_words
    for seed in range(200):
        n = 1 + seed % 4
        scene = sample_scene(seed, n)
        words = scene.caption.split(" ")
        assert set(words) <= caption_words, scene.caption
        assert words[0] == ("one", "two", "three", "four")[n - 1]
        assert scene.caption.count(" is ") == n
        for instance in scene.instances:
            assert f"{instance.position} one is {instance.pose}" in scene.caption or n == 1


def test_pairs_differ_in_view_and_reference_is_the_segmented_source():
    for i in range(20):
        pair = sample_pair(i, "train")
        target, source = pair.target.instances[0], pair.source.instances[0]
        assert (target.pose, target.flip) != (source.pose, source.flip)
        reference = pair.reference
        assert reference.shape == (64, 64, 4)
        assert set(np.unique(reference[..., 3])) <= {0, 255}
        opaque = reference[..., 3] > 0
        assert opaque.sum() == pair.source.masks[0].sum()
        source_pixels = pair.source.image[pair.source.masks[0]]
        assert sorted(map(tuple, reference[opaque][:, :3])) == sorted(map(tuple, source_pixels))


@pytest.mark.parametrize("size", [48, 64, 96, (64, 96)])
def test_scene_size_is_a_parameter(size):
    height, width = (size, size) if isinstance(size, int) else size
    for n in (1, 4):
        scene = sample_scene(5, n, size=size)
        assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
        assert scene.masks.shape == (n, height, width)
        assert all(mask.any() for mask in scene.masks)


def test_reference_image_is_centred_and_transparent():
    for seed in range(10):
        for size in (64, 128):
            rgba = reference_image(seed, size)
            assert rgba.shape == (size, size, 4) and rgba.dtype == np.uint8
            opaque = rgba[..., 3] > 0
            assert opaque.any() and not opaque[0].any() and not opaque[:, 0].any()
            rows = np.flatnonzero(opaque.any(1))
            assert abs((rows[0] + rows[-1] + 1) / 2 - size / 2) <= 1
    views = [random_reference(3, k) for k in range(6)]
    assert all(v.shape == (64, 64, 4) for v in views)
    assert len({v.tobytes() for v in views}) > 1 and np.array_equal(views[0], random_reference(3, 0))


def test_write_samples(tmp_path):
    written = write_samples(tmp_path, n=4, seed=1)
    assert all(path.exists() for path in written)
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert [len(r["characters"]) for r in records] == [1, 2, 3, 4]
    assert (tmp_path / "identities_heldout.png").exists()


IDENTITY_DIGEST = "8e3bab643b9dfdcca7c6f0e2ebfd8ff667ccff59ccb24041bf3cbed938e1a63a"
SCENE_DIGEST = "f10674965c2cd8c7bcf3601c6925fbeec936189e2b00dd39f1d70715e3f5fa5d"


def test_a_lone_character_gets_more_tries_where_a_tall_frame_turns_most_down(monkeypatch):
    """In a 128x48 frame a lone character fits about one seed in three: three tries (what two or
    more characters get before dropping one) failed a GPU run's tall pool; lone ones get 30."""
    import anystory_cli.lab.world.scenes as scenes_module
    from anystory_cli.lab.world.rng import WorldRng

    def lone_scenes():  # seed 14: its own scene and the next two drawn do not fit
        return [scenes_module.placeable_scene(WorldRng("lone", s), s, 1, "train", (128, 48)) for s in (3, 14)]

    assert all(len(scene.masks) == 1 and scene.image.shape == (128, 48, 3) for scene in lone_scenes())
    monkeypatch.setattr(scenes_module, "LONE_CHARACTER_TRIES", 3)
    with pytest.raises(RuntimeError, match="no character fits"):
        lone_scenes()
