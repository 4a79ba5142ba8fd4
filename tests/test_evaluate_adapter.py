"""The AnyStory evaluation on held-out identities (`evaluate_adapter` and its parts in
anystory_cli/lab/evaluate.py), the judge's identification (`Judge.character_log_probs`, `verdict_of`,
`identity_log_likelihood`), the pipeline's `route=` / `route_latents`, and
`anystory evaluate adapter`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from anystory_cli import cli
from anystory_cli.lab import evaluate as ev
from anystory_cli.errors import InputError
from anystory_cli.lab.judge import POSES, identity_log_likelihood, load_judge, verdict_of
from anystory_cli.layout import CHARACTER_TOP, PLACEMENT_BOXES
from anystory_cli.plan import figure_boxes
from anystory_cli.lab.world.identity import ATTRIBUTE_CLASSES, NOT_APPLICABLE, identity_from_seed, split_of
from anystory_cli.lab.world.scenes import reference_image, sample_scene

RATES = ("identity", "blended", "found", "all_attributes")


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def pipe(tiny_story_pipeline):
    return tiny_story_pipeline


@pytest.fixture(scope="module")
def heldout_panels():
    return ev.adapter_eval_panels(4, seed=0)  # 16 panels, 40 characters


@pytest.fixture(scope="module")
def encodings(pipe):
    cache = {}

    def encode(identity_seed):
        if identity_seed not in cache:
            cache[identity_seed] = pipe.encode_character(Image.fromarray(reference_image(identity_seed)),
                                                         name=f"identity {identity_seed}")
        return cache[identity_seed]

    return encode


@pytest.fixture(scope="module")
def evaluation(pipe, judge, tmp_path_factory):
    calls = []
    folder = tmp_path_factory.mktemp("adapter-report")
    result = ev.evaluate_adapter(pipe, judge, panels_per_count=1, seed=0, steps=1, routing_scenes=1,
                                 report_dir=folder, progress=lambda *args: calls.append(args))
    return result, folder, calls


def _mean(values):
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------
# the panels


def _panel_key(panel):
    return (panel.scene.seed, panel.scene.caption, tuple(panel.scene.identity_seeds), panel.regions,
            panel.candidates, panel.noise_seed)


def test_panels_are_deterministic_and_balanced_over_counts():
    panels = ev.adapter_eval_panels(3, seed=5)
    assert [len(p.scene.instances) for p in panels] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert [_panel_key(p) for p in ev.adapter_eval_panels(3, seed=5)] == [_panel_key(p) for p in panels]
    other = ev.adapter_eval_panels(3, seed=6)
    assert [_panel_key(p) for p in other] != [_panel_key(p) for p in panels]
    assert len({p.noise_seed for p in panels}) == len(panels)
    assert len({p.scene.seed for p in panels}) == len(panels)
    assert all(p.scene.image.shape == (64, 64, 3) and p.scene.split == "heldout" for p in panels)
    assert ev.adapter_eval_panels(0, seed=5) == []


def test_panel_candidates_are_heldout_distinct_looks_own_first(heldout_panels):
    for distractors in (9, 3):
        panels = heldout_panels if distractors == 9 else ev.adapter_eval_panels(2, seed=1, distractors=3)
        for panel in panels:
            own = panel.scene.identity_seeds
            assert len(panel.candidates) == len(own) + distractors
            assert list(panel.candidates[:len(own)]) == own  # the panel's own, in scene (left-to-right) order
            assert all(split_of(s) == "heldout" for s in panel.candidates)
            looks = [identity_from_seed(s).key() for s in panel.candidates]
            assert len(set(looks)) == len(looks)  # no distractor looks like an own character or another one


def test_panel_regions_are_the_story_placement_boxes(heldout_panels):
    for panel in heldout_panels:
        count = len(panel.scene.instances)
        assert len(panel.regions) == count
        if count == 1:
            assert panel.regions == (PLACEMENT_BOXES[panel.scene.instances[0].position],)
        else:
            expected = tuple((i / count, CHARACTER_TOP, (i + 1) / count, 1.0) for i in range(count))
            assert len(panel.regions) == len(expected)
            for got, want in zip(panel.regions, expected):
                assert got == pytest.approx(want)
    lone_words = {p.scene.instances[0].position for p in ev.adapter_eval_panels(12, seed=2)
                  if len(p.scene.instances) == 1}
    assert len(lone_words) >= 2  # lone characters are asked where their caption puts them


# ---------------------------------------------------------------------------------------------
# matching located boxes to the places asked for


def _box(centre_share, width=64, half=4):
    cx = centre_share * width
    return (cx - half, 10.0, cx + half, 50.0)


def test_match_to_places_needs_the_centre_inside_a_span():
    assert ev.match_to_places([PLACEMENT_BOXES["center"]], [_box(0.1), _box(0.9)], 64) == [None]
    assert ev.match_to_places([PLACEMENT_BOXES["center"]], [_box(0.1), _box(0.6)], 64) == [1]
    assert ev.match_to_places([PLACEMENT_BOXES["left"], PLACEMENT_BOXES["right"]], [], 64) == [None, None]
    # Located boxes are in pixels of `width`: the same box is at another share of a wider image.
    assert ev.match_to_places([PLACEMENT_BOXES["right"]], [(40.0, 0.0, 56.0, 60.0)], 64) == [0]
    assert ev.match_to_places([PLACEMENT_BOXES["right"]], [(40.0, 0.0, 56.0, 60.0)], 128) == [None]


def test_match_to_places_nearest_centre_wins_and_each_box_serves_once():
    whole = (0.0, 0.2, 1.0, 1.0)
    assert ev.match_to_places([whole], [_box(0.2), _box(0.45), _box(0.9)], 64) == [1]
    columns = [(0.0, 0.2, 0.5, 1.0), (0.5, 0.2, 1.0, 1.0)]
    assert ev.match_to_places(columns, [_box(0.28), _box(0.1), _box(0.7)], 64) == [0, 2]
    assert ev.match_to_places(columns, [_box(0.7), _box(0.28)], 64) == [1, 0]
    # One box in two overlapping spans goes to the place whose centre it is nearest, whatever
    # the order the places are listed in; the other place gets nothing.
    right_half = (0.5, 0.2, 1.0, 1.0)
    assert ev.match_to_places([whole, right_half], [_box(0.7)], 64) == [None, 0]
    assert ev.match_to_places([right_half, whole], [_box(0.7)], 64) == [0, None]
    # Two boxes, two overlapping places: both served, each box once.
    matched = ev.match_to_places([whole, right_half], [_box(0.7), _box(0.55)], 64)
    assert sorted(matched) == [0, 1] and matched == [1, 0]


# ---------------------------------------------------------------------------------------------
# judging a panel: the judge's ceiling on the rendered scenes


def _check_records(records, panel):
    own = panel.scene.identity_seeds
    assert [r["identity_seed"] for r in records] == own
    for r, seed in zip(records, own):
        truth = identity_from_seed(seed).attributes()
        assert set(r["attributes"]) == {k for k, v in truth.items() if v != NOT_APPLICABLE}
        if r["found"]:
            assert r["identified_as"] in panel.candidates
            assert r["right"] == (r["identified_as"] == seed)
            assert r["blended"] == (r["identified_as"] in own and r["identified_as"] != seed)
        else:
            assert r["identified_as"] is None and not r["right"] and not r["blended"] and not r["all_attributes"]
        assert not (r["right"] and r["blended"])
        if r["all_attributes"]:
            assert all(r["attributes"].values())


def test_judge_identifies_rendered_heldout_characters_at_their_true_places(judge, heldout_panels):
    records = []
    for panel in heldout_panels:
        panel_records = ev.judge_panel(judge, panel.scene.image, panel, ev._true_places(panel.scene))
        _check_records(panel_records, panel)
        records += panel_records
    assert len(records) == 40
    summary = ev.summarise_characters(records)
    assert summary["found"] >= 0.95, summary
    assert summary["identity"] >= 0.9, summary
    assert summary["blended"] <= 0.05, summary
    # Identification among 10 candidates is far easier than reading all ten attributes right.
    assert summary["all_attributes"] < summary["identity"]


def test_judge_panel_reports_another_panel_character_as_blended(judge, heldout_panels):
    """Mirror a rendered panel and ask for each character where the mirrored image shows its
    partner: the judge must name the partner (blending), not the character asked for."""
    records = []
    for panel in heldout_panels:
        n = len(panel.scene.instances)
        if n not in (2, 4):  # no character stands in its own mirrored place
            continue
        image = np.ascontiguousarray(panel.scene.image[:, ::-1])
        places = ev._true_places(panel.scene)
        asked = [(1 - places[n - 1 - i][2], places[n - 1 - i][1], 1 - places[n - 1 - i][0], places[n - 1 - i][3])
                 for i in range(n)]
        panel_records = ev.judge_panel(judge, image, panel, asked)
        _check_records(panel_records, panel)
        records += panel_records
    summary = ev.summarise_characters(records)
    assert summary["found"] >= 0.9 and summary["blended"] >= 0.85 and summary["identity"] <= 0.1, summary


def test_judge_panel_on_a_blank_image_finds_nobody(judge, heldout_panels):
    for panel in heldout_panels[::3]:
        colour = panel.scene.image.reshape(-1, 3).mean(0).astype(np.uint8)
        blank = np.broadcast_to(colour, panel.scene.image.shape).copy()
        records = ev.judge_panel(judge, blank, panel, list(panel.regions))
        assert len(records) == len(panel.scene.instances)
        for record in records:
            assert record["found"] is False and record["right"] is False and record["blended"] is False
            assert record["identified_as"] is None and not any(record["attributes"].values())
        summary = ev.summarise_characters(records)
        assert summary["identity"] == summary["found"] == summary["blended"] == 0.0


def test_summarise_characters_rates():
    records = [
        {"right": True, "blended": False, "found": True, "all_attributes": True, "pose": True,
         "attributes": {"a": True, "b": True}},
        {"right": False, "blended": True, "found": True, "all_attributes": False, "pose": True,
         "attributes": {"a": False}},
        {"right": False, "blended": False, "found": False, "all_attributes": False, "pose": False,
         "attributes": {"a": False, "b": False}},
        {"right": True, "blended": False, "found": True, "all_attributes": False, "pose": False,
         "attributes": {"a": True, "b": False}},
    ]
    out = ev.summarise_characters(records)
    assert out["identity"] == 0.5 and out["blended"] == 0.25 and out["found"] == 0.75
    assert out["all_attributes"] == 0.25 and out["pose"] == 0.5 and out["characters"] == 4
    assert out["per_attribute"] == {"a": 0.5, "b": pytest.approx(1 / 3, abs=1e-4)}  # b only where it applies
    assert "right" not in out
    empty = ev.summarise_characters([])
    assert empty["characters"] == 0 and math.isnan(empty["identity"]) and empty["per_attribute"] == {}


# ---------------------------------------------------------------------------------------------
# the judge's log-probabilities and identification


def _log_probs(seed, confident=None):
    """Random per-head log-probabilities; `confident` puts 0.9 on the chosen class of each head."""
    rng = np.random.default_rng(seed)
    heads = {**ATTRIBUTE_CLASSES, "pose": POSES}
    out = {}
    for name, classes in heads.items():
        if confident is not None and name in confident:
            p = np.full(len(classes), 0.1 / (len(classes) - 1))
            p[confident[name]] = 0.9
        else:
            p = rng.dirichlet(np.ones(len(classes)))
        out[name] = np.log(p)
    return out


def test_identity_log_likelihood_sums_the_applicable_heads():
    lp = _log_probs(0)
    attributes = identity_from_seed(7).attributes()
    expected = sum(lp[k][v] for k, v in attributes.items() if v != NOT_APPLICABLE)
    assert identity_log_likelihood(lp, attributes) == pytest.approx(expected)
    # NOT_APPLICABLE adds nothing (it must not index the last class either).
    with_pattern = {**attributes, "pattern": 1, "pattern_colour": 2, "pattern_scale": 0}
    without = {**with_pattern, "pattern_colour": NOT_APPLICABLE, "pattern_scale": NOT_APPLICABLE}
    assert identity_log_likelihood(lp, with_pattern) - identity_log_likelihood(lp, without) == pytest.approx(
        lp["pattern_colour"][2] + lp["pattern_scale"][0])
    all_missing = {k: NOT_APPLICABLE for k in attributes}
    assert identity_log_likelihood(lp, all_missing) == 0.0


def test_identity_log_likelihood_is_a_distribution_over_looks():
    """Over the pattern subtree (none, or a pattern with its colour and scale) the likelihoods
    sum to 1: a look without a pattern is neither favoured nor penalised for unread children."""
    lp = _log_probs(1)
    rest = {k: 0 for k in ATTRIBUTE_CLASSES}
    base = identity_log_likelihood(lp, {**rest, "pattern": NOT_APPLICABLE, "pattern_colour": NOT_APPLICABLE,
                                        "pattern_scale": NOT_APPLICABLE})
    total = 0.0
    for pattern, name in enumerate(ATTRIBUTE_CLASSES["pattern"]):
        if name == "none":
            total += math.exp(identity_log_likelihood(lp, {**rest, "pattern": pattern, "pattern_colour": NOT_APPLICABLE,
                                                           "pattern_scale": NOT_APPLICABLE}) - base)
            continue
        for colour in range(len(ATTRIBUTE_CLASSES["pattern_colour"])):
            for scale in range(len(ATTRIBUTE_CLASSES["pattern_scale"])):
                total += math.exp(identity_log_likelihood(
                    lp, {**rest, "pattern": pattern, "pattern_colour": colour, "pattern_scale": scale}) - base)
    assert total == pytest.approx(1.0, rel=1e-6)


def test_the_per_head_argmax_identity_is_the_most_likely_candidate():
    from anystory_cli.lab.world.identity import heldout_identity_seeds

    seeds = heldout_identity_seeds(40)
    for target in seeds[:8]:
        attributes = identity_from_seed(target).attributes()
        lp = _log_probs(target, confident={k: v for k, v in attributes.items() if v != NOT_APPLICABLE})
        assert verdict_of(lp).attributes == attributes
        scores = [identity_log_likelihood(lp, identity_from_seed(s).attributes()) for s in seeds]
        assert seeds[int(np.argmax(scores))] == target


def test_verdict_of_reads_argmax_and_leaves_unread_children_out():
    names = ATTRIBUTE_CLASSES
    choice = {k: len(v) - 1 for k, v in names.items()}
    choice["pattern"] = names["pattern"].index("none")
    lp = _log_probs(3, confident={**choice, "pose": 2})
    verdict = verdict_of(lp)
    assert verdict.pose == POSES[2]
    assert verdict.attributes["pattern_colour"] == verdict.attributes["pattern_scale"] == NOT_APPLICABLE
    assert verdict.attributes["accessory"] == choice["accessory"] and names["accessory"][choice["accessory"]] != "none"
    assert verdict.attributes["accessory_colour"] == choice["accessory_colour"]
    choice["accessory"] = names["accessory"].index("none")
    choice["pattern"] = 1
    verdict = verdict_of(_log_probs(3, confident=choice))
    assert verdict.attributes["accessory_colour"] == NOT_APPLICABLE
    assert verdict.attributes["pattern_colour"] == choice["pattern_colour"]


def test_character_log_probs_nest_like_the_boxes(judge, heldout_panels):
    scene = heldout_panels[12].scene  # four characters
    images = np.stack([scene.image, heldout_panels[0].scene.image])
    boxes = [[tuple(map(float, b)) for b in scene.boxes], []]
    out = judge.character_log_probs(images, boxes)
    assert len(out) == 2 and len(out[0]) == 4 and out[1] == []
    for crop in out[0]:
        assert set(crop) == set(ATTRIBUTE_CLASSES) | {"pose"}
        for name, values in crop.items():
            assert values.shape == (len(ATTRIBUTE_CLASSES.get(name, POSES)),)
            assert np.logaddexp.reduce(values) == pytest.approx(0.0, abs=1e-4)  # log-probabilities
    # One crop alone gives the same numbers as in a batch; the verdicts are their argmaxes.
    alone = judge.character_log_probs(scene.image[None], [[boxes[0][2]]])[0][0]
    for name in alone:
        np.testing.assert_allclose(alone[name], out[0][2][name], atol=1e-5)
    read = judge.read_characters(images[:1], boxes[:1])[0]
    assert [r.attributes for r in read] == [verdict_of(c).attributes for c in out[0]]
    assert judge.character_log_probs(images[:1], [[]]) == [[]]


def test_as_drawn_reads_a_character_from_the_panel_at_its_own_proportions(judge, heldout_panels):
    """A wide panel whose left half is a square scene: read as drawn, each character there gives
    the square's numbers (boxes in the judge's square frame, so x halved); squashed, it does not.
    The right half repeats the square's last column, as a crop running past an edge does."""
    scene = heldout_panels[12].scene  # four characters, 64x64
    wide = np.concatenate([scene.image, np.repeat(scene.image[:, -1:], 64, axis=1)], axis=1)  # 64x128
    boxes = [tuple(map(float, b)) for b in scene.boxes]
    squeezed = [(x0 / 2, y0, x1 / 2, y1) for x0, y0, x1, y1 in boxes]
    square = judge.character_log_probs(scene.image[None], [boxes])[0]
    for mine, reference in zip(judge.character_log_probs(scene.image[None], [boxes], as_drawn=True)[0], square):
        for name in reference:  # a square is read the same either way
            np.testing.assert_array_equal(mine[name], reference[name])
    drawn = judge.character_log_probs(wide[None], [squeezed], as_drawn=True)[0]
    squashed = judge.character_log_probs(wide[None], [squeezed])[0]
    for mine, reference, flat in zip(drawn, square, squashed):
        for name in reference:
            np.testing.assert_allclose(mine[name], reference[name], atol=1e-4)
    assert any(not np.allclose(flat[name], reference[name], atol=1e-2)
               for flat, reference in zip(squashed, square) for name in reference)


