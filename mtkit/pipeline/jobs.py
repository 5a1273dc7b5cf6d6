"""The run's independent (model, seed) units as submitit jobs, one code path for two engines: this machine
(``mtkit run --jobs N``: up to N processes at once, one GPU each round robin) and a SLURM cluster (``--launcher
slurm``: one job array). Each unit is a ``UnitJob``: its stages through the stage cache in a process of its own,
writing only its own stage files, so a unit that fails, or is pre-empted and requeued, reruns alone."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import submitit
import torch
import yaml
from submitit.core.utils import DelayedSubmission
from submitit.helpers import Checkpointable

from ..core.errors import MtkitError
from ..core.io import atomic_write_text
from ..core.schema import LauncherConfig, Recipe, slurm_minutes
from ..recipe.load import load_recipe

Unit = tuple[str, int]
LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # submitit stops a local job at its time limit (2 min unless told): a month
LAUNCH_FILE = "launch.json"  # the SLURM jobs of a run: unit -> job id and log, read again by `mtkit run`
# the states of a SLURM job that is still to run or running (a requeued one passes through PREEMPTED)
_ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "PREEMPTED")


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


def exports(env: dict[str, str]) -> str:
    """The shell line that gives a job its environment before Python starts (submitit's ``setup``)."""
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def _end_with(parent: int) -> None:
    """End this job when the process that launched it is gone (SIGKILL included): a daemon thread that polls."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                print(f"mtkit: the launching process {parent} is gone; this job ends with it", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True, name="mtkit-parent-watch").start()


class UnitJob(Checkpointable):
    """One (model, seed) unit in a job's process: ``target`` (the pipeline's ``run``) restricted to the unit, on the
    recipe the launcher wrote. Requeued after a time limit or a pre-emption (submitit's checkpointing), it runs
    again: the stage cache skips what finished and the training resumes from its last checkpoint."""

    def __init__(self, target: Callable, recipe_file: str, run_dir: str, unit: Unit, seeds: list[int],
                 force: bool) -> None:
        self.target, self.recipe_file, self.run_dir = target, recipe_file, run_dir
        self.unit, self.seeds, self.force = unit, seeds, force

    def __call__(self) -> str:
        if os.environ.get("MTKIT_PARENT_PID"):
            _end_with(int(os.environ["MTKIT_PARENT_PID"]))
        self.target(load_recipe(self.recipe_file), force=self.force, seeds=self.seeds, progress=False,
                    run_dir=self.run_dir, units=[self.unit])
        return f"{self.unit[0]}:{self.unit[1]}"

    def checkpoint(self) -> DelayedSubmission:
        """The same unit again, without ``force`` (what it asked for has been cleared already)."""
        return DelayedSubmission(UnitJob(self.target, self.recipe_file, self.run_dir, self.unit, self.seeds, False))


def _label(unit: Unit) -> str:
    return f"{unit[0]} seed {unit[1]}"


def _outcome(job, unit: Unit, t0: float, log) -> list[str]:
    """A finished job's line, and its failure (the unit and the end of its log) if it failed."""
    try:
        job.result()
    except Exception as exc:  # submitit's FailedJobError / UncompletedJobError carry the job's error
        path = Path(job.paths.stdout)
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else str(exc).splitlines()
        log(f"[job] {_label(unit)}: failed (log: {path})")
        return [f"{_label(unit)} (log {path}) ends:\n    " + "\n    ".join(lines[-6:])]
    log(f"[job] {_label(unit)}: done in {time.perf_counter() - t0:.0f} s")
    return []


def run_local(recipe: Recipe, run_dir: Path, todo: list[Unit], jobs: int, make_job: Callable[[Unit], UnitJob],
              log) -> list[str]:
    """Up to ``jobs`` units at once on this machine (submitit's local executor), each on the least busy GPU when
    it starts, with its share of that GPU and of the cores (``job_env``), logging into ``<run>/jobs/<unit>/``;
    the jobs end with this process. Returns the failures (the others run on)."""
    gpus = job_gpus(recipe)
    concurrent = max(1, min(jobs, len(todo)))
    per_gpu = math.ceil(concurrent / max(len(gpus), 1))
    load = dict.fromkeys(gpus, 0)  # jobs running on each GPU
    pending, running, failures = list(todo), {}, []
    try:
        while pending or running:
            while pending and len(running) < concurrent:
                unit = pending.pop(0)
                gpu = min(gpus, key=lambda g: load[g]) if gpus else None  # a free slot (the first among equals)
                if gpu is not None:
                    load[gpu] += 1
                env = {**job_env(gpu, per_gpu, concurrent), "MTKIT_PARENT_PID": str(os.getpid())}
                executor = submitit.LocalExecutor(run_dir / "jobs" / f"{unit[0]}-s{unit[1]}")
                executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, stderr_to_stdout=True,
                                           setup=[exports(env)])
                job = executor.submit(make_job(unit))
                running[job] = (unit, gpu, time.perf_counter())
                log(f"[job] {_label(unit)}: running" + (f" on GPU {gpu}" if gpu is not None else "")
                    + f" (log: {job.paths.stdout})")
            time.sleep(0.2)
            for job in [j for j in running if j.done()]:
                unit, gpu, t0 = running.pop(job)
                if gpu is not None:
                    load[gpu] -= 1
                failures += _outcome(job, unit, t0, log)
    finally:
        for job in running:
            job.cancel(check=False)
    return failures


