"""The one atomic write: every file mtkit writes (results, reports, plots, checkpoints, caches, exports) goes to a
temporary file in the same folder and is renamed over the target, so a reader never sees a half-written file.
A failed write removes its temporary file; temporaries of processes that died are cleaned on the next write."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import MtkitError, MtkitWarning

TMP_MARK = ".tmp"


def cache_dir() -> Path:
    """Generated data, prepared datasets and derived statistics: ``$MTKIT_CACHE`` or ``~/.cache/mtkit``."""
    return Path(os.environ.get("MTKIT_CACHE", Path.home() / ".cache" / "mtkit"))


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


def clear_tree(path: Path) -> None:
    """Remove the folder ``path`` and what it holds; a folder reached through a symlink (a run folder on a scratch
    disk, linked in) keeps the link and its target folder, emptied, instead of ``rmtree``'s refusal."""
    if path.is_symlink():
        target = path.resolve()
        for child in list(target.iterdir()) if target.is_dir() else []:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    elif path.exists():
        shutil.rmtree(path)


_HELD: set[int] = set()  # the file descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child: point the held locks' descriptors at /dev/null, so that the lock is its parent's alone
    (a flock lives while any descriptor of it is open) and the child's file objects still close cleanly."""
    if _HELD:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in _HELD:
            os.dup2(null, fd, inheritable=False)
        os.close(null)
        _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def run_lock(folder: Path, enabled: bool = True, wait: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold ``folder/.lock`` while writing a run there: a second mtkit process writing to the same folder stops at
    once with a message instead of interleaving checkpoints and logs; with ``wait`` (a log function) it says so
    once and waits for the first to finish (what a second ``prepare`` of the same dataset does). Yields whether it
    waited.

    A ``flock`` that the loader and prepare workers this process forks do not inherit (``_HELD``): it ends with
    the process however it ends, so a failed or killed run never leaves its folder locked behind a surviving
    worker. The file names its holder while held; a name left in it is a holder that died, whose folder is taken
    over with a notice (``wait``'s log, else a warning)."""
    if not enabled:
        yield False
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    waited = False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            if wait is None:
                raise MtkitError(f"{folder} is being written by {holder}: wait for it to finish, or write to another "
                                 "folder") from None
            wait(f"{folder} is being written by {holder}: waiting for it to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
            waited = True
        fh.seek(0)
        left = fh.read().strip()
        if left and not waited:
            (wait or (lambda m: warnings.warn(MtkitWarning(m), stacklevel=3)))(
                f"{folder}: taking over from {left}, which ended without releasing it (killed or crashed)")
        fh.seek(0)
        fh.truncate()
        fh.write(f"mtkit pid {os.getpid()}")
        fh.flush()
        _HELD.add(fh.fileno())
        try:
            yield waited
        finally:
            _HELD.discard(fh.fileno())
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_writable_dir(folder: str | Path, what: str = "output folder") -> Path:
    """Check, before any work, that ``folder`` can be created and written (nothing is created): one clear error
    for a path that is a file, sits under a file, or lacks permission."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise MtkitError(f"{what} {folder}: {parent} is a file, not a folder")
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    probe = existing / f".write-test{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MtkitError(f"{what} {folder} is not writable ({existing}: {exc.strerror or exc})") from None
    return folder