def test_wide_and_tall_rendered_panels_are_identified_as_drawn(judge):
    """The judge's ceiling on other panel shapes: read as drawn, the rendered scenes' characters
    are identified about as well as on squares (squashed, a tall panel's are not: 0.72 on 16
    panels per count, against 0.96 as drawn)."""
    for shape, floor in (((64, 128), 0.9), ((128, 64), 0.85)):
        panels = ev.adapter_eval_panels(3, seed=2, size=shape)
        assert all(p.scene.image.shape[:2] == shape for p in panels)
        records = [ev.judge_panel(judge, p.scene.image, p, ev._true_places(p.scene)) for p in panels]
        found = [r for rs in records for r in rs]
        assert _mean([r["right"] for r in found]) >= floor, shape


# ---------------------------------------------------------------------------------------------
# the pipeline: route= and route_latents


def _draw(pipe, characters, route, regions=None):
    out = pipe("two characters on a hill", characters=characters, regions=regions, route=route,
               num_inference_steps=1, guidance_scale=4.0, generator=torch.Generator().manual_seed(3), output_type="np")
    return np.asarray(out.images[0])


def test_route_false_changes_a_two_character_image_and_nothing_without_characters(pipe, encodings, heldout_panels):
    characters = [encodings(s) for s in heldout_panels[4].scene.identity_seeds]
    routed, unrouted = _draw(pipe, characters, True), _draw(pipe, characters, False)
    assert np.abs(routed - unrouted).max() > 1e-4
    np.testing.assert_array_equal(_draw(pipe, characters, True), routed)  # same generator, same image
    np.testing.assert_array_equal(_draw(pipe, [], True), _draw(pipe, [], False))