def check_launcher(cfg: LauncherConfig, detach: bool) -> None:
    """Before any work: SLURM's commands where the launcher is slurm, and --detach only there (one line each)."""
    if cfg.kind == "slurm":
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            raise MtkitError(f"--launcher slurm needs SLURM, and {' and '.join(missing)} is not on this machine's "
                             "PATH: submit from the cluster's login node, or run here with --launcher local")
    elif detach:
        raise MtkitError("--detach needs --launcher slurm: local jobs end with the process that started them")


def slurm_executor(cfg: LauncherConfig, folder: Path, name: str, jobs: int) -> submitit.SlurmExecutor:
    """submitit's SLURM executor with the launcher's resources (``check_launcher`` has found SLURM)."""
    executor = submitit.SlurmExecutor(folder / "%j")
    env = {"PYTHONUNBUFFERED": "1", "MTKIT_JOBS": "1", "OMP_NUM_THREADS": str(cfg.slurm_cpus_per_job)}
    executor.update_parameters(
        job_name=f"mtkit-{name}", time=slurm_minutes(cfg.slurm_time), gpus_per_node=cfg.slurm_gpus_per_job,
        cpus_per_task=cfg.slurm_cpus_per_job, stderr_to_stdout=True, setup=[*cfg.slurm_setup, exports(env)],
        **({"partition": cfg.slurm_partition} if cfg.slurm_partition else {}),
        **({"account": cfg.slurm_account} if cfg.slurm_account else {}),
        **({"mem": f"{round(cfg.slurm_mem_gb * 1024)}M"} if cfg.slurm_mem_gb else {}),
        **({"array_parallelism": jobs} if jobs > 1 else {}),
        **({"additional_parameters": dict(cfg.slurm_extra)} if cfg.slurm_extra else {}))
    return executor


def _active(entry: dict, folder: Path):
    """A SLURM job of an earlier submission that is still queued or running, else None."""
    job = submitit.SlurmJob(folder / "%j", entry["job_id"])
    return job if job.state.upper().startswith(_ACTIVE) and not job.paths.result_pickle.exists() else None


def run_slurm(recipe: Recipe, run_dir: Path, todo: list[Unit], jobs: int, make_job: Callable[[Unit], UnitJob],
              log, detach: bool) -> list[str] | None:
    """The units as one SLURM job array (those of an earlier submission still queued or running are followed, not
    submitted again); their ids and logs in ``<run>/jobs/launch.json``. ``detach``: return once submitted (None),
    else follow each unit's state until all are done and return the failures."""
    folder = run_dir / "jobs"
    record = folder / LAUNCH_FILE
    known = json.loads(record.read_text())["units"] if record.is_file() else {}
    executor = slurm_executor(recipe.launcher, folder, recipe.name, jobs)
    followed = {u: j for u in todo if f"{u[0]}:{u[1]}" in known
                and (j := _active(known[f"{u[0]}:{u[1]}"], folder)) is not None}
    submit = [u for u in todo if u not in followed]
    new = []
    if submit:
        with executor.batch():
            new = [executor.submit(make_job(u)) for u in submit]
    jobs_of = {**followed, **dict(zip(submit, new, strict=True))}
    for unit, job in jobs_of.items():
        known[f"{unit[0]}:{unit[1]}"] = {"job_id": job.job_id, "log": str(job.paths.stdout)}
    atomic_write_text(record, json.dumps({"launcher": "slurm", "units": known}, indent=2))
    if new:
        log(f"[job] {len(new)} unit(s) submitted as SLURM job array {new[0].job_id.split('_')[0]}"
            + (f"; {len(followed)} still queued or running from before" if followed else ""))
    if detach:
        log(f"[job] detached: the same `mtkit run` collects the results (the jobs are listed in {record})")
        return None
    states: dict[Unit, str] = {}
    failures: list[str] = []
    started = time.perf_counter()
    while jobs_of:
        for unit, job in list(jobs_of.items()):
            state = job.state
            if state != states.get(unit):
                states[unit] = state
                log(f"[job] {_label(unit)}: {state.lower()} (job {job.job_id}, log: {job.paths.stdout})")
            if job.done():
                failures += _outcome(job, unit, started, log)
                del jobs_of[unit]
        if jobs_of:
            time.sleep(30.0)
    return failures


def launch(recipe: Recipe, run_dir: Path, todo: list[Unit], jobs: int, force: bool, seeds: list[int],
           target: Callable, log=print, detach: bool = False) -> bool:
    """Run the units' stages as jobs of the recipe's launcher (``recipe.launcher``): ``target`` is the pipeline's
    ``run``, which each job calls on its unit. Returns False when detached (the jobs submitted, not awaited);
    raises, once every unit has ended, if any failed, naming each with the end of its log."""
    folder = run_dir / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "recipe.yaml"
    atomic_write_text(recipe_file, yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    def make_job(unit: Unit) -> UnitJob:
        return UnitJob(target, str(recipe_file), str(run_dir), unit, seeds, force)

    if recipe.launcher.kind == "slurm":
        failures = run_slurm(recipe, run_dir, todo, jobs, make_job, log, detach)
        if failures is None:
            return False
    else:
        failures = run_local(recipe, run_dir, todo, jobs, make_job, log)
    if failures:
        raise MtkitError(f"{len(failures)} of {len(todo)} unit(s) failed; the others' results are kept, and the "
                         "same command runs only what is missing:\n  " + "\n  ".join(failures))
    return True
