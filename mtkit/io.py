"""The one atomic write: every file mtkit writes (results, reports, plots, checkpoints, caches, exports) goes to a
temporary file in the same folder and is renamed over the target, so a reader never sees a half-written file.
A failed write removes its temporary file; temporaries of processes that died are cleaned on the next write."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

TMP_MARK = ".tmp"


def temporary_name(path: Path) -> Path:
    """The temporary file of ``path`` for this process: ``.<name>.tmp<pid><suffix>`` beside it."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}{path.suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporary files left in ``folder`` by mtkit processes that no longer run (a kill mid-write)."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_MARK}*"):
        digits = p.name.rsplit(TMP_MARK, 1)[-1].split(".")[0]
        if digits.isdigit() and int(digits) != os.getpid() and not _pid_alive(int(digits)):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp`` any way (a library's save function); on success it is
    renamed to ``p``, on an exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` atomically through ``write(binary file)``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))