def test_route_false_does_not_consult_the_router_and_leaves_the_null_subject_out(pipe, encodings, heldout_panels):
    """Without a router every character is at every pixel and the background entry nowhere, as
    stage 1 trains a lone character: neither the routers' weights nor the null subject matter."""
    characters = [encodings(s) for s in heldout_panels[4].scene.identity_seeds]
    before = _draw(pipe, characters, False)
    saved = {k: v.clone() for k, v in pipe.adapter.state_dict().items()}
    try:
        with torch.no_grad():
            for p in pipe.adapter.routers.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
            np.testing.assert_array_equal(_draw(pipe, characters, False), before)
            assert np.abs(_draw(pipe, characters, True) - before).max() > 1e-4
        # Without guidance the null subject appears only as the background entry: nowhere without a router.
        def plain(route):
            out = pipe("two characters on a hill", characters=characters, route=route, num_inference_steps=1,
                       guidance_scale=1.0, generator=torch.Generator().manual_seed(3), output_type="np")
            return np.asarray(out.images[0])

        unrouted, routed = plain(False), plain(True)
        null_tokens, null_routing = pipe.null_subject()
        pipe._null_subject = (null_tokens * 5.0, null_routing)
        np.testing.assert_array_equal(plain(False), unrouted)
        assert np.abs(plain(True) - routed).max() > 1e-4  # the router does give the background pixels
    finally:
        pipe.adapter.load_state_dict(saved)
        pipe._null_subject = None


