"""Where ``mtkit run`` runs a recipe's (model, seed) units: this machine, or a SLURM cluster through submitit."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from .base import Strict


def slurm_minutes(value: int | str) -> int:
    """A SLURM time limit in minutes: a number of minutes, or SLURM's ``MM``, ``HH:MM:SS``, ``D-HH`` ... forms."""
    if isinstance(value, int):
        minutes = value
    else:
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
        if m is None:
            raise ValueError(f"'{value}' is not a SLURM time: give minutes (240) or D-HH:MM:SS, HH:MM:SS, MM")
        days, a, b, c = (int(g) if g else None for g in m.groups())
        if days is not None:  # D-HH[:MM[:SS]]
            minutes = days * 1440 + a * 60 + (b or 0) + ((c or 0) + 59) // 60
        elif b is None:  # MM
            minutes = a
        elif c is None:  # MM:SS
            minutes = a + (b + 59) // 60
        else:  # HH:MM:SS
            minutes = a * 60 + b + (c + 59) // 60
    if minutes < 1:
        raise ValueError(f"a SLURM time limit of {value} is under a minute: give at least 1 minute")
    return minutes


class LauncherConfig(Strict):
    """How ``mtkit run`` spreads the run's independent (model, seed) units (``--launcher`` and the ``--slurm-*``
    options override these keys): on this machine, up to ``--jobs`` processes at once; or on SLURM, one job of a job
    array per unit. Both go through submitit; the run folder and the stage cache must then be on a file system that
    every node sees."""

    kind: Literal["local", "slurm"] = "local"
    """local: this machine (--jobs N processes at once, one GPU each round robin); slurm: a SLURM job array"""
    slurm_partition: str | None = None
    """the partition the jobs go to (sbatch --partition); null: the cluster's default"""
    slurm_account: str | None = None
    """the account the jobs are billed to (sbatch --account)"""
    slurm_gpus_per_job: int = Field(1, ge=0)
    """GPUs of each job (sbatch --gpus-per-node); 0 for a CPU-only job"""
    slurm_cpus_per_job: int = Field(8, ge=1)
    """cores of each job (sbatch --cpus-per-task): its loader and prepare workers share them"""
    slurm_mem_gb: float | None = Field(None, gt=0)
    """host memory of each job in GB (sbatch --mem); null: the partition's default"""
    slurm_time: int | str = 1440
    """each job's time limit: minutes, or SLURM's D-HH:MM:SS; a job that reaches it is requeued and resumes from its
    last checkpoint (submitit's checkpointing, up to 3 times)"""
    slurm_extra: dict[str, str | int | float] = Field(default_factory=dict)
    """further sbatch options by name without the dashes, e.g. {constraint: a100, qos: high}"""
    slurm_setup: list[str] = Field(default_factory=list)
    """shell lines each job runs before mtkit, e.g. ['module load cuda/12.4', 'source ~/venvs/mtkit/bin/activate']"""

    @field_validator("slurm_time")
    @classmethod
    def _time(cls, v: int | str) -> int | str:
        slurm_minutes(v)
        return v
