"""Identity scores (`scores.py`): regions from routing maps, blended and missing flags, the take a
panel keeps, take seeds; and, with the embedded model's own CLIP image encoder, a planted case:
a character cut out of a rendered sprite-world scene scores high against its own reference and
low against another's."""

from __future__ import annotations

import numpy as np
import pytest

from anystory_cli.scores import (MIN_REGION_SHARE, CharacterScore, best_take, good_enough, routed_regions,
                                 score_panel, take_seed)


def unit(*rows):
    vectors = np.asarray(rows, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def maps_with(*boxes, size=(20, 40)):
    """Routing maps (E, H, W): each character wins inside its box (rows, cols slices), the
    background elsewhere."""
    maps = np.zeros((len(boxes) + 1, *size), np.float32)
    maps[-1] = 0.5
    for i, (rows, cols) in enumerate(boxes):
        maps[i][rows, cols] = 0.9
    return maps


def test_routed_regions_take_each_pixels_likeliest_entry():
    maps = maps_with((slice(0, 10), slice(0, 10)), (slice(5, 20), slice(20, 40)))
    left, right = routed_regions(maps, 2)
    assert left.sum() == 100 and right.sum() == 15 * 20
    assert not (left & right).any()
    with pytest.raises(ValueError):
        routed_regions(maps, 3)


def test_own_reference_scores_high_and_anothers_flags_blended():
    references = unit([1, 0, 0], [0, 1, 0])
    regions = routed_regions(maps_with((slice(0, 20), slice(0, 20)), (slice(0, 20), slice(20, 40))), 2)
    faithful = score_panel(["mira", "bolt"], references, regions, unit([0.9, 0.1, 0.1], [0.1, 0.95, 0.0]))
    assert [s.blended or s.missing for s in faithful] == [False, False]
    assert all(s.identity > 0.9 for s in faithful)
    # bolt's region drawn as mira: closer to mira's reference than to its own
    copied = score_panel(["mira", "bolt"], references, regions, unit([0.9, 0.1, 0.1], [0.8, 0.3, 0.1]))
    assert not copied[0].blended
    assert copied[1].blended and copied[1].closest == "mira" and copied[1].identity < 0.5
    # a lone character is never blended; a character drawn twice is not blended with itself
    alone = score_panel(["mira"], references[:1], regions[:1], unit([0.1, 0.9, 0.0]))
    assert not alone[0].blended and alone[0].identity < 0.2
    twice = score_panel(["mira", "mira"], references[[0, 0]], regions, unit([1, 0, 0], [0.9, 0.1, 0]))
    assert not any(s.blended for s in twice)


def test_a_character_routed_to_almost_nothing_is_missing():
    size = (20, 40)
    few = max(1, int(MIN_REGION_SHARE * size[0] * size[1]) - 1)  # pixels in one row
    maps = maps_with((slice(0, 20), slice(0, 20)), (slice(0, 1), slice(20, 20 + few)), size=size)
    scores = score_panel(["mira", "bolt"], unit([1, 0], [0, 1]), routed_regions(maps, 2), unit([1, 0], [0, 1]))
    assert not scores[0].missing
    assert scores[1].missing and scores[1].identity == 0.0 and scores[1].area < MIN_REGION_SHARE
    nowhere = maps_with((slice(0, 20), slice(0, 20)), (slice(0, 0), slice(0, 0)), size=size)
    assert score_panel(["mira", "bolt"], unit([1, 0], [0, 1]), routed_regions(nowhere, 2),
                       np.zeros((2, 2)))[1].missing


def score(name, identity, blended=False, missing=False):
    return CharacterScore(name, identity, name, 0.1, blended, missing)


def test_the_kept_take_has_the_best_weakest_character_and_no_flag_when_another_has_none():
    takes = [
        [score("a", 0.9), score("b", 0.4)],                 # weakest 0.4
        [score("a", 0.6), score("b", 0.7)],                 # weakest 0.6: the best unflagged
        [score("a", 0.95), score("b", 0.9, blended=True)],  # higher, but blended
        [score("a", 0.99), score("b", 0.0, missing=True)],
    ]
    assert best_take(takes) == 1
    assert best_take([takes[2], takes[3]]) == 0  # every take flagged: the best weakest
    assert best_take([takes[1], [score("a", 0.6), score("b", 0.6)], takes[1]]) == 0  # the earliest of equals
    assert best_take([[]]) == 0
    with pytest.raises(ValueError):
        best_take([])


def test_min_identity_stops_only_on_an_unflagged_take_at_or_above_it():
    assert good_enough([score("a", 0.8), score("b", 0.7)], 0.7)
    assert not good_enough([score("a", 0.8), score("b", 0.69)], 0.7)
    assert not good_enough([score("a", 0.9, blended=True)], 0.5)
    assert not good_enough([score("a", 0.9)], None)


def test_take_seeds_are_the_panel_seed_first_then_stable_and_distinct():
    assert take_seed(1234, 0) == 1234
    seeds = [take_seed(1234, k) for k in range(16)]
    assert len(set(seeds)) == 16 and all(0 <= s < 2**32 for s in seeds)
    assert seeds == [take_seed(1234, k) for k in range(16)]
    assert take_seed(1235, 1) != seeds[1]


def test_scores_round_trip_through_their_dicts():
    original = CharacterScore("mira", 0.123456, "bolt", 0.25, True, False)
    again = CharacterScore.from_dict(original.to_dict())
    assert again.name == "mira" and again.closest == "bolt" and again.blended and not again.missing
    assert again.identity == pytest.approx(0.1235)


# ---------------------------------------------------------------------------------------------
# the embedded model's image encoder, on a planted case


@pytest.fixture(scope="module")
def default_pipeline():
    import storykit

    from anystory_cli.model_loading import load_pipeline

    threads = storykit.one_torch_thread()
    next(threads)
    yield load_pipeline("default", None)
    next(threads, None)


def test_embedded_encoder_scores_a_character_high_against_its_own_reference_and_low_against_anothers(
        default_pipeline):
    """Rendered sprite-world scenes of two held-out characters, their exact masks as the routing
    maps: each region is closest to its own reference, by a wide margin; swapping the references
    flags both as blended."""
    from PIL import Image

    from anystory_cli.lab.world.rng import WorldRng
    from anystory_cli.lab.world.scenes import reference_image, sample_scene

    rng = WorldRng("test-scores", 0)
    margins = []
    for _ in range(4):
        scene = sample_scene(rng.integer(1 << 40), 2, "heldout", 64)
        references = default_pipeline.identity_embeddings(
            [Image.fromarray(reference_image(s)) for s in scene.identity_seeds], [None, None])
        maps = np.concatenate([scene.masks.astype(np.float32), 0.5 * np.ones((1, 64, 64), np.float32)])
        regions = routed_regions(maps, 2)
        embeddings = default_pipeline.identity_embeddings([Image.fromarray(scene.image)] * 2, regions)
        scores = score_panel(["a", "b"], references, regions, embeddings)
        assert not any(s.blended or s.missing for s in scores)
        assert all(s.identity > 0.6 for s in scores)
        swapped = score_panel(["a", "b"], references[::-1], regions, embeddings)
        assert all(s.blended for s in swapped)
        margins += [s.identity - t.identity for s, t in zip(scores, swapped)]
    assert np.mean(margins) > 0.25


def test_flux_scores_with_redux_siglip_tell_two_planted_characters_apart():
    """The FLUX path: Redux's SigLIP (tiny, random) embeds references and routed regions; a panel
    made of the two references side by side scores each half highest against its own."""
    from PIL import Image

    import storykit
    from anystory_cli.flux.comic import FluxComicPipeline

    comic = FluxComicPipeline(storykit.tiny_flux_pipeline(), "tiny")
    subjects = storykit.FLUX_FIXTURE / "subjects"
    pictures = [Image.open(subjects / f"{name}.png").convert("RGB") for name in ("red", "blue")]
    masks = [Image.open(subjects / f"{name}_mask.png").convert("L") for name in ("red", "blue")]
    references = comic.identity_embeddings(pictures, masks)
    assert references.shape[0] == 2 and np.allclose(np.linalg.norm(references, axis=1), 1.0, atol=1e-5)
    side = 64
    panel = Image.new("RGB", (2 * side, side), (255, 255, 255))
    for i, picture in enumerate(pictures):
        panel.paste(picture.resize((side, side)), (i * side, 0))
    maps = np.zeros((3, side, 2 * side), np.float32)
    maps[0, :, :side], maps[1, :, side:] = 1.0, 1.0
    regions = routed_regions(maps, 2)
    scores = score_panel(["red", "blue"], references, regions, comic.identity_embeddings([panel] * 2, regions))
    assert not any(s.blended for s in scores)
    swapped = score_panel(["red", "blue"], references[::-1], regions, comic.identity_embeddings([panel] * 2, regions))
    assert all(s.blended for s in swapped)