def test_route_latents_gives_one_soft_map_per_cross_attention_layer(pipe, encodings, heldout_panels):
    seeds = heldout_panels[8].scene.identity_seeds  # three characters
    characters = [encodings(s) for s in seeds]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = pipe.route_latents(latents, 500, "three characters", characters)
    layers = {name[:-len(".processor")] for name in pipe.base.unet.attn_processors if name.endswith("attn2.processor")}
    assert set(maps) == layers and len(maps) == 7
    sides = set()
    for layer, m in maps.items():
        assert m.dtype == torch.float32 and m.shape[:2] == (1, len(characters) + 1)
        sides.add(tuple(m.shape[-2:]))
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(1), torch.ones(1, *m.shape[-2:]), atol=1e-5, rtol=0)
    assert sides == {(16, 16), (8, 8)}
    # Entries follow the characters' order, the background last.
    swapped = pipe.route_latents(latents, 500, "three characters", [characters[1], characters[0], characters[2]])
    for layer, m in maps.items():
        torch.testing.assert_close(swapped[layer][0], m[0, [1, 0, 2, 3]], atol=1e-5, rtol=0)
    one = pipe.route_latents(latents, 500, "one character", characters[:1])
    assert all(m.shape[1] == 2 for m in one.values())


# ---------------------------------------------------------------------------------------------
# placement and the router as a segmenter


def test_region_share_is_the_routing_mass_inside_each_region():
    fine = torch.zeros(1, 3, 8, 8)
    fine[0, 0, :, :4] = 1.0  # character 0 entirely in the left half
    fine[0, 1] = 1.0 / 64  # character 1 spread evenly
    coarse = torch.zeros(1, 3, 4, 4)
    coarse[0, 0, :, 2:] = 1.0  # character 0 entirely in the right half
    coarse[0, 1, :, 2:] = 1.0
    regions = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    assert ev.region_share({"a": fine}, regions) == pytest.approx(0.75)
    assert ev.region_share({"b": coarse}, regions) == pytest.approx(0.5)
    assert ev.region_share({"a": fine, "b": coarse}, regions) == pytest.approx(0.625)
    empty = torch.zeros(1, 3, 8, 8)
    assert math.isnan(ev.region_share({"a": empty}, regions))  # no mass: nothing to share


