"""Errors that the CLI shows as one line (exit code 2) instead of a traceback."""

from __future__ import annotations

import difflib
from typing import Any


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


def did_you_mean(name: str, known: list[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the close matches of ``name`` among ``known``, else ``""``."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=cutoff)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def value_problem(path: str, err: dict[str, Any]) -> str:
    """One pydantic validation error of a value as ``key 'path': message (got value)``."""
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"key '{path}': {err['msg'].removeprefix('Value error, ')}{got_s}"


class MtkitWarning(UserWarning):
    """Something accepted that is likely not what was meant (the CLI prints it as one line: ``warning: …``)."""
