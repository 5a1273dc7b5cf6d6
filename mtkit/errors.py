"""Errors that the CLI shows as one line (exit code 2) instead of a traceback."""

from __future__ import annotations


class MtkitError(Exception):
    """A mistake in user input (recipe, path, name, dataset layout): reported without a traceback."""

    exit_code = 2


class RecipeError(MtkitError):
    """A recipe that does not validate."""


class DatasetError(MtkitError):
    """A dataset root that is missing, has the wrong layout, or holds an unreadable file."""


class CheckpointError(MtkitError):
    """A checkpoint or weight file that is missing, unsafe or does not match the model."""


class TrainingDiverged(MtkitError):
    """A loss became NaN or inf."""
