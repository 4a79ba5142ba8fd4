"""What reaches the pipeline from each story field, through the real render path.

render_story draws with a recording wrapper around the tiny real AnyStoryPipeline (the factory
seam). The wrapper keeps the arguments of each call and, at every UNet forward of it, what the
UNet receives: the batch (two halves while classifier-free guidance is on), the timestep, the
guidance scale of that step, the AnyStory inputs (region masks, subject and reference strength,
reference guidance) and the initial noise. The expected values are written out from the story's
documented meaning, not computed by the code under test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

import storykit
import tiny
from anystory_cli.render import render_story

UNGUIDED = 1.0 + 1e-6  # the scale of a step outside the guidance interval (guidance.py)
LATENT = 16  # the tiny pipeline draws 32 x 32 images: 16 x 16 latents


@dataclass
class Forward:
    timestep: float
    rows: int
    guidance_scale: float
    inputs: object  # InjectionInputs
    latents: torch.Tensor


@dataclass
class Call:
    prompt: str
    kwargs: dict
    forwards: list[Forward] = field(default_factory=list)


class Recording:
    """The tiny real pipeline, recording every call and every UNet forward inside it."""

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.calls: list[Call] = []
        self.encoded: list[tuple[str, np.ndarray]] = []  # (name, reference pixels)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def encode_character(self, image, mask=None, name=""):
        self.encoded.append((name, np.asarray(image.convert("RGBA"))))
        return self._pipeline.encode_character(image, mask=mask, name=name)

    def __call__(self, prompt, **kwargs):
        call = Call(prompt, dict(kwargs))
        self.calls.append(call)
        base = self._pipeline  # the pipeline that runs the loop: its UNet, its guidance scale

        def hook(_module, args, hook_kwargs):
            sample = args[0] if args else hook_kwargs["sample"]
            timestep = args[1] if len(args) > 1 else hook_kwargs["timestep"]
            context = hook_kwargs["cross_attention_kwargs"]["anystory"]
            call.forwards.append(Forward(float(timestep), sample.shape[0], float(base.guidance_scale),
                                         context.inputs, sample.detach().clone()))

        handle = base.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return self._pipeline(prompt, **kwargs)
        finally:
            handle.remove()

    def panel_calls(self) -> dict[str, Call]:
        return {call.prompt: call for call in self.calls}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture
def recording(tiny_story_pipeline):
    return Recording(tiny_story_pipeline)


def render(story, out, recording, cache, **options):
    return render_story(story, out, pipeline_factory=storykit.TinyFactory(recording),
                        model_fingerprint=storykit.tiny_fingerprint, cache_dir=cache, **options)


def flat(boxes) -> list[float]:
    return [float(v) for box in boxes for v in box]


def region_mask(box, size=LATENT):
    """A box in 0..1 at latent resolution; a box thinner than a pixel still covers one."""
    import math

    x0, y0, x1, y1 = box
    mask = torch.zeros(size, size)
    mask[int(y0 * size): max(int(y0 * size) + 1, math.ceil(y1 * size)),
         int(x0 * size): max(int(x0 * size) + 1, math.ceil(x1 * size))] = 1.0
    return mask


def panel_seed(story_seed: int, index: int) -> int:
    """A panel's documented default seed: sha256 of 'anystory/panel-seed/<story seed>/<index>'."""
    digest = hashlib.sha256(f"anystory/panel-seed/{story_seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def initial_noise(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn((rows, 4, LATENT, LATENT), generator=torch.Generator("cpu").manual_seed(seed))


def page(rows: int) -> dict:
    """One page, one panel per row, each frame about square (drawn at the model's own size)."""
    return {"size": {"width": 240, "height": 240 * rows}, "dpi": 72, "margin": 1, "gutter": 1,
            "layout": [1] * rows}


PANELS = [
    {"prompt": "mira alone", "characters": [{"name": "mira", "at": "right"}], "seed": 1234},
    {"prompt": "mira and bolt", "characters": [{"name": "bolt", "at": "left"},
                                               {"name": "mira", "at": {"box": [0.55, 0.3, 0.95, 0.9]}}]},
    {"prompt": "three", "characters": ["pip", {"name": "mira", "at": "left"}, {"name": "bolt", "mirrored": True}]},
]

STYLE = {"steps": 4, "guidance": 3.0, "guidance_interval": [0.0, 0.5], "subject_strength": 0.7,
         "reference_strength": 0.25, "reference_guidance": False, "paste_references_at": 0.6,
         "prompt_prefix": "comic", "prompt_suffix": "ink", "negative_prompt": "blurry"}


@pytest.fixture
def recorded(tmp_path, recording):
    story = storykit.write_story(tmp_path / "s", PANELS, style=STYLE, page=page(3), seed=77)
    bolt = tiny.sprite(storykit.COLOURS["bolt"], seed=1)
    bolt.paste((250, 220, 40, 255), (8, 10, 22, 30))  # a patch on its left: not symmetric
    bolt.save(tmp_path / "s" / "characters" / "bolt.png")
    summary = render(story, tmp_path / "out", recording, tmp_path / "cache")
    assert summary.panels_rendered == [1, 2, 3]
    return recording.panel_calls()


def test_prompts_and_negative_prompt_reach_the_pipeline(recorded):
    assert set(recorded) == {"comic, mira alone, ink", "comic, mira and bolt, ink", "comic, three, ink"}
    assert all(call.kwargs["negative_prompt"] == "blurry" for call in recorded.values())


def test_placements_reach_the_pipeline_as_regions_and_region_masks(recorded):
    """`at: right` alone: the right half below the top fifth; with others, each character gets a
    column: `at: left` the first, a box its box, an unplaced one the column no word took."""
    expected = {
        "comic, mira alone, ink": [(0.5, 0.2, 1.0, 1.0)],
        "comic, mira and bolt, ink": [(0.0, 0.2, 0.5, 1.0), (0.55, 0.3, 0.95, 0.9)],
        "comic, three, ink": [(1 / 3, 0.2, 2 / 3, 1.0), (0.0, 0.2, 1 / 3, 1.0), (2 / 3, 0.2, 1.0, 1.0)],
    }
    for prompt, boxes in expected.items():
        call = recorded[prompt]
        assert flat(call.kwargs["regions"]) == pytest.approx(flat(boxes)), prompt
        for forward in call.forwards:
            masks = forward.inputs.region_masks
            assert masks is not None and masks.shape[1] == len(boxes), prompt
            for i, box in enumerate(boxes):
                for row in range(masks.shape[0]):
                    assert torch.equal(masks[row, i].cpu(), region_mask(box)), (prompt, i)


def test_character_order_and_encodings_follow_the_panel(recorded, recording, tmp_path):
    three = recorded["comic, three, ink"]
    assert [c.name for c in three.kwargs["characters"]] == ["pip", "mira", "bolt"]
    assert [c.name for c in recorded["comic, mira and bolt, ink"].kwargs["characters"]] == ["bolt", "mira"]
    # bolt is mirrored in panel 3: that encoding is made from its reference flipped left to right;
    # panel 2 draws it as it is. Each is encoded once.
    reference = np.asarray(Image.open(tmp_path / "s" / "characters" / "bolt.png").convert("RGBA"))
    bolts = [pixels for name, pixels in recording.encoded if name == "bolt"]
    assert len(bolts) == 2
    assert sum(np.array_equal(pixels, reference[:, ::-1]) for pixels in bolts) == 1
    assert sum(np.array_equal(pixels, reference) for pixels in bolts) == 1
    mirrored = three.kwargs["characters"][2]
    plain = recorded["comic, mira and bolt, ink"].kwargs["characters"][0]
    assert not torch.equal(mirrored.subject_tokens, plain.subject_tokens)


def test_subject_and_reference_strength_and_reference_guidance_reach_every_step(recorded):
    for prompt, call in recorded.items():
        assert call.kwargs["subject_scale"] == 0.7 and call.kwargs["reference_scale"] == 0.25
        assert call.kwargs["reference_guidance"] is False
        assert len(call.forwards) == 4, prompt
        for forward in call.forwards:
            assert forward.inputs.subject_scale == pytest.approx(0.7)
            assert forward.inputs.reference_scale == pytest.approx(0.25)
            assert forward.inputs.reference_guidance is False


def test_guidance_and_its_interval_set_each_step_s_scale(recorded):
    """4 DDIM steps at t = 751, 501, 251, 1 of 1000; guided (scale 3) only at t/T <= 0.5. Every
    forward keeps both halves of the batch."""
    for prompt, call in recorded.items():
        steps = [(round(f.timestep), f.rows, f.guidance_scale) for f in call.forwards]
        assert steps == [(751, 2, pytest.approx(UNGUIDED)), (501, 2, pytest.approx(UNGUIDED)),
                         (251, 2, 3.0), (1, 2, 3.0)], prompt


def test_figure_boxes_and_the_paste_level_reach_the_pipeline(recorded):
    """A figure stands in its region: the region's width, 0.52 / 0.47 / 0.42 of the panel high
    for 1 / 2 / 3 characters, feet on the 0.85 line (or the region's bottom if higher)."""
    expected = {
        "comic, mira alone, ink": [(0.5, 0.85 - 0.52, 1.0, 0.85)],
        "comic, mira and bolt, ink": [(0.0, 0.85 - 0.47, 0.5, 0.85), (0.55, 0.85 - 0.47, 0.95, 0.85)],
        "comic, three, ink": [(1 / 3, 0.43, 2 / 3, 0.85), (0.0, 0.43, 1 / 3, 0.85), (2 / 3, 0.43, 1.0, 0.85)],
    }
    for prompt, boxes in expected.items():
        call = recorded[prompt]
        assert flat(call.kwargs["figure_boxes"]) == pytest.approx(flat(boxes)), prompt
        assert call.kwargs["paste_at"] == pytest.approx(0.6)


def test_seeds_and_steps_reach_the_pipeline(recorded):
    """A panel's own seed wins; the others draw from the story seed and their index. The first
    step's latents are that seed's noise (twice: both halves of guidance)."""
    seeds = {"comic, mira alone, ink": 1234, "comic, mira and bolt, ink": panel_seed(77, 1),
             "comic, three, ink": panel_seed(77, 2)}
    for prompt, seed in seeds.items():
        call = recorded[prompt]
        assert call.kwargs["num_inference_steps"] == 4
        first = call.forwards[0].latents
        noise = initial_noise(seed)[0]
        assert torch.equal(first[0], noise) and torch.equal(first[1], noise), prompt


def test_seed_and_steps_overrides_reach_the_pipeline(tmp_path, recording):
    story = storykit.write_story(tmp_path / "s", PANELS[:2], style=STYLE, page=page(2), seed=77)
    render(story, tmp_path / "out", recording, tmp_path / "cache", seed=9, steps=2)
    calls = recording.panel_calls()
    own, derived = calls["comic, mira alone, ink"], calls["comic, mira and bolt, ink"]
    assert torch.equal(own.forwards[0].latents[0], initial_noise(1234)[0])  # its own seed stays
    assert torch.equal(derived.forwards[0].latents[0], initial_noise(panel_seed(9, 1))[0])
    assert [len(c.forwards) for c in (own, derived)] == [2, 2]
    assert own.kwargs["num_inference_steps"] == 2


def test_a_paste_level_of_zero_pastes_nothing_and_defaults_are_the_documented_ones(tmp_path, recording):
    style = {"steps": 2, "guidance": 2.0, "paste_references_at": 0.0}
    story = storykit.write_story(tmp_path / "s", PANELS[:1], style=style, page=page(1))
    render(story, tmp_path / "out", recording, tmp_path / "cache")
    (call,) = recording.calls
    assert call.kwargs["paste_at"] is None
    assert call.kwargs["subject_scale"] == 1.0 and call.kwargs["reference_scale"] == 0.0
    assert call.kwargs["reference_guidance"] is True and call.kwargs["negative_prompt"] is None
    assert tuple(call.kwargs["guidance_interval"]) == (0.0, 0.7)
    # 2 steps at t = 501 and 1: both inside (0, 0.7), both guided at 2.
    assert [(round(f.timestep), f.guidance_scale) for f in call.forwards] == [(501, 2.0), (1, 2.0)]
    assert all(f.inputs.reference_guidance is True and f.inputs.subject_scale == 1.0 for f in call.forwards)


def test_a_wide_frame_is_drawn_wide(tmp_path, recording):
    """A frame about twice as wide as high is drawn at twice the model's width."""
    page = {"size": {"width": 400, "height": 200}, "dpi": 72, "margin": 1, "gutter": 1, "layout": [1]}
    story = storykit.write_story(tmp_path / "s", [{"prompt": "wide", "characters": ["mira"]}],
                                 style={"steps": 1, "guidance": 2.0}, page=page)
    render(story, tmp_path / "out", recording, tmp_path / "cache")
    (call,) = recording.calls
    assert (call.kwargs["width"], call.kwargs["height"]) == (64, 32)
    assert call.forwards[0].latents.shape[-2:] == (16, 32)
    assert Image.open(tmp_path / "out" / "panels" / "panel-001.png").size == (64, 32)


def test_reference_guidance_and_the_interval_change_the_drawn_panel(tmp_path, recording):
    """With guidance above 1 both settings reach the pixels of the rendered panel."""
    drawn = {}
    variants = {"base": {}, "no_reference_guidance": {"reference_guidance": False},
                "interval": {"guidance_interval": [0.0, 1.0]}}
    for name, change in variants.items():
        style = {"steps": 4, "guidance": 4.0, "reference_strength": 1.0, **change}
        story = storykit.write_story(tmp_path / name, PANELS[1:2], style=style, page=page(1))
        render(story, tmp_path / f"out-{name}", recording, tmp_path / "cache")
        drawn[name] = np.asarray(Image.open(tmp_path / f"out-{name}" / "panels" / "panel-001.png"), dtype=int)
    assert np.abs(drawn["base"] - drawn["no_reference_guidance"]).max() > 0
    assert np.abs(drawn["base"] - drawn["interval"]).max() > 0
