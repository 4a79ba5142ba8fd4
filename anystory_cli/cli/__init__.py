"""The `anystory` command: the only package that imports typer or rich.

Everything heavy (pydantic, torch, diffusers) is imported inside the commands, so `--help` and
`--version` answer at once. Library errors (`AnyStoryError`) become one line on stderr — red on
a terminal, plain otherwise or with NO_COLOR — and exit code 1; usage errors exit 2; an
unexpected exception prints a short line and a hint to rerun with --debug for the traceback.

    rendering.py   validate, schema, models, encode-character, render
    importing.py   import storyboard
    training.py    train
    world.py       world sample | dataset | reference
    evaluation.py  evaluate base | adapter | compare
    output.py      error lines, progress printers, summaries and tables
    seams.py       where tests put tiny models in place of the loaders
"""

from __future__ import annotations

import typer

from .. import __version__
from . import evaluation, importing, rendering, seams, training, world
from .output import State

app = typer.Typer(
    name="anystory",
    help="Turn a YAML story into comic pages whose characters stay the same person "
    "(AnyStory, arXiv 2501.09503).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"anystory {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of unexpected errors."),
) -> None:
    State.debug = debug


app.command()(rendering.validate)
app.command()(rendering.schema)
app.command()(rendering.models)
app.add_typer(importing.import_app, name="import")
app.command("encode-character")(rendering.encode_character)
app.command()(rendering.render)
app.command()(training.train)
app.add_typer(world.world_app, name="world")
app.add_typer(evaluation.evaluate_app, name="evaluate")

__all__ = ["app", "main", "seams"]
