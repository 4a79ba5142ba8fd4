"""`anystory import storyboard`: scripts of the AnyStory storyboard tool become valid stories."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from anystory_cli import cli
from anystory_cli.errors import InputError
from anystory_cli.story import load_story
from anystory_cli.storyboard import import_storyboard, read_script

SCRIPT = Path(__file__).parent / "data" / "storyboard_script.json"
EXAMPLE = Path(__file__).parents[1] / "stories" / "storyboard_example.json"
runner = CliRunner()


def script() -> dict:
    return json.loads(SCRIPT.read_text(encoding="utf-8"))


def english(data: dict) -> dict:
    """The same script with Latin-only narration (any lettering font draws it)."""
    data = copy.deepcopy(data)
    for number, shot in enumerate(data["分镜头"]):
        shot["旁白"] = f"Shot {number + 1}: the night goes on."
    return data


def invoke(*args: str):
    return runner.invoke(cli.app, list(args))


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# What a script becomes
# --------------------------------------------------------------------------------------------


def test_roles_become_text_only_characters_and_shots_panels(tmp_path):
    result = import_storyboard(script(), "lighthouse.json")
    assert result.names == {"ROLE-A": "role-a", "ROLE-B": "captain-zoe", "ROLE-AB": "role-ab"}
    story = result.story
    assert story["title"] == "月光下的灯塔"
    assert story["characters"] == {
        "role-a": {"description": "A short-haired girl in a yellow raincoat, carrying an old "
                                  "canvas backpack"},
        "captain-zoe": {"description": "An old sea captain with a white beard, a dark blue "
                                       "captain's hat and an oil lamp in his hand"},
        "role-ab": {"description": "A black and white cat with a small bell around its neck"},
    }
    panels = story["panels"]
    assert [p["characters"] for p in panels] == [
        ["role-a"], ["role-a", "captain-zoe"], ["role-ab"], ["role-a", "captain-zoe", "role-ab"]]
    # ROLE-AB is one placeholder, not ROLE-A followed by 'B'.
    assert panels[2]["prompt"].startswith("role-ab sits beside the huge broken lamp")
    assert panels[3]["prompt"].startswith("role-a, captain-zoe and role-ab stand at the top")
    assert not any("ROLE-" in p["prompt"] for p in panels)
    assert panels[1]["caption"] == "老船长说：“灯不亮，船就回不了家。”"
    assert panels[3]["caption"].startswith("The light is back! 灯又亮了")
    # The YAML text is the same story, and a story file the loader accepts.
    path = tmp_path / "story.yaml"
    path.write_text(result.yaml_text, encoding="utf-8")
    loaded = load_story(path)
    assert [p.prompt for p in loaded.panels] == [p["prompt"] for p in panels]
    assert [p.caption for p in loaded.panels] == [p["caption"] for p in panels]
    assert [[c.name for c in p.characters] for p in loaded.panels] == [p["characters"] for p in panels]
    assert "role-a = 阿蓝 (ROLE-A)" in result.yaml_text.splitlines()[1]
    assert result.warnings == []


def test_a_role_only_named_in_the_prompt_is_on_stage_and_role_names_stand_for_aliases():
    data = script()
    shot = data["分镜头"][1]
    shot["act_roles"] = ["阿蓝"]  # the role's name where its alias belongs
    shot["prompt"] = "ROLE-B waves at ROLE-A; ROLE-A's lamp. Not ROLE-C or XROLE-B."
    panel = import_storyboard(data).story["panels"][1]
    assert panel["characters"] == ["role-a", "captain-zoe"]
    assert panel["prompt"] == "captain-zoe waves at role-a; role-a's lamp. Not ROLE-C or XROLE-B."


@pytest.mark.parametrize("role_name, alias, expected", [
    ("Mira", "ROLE-A", "mira"),
    ("Zoë Ångström", "ROLE-A", "zoe-angstrom"),
    ("小狐狸", "ROLE-A", "role-a"),
    ("con", "ROLE-A", "role-a"),  # a name Windows reserves: its alias instead
    ("42", "ROLE-A", "role-a"),  # a name must start with a letter
    ("小狐狸", "主角", "role-1"),  # neither folds to a key
])
def test_character_names_are_valid_story_keys(role_name, alias, expected):
    data = {"角色表": [{"角色名": role_name, "alias": alias, "simple_prompt": "a fox"}],
            "分镜头": [{"prompt": f"{alias} runs", "act_roles": [alias]}]}
    result = import_storyboard(data)
    assert list(result.story["characters"]) == [expected]
    assert result.story["panels"][0] == {"prompt": f"{expected} runs", "characters": [expected]}


def test_roles_whose_names_fold_alike_get_distinct_keys():
    roles = [{"角色名": name, "alias": f"ROLE-{c}", "simple_prompt": "a fox"}
             for name, c in [("Mira", "A"), ("mira", "B"), ("MIRA", "C")]]
    data = {"角色表": roles, "分镜头": [{"prompt": "ROLE-A, ROLE-B and ROLE-C"}]}
    result = import_storyboard(data)
    assert list(result.story["characters"]) == ["mira", "mira-2", "mira-3"]
    assert result.story["panels"][0]["prompt"] == "mira, mira-2 and mira-3"


def test_unknown_keys_are_ignored_with_a_warning():
    data = script()
    data["版本"] = 2
    data["分镜头"][0]["镜头角度"] = "远景"
    data["角色表"][1]["voice"] = "deep"
    result = import_storyboard(data, "s.json")
    assert result.story == import_storyboard(script(), "s.json").story
    assert result.warnings == [
        "s.json: 版本: unknown key, ignored",
        "s.json: 角色表[1].voice: unknown key, ignored",
        "s.json: 分镜头[0].镜头角度: unknown key, ignored",
    ]


def test_english_keys_are_read_as_well():
    data = {"title": "Kite", "roles": [{"name": "Mira", "alias": "ROLE-A", "simple_prompt": "a fox."}],
            "shots": [{"index": 1, "prompt": "ROLE-A flies a kite", "narration": "Up it goes."}]}
    story = import_storyboard(data).story
    assert story == {"title": "Kite", "model": "default",
                     "characters": {"mira": {"description": "a fox"}},
                     "panels": [{"prompt": "mira flies a kite", "characters": ["mira"],
                                 "caption": "Up it goes."}]}


def test_a_long_narration_is_cut_to_a_caption_with_a_warning():
    data = script()
    data["分镜头"][0]["旁白"] = "风" * 600
    result = import_storyboard(data, "s.json")
    caption = result.story["panels"][0]["caption"]
    assert len(caption) == 500 and caption.endswith("...")
    assert result.warnings == ["s.json: 分镜头[0].旁白: narration of 600 characters cut to 500 "
                               "(a caption's limit)"]


# --------------------------------------------------------------------------------------------
# Not a script: one line naming the file and the field
# --------------------------------------------------------------------------------------------


def _five_on_stage(data):
    data["角色表"] += [{"alias": f"ROLE-{c}", "simple_prompt": "a fox"} for c in "XY"]
    data["分镜头"][3]["prompt"] = "ROLE-A ROLE-B ROLE-AB ROLE-X ROLE-Y"


def _broken(change):
    data = script()
    change(data)
    return data


NOT_SCRIPTS = {
    "a list": ([1, 2], "not an AnyStory storyboard script: expected an object with a role table "
                       "(角色表) and shots (分镜头), got a list"),
    "a story": ({"title": "t", "panels": []}, "got keys 'title', 'panels'"),
    "no shots": (_broken(lambda d: d.pop("分镜头")), "分镜头: required but missing"),
    "empty shots": (_broken(lambda d: d.update({"分镜头": []})), "分镜头: no shots"),
    "roles not a list": (_broken(lambda d: d.update({"角色表": {"a": 1}})),
                         "角色表: expected a list, got an object"),
    "role without alias": (_broken(lambda d: d["角色表"][0].pop("alias")),
                           "角色表[0].alias: required but missing"),
    "blank simple_prompt": (_broken(lambda d: d["角色表"][2].update({"simple_prompt": " "})),
                            "角色表[2].simple_prompt: must not be empty"),
    "alias twice": (_broken(lambda d: d["角色表"][1].update({"alias": "ROLE-A"})),
                    "角色表[1].alias: role alias 'ROLE-A' is used twice"),
    "shot without prompt": (_broken(lambda d: d["分镜头"][3].pop("prompt")),
                            "分镜头[3].prompt: required but missing"),
    "prompt a number": (_broken(lambda d: d["分镜头"][0].update({"prompt": 7})),
                        "分镜头[0].prompt: expected a string, got number 7"),
    "unknown act role": (_broken(lambda d: d["分镜头"][1].update({"act_roles": ["ROLE-A", "ROLE-Z"]})),
                         "分镜头[1].act_roles[1]: unknown role 'ROLE-Z' (roles: ROLE-A, ROLE-B, ROLE-AB)"),
    "five on stage": (_broken(_five_on_stage), "the imported story is not valid: s.json: "
                      "panels[3].characters: 5 characters, but the model supports at most 4"),
}


@pytest.mark.parametrize("data, message", NOT_SCRIPTS.values(), ids=NOT_SCRIPTS.keys())
def test_not_a_script_is_one_clear_error(data, message):
    with pytest.raises(InputError) as info:
        import_storyboard(data, "s.json")
    text = str(info.value)
    assert text.startswith("s.json: ") and message in text and "\n" not in text


@pytest.mark.parametrize("content, message", [
    (b'{"\xe8\xa7\x92": [', "not valid JSON (line 1, column"),
    (b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
    (b"[" * 100_000 + b"]" * 100_000, "not a storyboard script"),
])
def test_unreadable_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_script(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    with pytest.raises(InputError, match="no such file"):
        read_script(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_import_then_validate_passes(tmp_path):
    source = write_json(tmp_path / "script.json", english(script()))
    out = tmp_path / "stories" / "lighthouse.yaml"
    result = invoke("import", "storyboard", str(source), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"ok: 3 characters, 4 panels -> {out}"
    checked = invoke("validate", str(out))
    assert checked.exit_code == 0, checked.stderr
    assert checked.stdout.strip() == f"ok: {out}"
    # Without --out the story goes to stdout, the same text.
    printed = invoke("import", "storyboard", str(source))
    assert printed.exit_code == 0 and printed.stdout == out.read_text(encoding="utf-8")


def test_the_shipped_example_imports(tmp_path):
    out = tmp_path / "example.yaml"
    result = invoke("import", "storyboard", str(EXAMPLE), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    story = load_story(out)
    assert len(story.panels) == 4 and set(story.characters) == {"role-a", "bolt"}
    assert story.panels[1].caption == "Bolt 说：“别担心，我能找到它！”"


def test_warnings_go_to_stderr_and_the_story_is_written(tmp_path):
    data = english(script())
    data["分镜头"][2]["camera"] = "wide"
    source = write_json(tmp_path / "script.json", data)
    out = tmp_path / "story.yaml"
    result = invoke("import", "storyboard", str(source), "--out", str(out))
    assert result.exit_code == 0
    assert result.stderr.strip() == f"warning: {source}: 分镜头[2].camera: unknown key, ignored"
    assert out.is_file()


@pytest.mark.parametrize("content", ['{"角色表": [', '{"title": "a story"}', "[]"])
def test_a_bad_script_leaves_the_earlier_story_untouched(tmp_path, content):
    out = tmp_path / "story.yaml"
    out.write_text("title: mine\n", encoding="utf-8")
    source = tmp_path / "script.json"
    source.write_text(content, encoding="utf-8")
    result = invoke("import", "storyboard", str(source), "--out", str(out))
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {source}: ")
    assert out.read_text(encoding="utf-8") == "title: mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.json", "story.yaml"]


def test_a_failed_write_leaves_the_earlier_story_untouched(tmp_path, monkeypatch):
    source = write_json(tmp_path / "script.json", english(script()))
    out = tmp_path / "story.yaml"
    out.write_text("title: mine\n", encoding="utf-8")
    real_write = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write(self, text[:20], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    result = invoke("import", "storyboard", str(source), "--out", str(out))
    monkeypatch.undo()
    assert result.exit_code == 1
    assert "write failed (No space left on device" in result.stderr
    assert out.read_text(encoding="utf-8") == "title: mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.json", "story.yaml"]
