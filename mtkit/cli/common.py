"""What the commands share: the consoles, the recipe and number-list options, one-line warnings."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape

from ..core.errors import MtkitError

console = Console()
err_console = Console(stderr=True)


class Context:
    """Global options (``mtkit --debug``)."""

    debug = False


def recipe_from(path: str, overrides: tuple[str, ...]):
    """The validated recipe at ``path`` with ``-o`` overrides applied."""
    # imported here, like every command's work: `mtkit --help` imports neither torch nor timm nor torchvision
    from ..recipe.load import load_recipe

    return load_recipe(path, list(overrides))


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MtkitError(f"--seeds expects comma-separated integers like 0,1,2, got '{text}'") from None


def parse_unit(text: str) -> tuple[str, int]:
    name, _, seed = text.rpartition(":")
    try:
        return name, int(seed)
    except ValueError:
        raise MtkitError(f"--unit expects MODEL:SEED, e.g. multi-0.1:0, got '{text}'") from None


def parse_numbers(text: str | None, option: str = "--eps", example: str = "0.25,1,4", kind=float) -> list | None:
    if text is None:
        return None
    try:
        return [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise MtkitError(f"{option} expects comma-separated {what} like {example}, got '{text}'") from None


override_opt = click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
                            help="override a recipe key, e.g. -o train.lr=1e-4 (repeatable)")


def warn_plugin_failures() -> None:
    """One warning per plugin that failed to load (list, show and run say it alike)."""
    from ..plugins.manager import plugin_failures

    for failure in plugin_failures():
        err_console.print(f"[yellow]warning:[/yellow] {escape(failure)}")
