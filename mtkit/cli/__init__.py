"""The ``mtkit`` command line: a thin layer over ``mtkit.api``.

User mistakes (bad recipe, missing dataset, unknown name) print one line and exit with code 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
import warnings

import click

from .. import __version__
from ..core.errors import MtkitError, MtkitWarning
from .benchmarks import bench
from .common import Context, console, err_console
from .evaluation import eval_cmd, eval_depth_cmd, export
from .protocol import list_cmd, prepare, run, show, train

__all__ = ["cli", "console", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtkit")
@click.option("--debug", is_flag=True, help="show tracebacks for errors")
def cli(debug: bool) -> None:
    """mtkit: robust semantic segmentation by multi-task training with self-supervised depth."""
    Context.debug = debug


for command in (list_cmd, show, run, prepare, train, eval_cmd, eval_depth_cmd, export, bench):
    cli.add_command(command)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or torchrun's stop), handled like Ctrl-C: one line, the finished work kept."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


#: errors of a folder that refuses a write: read-only file system, permission, full disk or quota
WRITE_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def write_error(exc: OSError) -> str:
    """The one-line message of a refused write, with the fix: the cache (``MTKIT_CACHE``) or the output folder."""
    from pathlib import Path

    from ..core.io import cache_dir

    where = Path(exc.filename) if exc.filename else None
    cache = cache_dir()
    in_cache = where is not None and (where == cache or cache in where.parents)
    fix = (f"the cache {cache} lacks what this run needs and cannot be written: make it writable or set MTKIT_CACHE "
           "to a writable folder" if in_cache else "choose a writable folder (--out or output_dir)")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space there, or {fix[0].lower()}{fix[1:]}"
    return f"cannot write {where or 'a file'} ({exc.strerror or exc}): {fix}; finished work is kept"


RESUME_HINT = "finished stages and the last checkpoint are kept: the same command continues where it stopped"


_SHOWN: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """mtkit's own warnings (``MtkitWarning``) as one line, each once (a recipe is validated again by later
    stages); every other warning as Python shows it."""
    if issubclass(category, MtkitWarning):
        if str(message) in _SHOWN:
            return
        _SHOWN.add(str(message))
        err_console.print(f"warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> None:
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        _main(argv)
    finally:
        warnings.showwarning = shown
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C (and our SIGTERM) into Abort
        if isinstance(exc.__cause__, Terminated):
            err_console.print(f"terminated (SIGTERM): {RESUME_HINT}")
            sys.exit(143)
        err_console.print(f"interrupted: {RESUME_HINT}")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MtkitError as exc:
        if Context.debug:
            raise
        msg = str(exc)
        err_console.print(f"error: {msg}", style="bold red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a folder mtkit must write to refuses (read-only, no permission, full): one line
        if Context.debug or exc.errno not in WRITE_ERRORS:
            raise
        err_console.print(f"error: {write_error(exc)}", style="bold red", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except Terminated:
        err_console.print(f"terminated (SIGTERM): {RESUME_HINT}")
        sys.exit(143)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {RESUME_HINT}")
        sys.exit(130)


if __name__ == "__main__":
    main()
