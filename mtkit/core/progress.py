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


def hms(seconds: float) -> str:
    """A duration as people read it: ``4 min 07 s``, ``2 h 05 min``."""
    m, s = divmod(round(seconds), 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min {s:02d} s"
