"""Import a script of the released AnyStory storyboard tool as a story.

The storyboard tool (its `storyboard.py`, with example scripts under `assets/scripts/`) reads a
JSON script whose keys are Chinese::

    {
      "故事梗概": "...",                          synopsis
      "角色表": [                                 role table
        {"角色名": "杨戬", "简单描述": "...",       role name, short description (Chinese)
         "alias": "ROLE-A", "simple_prompt": "A handsome man, wearing silver armor ..."}
      ],
      "分镜头": [                                 shots
        {"序号": 1, "出场角色": ["杨戬"],            number, roles on stage (by name)
         "旁白": "...",                           narration
         "act_roles": ["ROLE-A"], "场景描述": "...", roles on stage (by alias), scene (Chinese)
         "prompt": "ROLE-A stands at the foot of ROLE-B, ..."}
      ]
    }

The English spellings `title`/`synopsis`, `roles`, `shots`, `name`, `index`, `narration` and
`roles_on_stage` are read as well. Characters no story text may hold (control characters but
tab and newline, lone surrogates, non-characters: `story.forbidden_kind`) are removed from what
is read, with a warning naming the script's field. Each role becomes a text-only character (`simple_prompt` is
its description) under a name that is a valid story key: the role name folded to ASCII when that
works (`Mira` -> `mira`), else its alias (`ROLE-A` -> `role-a`). Each shot becomes a panel in
script order: its prompt with every alias replaced by that name, its characters the roles of
`act_roles` followed by any other alias its prompt names (as the storyboard tool does), its
narration the caption. Keys the importer does not know are ignored with a warning; a file that
is not such a script raises `InputError`. No torch.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from anystory_cli.errors import InputError, StoryError
from anystory_cli.story import (MAX_STORY_BYTES, forbidden_characters, forbidden_kind, is_character_name,
                                validate_story, without_forbidden)

# Each field: the script's own key first, then the English spellings read as well.
SYNOPSIS = ("故事梗概", "title", "synopsis")
ROLES = ("角色表", "roles")
SHOTS = ("分镜头", "shots")
ROLE_NAME = ("角色名", "name")
ROLE_ALIAS = ("alias",)
ROLE_PROMPT = ("simple_prompt",)
ROLE_NOTE = ("简单描述", "description")  # the Chinese description; the prompt is simple_prompt
SHOT_INDEX = ("序号", "index")
SHOT_PROMPT = ("prompt",)
SHOT_ACT_ROLES = ("act_roles",)
SHOT_NARRATION = ("旁白", "narration")
SHOT_ON_STAGE = ("出场角色", "roles_on_stage")  # role names; act_roles says the same by alias
SHOT_SCENE = ("场景描述", "scene")  # the Chinese scene; the prompt is its English version

_TOP_KEYS = (*SYNOPSIS, *ROLES, *SHOTS)
_ROLE_KEYS = (*ROLE_NAME, *ROLE_ALIAS, *ROLE_PROMPT, *ROLE_NOTE)
_SHOT_KEYS = (*SHOT_INDEX, *SHOT_PROMPT, *SHOT_ACT_ROLES, *SHOT_NARRATION, *SHOT_ON_STAGE,
              *SHOT_SCENE)

MAX_TITLE_CHARS = 200  # the story's limits (story.py): a longer text is cut with '...'
MAX_CAPTION_CHARS = 500
MAX_DESCRIPTION_CHARS = 1000


@dataclass
class ImportedStory:
    """The story (a plain dict, as a story file holds it), its YAML text, and what was said."""

    story: dict[str, Any]
    yaml_text: str
    names: dict[str, str]  # alias -> character name
    warnings: list[str] = field(default_factory=list)


class _Script:
    """Reads one script, collecting warnings; `fail` raises the one-line InputError."""

    def __init__(self, source: str):
        self.source = source
        self.warnings: list[str] = []

    def fail(self, loc: tuple, message: str) -> None:
        where = f"{_loc(loc)}: " if loc else ""
        raise InputError(f"{self.source}: {where}{message}")

    def warn(self, loc: tuple, message: str) -> None:
        self.warnings.append(f"{self.source}: {_loc(loc)}: {message}")

    def mapping(self, value: Any, loc: tuple, known: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fail(loc, f"expected an object, got {_kind(value)}")
        for key in value:
            if key not in known:
                self.warn((*loc, key), "unknown key, ignored")
        return value

    def get(self, mapping: dict, keys: tuple[str, ...], loc: tuple, kind: type | tuple,
            required: bool = False) -> Any:
        """The value under the first of `keys` present, checked to be `kind`."""
        for key in keys:
            if key in mapping:
                value = mapping[key]
                if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                    names = kind.__name__ if isinstance(kind, type) else " or ".join(
                        k.__name__ for k in kind)
                    self.fail((*loc, key), f"expected {_json_name(names)}, got {_kind(value)}")
                return value
        if required:
            self.fail((*loc, keys[0]), "required but missing")
        return None

    def clean(self, value: str, loc: tuple) -> str:
        """`value` without the characters no story text may hold; a warning when there were."""
        found = forbidden_characters(value)
        if found:
            char = found[0][1]
            self.warn(loc, f"{len(found)} character(s) no story text may hold removed (first: "
                           f"{forbidden_kind(char)} U+{ord(char):04X} at character {found[0][0] + 1})")
        return without_forbidden(value)

    def text(self, mapping: dict, keys: tuple[str, ...], loc: tuple,
             required: bool = False) -> str | None:
        value = self.get(mapping, keys, loc, str, required)
        if value is not None:
            value = self.clean(value, (*loc, _present(mapping, keys)))
        if value is not None and not value.strip():
            if required:
                self.fail((*loc, _present(mapping, keys)), "must not be empty")
            return None
        return value.strip() if value is not None else None


def read_script(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON of a script file; InputError (one line) when it cannot be read."""
    source = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_STORY_BYTES:
            raise InputError(f"{source}: the file is {size / 1024 / 1024:.1f} MiB; a storyboard "
                             f"script must be at most {MAX_STORY_BYTES // (1024 * 1024)} MiB")
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{source}: is a directory, expected a storyboard script (JSON)") from None
    except OSError as exc:
        raise InputError(f"{source}: cannot read the file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not UTF-8 text (byte {exc.start}); a storyboard script is "
                         "UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not a storyboard script: not valid JSON (line {exc.lineno}, "
                         f"column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise InputError(f"{source}: not a storyboard script: the JSON is nested too "
                         "deeply") from None


