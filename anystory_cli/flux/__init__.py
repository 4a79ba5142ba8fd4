"""AnyStory on FLUX.1 with the released weights (`anystory_flux.bin`, FLUX.1-dev, FLUX.1-Redux-dev).

    from anystory_cli.flux import AnyStoryFluxPipeline
    pipe = AnyStoryFluxPipeline.from_pretrained("FLUX.1-dev", redux="FLUX.1-Redux-dev",
                                                adapter="anystory_flux.bin")
    mira = pipe.encode_character(image, mask=mask, generator=torch.Generator().manual_seed(0))
    out = pipe("mira waves", characters=[mira], generator=torch.Generator().manual_seed(0))
"""
from __future__ import annotations

__all__ = ["CHARACTER_FORMAT", "AnyStoryFluxAdapter", "AnyStoryFluxPipeline", "FluxCharacter", "FluxOutput",
           "prepare_reference"]


def __getattr__(name):  # diffusers takes seconds to import: only when asked for
    if name == "FluxCharacter":
        from .character import FluxCharacter
        return FluxCharacter
    if name in ("AnyStoryFluxPipeline", "AnyStoryFluxAdapter", "FluxOutput"):
        from ..library_logging import library_logs_quiet

        with library_logs_quiet():  # diffusers and transformers log what they fall back to on import
            from . import pipeline
        return getattr(pipeline, name)
    if name == "CHARACTER_FORMAT":
        from .weights import CHARACTER_FORMAT
        return CHARACTER_FORMAT
    if name == "prepare_reference":
        from .reference import prepare_reference
        return prepare_reference
    raise AttributeError(name)
