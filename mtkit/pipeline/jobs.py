"""``mtkit run --jobs N``: the independent (model, seed) units of a run in up to N processes at once."""

from __future__ import annotations

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


def run_jobs(recipe: Recipe, run_dir: Path, units: list[tuple[str, int]], jobs: int, force: bool, log=print
             ) -> None:
    """Run the stages of independent (model, seed) units in up to ``jobs`` processes at once (``mtkit run --unit``
    on the resolved recipe, into the same run folder and stage cache): several models share one GPU, or spread
    over several (each process sees one GPU, ``CUDA_VISIBLE_DEVICES``, round robin), or share the CPU. Each
    process trains and evaluates exactly as one process would (the same seeds, data and thread count), so the
    results equal ``jobs=1``'s; a failed unit stops the others and names its log."""
    folder = run_dir / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "recipe.yaml"
    atomic_write_text(recipe_file, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    gpus = torch.cuda.device_count() if recipe.device in ("auto", "cuda") else 0
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    pending, running = list(enumerate(units)), []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, (name, seed) = pending.pop(0)
                child = {**env, **({"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus > 1 else {})}
                logfile = folder / f"{name}-s{seed}.log"
                cmd = [sys.executable, "-m", "mtkit", "run", str(recipe_file), "--out", str(run_dir), "--no-progress",
                       "--unit", f"{name}:{seed}", *(["--force"] if force else [])]
                with open(logfile, "w") as fh:
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child)
                running.append((proc, name, seed, logfile, time.perf_counter()))
                log(f"[job] {name} seed {seed} started" + (f" on GPU {i % gpus}" if gpus > 1 else "")
                    + f" (log: {logfile})")
            time.sleep(0.2)
            for job in [j for j in running if j[0].poll() is not None]:
                proc, name, seed, logfile, t0 = job
                running.remove(job)
                if proc.returncode != 0:
                    tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-8:])
                    raise MtkitError(f"job {name} seed {seed} failed (exit code {proc.returncode}); its log "
                                     f"{logfile} ends:\n{tail}")
                log(f"[job] {name} seed {seed} done in {time.perf_counter() - t0:.0f} s")
    finally:
        for proc, *_ in running:
            proc.terminate()
