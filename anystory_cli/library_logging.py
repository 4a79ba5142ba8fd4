"""Quieting diffusers' and transformers' own output while a model loads; callers report progress."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bars_off():
    """diffusers and transformers draw loading bars of their own; callers report progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def library_logs_quiet():
    """diffusers, transformers, peft and accelerate log and warn while they load (keys they skip,
    adapters they wrap, backends they fall back to); our loaders check what landed themselves and
    say what went wrong in one line."""
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Each library sets its own level when it first logs: let that happen before ours is set.
    diffusers_logging.get_verbosity()
    transformers_logging.get_verbosity()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft", "accelerate")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR + 10)  # diffusers logs a failed adapter load at ERROR before raising
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