class _OraclePipe:
    """The tiny pipeline's parts, with a router that returns `how` of each scene's true masks."""

    def __init__(self, pipe, scenes, how):
        self.device, self.how = pipe.device, how
        self.vae, self.unet, self.scheduler, self.vae_scale_factor = pipe.vae, pipe.unet, pipe.scheduler, pipe.vae_scale_factor
        self.scenes = {tuple(s.identity_seeds): s for s in scenes}
        self.calls = []

    def route_latents(self, latents, timestep, prompt, characters):
        import torch.nn.functional as F

        self.calls.append(timestep)
        scene = self.scenes[tuple(characters)]
        n = len(characters)
        out = {}
        for name, side in (("fine", latents.shape[-1]), ("coarse", latents.shape[-1] // 2)):
            truth = F.interpolate(torch.from_numpy(scene.masks).float()[:, None], size=(side, side), mode="area")[:, 0] > 0.5
            maps = torch.zeros(1, n + 1, side, side)
            maps[0, n] = 1.0
            for i in range(n):
                j = {"truth": i, "shifted": (i + 1) % n}.get(self.how)
                if j is not None:
                    maps[0, i][truth[j]] = 1.0
                    maps[0, n][truth[j]] = 0.0
            out[name] = maps
        return out


def test_routing_iou_scores_the_router_against_the_true_masks(pipe):
    scenes = [sample_scene(41, 2, "heldout"), sample_scene(42, 3, "heldout")]
    perfect = ev.routing_iou(_OraclePipe(pipe, scenes, "truth"), scenes, lambda s: s, seed=0)
    assert perfect["timesteps"] == [900, 700, 500, 300, 100, 20] and perfect["scenes"] == 2
    assert perfect["finest_resolution"] == "16" and set(perfect["by_resolution"]) == {"16", "8"}
    for row in perfect["by_resolution"].values():
        assert list(row) == ["900", "700", "500", "300", "100", "20"]
        assert all(v == 1.0 for v in row.values())
    assert perfect["finest_late"] == 1.0
    background = ev.routing_iou(_OraclePipe(pipe, scenes, "background"), scenes, lambda s: s, seed=0)
    assert all(v == 0.0 for row in background["by_resolution"].values() for v in row.values())
    assert background["finest_late"] == 0.0
    assert perfect["foreground_finest_late"] == 1.0 and background["foreground_finest_late"] == 0.0
    shifted = ev.routing_iou(_OraclePipe(pipe, scenes, "shifted"), scenes, lambda s: s, seed=0)
    assert all(v == 0.0 for row in shifted["by_resolution"].values() for v in row.values())
    # every character found, each taken for another: the foreground is perfect
    assert all(v == 1.0 for row in shifted["foreground_by_resolution"].values() for v in row.values())
    oracle = _OraclePipe(pipe, scenes[:1], "truth")
    custom = ev.routing_iou(oracle, scenes[:1], lambda s: s, seed=0, shares=(0.5, 0.05))
    assert custom["timesteps"] == [500, 50] and oracle.calls == [500, 50]
    assert list(custom["by_resolution"]["16"]) == ["500", "50"]


def test_routing_iou_on_the_tiny_pipeline(pipe, encodings):
    scenes = [sample_scene(43, 2, "heldout"), sample_scene(44, 4, "heldout")]
    iou = ev.routing_iou(pipe, scenes, encodings, seed=1)
    assert iou["timesteps"] == [900, 700, 500, 300, 100, 20] and iou["scenes"] == 2
    assert set(iou["by_resolution"]) == {"16", "8"} and iou["finest_resolution"] == "16"
    for row in iou["by_resolution"].values():
        assert [int(t) for t in row] == iou["timesteps"]
        assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in row.values())
    late = [v for t, v in iou["by_resolution"]["16"].items() if int(t) <= 100]
    assert len(late) == 2 and iou["finest_late"] == pytest.approx(_mean(late), abs=1e-4)
    assert ev.routing_iou(pipe, scenes, encodings, seed=1) == iou  # deterministic


# ---------------------------------------------------------------------------------------------
# evaluate_adapter end to end


def test_evaluate_adapter_end_to_end(evaluation):
    result, _, calls = evaluation
    assert result["variants"] == list(ev.ADAPTER_VARIANTS) and set(result["results"]) == set(ev.ADAPTER_VARIANTS)
    assert result["candidates"] == 10 and result["panels_per_count"] == 1 and result["steps"] == 1
    for figures in [*result["results"].values(), result["rendered"]]:
        assert set(figures) == {"1", "2", "3", "4", "multi"}
        assert [figures[c]["characters"] for c in ("1", "2", "3", "4", "multi")] == [1, 2, 3, 4, 9]
    # Each rate is the share of that count's characters whose record says so.
    sources = {**{v: lambda panel, v=v: panel["judged"][v] for v in result["variants"]},
               "rendered": lambda panel: panel["rendered"]}
    for name, records_of in sources.items():
        figures = result["rendered"] if name == "rendered" else result["results"][name]
        for count in ("1", "2", "3", "4", "multi"):
            records = [r for panel in result["panels"] for r in records_of(panel)
                       if (len(panel["identity_seeds"]) > 1 if count == "multi" else len(panel["identity_seeds"]) == int(count))]
            group = figures[count]
            assert group["characters"] == len(records)
            for key, field in (("identity", "right"), ("blended", "blended"), ("found", "found"),
                               ("all_attributes", "all_attributes")):
                assert group[key] == pytest.approx(_mean([float(r[field]) for r in records]), abs=1e-4), (name, count, key)
            for attribute, rate in group["per_attribute"].items():
                assert rate == pytest.approx(_mean([float(r["attributes"][attribute]) for r in records
                                                    if attribute in r["attributes"]]), abs=1e-4)
            assert group["identity"] + group["blended"] <= group["found"] + 1e-9
    # The judge's ceiling: the rendered scenes at their true places.
    assert result["rendered"]["multi"]["identity"] >= 0.85 and result["rendered"]["1"]["identity"] == 1.0
    anystory = result["results"]["anystory"]
    assert result["reached"] == {"single_identity": anystory["1"]["identity"], "two_identity": anystory["2"]["identity"],
                                 "two_blending_max": anystory["2"]["blended"],
                                 "routing_iou_finest_late": result["routing_iou"]["finest_late"]}
    assert set(result["goals_met"]) == set(ev.ADAPTER_GOALS) and all(isinstance(v, bool) for v in result["goals_met"].values())
    assert result["goals_met"]["two_blending_max"] == (anystory["2"]["blended"] <= ev.ADAPTER_GOALS["two_blending_max"])
    intervals = result["goal_intervals"]
    assert set(intervals) == {"single_identity", "two_identity", "two_blending_max"}  # the rates, not the IoU
    for goal, (low, high) in intervals.items():
        assert 0.0 <= low <= result["reached"][goal] <= high <= 1.0, goal
        assert high - low > 0.3, goal  # one or two characters tell little
    assert result["placement"]["found_in_region"] == anystory["multi"]["found"]
    assert 0.0 <= result["placement"]["routing_share_in_region"] <= 1.0
    assert result["routing_iou"]["scenes"] == 1 and result["routing_iou"]["finest_resolution"] == "16"
    assert len(result["panels"]) == 4
    for record, count in zip(result["panels"], (1, 2, 3, 4)):
        assert len(record["identity_seeds"]) == count and record["candidates"][:count] == record["identity_seeds"]
        assert set(record["judged"]) == set(ev.ADAPTER_VARIANTS)
        assert all(len(v) == count for v in [*record["judged"].values(), record["rendered"]])
    # Progress: each panel x variant drawn, then the routing scenes.
    draws = [c for c in calls if c[0] == "draw"]
    total = 4 * len(ev.ADAPTER_VARIANTS)
    assert draws == [("draw", k, total) for k in range(1, total + 1)] and calls[-1] == ("routing", 1, 1)
    json.dumps(result)  # a plain dict


def test_wilson_interval_matches_a_hand_worked_value_and_its_limits():
    # 2 of 32 (two-character blending on 16 panels): centre 0.1094, half-width 0.0921.
    assert ev.wilson_interval(2, 32) == pytest.approx((0.0173, 0.2015), abs=2e-4)
    low, high = ev.wilson_interval(0, 32)
    assert low == 0.0 and high == pytest.approx(0.1072, abs=2e-4)  # 0 of 32 does not prove a rate of 0
    low, high = ev.wilson_interval(32, 32)
    assert high == 1.0 and low == pytest.approx(0.8928, abs=2e-4)  # symmetric to 0 of 32
    assert ev.wilson_interval(20, 320)[1] - ev.wilson_interval(20, 320)[0] < high - low  # narrows with more panels
    assert all(math.isnan(v) for v in ev.wilson_interval(0, 0))


def test_wilson_interval_equals_the_score_formula_on_a_grid():
    z = 1.96
    for trials in (*range(1, 41), 64, 128, 320):
        for successes in range(trials + 1):
            rate, spread = successes / trials, z * z / trials
            centre = (rate + spread / 2) / (1 + spread)
            half = z * math.sqrt(rate * (1 - rate) / trials + spread / (4 * trials)) / (1 + spread)
            expected = (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))
            assert ev.wilson_interval(successes, trials) == expected, (successes, trials)


