"""``mtkit run``: the paper's protocol as cached stages (``stages``: their hashes, files and the one caching
path), the run itself (``runner``), ``--jobs`` (``jobs``) and what a run records of its machine
(``provenance``)."""

from .runner import RunResult, run, run_folder
from .stages import StageCache, UnitFiles, stage_files

__all__ = ["RunResult", "StageCache", "UnitFiles", "run", "run_folder", "stage_files"]
