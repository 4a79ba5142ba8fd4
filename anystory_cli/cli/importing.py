"""`anystory import`: stories from other tools' files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .output import guarded, print_warning

import_app = typer.Typer(help="Turn other tools' files into stories.", no_args_is_help=True)


@import_app.command("storyboard")
def import_storyboard_command(
    script: Path = typer.Argument(..., help="A script of the AnyStory storyboard tool (JSON).",
                                  show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="Story file to write (default: print "
                                       "the story on stdout). Replaced only once it is complete."),
    model: str = typer.Option("default", "--model", help="The story's `model:` value."),
) -> None:
    """A story from a storyboard script: each role a text-only character, each shot a panel
    (its prompt with the role aliases replaced by the characters' names, its narration the
    caption)."""
    with guarded():
        from ..atomic import atomic_path
        from ..storyboard import import_storyboard, lettering_warning, read_script

        base_dir = out.parent if out is not None else Path.cwd()
        result = import_storyboard(read_script(script), str(script), model=model,
                                   base_dir=base_dir)
        for warning in [*result.warnings, lettering_warning(result.story, str(script))]:
            if warning:
                print_warning(warning)
        if out is None:
            typer.echo(result.yaml_text, nl=False)
            return
        with atomic_path(out) as temp:
            temp.write_text(result.yaml_text, encoding="utf-8")
        story = result.story
        typer.echo(f"ok: {len(story.get('characters', {}))} characters, {len(story['panels'])} "
                   f"panels -> {out}")
