"""The run's units as submitit jobs (``mtkit run --jobs N``, ``--launcher slurm``): a failed unit reported with its
log while the others finish, an interrupted run continued, a requeued unit resumed, SLURM job arrays submitted,
detached and collected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import fake_slurm, run_cli, tiny_recipe

from mtkit.core.errors import MtkitError
from mtkit.core.results import RunResults
from mtkit.pipeline.runner import run
from mtkit.pipeline.stages import UnitFiles
from mtkit.recipe.load import validate

SEEDS = [0, 1]


def lean_recipe(**over) -> dict:
    """One model, two seeds (two units), one evaluation set, no depth evaluation: the least a unit can be."""
    data = tiny_recipe(**{"train.epochs": 3, "robustness.datasets": ["CS"], "robustness.sanity.enabled": False,
                          "seeds": SEEDS, **over})
    data["models"] = data["models"][:1]
    data["data"]["depth_eval"] = {}
    return data


def comparable(results: RunResults) -> tuple:
    """Everything of a run's results but the timings."""
    training = [{k: v for k, v in t.items() if k != "seconds"} for t in results.training]
    robustness = [r.model_copy(update={"seconds_sweep": 0.0}) for r in results.robustness]
    return training, results.clean, robustness


@pytest.fixture(scope="module")
def reference(tmp_path_factory, device):
    """The lean recipe run in this one process, and its recipe file. On one thread, so that the jobs, which take
    this process's thread count (their results then equal its), run side by side on the 2 cores without
    oversubscribing them (2 jobs of 2 threads each ran 5x slower)."""
    import torch

    if device.type != "cpu":
        pytest.skip("the jobs' CUDA case is tools/gpu-check.sh's")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _reference(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("launch")
    recipe_file = folder / "lean.yaml"
    recipe_file.write_text(yaml.safe_dump(lean_recipe()))
    res = run(validate(lean_recipe()), progress=False, run_dir=folder / "one", log=lambda m: None)
    return recipe_file, res


def _processes_of(folder: Path) -> list[int]:
    """The live processes whose command line names ``folder`` (the jobs of a run there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(folder) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]


def test_a_failed_unit_is_reported_with_its_log_while_the_others_finish(reference, tmp_path):
    """One unit fails (its training folder is a file): the other finishes, the error names the failed unit and
    the end of its log; fixed and run again, only the failed unit's stages run and the report equals one
    process's."""
    _, ref = reference
    recipe = validate(lean_recipe())
    blocked = UnitFiles.of(recipe, tmp_path, recipe.models[0], 1).train_dir
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")
    lines: list[str] = []
    with pytest.raises(MtkitError, match=r"1 of 2 unit\(s\) failed") as failed:
        run(recipe, progress=False, run_dir=tmp_path, log=lines.append, jobs=2)
    message = str(failed.value)
    assert "single seed 1 (log " in message and "jobs/single-s1/" in message and "single seed 0" not in message
    assert (UnitFiles.of(recipe, tmp_path, recipe.models[0], 0).done).is_file()
    assert any(line.startswith("[job] single seed 0: done") for line in lines)
    blocked.unlink()
    again = run(recipe, progress=False, run_dir=tmp_path, log=lines.append, jobs=2)
    assert again.stages_run and all("seed 1" in s for s in again.stages_run)
    assert comparable(again.results) == comparable(ref.results)


def test_an_interrupted_jobs_run_continues_where_it_stopped(reference, tmp_path):
    """``mtkit run --jobs 2`` killed (SIGKILL) once a unit has checkpointed: its jobs end with it, and the same
    command then completes and equals the uninterrupted run (each unit resumes or reruns only what is missing)."""
    recipe_file, ref = reference
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mtkit", "run", str(recipe_file), "--out", str(out), "--jobs",
                             "2", "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while not list(out.glob("train/*/last.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a unit checkpointed"
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while _processes_of(out) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_of(out), "the jobs outlived the run that started them"
    lines: list[str] = []
    again = run(validate(lean_recipe()), progress=False, run_dir=out, log=lines.append, jobs=2)
    assert comparable(again.results) == comparable(ref.results)
    assert (out / "report.md").is_file()


def test_a_requeued_unit_resumes_from_its_checkpoint(reference, tmp_path):
    """A unit pre-empted after its first checkpoint (SLURM's USR2, here sent to the local job): submitit
    checkpoints the job and requeues it, and its training resumes from last.pt instead of starting again."""
    import submitit

    from mtkit.pipeline.jobs import UnitJob

    recipe_file, ref = reference
    recipe = validate(lean_recipe(**{"train.epochs": 8}))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    files = UnitFiles.of(recipe, tmp_path, recipe.models[0], 0)
    executor = submitit.LocalExecutor(tmp_path / "job")
    executor.update_parameters(timeout_min=30, stderr_to_stdout=True)
    job = executor.submit(UnitJob(run, str(tmp_path / "r.yaml"), str(tmp_path), ("single", 0), SEEDS, False))
    deadline = time.time() + 240
    while not (files.train_dir / "last.pt").is_file() and time.time() < deadline and not job.done():
        time.sleep(0.05)
    task = int(Path(f"/proc/{job.job_id}/task/{job.job_id}/children").read_text().split()[0])
    os.kill(task, signal.SIGUSR2)
    job.result()
    log = Path(job.paths.stdout).read_text()
    assert "Requeued job" in log and "train single seed 0 (resuming)" in log
    done = json.loads(files.done.read_text())
    assert done["epochs"] == 8 and [h["epoch"] for h in done["history"]] == list(range(1, 9))


def test_slurm_without_slurm_and_detach_without_slurm_are_one_line(reference, tmp_path, capsys, monkeypatch):
    recipe_file, _ = reference
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    code, _, err = run_cli(["run", str(recipe_file), "--out", str(tmp_path / "r"), "--launcher", "slurm"], capsys)
    assert code == 2 and "needs SLURM, and sbatch and srun is not on this machine's PATH" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    code, _, err = run_cli(["run", str(recipe_file), "--out", str(tmp_path / "r"), "--detach"], capsys)
    assert code == 2 and "--detach needs --launcher slurm" in err
    code, _, err = run_cli(["run", str(recipe_file), "--launcher", "slurm", "--slurm-time", "2 days"], capsys)
    assert code == 2 and "is not a SLURM time" in err


def test_a_slurm_array_detached_then_collected_equals_the_attached_run(reference, tmp_path, capsys, monkeypatch):
    """``--launcher slurm --detach`` (SLURM's commands simulated on this machine, submitit's real submission
    script and job environment): one job array with the --slurm-* resources, the job ids in launch.json; run again
    while the jobs are queued or running, nothing is submitted twice; once done, the same command reports, and
    the report equals the one-process run's."""
    import torch

    recipe_file, ref = reference
    state = fake_slurm(tmp_path, monkeypatch)
    threads = torch.get_num_threads()  # the one-process run's: a CPU's float sums depend on the thread count
    out = tmp_path / "run"
    args = ["run", str(recipe_file), "--out", str(out), "--no-progress", "--launcher", "slurm",
            "--slurm-partition", "gpu", "--slurm-account", "lab", "--slurm-time", "0-02:30:00",
            "--slurm-gpus-per-job", "0", "--slurm-extra", "constraint=a100", "-o",
            f"launcher.slurm_cpus_per_job={threads}", "--detach"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "2 unit(s) submitted as SLURM job array 4242" in stdout and "detached" in stdout
    assert "projected" not in stdout  # the units run on SLURM's nodes: this one's speed says nothing of theirs
    script = (out / "jobs" / "4242" / "4242_submission.sh").read_text()
    for line in ("--array=0-1", "--partition=gpu", "--account=lab", "--time=150", "--constraint=a100",
                 "--gpus-per-node=0", f"--cpus-per-task={threads}",
                 f"export PYTHONUNBUFFERED=1 MTKIT_JOBS=1 OMP_NUM_THREADS={threads}"):
        assert line in script, line
    units = json.loads((out / "jobs" / "launch.json").read_text())["units"]
    assert {u: e["job_id"] for u, e in units.items()} == {"single:0": "4242_0", "single:1": "4242_1"}
    code, stdout, err = run_cli(args, capsys)  # again while queued or running: followed, not submitted again
    assert code == 0 and "submitted" not in stdout
    assert (state / "submissions").read_text().splitlines() == ["4242 2"]
    deadline = time.time() + 240
    while any((state / f"4242_{i}").read_text() not in ("COMPLETED", "FAILED") for i in (0, 1)):
        assert time.time() < deadline, "the simulated array did not finish"
        time.sleep(0.2)
    assert [(state / f"4242_{i}").read_text() for i in (0, 1)] == ["COMPLETED", "COMPLETED"]
    code, stdout, err = run_cli(args[:-1], capsys)  # collect: every stage cached, the report written
    assert code == 0, err
    collected = RunResults.read(out / "results.json")
    assert comparable(collected) == comparable(ref.results)
    assert (state / "submissions").read_text().splitlines() == ["4242 2"]
