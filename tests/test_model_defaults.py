"""Sampling defaults belong to the model: a folder's anystory_defaults.json, overridden by the
story's style; a model without one samples as the paper does (no figure paste)."""

from __future__ import annotations

import json

import pytest

import storykit
from anystory_cli.errors import ModelError
from anystory_cli.model_loading import DEFAULTS_FILE, model_defaults
from anystory_cli.plan import build_plan
from anystory_cli.story import load_story


def test_the_embedded_model_pastes_at_0_4_and_a_folder_without_defaults_does_not_paste(tmp_path):
    assert model_defaults("default") == {"paste_references_at": 0.4}
    (tmp_path / "mine").mkdir()
    assert model_defaults("mine", tmp_path) == {}
    assert model_defaults(str(tmp_path / "not-there")) == {}  # loading it says what is missing


def test_a_folder_s_defaults_reach_the_plans_and_the_story_overrides_them(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / DEFAULTS_FILE).write_text(json.dumps({"paste_references_at": 0.3}))
    panels = [{"prompt": "p", "characters": ["mira"]}]
    story = load_story(storykit.write_story(tmp_path / "s", panels, model="../mine"))
    plan = build_plan(story, model_defaults=model_defaults(story.model))[0]
    assert plan.paste_references_at == 0.3
    style = {**storykit.STYLE, "paste_references_at": 0.6}
    own = load_story(storykit.write_story(tmp_path / "t", panels, model="../mine", style=style))
    assert build_plan(own, model_defaults=model_defaults(own.model))[0].paste_references_at == 0.6


@pytest.mark.parametrize("text, message", [
    ('{"paste_at": 0.4}', "unknown key.*paste_at.*paste_references_at"),
    ('{"paste_references_at": 2}', "from 0 to 1"),
    ("[0.4]", "JSON object"),
    ("{", "not readable JSON"),
])
def test_a_bad_defaults_file_is_one_line_naming_it(tmp_path, text, message):
    (tmp_path / DEFAULTS_FILE).write_text(text)
    with pytest.raises(ModelError, match=message) as error:
        model_defaults(str(tmp_path))
    assert str(tmp_path / DEFAULTS_FILE) in str(error.value) and "\n" not in str(error.value)


def test_validate_reports_a_bad_defaults_file_in_the_story_s_model(tmp_path):
    import shutil

    from anystory_cli.model_loading import DEFAULT_MODEL_DIR
    from anystory_cli.render import story_problems

    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "mine")
    story = storykit.write_story(tmp_path / "s", [{"prompt": "p", "characters": ["mira"]}], model="../mine")
    assert story_problems(story) == []
    (tmp_path / "mine" / DEFAULTS_FILE).write_text('{"paste_references_at": 3}')
    problems = story_problems(story)
    assert len(problems) == 1 and "model:" in problems[0] and DEFAULTS_FILE in problems[0] and "from 0 to 1" in problems[0]