def import_storyboard(data: Any, source: str = "<script>", model: str = "default",
                      base_dir: str | os.PathLike[str] = ".") -> ImportedStory:
    """A story (dict and YAML text) from a parsed storyboard script; InputError if `data` is
    not one. The story is checked with `validate_story` before it is returned."""
    script = _Script(source)
    if not isinstance(data, dict) or not any(k in data for k in (*ROLES, *SHOTS)):
        raise InputError(
            f"{source}: not an AnyStory storyboard script: expected an object with a role table "
            f"({ROLES[0]}) and shots ({SHOTS[0]}), got "
            + (f"keys {', '.join(map(repr, list(data)[:5]))}" if isinstance(data, dict)
               else _kind(data)))
    script.mapping(data, (), _TOP_KEYS)
    roles = script.get(data, ROLES, (), list, required=True)
    shots = script.get(data, SHOTS, (), list, required=True)
    roles_key, shots_key = _present(data, ROLES), _present(data, SHOTS)
    if not shots:
        script.fail((shots_key,), "no shots; a story needs at least one panel")

    names: dict[str, str] = {}  # alias -> character name
    by_role_name: dict[str, str] = {}  # role name -> alias
    characters: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    taken: set[str] = set()
    for number, role in enumerate(roles):
        loc = (roles_key, number)
        script.mapping(role, loc, _ROLE_KEYS)
        alias = script.text(role, ROLE_ALIAS, loc, required=True)
        prompt = script.text(role, ROLE_PROMPT, loc, required=True)
        role_name = script.text(role, ROLE_NAME, loc)
        if alias in names:
            script.fail((*loc, "alias"), f"role alias {alias!r} is used twice")
        name = _unique(_character_name(role_name, alias, number), taken)
        taken.add(name.casefold())
        names[alias] = name
        if role_name:
            by_role_name[role_name] = alias
        characters[name] = {"description": _cut(prompt.rstrip(". ").strip() or prompt,
                                                MAX_DESCRIPTION_CHARS)}
        notes.append(f"{name} = {role_name} ({alias})" if role_name and role_name != name
                     else f"{name} ({alias})")

    pattern = _alias_pattern(names)
    panels = []
    for number, shot in enumerate(shots):
        loc = (shots_key, number)
        script.mapping(shot, loc, _SHOT_KEYS)
        prompt = script.text(shot, SHOT_PROMPT, loc, required=True)
        act_roles = script.get(shot, SHOT_ACT_ROLES, loc, list) or []
        on_stage: list[str] = []
        for slot, alias in enumerate(act_roles):
            where = (*loc, _present(shot, SHOT_ACT_ROLES), slot)
            if not isinstance(alias, str):
                script.fail(where, f"expected a role alias, got {_kind(alias)}")
            alias = script.clean(alias, where).strip()
            if alias not in names:
                if alias in by_role_name:  # a role name where an alias belongs
                    alias = by_role_name[alias]
                else:
                    script.fail(where, f"unknown role {alias!r} (roles: {', '.join(names)})")
            if names[alias] not in on_stage:
                on_stage.append(names[alias])
        if pattern is not None:
            for match in pattern.finditer(prompt):
                if names[match.group(0)] not in on_stage:
                    on_stage.append(names[match.group(0)])
            prompt = pattern.sub(lambda m: names[m.group(0)], prompt)
        panel: dict[str, Any] = {"prompt": prompt}
        if on_stage:
            panel["characters"] = on_stage
        narration = script.text(shot, SHOT_NARRATION, loc)
        if narration:
            if len(narration) > MAX_CAPTION_CHARS:
                script.warn((*loc, _present(shot, SHOT_NARRATION)),
                            f"narration of {len(narration)} characters cut to "
                            f"{MAX_CAPTION_CHARS} (a caption's limit)")
            panel["caption"] = _cut(narration, MAX_CAPTION_CHARS)
        panels.append(panel)

    title = script.text(data, SYNOPSIS, ()) or without_forbidden(Path(source).stem).strip() or "Untitled"
    story: dict[str, Any] = {"title": _cut(title, MAX_TITLE_CHARS), "model": model}
    if characters:
        story["characters"] = characters
    story["panels"] = panels
    try:
        validate_story(story, source=source, base_dir=base_dir)
    except StoryError as exc:
        problems = getattr(exc, "problems", None) or [str(exc)]
        raise InputError(f"{source}: the imported story is not valid: "
                         f"{'; '.join(problems)}") from None

    # Comments end at any line break YAML knows (U+2028 too): each is one line, or a role name
    # could write keys of its own into the story.
    header = [f"# A story imported from the AnyStory storyboard script {_one_line(Path(source).name)}."]
    if notes:
        header.append("# Characters: " + _one_line(", ".join(notes)) + ".")
    body = yaml.safe_dump(story, allow_unicode=True, sort_keys=False, width=100)
    return ImportedStory(story, "\n".join(header) + "\n" + body, names, script.warnings)


