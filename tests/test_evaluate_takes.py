"""`evaluate_adapter(takes=N)` / `anystory evaluate adapter --takes N --counts ...`: each AnyStory
panel drawn N times, the take the identity scores pick kept, every take judged; and the panels
of the counts drawn are those of a run with every count."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import storykit
from anystory_cli import cli
from anystory_cli.lab import evaluate as ev
from anystory_cli.lab.judge import load_judge
from anystory_cli.scores import CharacterScore, best_take, take_seed


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_counts_keep_the_panels_a_run_with_every_count_draws():
    every = ev.adapter_eval_panels(2, seed=3)
    some = ev.adapter_eval_panels(2, seed=3, counts=(1, 2))
    assert [p.scene.seed for p in some] == [p.scene.seed for p in every[:4]]
    assert [p.noise_seed for p in some] == [p.noise_seed for p in every[:4]]
    assert [len(p.scene.instances) for p in ev.adapter_eval_panels(1, seed=3, counts=(2, 4))] == [2, 4]


def test_takes_keep_the_scored_pick_judge_every_take_and_start_from_the_panels_own_noise(tiny_story_pipeline, judge):
    options = dict(panels_per_count=1, seed=0, steps=1, routing_scenes=1, variants=("anystory",), counts=(1, 2))
    one = ev.evaluate_adapter(tiny_story_pipeline, judge, **options)
    three = ev.evaluate_adapter(tiny_story_pipeline, judge, takes=3, **options)
    assert one["counts"] == [1, 2] and sorted(one["results"]["anystory"]) == ["1", "2", "multi"]
    assert three["takes"]["takes"] == 3 and three["takes"]["takes_drawn"] == 3.0
    panels = ev.adapter_eval_panels(1, seed=0, counts=(1, 2))
    for panel, plain, record in zip(panels, one["panels"], three["panels"]):
        takes = record["takes"]["takes"]
        assert [t["noise_seed"] for t in takes] == [take_seed(panel.noise_seed, k) for k in range(3)]
        # the first take is the one-take run's panel, judged the same
        assert takes[0]["judged"] == plain["judged"]["anystory"]
        scores = [[CharacterScore.from_dict(s) for s in t["scores"]] for t in takes]
        assert record["takes"]["picked"] == best_take(scores)
        assert record["judged"]["anystory"] == takes[record["takes"]["picked"]]["judged"]
        assert [s["name"] for s in takes[0]["scores"]] == [f"c{i}" for i in range(len(panel.scene.instances))]
    for count in ("1", "2"):
        row = three["takes"][count]
        rates = [[np.mean([v["right"] for v in t["judged"]]) for t in p["takes"]["takes"]]
                 for p in three["panels"] if str(len(p["identity_seeds"])) == count]
        assert row["random"] == pytest.approx(np.mean([np.mean(r) for r in rates]), abs=1e-4)
        assert row["oracle"] == pytest.approx(np.mean([max(r) for r in rates]), abs=1e-4)
        assert row["first"] <= row["oracle"] and row["picked"] <= row["oracle"]


def test_cli_evaluate_adapter_takes_and_counts(tiny_story_pipeline, monkeypatch):
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", lambda model, folder: tiny_story_pipeline)
    runner = CliRunner()
    result = runner.invoke(cli.app, ["evaluate", "adapter", "--panels-per-count", "1", "--steps", "1",
                                     "--routing-scenes", "1", "--variants", "anystory", "--counts", "1",
                                     "--takes", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["counts"] == [1] and data["takes"]["takes"] == 2 and len(data["panels"]) == 1
    assert len(data["panels"][0]["takes"]["takes"]) == 2
    for bad in (["--counts", "5"], ["--counts", "x"]):
        refused = runner.invoke(cli.app, ["evaluate", "adapter", "--variants", "anystory", *bad])
        assert refused.exit_code == 1 and "--counts" in refused.output and "Traceback" not in refused.output
    for bad in (["--takes", "0"], ["--takes", "17"], ["--min-identity", "1.5"]):
        refused = runner.invoke(cli.app, ["evaluate", "adapter", *bad])
        assert refused.exit_code == 2 and bad[0] in refused.output
