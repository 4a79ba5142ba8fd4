"""Takes in a render (`render/takes.py`, `render/review.py`) on a tiny real AnyStoryPipeline:
the take kept, scores in the summary and scores.json, takes cached (an unchanged story draws
nothing, more takes draw only the new ones, a pinned seed finds its take), min_identity, bad
values, a story without characters; and review.html opened in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import storykit
from anystory_cli.errors import StoryError
from anystory_cli.render.takes import SEED_TEXT
from anystory_cli.scores import take_rank, take_seed


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


class CountingPipeline:
    """The tiny pipeline, counting the panels it draws (calls with characters) by seed."""

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.seeds: list[int] = []

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def __call__(self, *args, **kwargs):
        if kwargs.get("characters"):
            self.seeds.append(kwargs["generator"].initial_seed())
        return self._pipeline(*args, **kwargs)


@pytest.fixture
def counting(tiny_story_pipeline):
    pipeline = CountingPipeline(tiny_story_pipeline)
    return pipeline, storykit.TinyFactory(pipeline)


def story_with(folder: Path, panels=None, **style) -> Path:
    path = storykit.write_story(folder, story_panels=panels)
    data = yaml.safe_load(path.read_text())
    data["style"].update(style)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def set_style(path: Path, **style) -> None:
    data = yaml.safe_load(path.read_text())
    data["style"].update(style)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_takes_keep_the_best_scored_take_and_report_every_score(tmp_path, counting):
    pipeline, factory = counting
    story = story_with(tmp_path / "s", takes=3)
    out = tmp_path / "out"
    summary = storykit.render(story, out, factory, tmp_path / "cache")
    assert len(pipeline.seeds) == 3 * 3  # three panels with characters, three takes each
    rows = {row["panel"]: row for row in summary.scores}
    takes_by_seed = stored_takes(out)
    assert len(takes_by_seed) == 9
    assert sorted(rows) == [1, 2, 3]
    on_disk = json.loads((out / "panels" / "scores.json").read_text())
    assert [row["panel"] for row in on_disk["panels"]] == [1, 2, 3]
    for number, row in rows.items():
        assert [t["take"] for t in row["all_takes"]] == [1, 2, 3]
        panel_seed = row["all_takes"][0]["seed"]
        assert [t["seed"] for t in row["all_takes"]] == [take_seed(panel_seed, k) for k in range(3)]
        assert [c["name"] for c in row["scores"]] == row["characters"]
        assert all(-1.0 <= c["identity"] <= 1.0 for t in row["all_takes"] for c in t["scores"])
        # the kept take: unflagged before flagged, then the highest weakest score
        ranks = [(not any(c["blended"] or c["missing"] for c in t["scores"]),
                  min(c["identity"] for c in t["scores"])) for t in row["all_takes"]]
        assert ranks[row["kept"] - 1] == max(ranks)
        assert row["seed"] == row["all_takes"][row["kept"] - 1]["seed"]
        # the panel on disk is the kept take's image
        with Image.open(out / "panels" / f"panel-{number:03d}.png") as panel:
            assert np.array_equal(np.asarray(panel.convert("RGB")), takes_by_seed[row["seed"]])
    assert summary.lowest.startswith("panel ")
    assert (out / "review.html").is_file()


def stored_takes(out: Path) -> dict[int, np.ndarray]:
    """Every take stored in the output folder, by its seed."""
    takes = {}
    for path in (out / ".anystory" / "takes").glob("*.png"):
        with Image.open(path) as take:
            if SEED_TEXT in take.text:
                takes[int(take.text[SEED_TEXT])] = np.asarray(take.convert("RGB"))
    return takes


def test_takes_are_cached_unchanged_draws_nothing_more_draws_only_new_and_a_pinned_seed_none(tmp_path, counting):
    pipeline, factory = counting
    story = story_with(tmp_path / "s", takes=2)
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = storykit.render(story, out, factory, cache)
    assert len(pipeline.seeds) == 6
    again = storykit.render(story, out, factory, cache)
    assert again.up_to_date and len(pipeline.seeds) == 6
    assert again.scores == first.scores  # read back from the stored takes
    snapshot = storykit.snapshot(out / ".anystory" / "takes")

    set_style(story, takes=4)
    more = storykit.render(story, out, factory, cache)
    drawn = pipeline.seeds[6:]
    panel_seeds = [row["all_takes"][0]["seed"] for row in first.scores]
    assert sorted(drawn) == sorted(take_seed(s, k) for s in panel_seeds for k in (2, 3))
    after = storykit.snapshot(out / ".anystory" / "takes")
    assert all(after[name] == digest for name, digest in snapshot.items())  # earlier takes kept as they were
    for before, now in zip(first.scores, more.scores):
        assert now["all_takes"][:2] == before["all_takes"]

    # Pin the second panel to a take that was not kept: its panel comes from the stored take.
    row = more.scores[1]
    other = next(t for t in row["all_takes"] if t["take"] != row["kept"])
    data = yaml.safe_load(story.read_text())
    data["panels"][1]["seed"] = other["seed"]
    story.write_text(yaml.safe_dump(data, sort_keys=False))
    count = len(pipeline.seeds)
    pinned = storykit.render(story, out, factory, cache)
    assert len(pipeline.seeds) == count  # nothing drawn
    assert pinned.scores[1]["seed"] == other["seed"] and pinned.scores[1]["takes"] == 1
    assert pinned.scores[1]["scores"] == other["scores"]


def test_min_identity_stops_at_the_first_take_that_clears_it(tmp_path, counting):
    pipeline, factory = counting
    story = story_with(tmp_path / "s", takes=4, min_identity=0.0)
    summary = storykit.render(story, tmp_path / "out", factory, tmp_path / "cache")
    for row in summary.scores:
        takes = row["all_takes"]
        ranks = [take_rank_of(t) for t in takes]
        # every take but the last failed the threshold; the last cleared it (or it is the fourth)
        assert all(not (r[0] and r[1] >= 0.0) for r in ranks[:-1])
        assert (ranks[-1][0] and ranks[-1][1] >= 0.0) or len(takes) == 4
    assert len(pipeline.seeds) == sum(len(row["all_takes"]) for row in summary.scores)


def take_rank_of(take: dict):
    from anystory_cli.scores import CharacterScore

    return take_rank([CharacterScore.from_dict(c) for c in take["scores"]])


@pytest.mark.parametrize("style, field", [({"takes": 0}, "style.takes"), ({"takes": 17}, "style.takes"),
                                          ({"min_identity": 1.5}, "style.min_identity"),
                                          ({"min_identity": -0.1}, "style.min_identity")])
def test_out_of_range_takes_and_min_identity_name_the_field(tmp_path, style, field, tiny_story_pipeline):
    story = story_with(tmp_path / "s", **style)
    with pytest.raises(StoryError) as error:
        storykit.render(story, tmp_path / "out", storykit.TinyFactory(tiny_story_pipeline), tmp_path / "cache")
    assert str(error.value).count("\n") == 0 and field in str(error.value)


def test_cli_takes_out_of_range_is_refused(tmp_path):
    from typer.testing import CliRunner

    from anystory_cli.cli import app

    story = story_with(tmp_path / "s")
    for value in ("0", "17"):
        result = CliRunner().invoke(app, ["render", str(story), "--takes", value, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and "--takes" in result.output


def test_a_story_without_characters_gets_no_scores_and_no_error(tmp_path, counting):
    _, factory = counting
    panels = [{"prompt": "a hill at night"}, {"prompt": "a forest"}]
    story = story_with(tmp_path / "s", panels=panels, takes=3)
    out = tmp_path / "out"
    summary = storykit.render(story, out, factory, tmp_path / "cache")
    assert summary.scores == [] and summary.lowest == "" and summary.panels_rendered == [1, 2]
    assert not (out / "panels" / "scores.json").exists() and not (out / "review.html").exists()
    assert sorted(p.name for p in (out / "panels").glob("panel-*.png")) == ["panel-001.png", "panel-002.png"]


def test_one_take_draws_the_panel_a_render_without_takes_draws(tmp_path, counting):
    """Take 0 is the panel's own seed: takes: 1 keeps the panels' keys and pixels."""
    pipeline, factory = counting
    story = story_with(tmp_path / "s")
    out = tmp_path / "out"
    summary = storykit.render(story, out, factory, tmp_path / "cache")
    assert [row["all_takes"][0]["seed"] for row in summary.scores] == pipeline.seeds
    plans_seeds = [s.seed for s in _plans(story)]
    assert pipeline.seeds == plans_seeds


def _plans(story):
    from anystory_cli.plan import build_plan
    from anystory_cli.render.validate import check_story

    return build_plan(check_story(story))


# ---------------------------------------------------------------------------------------------
# review.html in a real browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", *arguments],
                          capture_output=True, text=True, timeout=180)


class Page(HTMLParser):
    """What the browser's DOM shows: takes (kept or not), seed lines, scores, images, scripts."""

    def __init__(self):
        super().__init__()
        self.takes, self.kept, self.seeds, self.scores, self.images, self.scripts = [], 0, [], [], [], 0
        self.prompts: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "div" and "take" in classes:
            self.takes.append(attributes.get("id"))
            self.kept += "kept" in classes
        if tag == "img":
            self.images.append(attributes.get("src"))
        if tag == "script":
            self.scripts += 1
        if "seed" in classes or "score" in classes or "prompt" in classes:
            self._open = "seed" if "seed" in classes else "score" if "score" in classes else "prompt"

    def handle_data(self, data):
        if self._open == "seed":
            self.seeds.append(data)
        elif self._open == "score":
            self.scores.append(data)
        elif self._open == "prompt":
            self.prompts.append(data)
        self._open = None


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_review_page_in_headless_chromium_shows_every_take_score_and_seed_line(tmp_path, counting):
    _, factory = counting
    hostile = 'mira <script>alert("x")</script> & "friends"'
    panels = storykit.panels()[:2]
    panels[1]["prompt"] = hostile
    story = story_with(tmp_path / "s", panels=panels, takes=2)
    out = tmp_path / "out"
    summary = storykit.render(story, out, factory, tmp_path / "cache")
    review = out / "review.html"

    shown = chromium(tmp_path, "--dump-dom", review.as_uri())
    assert shown.returncode == 0, shown.stderr[-2000:]
    page = Page()
    page.feed(shown.stdout)
    assert page.scripts == 0  # the prompt's <script> is text, not a script
    assert any(hostile in prompt for prompt in page.prompts)
    assert len(page.takes) == 4 and page.kept == 2
    expected = [f"seed: {t['seed']}" for row in summary.scores for t in row["all_takes"]]
    assert page.seeds == expected
    shown_scores = [float(s) for s in page.scores]
    stored = [c["identity"] for row in summary.scores for t in row["all_takes"] for c in t["scores"]]
    assert shown_scores == pytest.approx(stored, abs=0.006)
    assert page.images and all((out / src).is_file() for src in page.images)  # offline: local files only

    shot = tmp_path / "review.png"
    taken = chromium(tmp_path, "--window-size=900,700", f"--screenshot={shot}", review.as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    with Image.open(shot) as picture:
        colours = picture.convert("RGB").getcolors(1 << 20)
    assert colours is not None and len(colours) > 50  # text, panels and bars drawn, not a blank page
