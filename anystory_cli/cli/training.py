"""`anystory train`: one entry point for every kind of recipe: AnyStory adapters, the default model's
base models and the evaluation's judge."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer

from .output import TrainProgress, guarded, print_warning, quiet_libraries


def _train_adapter(recipe_path: Path, resume: Optional[bool], check: bool, as_json: bool) -> None:
    """An AnyStory adapter, stage 1 or 2 (anystory_cli/train/loop.py)."""
    from ..train import check_dataset, load_recipe
    from ..train import train as run_training

    recipe = load_recipe(recipe_path)
    if resume is not None:
        recipe = recipe.model_copy(update={"resume": resume})
    if check:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_dataset(recipe)
        for warning in caught:
            print_warning(str(warning.message))
        typer.echo(f"{recipe_path}: the recipe and its dataset {recipe.data} are usable")
        return
    quiet_libraries()
    progress = TrainProgress(as_json)
    try:
        with warnings.catch_warnings():
            # skipped rows and unwritten previews: one line each, not Python's warning format
            warnings.showwarning = lambda message, *args, **kwargs: print_warning(str(message))
            result = run_training(recipe, progress=progress)
    finally:
        progress.close()
    if not as_json:
        typer.echo(f"trained to step {result.step}: {recipe.output_dir / 'adapter.safetensors'}"
                   + (f" ({result.skipped} bad row(s) skipped)" if result.skipped else ""))


def _train_base_model(recipe_path: Path, resume: Optional[bool], check: bool, as_json: bool) -> None:
    """The default model's VAE, CLIP or UNet (anystory_cli/lab/train_base.py): always resumes
    from its checkpoint; --restart is refused rather than silently deleting a long run."""
    from ..errors import InputError
    from ..lab import train_base

    recipe, base_dir = train_base.load_recipe(recipe_path)
    if resume is False:
        checkpoints = train_base.RunPaths(recipe, base_dir).checkpoints
        raise InputError(f"{recipe_path}: base-model runs always continue from their checkpoint; "
                         f"delete {checkpoints} to start over")
    if check:
        typer.echo(f"{recipe_path}: the recipe is usable")
        return

    train_base.train(recipe, base_dir, log=_say(as_json))


def _train_judge(recipe_path: Path, resume: Optional[bool], check: bool, as_json: bool) -> None:
    """The independent judge the evaluation grades with (anystory_cli/lab/judge.py), published
    into the assets. A run has no checkpoints: it always starts over."""
    from ..errors import InputError
    from ..lab import judge

    recipe, base_dir = judge.load_recipe(recipe_path)
    if resume:
        raise InputError(f"{recipe_path}: a judge run keeps no checkpoints to continue from; it starts over")
    if check:
        typer.echo(f"{recipe_path}: the recipe is usable")
        return
    judge.train_judge(recipe, base_dir, log=_say(as_json))


def _say(as_json: bool):
    """One record of a lab run: a JSON line on stdout, or key=value words on stderr."""

    def say(record: dict) -> None:
        if as_json:
            typer.echo(json.dumps(record))
        else:
            typer.echo(" ".join(f"{k}={v}" for k, v in record.items()), err=True)

    return say


KINDS = {"adapter": _train_adapter, "base": _train_base_model, "judge": _train_judge}


def train(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="A training recipe (YAML); its `kind` says "
                                       "what it trains: `adapter` an AnyStory adapter (stage 1 or 2), `base` one "
                                       "of the default model's base models, `judge` the evaluation's judge."),
    resume: Optional[bool] = typer.Option(None, "--resume/--restart", help="Continue from the last "
                                          "checkpoint, or start over (default: the recipe's `resume`)."),
    check: bool = typer.Option(False, "--check", help="Only check the recipe and every row of its "
                               "dataset; load no model."),
    as_json: bool = typer.Option(False, "--json", help="Print each step and checkpoint as one JSON "
                                 "line on stdout."),
) -> None:
    """Train with a recipe: on this CPU, or on GPUs under `accelerate launch` / `torchrun`.

    Adapter runs write checkpoints, log.jsonl, losses.png and samples.png (sample generations
    with their routing maps) to the recipe's output_dir; see `anystory_cli/train/loop.py`."""
    with guarded(as_json):
        from ..train.recipe_files import recipe_kind

        KINDS[recipe_kind(recipe_path, tuple(KINDS))](recipe_path, resume, check, as_json)
