"""`anystory world`: the sprite world the embedded default model is trained on."""

from __future__ import annotations

from pathlib import Path

import typer

from .output import guarded


world_app = typer.Typer(help="The sprite world the embedded default model is trained on.",
                        no_args_is_help=True)


@world_app.command("sample")
def world_sample(
    out: Path = typer.Option(..., "--out", help="Folder for the example scenes."),
    count: int = typer.Option(16, "--count", min=1, max=1000, help="How many scenes."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same scenes)."),
) -> None:
    """Write example scenes, their instance masks, captions and identity contact sheets."""
    with guarded():
        from ..errors import OutputError
        from ..lab.world import write_samples

        try:
            files = write_samples(out, n=count, seed=seed)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write samples ({exc.strerror or exc})") from None
        typer.echo(f"{len(files)} files -> {out}")


@world_app.command("dataset")
def world_dataset(
    out: Path = typer.Option(..., "--out", help="Dataset folder (train.jsonl and its images)."),
    stage: int = typer.Option(..., "--stage", min=1, max=2, help="1: paired views of one "
                              "character; 2: scenes of 2-4 characters with instance masks."),
    count: int = typer.Option(..., "--count", min=1, max=10_000_000, help="How many samples."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed (same seed, same samples)."),
    size: int = typer.Option(64, "--size", min=32, max=512, help="Image size in pixels."),
    workers: int = typer.Option(1, "--workers", min=1, max=256, help="Processes that draw samples "
                                "(the same files whatever the number)."),
) -> None:
    """Write an `anystory train` dataset drawn from the world's training identities."""
    with guarded():
        from ..errors import OutputError
        from ..lab.world.dataset import write_dataset

        try:
            manifest = write_dataset(out, stage, count, seed, size, workers=workers)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the dataset ({exc.strerror or exc})") from None
        typer.echo(f"{count} stage-{stage} samples -> {manifest}")


@world_app.command("reference")
def world_reference(
    identity: int = typer.Argument(..., help="Identity seed of a world character.", show_default=False),
    out: Path = typer.Argument(..., help="PNG to write (RGBA: the alpha is the mask).", show_default=False),
    size: int = typer.Option(64, "--size", min=32, max=512, help="Image size in pixels."),
) -> None:
    """Write a world character's reference image (a front view on a transparent background)."""
    with guarded():
        from PIL import Image

        from ..atomic import atomic_path
        from ..lab.world import identity_from_seed, reference_image, split_of

        with atomic_path(out) as tmp:
            Image.fromarray(reference_image(identity, size=size), "RGBA").save(tmp, format="PNG")
        typer.echo(f"identity {identity} ({split_of(identity)}): "
                   f"{identity_from_seed(identity).describe()} -> {out}")