def test_evaluate_adapter_writes_its_report(evaluation):
    result, folder, _ = evaluation
    assert result["report"] == {
        "samples": str(folder / "samples.png"), "routing": str(folder / "routing.png"),
        "html": str(folder / "index.html"), "json": str(folder / "report.json")}
    for name in ("samples.png", "routing.png"):
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width > 128 and image.height > 128
            image.verify()
    html = (folder / "index.html").read_text()
    assert html.startswith("<!doctype html>") and "samples.png" in html and "routing.png" in html
    low, high = result["goal_intervals"]["two_blending_max"]
    assert f"(95 % interval {low:.2f}-{high:.2f})" in html
    assert "<table>" in html and all(v in html for v in ev.ADAPTER_VARIANTS)
    report = json.loads((folder / "report.json").read_text())
    assert "report" not in report
    assert report["results"] == json.loads(json.dumps(result["results"]))
    assert report["panels"] == json.loads(json.dumps(result["panels"]))


def _report_result(variants=("anystory", "text_only"), model_id="default@0123") -> dict:
    """A small `evaluate_adapter` result with every field the HTML report reads."""
    def figures(base: float) -> dict:
        return {c: {"identity": base, "blended": 0.05, "all_attributes": 0.5, "found": float("nan") if c == "3" else 1.0}
                for c in ("1", "2", "3", "multi")}

    return {
        "variants": list(variants), "results": {v: figures(0.25 * (k + 1)) for k, v in enumerate(variants)},
        "rendered": figures(0.875),
        "routing_iou": {"timesteps": [100, 500], "scenes": 8,
                        "by_resolution": {"8": {"100": 0.5, "500": None}},
                        "foreground_by_resolution": {"8": {"100": 0.75, "500": 0.625}}},
        "goals": {"single_identity": 0.9, "two_blending_max": 0.05},
        "reached": {"single_identity": 0.93, "two_blending_max": 0.031},
        "goals_met": {"single_identity": True, "two_blending_max": True},
        "goal_intervals": {"single_identity": (0.8, 0.97), "two_blending_max": (0.0, 0.107)},
        "placement": {"routing_share_in_region": 0.812, "found_in_region": 0.9},
        "panels_per_count": 16, "image_size": [64, 128], "routing_iou_image_size": [64, 64], "steps": 25,
        "guidance_scale": 4.0, "guidance_interval": [0.0, 0.7], "subject_strength": 1.0, "reference_strength": 0.0,
        "seed": 3, "candidates": 12, "model_id": model_id,
    }


def test_the_report_template_lays_out_every_table():
    html = ev._adapter_html(_report_result())
    assert html.startswith('<!doctype html><meta charset="utf-8"><title>AnyStory evaluation</title>\n')
    assert html.endswith('<h2>Samples</h2><img src="samples.png"><h2>Routing maps</h2><img src="routing.png">\n')
    assert ("<p>16 panels per character count, 64x128 panels (routing IoU on 64x64 scenes), 25 steps, guidance 4.0 "
            "at t/T in [0.0, 0.7], subject strength 1.0, reference strength 0.0,\nseed 3; each character identified "
            "among 12 candidates. Model default@0123.</p>") in html
    assert ("<h2>Goals</h2><ul><li>single_identity: goal ≥ 0.90, reached 0.93 (95 % interval 0.80-0.97) — met</li>"
            "<li>two_blending_max: goal ≤ 0.05, reached 0.03 (95 % interval 0.00-0.11) — met</li></ul>\n") in html
    assert ("<h2>Characters</h2><h3>identity (identified as itself)</h3><table><tr><th></th><th>1 char.</th>"
            "<th>2 char.</th><th>3 char.</th><th>2-4 char.</th></tr><tr><td>anystory</td><td>0.25</td><td>0.25</td>"
            "<td>0.25</td><td>0.25</td></tr><tr><td>text_only</td><td>0.50</td>") in html
    assert html.count("<table>") == 5 and html.count("<tr><td>text_only</td>") == 4
    assert "<td>1.00</td><td>1.00</td><td>–</td><td>1.00</td></tr></table>\n<h2>Placement</h2>" in html  # nan: –
    assert ("<table><tr><th>latent side</th><th>t=100</th><th>t=500</th></tr><tr><td>8x8</td><td>0.50</td>"
            "<td>–</td></tr><tr><td>8x8, any character</td><td>0.75</td><td>0.62</td></tr></table>\n") in html