def lettering_warning(story: dict[str, Any], source: str) -> str | None:
    """A warning when this machine has no font for some characters of the captions (the story
    is still valid; `anystory validate` and `render` will name what to install), else None."""
    from anystory_cli.errors import FontError
    from anystory_cli.fonts import font_chain

    text = "".join(panel.get("caption", "") for panel in story.get("panels", []))
    try:
        chain = font_chain(None)
        missing = chain.undrawable(text)
    except FontError as exc:
        return f"{source}: {exc}"
    if not missing:
        return None
    return (f"{source}: the narration cannot be lettered on this machine: "
            f"{chain.describe_missing(missing)}")


def _character_name(role_name: str | None, alias: str, number: int) -> str:
    """A valid story key for a role: its name folded to ASCII, else its alias, else role-N."""
    for candidate in (role_name or "", alias):
        folded = unicodedata.normalize("NFKD", candidate).encode("ascii", "ignore").decode()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", folded).strip("-").lower()[:40].rstrip("-")
        if slug and is_character_name(slug):
            return slug
    return f"role-{number + 1}"


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or name-2, name-3, ... when another character has it (case folded)."""
    if name.casefold() not in taken:
        return name
    count = 2
    while f"{name[:36]}-{count}".casefold() in taken:
        count += 1
    return f"{name[:36]}-{count}"


def _alias_pattern(names: dict[str, str]) -> re.Pattern[str] | None:
    """Matches any alias as a whole word (ROLE-A, not the start of ROLE-AB); longest first."""
    if not names:
        return None
    words = sorted(names, key=len, reverse=True)
    return re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, words)) + r")(?![\w-])")


def _loc(loc: tuple) -> str:
    """('分镜头', 2, 'prompt') -> '分镜头[2].prompt' (the script's own keys, any script)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[^\W\d]\w*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


def _present(mapping: dict, keys: tuple[str, ...]) -> str:
    return next((k for k in keys if k in mapping), keys[0])


def _one_line(text: str) -> str:
    """`text` with every run of white space, line breaks included, one space."""
    return " ".join(text.split())


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _json_name(python_name: str) -> str:
    return {"dict": "an object", "list": "a list", "str": "a string", "int": "a number"}.get(
        python_name, python_name)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = repr(value) if len(value) <= 30 else repr(value[:27] + "...")
        return f"string {shown}"
    return {"dict": "an object", "list": "a list"}.get(type(value).__name__, type(value).__name__)
