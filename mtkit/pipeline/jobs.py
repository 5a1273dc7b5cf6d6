"""``mtkit run --jobs N``: the independent (model, seed) units of a run in up to N processes at once."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from ..core.errors import MtkitError
from ..core.io import atomic_write_text
from ..core.schema import Recipe


def job_gpus(recipe: Recipe) -> list[str]:
    """The GPUs the jobs are spread over, as ``CUDA_VISIBLE_DEVICES`` names them: the inherited entries (a
    scheduler's ``4,5,6,7``, GPU UUIDs, MIG names) as they are, else 0..N-1; none on a CPU run."""
    count = torch.cuda.device_count() if recipe.device in ("auto", "cuda") else 0
    inherited = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (inherited or [str(i) for i in range(count)])[:count]


def job_env(gpu: str | None, per_gpu: int, concurrent: int) -> dict[str, str]:
    """A job's environment: its GPU and its share of it (``MTKIT_MEMORY_SHARE``: the attack passes size
    themselves to that share of the free memory, ``evaluation.sweep.pass_size``), the number of jobs on the node
    (``MTKIT_JOBS``: loader and prepare workers take their share of the cores, ``recipe.prepare.default_workers``),
    and its threads: on a GPU its share of the cores; on the CPU the thread count of one process, which keeps the
    results equal to ``--jobs 1`` (a CPU's float reductions depend on the thread count)."""
    cores = os.cpu_count() or 1
    env = {"PYTHONUNBUFFERED": "1", "MTKIT_JOBS": str(concurrent)}
    if gpu is None:
        return {**env, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return {**env, "CUDA_VISIBLE_DEVICES": gpu, "MTKIT_MEMORY_SHARE": f"{1 / per_gpu:.6g}",
            "OMP_NUM_THREADS": str(max(1, cores // concurrent))}


def run_jobs(recipe: Recipe, run_dir: Path, units: list[tuple[str, int]], jobs: int, force: bool, log=print,
             seeds: list[int] | None = None) -> None:
    """Run the stages of independent (model, seed) units in up to ``jobs`` processes at once (``mtkit run --unit``
    on the resolved recipe, into the same run folder and stage cache): several models share one GPU, or spread
    over several (each process sees one GPU through ``CUDA_VISIBLE_DEVICES``: the least busy one when it starts,
    named as the inherited variable names it), or share the CPU. Each process trains and evaluates exactly as
    one process would (the same seeds and data), with its share of the GPU's memory and of the cores
    (``job_env``); a failed unit stops the others and names its log. ``seeds``: the run's (``--seeds``), which
    each process is given, so that its unit is one of its run's."""
    folder = run_dir / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "recipe.yaml"
    atomic_write_text(recipe_file, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    gpus = job_gpus(recipe)
    concurrent = max(1, min(jobs, len(units)))
    per_gpu = math.ceil(concurrent / max(len(gpus), 1))
    load = dict.fromkeys(gpus, 0)  # jobs running on each GPU
    pending, running = list(units), []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, seed = pending.pop(0)
                gpu = min(gpus, key=lambda g: load[g]) if gpus else None  # a free slot (the first among equals)
                if gpu is not None:
                    load[gpu] += 1
                logfile = folder / f"{name}-s{seed}.log"
                cmd = [sys.executable, "-m", "mtkit", "run", str(recipe_file), "--out", str(run_dir), "--no-progress",
                       "--unit", f"{name}:{seed}", *(["--force"] if force else []),
                       *(["--seeds", ",".join(map(str, seeds))] if seeds else [])]
                with open(logfile, "w") as fh:
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                            env={**os.environ, **job_env(gpu, per_gpu, concurrent)})
                running.append((proc, name, seed, logfile, time.perf_counter(), gpu))
                log(f"[job] {name} seed {seed} started" + (f" on GPU {gpu}" if gpu is not None else "")
                    + f" (log: {logfile})")
            time.sleep(0.2)
            for job in [j for j in running if j[0].poll() is not None]:
                proc, name, seed, logfile, t0, gpu = job
                running.remove(job)
                if gpu is not None:
                    load[gpu] -= 1
                if proc.returncode != 0:
                    tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-8:])
                    raise MtkitError(f"job {name} seed {seed} failed (exit code {proc.returncode}); its log "
                                     f"{logfile} ends:\n{tail}")
                log(f"[job] {name} seed {seed} done in {time.perf_counter() - t0:.0f} s")
    finally:
        for proc, *_ in running:
            proc.terminate()