def test_the_report_escapes_what_it_shows():
    html = ev._adapter_html(_report_result(variants=("anystory", "<b>bold</b> & co"),
                                           model_id='/models/<script>alert("x")</script>'))
    assert "<script>" not in html and "<b>" not in html
    assert "Model /models/&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;.</p>" in html
    assert "<tr><td>&lt;b&gt;bold&lt;/b&gt; &amp; co</td>" in html


def test_the_report_template_ships_with_the_package():
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["anystory_cli"]
    templates = sorted((root / "anystory_cli" / "lab" / "templates").iterdir())
    assert [t.name for t in templates] == [ev.REPORT_TEMPLATE]
    for template in templates:
        relative = template.relative_to(root / "anystory_cli").as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_evaluate_adapter_is_deterministic_and_variants_share_the_noise(pipe, judge, evaluation):
    first, _, _ = evaluation
    again = ev.evaluate_adapter(pipe, judge, panels_per_count=1, seed=0, steps=1, routing_scenes=1)
    assert again["results"] == first["results"] and again["rendered"] == first["rendered"]
    assert again["routing_iou"] == first["routing_iou"] and again["panels"] == first["panels"]
    assert "report" not in again
    # AnyStory alone: the same panels drawn from the same noise, whatever else is drawn beside it.
    alone = ev.evaluate_adapter(pipe, judge, panels_per_count=1, seed=0, steps=1, routing_scenes=1,
                                variants=("anystory",))
    assert set(alone["results"]) == {"anystory"} and alone["results"]["anystory"] == first["results"]["anystory"]


def test_evaluate_adapter_on_wide_panels_draws_that_shape(pipe, judge, tmp_path):
    result = ev.evaluate_adapter(pipe, judge, panels_per_count=1, seed=0, steps=1, routing_scenes=1,
                                 variants=("anystory", "text_only"), shape=(64, 128), report_dir=tmp_path)
    assert result["image_size"] == [64, 128] and result["routing_iou_image_size"] == [64, 64]
    assert result["rendered"]["1"]["identity"] == 1.0 and result["rendered"]["multi"]["identity"] >= 0.85
    panel = ev.adapter_eval_panels(1, seed=0, size=(64, 128))[1]
    image, _ = ev.draw_panel(pipe, panel, [], "text_only", steps=1, guidance=4.0, size=(64, 128))
    assert image.shape == (64, 128, 3)
    with Image.open(tmp_path / "samples.png") as sheet:  # wide tiles, 256 pixels for 128 high
        assert sheet.width >= 4 * 48 + 3 * 256
    assert "64x128 panels (routing IoU on 64x64 scenes)" in (tmp_path / "index.html").read_text()
    # Squares are the panels and pictures they always were.
    assert [_panel_key(p) for p in ev.adapter_eval_panels(2, seed=4, size=(64, 64))] == \
        [_panel_key(p) for p in ev.adapter_eval_panels(2, seed=4)]


def test_tall_panels_hold_the_characters_that_fit():
    panels = ev.adapter_eval_panels(2, seed=0, size=(128, 64))
    counts = [len(p.scene.instances) for p in panels]
    assert counts[:2] == [1, 1] and all(1 <= c <= 4 for c in counts)
    for p in panels:  # one region per character placed; a lone one at its own position
        assert len(p.regions) == len(p.scene.instances)
        assert p.candidates[:len(p.scene.instances)] == tuple(p.scene.identity_seeds)


def test_text_only_variant_is_the_plain_base_pipeline(pipe):
    panel = ev.adapter_eval_panels(1, seed=0)[1]
    image, layers = ev.draw_panel(pipe, panel, [], "text_only", steps=1, guidance=4.0, guidance_interval=None)
    assert layers is None and image.dtype == np.uint8 and image.shape == (32, 32, 3)
    base = pipe.base(panel.scene.caption, num_inference_steps=1, guidance_scale=4.0, output_type="np",
                     generator=torch.Generator().manual_seed(panel.noise_seed)).images[0]
    np.testing.assert_array_equal(image, np.clip(np.round(base * 255), 0, 255).astype(np.uint8))


def test_strengths_reach_the_pipeline_and_ablations_keep_their_own(pipe, encodings, heldout_panels):
    """η and γ reach every call as a story's style passes them, except the one an ablation removes."""
    panel = heldout_panels[4]
    characters = [encodings(s) for s in panel.scene.identity_seeds]
    calls = []

    class Spy:
        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return pipe(*args, **kwargs)

    for variant in ("anystory", "no_router", "no_reference_net", "no_subject_tokens", "no_paste"):
        ev.draw_panel(Spy(), panel, characters, variant, steps=1, guidance=4.0,
                      subject_strength=1.5, reference_strength=2.0, paste_at=0.4)
    scales = [(c["subject_scale"], c["reference_scale"]) for c in calls]
    assert scales == [(1.5, 2.0), (1.5, 2.0), (1.5, None), (0.0, 2.0), (1.5, 2.0)]
    assert calls[1]["route"] is False
    assert all(c["reference_guidance"] is True for c in calls)
    # The figures are pasted where the story would paste them, except in the ablation without.
    assert [c["paste_at"] for c in calls] == [0.4, 0.4, 0.4, 0.4, None]
    assert all(c["figure_boxes"] == figure_boxes(panel.regions) for c in calls)
    ev.draw_panel(Spy(), panel, characters, "no_router", steps=1, guidance=4.0, reference_guidance=False)
    assert calls[-1]["reference_guidance"] is False


