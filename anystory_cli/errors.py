"""Typed errors. Library code raises these with a message that says what was wrong, where, and
what was expected; only the `cli` package turns them into one line on stderr and an exit code."""


class AnyStoryError(Exception):
    """Base of every error a user can cause or fix. `exit_code` is what the CLI returns."""

    exit_code = 1


class InputError(AnyStoryError):
    """A user-supplied value (image, mask, story field, argument) is wrong."""


class StoryError(InputError):
    """A story file is malformed or inconsistent; the message names the file and the field."""


class FontError(InputError):
    """A lettering font is missing or unreadable, or no font draws some characters of a text."""


class ModelError(AnyStoryError):
    """A model is missing, or its parts do not fit together (adapter vs. base model shapes)."""


class OutputError(AnyStoryError):
    """An output could not be written (unwritable folder, disk full); earlier output is intact."""
