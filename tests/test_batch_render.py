"""Scale: many stories in one process, and one story drawn by several processes (torchrun).

Many stories load each model once and encode a character shared between them once. Under
`torchrun --nproc-per-node 2` (gloo, CPU) the two processes share the panels out and the first
composes the pages: every output file is byte-identical to a single-process render.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import storykit
from anystory_cli import cli

runner = CliRunner()
TESTS = Path(__file__).parent


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


class CountingPipeline:
    """The tiny real pipeline, counting how often a character is encoded."""

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.encoded: list[str] = []

    def encode_character(self, image, mask=None, name=""):
        self.encoded.append(name)
        return self._pipeline.encode_character(image, mask=mask, name=name)

    def __call__(self, *args, **kwargs):
        return self._pipeline(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


def test_many_stories_load_the_model_once_and_encode_a_shared_character_once(
        tiny_story_pipeline, tmp_path, monkeypatch):
    counting = CountingPipeline(tiny_story_pipeline)
    factory = storykit.TinyFactory(counting)
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", factory)
    monkeypatch.setattr(cli.seams, "MODEL_FINGERPRINT", storykit.tiny_fingerprint)
    # Three story folders, each with its own copy of the same reference images.
    a = storykit.write_story(tmp_path / "a", [{"prompt": "mira", "characters": ["mira"]}], name="one.yaml")
    b = storykit.write_story(tmp_path / "b", [{"prompt": "mira and bolt", "characters": ["mira", "bolt"]}],
                             name="two.yaml")
    c = storykit.write_story(tmp_path / "c", [{"prompt": "bolt", "characters": ["bolt"]}], name="three.yaml")
    result = runner.invoke(cli.app, ["render", str(a), str(b), str(c), "--out", str(tmp_path / "out"),
                                     "--cache", str(tmp_path / "cache"), "--json"])
    assert result.exit_code == 0, result.stderr
    one, two, three = json.loads(result.stdout)["stories"]
    assert factory.calls == 1  # one model load for three stories
    assert sorted(counting.encoded) == ["bolt", "mira"]  # each image encoded once
    assert (one["cache_misses"], two["cache_hits"], two["cache_misses"], three["cache_hits"]) == (1, 1, 1, 1)
    for name in ("one", "two", "three"):
        assert (tmp_path / "out" / name / f"{name}.pdf").is_file()


RANK_SCRIPT = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import storykit, tiny
from anystory_cli import cli

pipeline = tiny.tiny_story_pipeline()
cli.seams.PIPELINE_FACTORY = storykit.TinyFactory(pipeline)
cli.seams.MODEL_FINGERPRINT = storykit.tiny_fingerprint
cli.app(sys.argv[1:], prog_name="anystory")
"""


def five_panels():
    """Five panels on three pages; `moss` has no image, so a sheet is drawn and shared too."""
    return storykit.panels() + [
        {"prompt": "moss and pip", "characters": ["moss", "pip"], "caption": "Later."},
        {"prompt": "moss alone", "characters": ["moss"], "dialogue": [{"who": "moss", "text": "Hm."}]},
    ]


def write_five_panel_story(folder: Path) -> Path:
    story = storykit.write_story(folder, five_panels())
    moss = "characters:\n  moss:\n    description: a round green character\n"
    story.write_text(story.read_text().replace("characters:\n", moss, 1))  # the first: the top level
    return story


def test_two_processes_render_the_same_bytes_as_one(tiny_story_pipeline, tmp_path):
    """torchrun --nproc-per-node 2 (gloo): panels shared out, pages composed by the first."""
    story = write_five_panel_story(tmp_path / "s")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), "render",
         str(story), "--out", str(tmp_path / "two"), "--cache", str(tmp_path / "cache2"), "--json"],
        capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (summary,) = json.loads(done.stdout[done.stdout.index("{"):])["stories"]
    assert summary["panels_rendered"] == [1, 2, 3, 4, 5] and summary["pages_written"] == [1, 2, 3]
    assert "process 1 of 2: drawing 3 of the 5 panel(s)" in done.stderr  # only the first reports

    reference = storykit.TinyFactory(tiny_story_pipeline)
    from anystory_cli.render import render_story

    render_story(story, tmp_path / "one", pipeline_factory=reference,
                 model_fingerprint=storykit.tiny_fingerprint, cache_dir=tmp_path / "cache1")
    one, two = storykit.snapshot(tmp_path / "one"), storykit.snapshot(tmp_path / "two")
    assert {"pages/page-003.png", "story.pdf", "story.cbz", "characters/moss.png"} <= set(one)
    assert two == one  # every file, byte for byte


class FakeRanks:
    """Stands in for torch.distributed: this process is `rank` of 2; `others_failed` is what the
    gather hears from the other process, which drew the panels `others_drew` (0-based)."""

    def __init__(self, rank, others_failed=False, others_drew=()):
        self.rank, self.world, self.others_failed, self.others_drew = rank, 2, others_failed, others_drew

    def share(self, indices, count):
        return [] if self.rank else list(indices)

    def mine(self, todo):
        return list(todo[self.rank::self.world])

    def gather(self, failed, indices, count):
        return failed or self.others_failed, sorted({*indices, *self.others_drew})


def render_as(rank_object, story, out, tiny_story_pipeline, tmp_path, monkeypatch):
    from anystory_cli import render

    monkeypatch.setattr(render.Ranks, "current", classmethod(lambda cls: rank_object))
    return render.render_story(story, out, pipeline_factory=storykit.TinyFactory(tiny_story_pipeline),
                               model_fingerprint=storykit.tiny_fingerprint, cache_dir=tmp_path / "cache")


def test_when_another_process_fails_no_page_is_composed(tiny_story_pipeline, tmp_path, monkeypatch):
    from anystory_cli.errors import AnyStoryError

    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    with pytest.raises(AnyStoryError, match=r"story.yaml: another process of this render failed \(see its "
                                            r"message\); finished panels are kept, run again"):
        render_as(FakeRanks(0, others_failed=True), story, out, tiny_story_pipeline, tmp_path, monkeypatch)
    # This process drew its share (panels 1 and 3) and kept them; no page without panel 2.
    assert sorted(p.name for p in (out / "panels").iterdir()) == ["panel-001.png", "panel-003.png"]
    assert not (out / "pages").exists()


def test_a_process_other_than_the_first_draws_its_share_and_composes_nothing(
        tiny_story_pipeline, tmp_path, monkeypatch):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    # Rank 0 found panels 1-3 to draw and shares them; this process is rank 1 of 2.
    ranks = FakeRanks(1, others_drew=[0, 2])
    ranks.share = lambda indices, count: [0, 1, 2]
    summary = render_as(ranks, story, out, tiny_story_pipeline, tmp_path, monkeypatch)
    assert summary.panels_rendered == [1, 2, 3]  # everyone's, after the gather
    assert sorted(p.name for p in (out / "panels").iterdir()) == ["panel-002.png"]
    assert not (out / "pages").exists() and not (out / "story.pdf").exists()


def test_world_size_without_a_launcher_is_one_clear_error(tmp_path, monkeypatch):
    from anystory_cli.errors import AnyStoryError
    from anystory_cli.render import Ranks

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(AnyStoryError, match=r"WORLD_SIZE=2: cannot join the other processes \(.*\); start "
                                            r"them with torchrun --nproc-per-node N, or unset WORLD_SIZE"):
        Ranks.current()