def test_reference_strength_changes_a_two_character_panel(pipe, encodings, heldout_panels):
    panel = heldout_panels[4]
    characters = [encodings(s) for s in panel.scene.identity_seeds]
    drawn = {gamma: ev.draw_panel(pipe, panel, characters, "anystory", steps=1, guidance=4.0,
                                  reference_strength=gamma)[0] for gamma in (0.0, 3.0)}
    default = ev.draw_panel(pipe, panel, characters, "anystory", steps=1, guidance=4.0)[0]
    np.testing.assert_array_equal(default, drawn[0.0])
    assert np.abs(drawn[3.0].astype(int) - drawn[0.0].astype(int)).max() > 0


def test_evaluate_adapter_rejects_unknown_variants(pipe, judge):
    with pytest.raises(InputError, match="bogus"):
        ev.evaluate_adapter(pipe, judge, panels_per_count=1, steps=1, routing_scenes=1, variants=("anystory", "bogus"))
    with pytest.raises(InputError, match="anystory"):
        ev.evaluate_adapter(pipe, judge, panels_per_count=1, steps=1, routing_scenes=1, variants=("no_router",))


# ---------------------------------------------------------------------------------------------
# anystory evaluate adapter


def _lines(output):
    return [line for line in output.splitlines() if line.strip()]


def test_cli_evaluate_adapter_json_through_the_seam(pipe, monkeypatch):
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", lambda model, folder: pipe)
    result = CliRunner().invoke(cli.app, ["evaluate", "adapter", "--panels-per-count", "1", "--steps", "1",
                                          "--routing-scenes", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert data["ok"] is True and data["panels_per_count"] == 1 and data["steps"] == 1
    assert set(data["results"]) == set(ev.ADAPTER_VARIANTS) and len(data["panels"]) == 4
    assert data["routing_iou"]["scenes"] == 1 and "report" not in data
    assert data["subject_strength"] == 1.0 and data["reference_strength"] == 0.0
    assert data["reference_guidance"] is True


def test_cli_evaluate_adapter_records_the_strengths_and_refuses_out_of_range(pipe, monkeypatch):
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", lambda model, folder: pipe)
    args = ["evaluate", "adapter", "--panels-per-count", "1", "--steps", "1", "--routing-scenes", "1",
            "--variants", "anystory"]
    result = CliRunner().invoke(cli.app, [*args, "--subject-strength", "1.5", "--reference-strength", "2"])
    assert result.exit_code == 0, result.output
    assert "subject strength 1.5, reference strength 2.0" in result.stdout
    assert "references in both halves" not in result.stdout
    without = CliRunner().invoke(cli.app, [*args, "--no-reference-guidance"])
    assert without.exit_code == 0, without.output
    assert "references in both halves of guidance" in without.stdout
    bad = CliRunner().invoke(cli.app, [*args, "--subject-strength", "9"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_cli_evaluate_adapter_prints_a_table_and_writes_the_report(pipe, monkeypatch, tmp_path):
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", lambda model, folder: pipe)
    result = CliRunner().invoke(cli.app, ["evaluate", "adapter", "--panels-per-count", "1", "--steps", "1",
                                          "--routing-scenes", "1", "--variants", "anystory,text_only",
                                          "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "identity" in result.stdout and "text_only" in result.stdout and "no_router" not in result.stdout
    assert f"report: {tmp_path / 'report' / 'index.html'}" in result.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    low, high = report["goal_intervals"]["two_identity"]
    assert f"goal two_identity >= 0.85: {report['reached']['two_identity']:.2f} (95 % interval {low:.2f}-{high:.2f})" \
        in result.stdout
    assert "goal routing_iou_finest_late >= 0.80: " in result.stdout
    assert (tmp_path / "report" / "report.json").is_file()


def test_cli_evaluate_adapter_takes_a_panel_shape(pipe, monkeypatch):
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", lambda model, folder: pipe)
    args = ["evaluate", "adapter", "--panels-per-count", "1", "--steps", "1", "--routing-scenes", "1",
            "--variants", "anystory"]
    result = CliRunner().invoke(cli.app, [*args, "--shape", "64x128"])
    assert result.exit_code == 0, result.output
    assert "1 64x128 panels per count" in result.stdout
    bad = CliRunner().invoke(cli.app, [*args, "--shape", "64x100"])
    assert bad.exit_code == 1 and _lines(bad.output) == [
        "error: --shape '64x100': each side must be a multiple of 16 from 32 to 256"]


def test_cli_evaluate_adapter_without_the_adapter_file_is_one_line(tmp_path):
    result = CliRunner().invoke(cli.app, ["evaluate", "adapter", "--adapter", str(tmp_path / "nonexistent.safetensors")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = _lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error:") and "no adapter file" in lines[0]


def test_cli_evaluate_adapter_with_an_unknown_variant_is_one_line(pipe, monkeypatch):
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", lambda model, folder: pipe)
    result = CliRunner().invoke(cli.app, ["evaluate", "adapter", "--variants", "bogus"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = _lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error:") and "bogus" in lines[0] and "anystory" in lines[0]
    as_json = CliRunner().invoke(cli.app, ["evaluate", "adapter", "--variants", "anystory,bogus", "--json"])
    assert as_json.exit_code == 1
    data = json.loads(as_json.stdout)
    assert data["ok"] is False and "bogus" in data["error"] and data["exit_code"] == 1


def test_cli_evaluate_adapter_refuses_an_unwritable_report_folder_before_drawing(tiny_story_pipeline, monkeypatch,
                                                                                 tmp_path):
    from typer.testing import CliRunner

    from anystory_cli import cli

    drawn = []
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", lambda model, folder: drawn.append(model) or tiny_story_pipeline)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(cli.app, ["evaluate", "adapter", "--panels-per-count", "1", "--steps", "1",
                                          "--report", str(blocker / "report")])
    assert result.exit_code == 1 and drawn == []
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(blocker) in lines[0] and "Traceback" not in result.output
