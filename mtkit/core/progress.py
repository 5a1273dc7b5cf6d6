"""One rich progress bar for every long job (training, sweeps, depth evaluation): description, bar, done/total,
free-form info, elapsed time and ETA. Disabled, it costs nothing and prints nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(enabled: bool, total: int, label: str, done: int = 0) -> Iterator[Callable[..., None]]:
    """``with progress_bar(True, n, "train") as advance: advance(description=..., info=...)``."""
    if not enabled:
        yield lambda *a, **k: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    task = bar.add_task(label, total=total, completed=done, info="")

    def advance(description: str | None = None, info: str | None = None, steps: int = 1) -> None:
        fields = {} if info is None else {"info": info}
        bar.update(task, advance=steps, description=description or label, **fields)

    with bar:
        yield advance
