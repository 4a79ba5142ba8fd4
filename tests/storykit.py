"""Stories on disk for render and CLI tests, drawn by a tiny real AnyStoryPipeline.

The pipeline is the real one (anystory_cli.testing: random, 32x32); only its weights are small.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

import tiny

COLOURS = {"mira": (220, 40, 40), "bolt": (40, 40, 220), "pip": (40, 200, 40)}

# Small pages (fast to compose) and one step (fast to draw), guided (scale above 1), so that
# every guidance setting (reference guidance, the interval) can change a pixel. One DDIM step is
# at t = 1 of 1000: inside the default interval.
PAGE = {"size": {"width": 320, "height": 240}, "dpi": 72, "margin": 4, "gutter": 2, "layout": [2]}
STYLE = {"steps": 1, "guidance": 2.0}


def panels():
    """Three panels on two pages: one, two and three characters, captions and dialogue."""
    return [
        {"prompt": "mira on a hill", "characters": ["mira"], "caption": "One windy morning.",
         "dialogue": [{"who": "mira", "text": "What a sky!"}]},
        {"prompt": "mira and bolt", "characters": [{"name": "mira", "at": "left"},
                                                   {"name": "bolt", "at": "right"}],
         "dialogue": [{"who": "bolt", "text": "Where is the kite?"}]},
        {"prompt": "everyone in the forest", "characters": ["mira", "bolt", "pip"],
         "caption": "The end."},
    ]


def write_story(folder: Path, story_panels=None, characters=None, name="story.yaml", **top) -> Path:
    """A story with reference sprites in folder/characters; returns the YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "characters").mkdir(exist_ok=True)
    if characters is None:
        characters = {}
        for seed, (who, colour) in enumerate(COLOURS.items()):
            tiny.sprite(colour, seed=seed).save(folder / "characters" / f"{who}.png")
            characters[who] = {"image": f"characters/{who}.png"}
    data = {"title": "Test Story", "seed": 5, "style": dict(STYLE), "page": dict(PAGE),
            "characters": characters, "panels": story_panels if story_panels is not None else panels(),
            **top}
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class TinyFactory:
    """A pipeline_factory returning one tiny real AnyStoryPipeline; counts its calls."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.calls = 0

    def __call__(self, model, story_dir):
        self.calls += 1
        return self.pipeline


def tiny_fingerprint(model, story_dir) -> str:
    """Keys panels without loading anything, as the real loader's file fingerprint does."""
    return f"tiny:{model}"


def one_torch_thread():
    """Generator for a module fixture: torch on one thread, restored afterwards. On a shared,
    busy 2-core machine, tiny models run ~50x faster without OpenMP threads waiting on each
    other (measured: 0.5 s against 27 s for a 3-panel story)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def render(story, out, factory, cache, **options):
    """render_story through the tiny pipeline's factory, keyed by its fixed fingerprint."""
    from anystory_cli.render import render_story

    return render_story(story, out, pipeline_factory=factory, model_fingerprint=tiny_fingerprint,
                        cache_dir=cache, **options)


FLUX_FIXTURE = Path(__file__).parent / "data" / "flux_tiny"  # tiny FLUX + released-code outputs
FLUX_MODEL = FLUX_FIXTURE / "model"


def flux_cases() -> dict:
    return json.loads((FLUX_FIXTURE / "cases.json").read_text())


def flux_subject(name: str):
    """One of the fixture's subjects: (image, mask), as PIL images."""
    from PIL import Image

    files = flux_cases()["subjects"][name]
    return Image.open(FLUX_FIXTURE / files["image"]), Image.open(FLUX_FIXTURE / files["mask"])


def tiny_flux_pipeline():
    """AnyStoryFluxPipeline on the committed tiny FLUX fixture, on the CPU."""
    from anystory_cli.flux import AnyStoryFluxPipeline

    return AnyStoryFluxPipeline.from_pretrained(
        FLUX_MODEL / "flux", redux=FLUX_MODEL / "redux", adapter=FLUX_MODEL / "anystory_flux.bin",
        reference_size=flux_cases()["reference_size"], device="cpu")
