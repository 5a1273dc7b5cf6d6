"""``mtkit run``: a miniature of the whole protocol end to end, every artefact, stage caching and --force."""

from __future__ import annotations

import csv
import json
import os

import pytest
import yaml
from PIL import Image
from support import run_cli, tiny_recipe

from mtkit.core.errors import DatasetError
from mtkit.core.results import RunResults
from mtkit.pipeline.runner import run
from mtkit.recipe.load import load_recipe, validate


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, device):
    """The miniature protocol on the device under test (train → evaluate → report, as ``mtkit run``)."""
    folder = tmp_path_factory.mktemp("pipeline")
    recipe_file = folder / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe(device=str(device))))
    recipe = load_recipe(recipe_file)
    from mtkit.recipe import prepare

    calls: list[str] = []
    real = prepare.prepare_dataset
    with pytest.MonkeyPatch.context() as mp:  # count the preparations of the run (one per dataset)
        mp.setattr(prepare, "prepare_dataset", lambda cfg, train, where, *a, **k: calls.append(where) or real(
            cfg, train, where, *a, **k))
        logs: list[str] = []
        res = run(recipe, progress=False, run_dir=folder / "run", log=logs.append, project=True)
    res.prepare_calls, res.logs = calls, logs
    return recipe_file, recipe, res


def test_the_run_prepares_each_dataset_once_and_hands_it_on(first_run):
    """One prepared-data handle through the run: the pipeline prepares (and verifies) each of the recipe's
    datasets once, and training and evaluation get the opened handles instead of preparing again."""
    _, recipe, res = first_run
    from mtkit.recipe.prepare import recipe_datasets

    assert res.prepare_calls == list(recipe_datasets(recipe)) == ["data.segmentation", "data.segmentation_val",
                                                                   "data.depth", "data.eval.CS", "data.eval.K"]


def test_every_artefact_exists_and_parses(first_run):
    _, recipe, res = first_run
    d = res.run_dir
    work = [s for s in res.stages_run if not s.startswith("prepare ")]
    assert [s for s in res.stages_cached if not s.startswith("prepare ")] == []
    assert len(work) == 2 * (1 + 2) + 1  # two models: train, evaluate on CS and K; depth of multi
    # the data stage comes first: every dataset training and evaluation read, from the prepared cache
    assert [r.key for r in res.results.data] == ["data.segmentation", "data.segmentation_val", "data.depth",
                                                 "data.eval.CS", "data.eval.K"]
    assert res.results.data[0].samples == 16 and "| data.eval.K | synthetic | test | 4 | 64x32 | 0 |" in (
        d / "report.md").read_text()
    results = RunResults.read(d / "results.json")
    assert results == res.results  # the typed results round-trip through strict JSON
    depth = results.depth
    assert [(r.model, r.dataset) for r in depth] == [("multi", "Eigen")]
    m = depth[0].metrics
    assert 0 < m["abs_rel"] and 0 <= m["a1"] <= m["a2"] <= m["a3"] <= 1 and m["rmse"] >= 0
    assert depth[0].images == 4 and depth[0].scale_median > 0
    assert set(results.models) == {"single", "multi"}
    assert {(c.model, c.dataset) for c in results.clean} == {(m, k) for m in ("single", "multi")
                                                                     for k in ("CS", "K")}
    rows = list(csv.DictReader((d / "results.csv").open()))
    assert len(rows) == 2 * 2 * 5 * 2  # models x datasets x (perturbations and the worst case) x ε
    assert {r["perturbation"] for r in rows} == {"gaussian", "salt_pepper", "fgsm", "pgd", "worst_case"}
    for r in results.robustness:
        assert r.q == pytest.approx(r.miou / r.miou_clean) and r.epsilon_measured > 0
        assert r.epsilon_measured <= r.epsilon * 1.0001 or r.perturbation in ("gaussian", "salt_pepper")
    for png in ("figure5_robustness.png", "figure6_fgsm_lambda.png"):
        with Image.open(d / png) as im:
            assert im.size[0] > 400 and im.size[1] > 200
    report = (d / "report.md").read_text()
    assert "Table 2-style" in report and "![Figure 5](figure5_robustness.png)" in report
    # what ε means for each perturbation, with its measured ε; the Figure 1-style panel of the two models
    assert "  - pgd: L∞ bound ε (the paper's PGD)" in report and "  - fgsm: every element moved by ±ε" in report
    figure1 = next((d / "figures").glob("figure1-*.png"))
    assert f"![Figure 1](figures/{figure1.name})" in report
    with Image.open(figure1) as im:  # 2 images x 5 conditions (clean, gaussian and fgsm at 2 ε) in rows
        assert im.size[0] > 800 and im.size[1] > 1000
    assert "Q [%] and mIoU under attack [%]: **pgd** on K" in report and "### Depth on Eigen" in report
    assert "| mIoU (multi (λ=0.1)) |" in report  # the absolute mIoU under attack beside Q
    # every attack's strength is stated: gradient passes per image over its sweep (the tiny recipe's PGD: 2
    # iterations at each of the 2 ε; FGSM one pass for both)
    assert "Attack budgets, gradient passes per image over the sweep of ε = 1, 4" in report \
        and "pgd: 4" in report and "fgsm: 1" in report
    assert "one seed, so no claim of significance is possible" in report and "(4 images, 1 seed)" in report
    # the gradient-masking checks: one row per model and dataset, a cell per check
    assert len(results.sanity) == 2 * 2 * 5
    table = report.split("### Gradient-masking sanity checks")[1].split("\n\n")[1].splitlines()
    assert table[0] == ("| model on dataset | mIoU does not rise with ε | iterative attacks ≥ FGSM "
                        "| unbounded attack → mIoU ≈ 0 (heuristic) | gradient attacks ≥ Gaussian noise "
                        "| predictions change under perturbation |")
    assert len(table) == 2 + 4 and table[2].startswith("| single (single-task) on CS | ")
    assert validate(yaml.safe_load((d / "recipe.yaml").read_text())).to_dict() == recipe.to_dict()
    env = json.loads((d / "environment.json").read_text())
    assert env["versions"]["torch"] and env["device"].split(":")[0] == recipe.device
    cuda = recipe.device == "cuda"  # the math policy of each phase: TF32 in training only, fp32 evaluation
    assert env["math"]["train"]["tf32"] == cuda and env["math"]["evaluation"]["tf32"] is False
    assert env["math"]["evaluation"]["amp"] == "fp32" and env["math"]["train"]["cudnn_benchmark"] == cuda
    for summary in results.training:  # the class weights and the content key they were cached under
        assert len(summary["class_weights"]) == 19 and summary["class_weights_key"]
        assert summary["steps"] == 2 and summary["history"][-1]["val_miou"] >= 0
    from mtkit.core.checkpoint import load_checkpoint
    from mtkit.evaluation.robustness import load_model

    for folder in (d / "train").iterdir():
        last, best = load_checkpoint(folder / "last.pt"), load_checkpoint(folder / "best.pt")
        assert {"optimizer", "scheduler", "rng"} <= set(last) and not {"optimizer", "rng"} & set(best)
        assert load_model(folder / "best.pt").spec.name in ("single", "multi")


def test_rerun_is_cached_and_a_changed_key_reruns_only_what_depends_on_it(first_run, tmp_path):
    recipe_file, recipe, res = first_run
    again = run(recipe, progress=False, run_dir=res.run_dir, log=lambda m: None)
    assert again.stages_run == [] and len(again.stages_cached) == 5 + 7  # the data, and the 7 stages
    assert again.results.depth == res.results.depth
    assert again.results.robustness == res.results.robustness
    # a robustness key shapes only the evaluation stages
    changed = load_recipe(recipe_file, ["robustness.epsilons=[2.0]"])
    part = run(changed, progress=False, run_dir=res.run_dir, log=lambda m: None)
    assert all(s.startswith("evaluate") for s in part.stages_run) and len(part.stages_run) == 4
    assert all(s.startswith(("prepare", "train", "evaluate depth")) for s in part.stages_cached)
    # λ of the multi-task model shapes its training and evaluation, not the single-task model's
    lam = load_recipe(recipe_file, ["models.1.lambda=0.5"])
    part = run(lam, progress=False, run_dir=res.run_dir, log=lambda m: None)
    assert sorted(part.stages_run) == ["evaluate depth multi seed 0 on Eigen", "evaluate multi seed 0 on CS",
                                       "evaluate multi seed 0 on K", "train multi seed 0"]
    # --force runs every stage again, finished or not: shown on the single-task model on CS, whose stages (its
    # data, its training, its evaluation) are all cached
    data = recipe.to_dict()
    data["models"], data["robustness"]["datasets"] = data["models"][:1], ["CS"]
    small = validate(data)
    cached = run(small, progress=False, run_dir=res.run_dir, log=lambda m: None)
    assert cached.stages_run == [] and "train single seed 0" in cached.stages_cached
    forced = run(small, force=True, progress=False, run_dir=res.run_dir, log=lambda m: None)
    assert sorted(forced.stages_run) == sorted(cached.stages_cached) and forced.stages_cached == []
    assert any(s.startswith("prepare ") for s in forced.stages_run)  # the data prepared again too


def test_a_damaged_stage_file_runs_its_stage_again_with_one_line(first_run, tmp_path):
    """A truncated done.json, a result file of another schema version and a depth row that is not JSON: each is
    said in one line and its stage runs again (the training resumes from its finished last.pt: no step runs), with
    the results of the first run; before, the first stopped the run with a JSONDecodeError and the second advised
    re-running ``mtkit run``, which failed the same way."""
    import shutil

    _, recipe, res = first_run
    folder = tmp_path / "run"
    shutil.copytree(res.run_dir, folder)
    from mtkit.pipeline.stages import stage_files

    # this recipe's own stage files (the folder also holds those of the other tests' changed recipes)
    done = stage_files(recipe, folder, recipe.models[0], 0)[0]
    multi = stage_files(recipe, folder, recipe.models[1], 0)
    ev = next(f for f in multi if f.parent.name == "eval" and "-K-" in f.name)
    depth = next(f for f in multi if f.parent.name == "depth")
    done.write_text(done.read_text()[:40])
    ev.write_text(ev.read_text().replace('"schema_version": 2', '"schema_version": 1'))
    depth.write_bytes(b"\x00" * 10)
    lines: list[str] = []
    again = run(recipe, progress=False, run_dir=folder, log=lines.append)
    assert sorted(again.stages_run) == ["evaluate depth multi seed 0 on Eigen", "evaluate multi seed 0 on K",
                                        "train single seed 0"]
    damaged = [line for line in lines if "cannot be read" in line]
    assert len(damaged) == 3 and any("schema version 1" in line for line in damaged), lines
    assert _comparable(again.results) == _comparable(res.results)
    assert json.loads(done.read_text())["steps"] == res.results.training[0]["steps"]


def _comparable(results: RunResults) -> tuple:
    """Everything of a run's results but the timings."""
    training = [{k: v for k, v in t.items() if k != "seconds"} for t in results.training]
    robustness = [r.model_copy(update={"seconds_sweep": 0.0}) for r in results.robustness]
    return training, results.clean, robustness, results.depth, results.sanity


def test_cli_run_uses_the_cache_and_prints_tables(first_run, capsys):
    recipe_file, _, res = first_run
    code, out, err = run_cli(["run", str(recipe_file), "--out", str(res.run_dir), "--no-progress"], capsys)
    assert code == 0, err
    assert "stages run: 0, cached: 12" in out and "Table 2: mIoU" in out
    assert "projected" not in out  # nothing left to run, nothing to project
    assert "Depth on Eigen" in out and "Gradient-masking sanity checks" in out


def test_the_run_prints_its_projected_time_and_flops_before_its_first_stage(first_run):
    """``mtkit run`` (``project=True``) measures one training step and a two-image sweep, then logs the projected
    time and FLOPs of what it is about to run, once, before its first stage."""
    logs = first_run[2].logs
    projected = [i for i, m in enumerate(logs) if m.startswith("[plan] projected: ")]
    assert len(projected) == 1 and projected[0] < min(i for i, m in enumerate(logs) if m.startswith("[stage]"))
    assert "in one process for" in logs[projected[0]] and "TFLOP on " in logs[projected[0]]


def test_a_projection_that_cannot_be_measured_is_one_line_and_the_run_goes_on(first_run, monkeypatch):
    from mtkit.pipeline import runner

    def fails(*_):
        raise RuntimeError("this perturbation refuses random labels")

    monkeypatch.setattr(runner, "projection", fails)
    logs: list[str] = []
    runner.announce_projection(first_run[1], {"single": 1}, logs.append)
    assert logs == ["[plan] no projection (RuntimeError: this perturbation refuses random labels); the run goes on "
                    "(`mtkit run --plan` shows where measuring fails)"]


def test_paper_recipe_without_datasets_stops_at_once_pointing_to_quickstart(monkeypatch, tmp_path):
    for var in ("CITYSCAPES_ROOT", "KITTI_ROOT", "KITTI2015_ROOT"):
        monkeypatch.delenv(var, raising=False)
    from support import ROOT

    recipe = load_recipe(ROOT / "recipes" / "paper.yaml", ["model.pretrained=false", "model.pose_pretrained=false"])
    with pytest.raises(DatasetError) as err:
        run(recipe, progress=False, run_dir=tmp_path, log=lambda m: None)
    msg = str(err.value)
    assert "data.segmentation (cityscapes)" in msg and "data.depth (kitti_raw)" in msg
    assert "recipes/quickstart.yaml" in msg
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_unit_that_is_not_in_the_run_is_refused(first_run, capsys):
    recipe_file, _, res = first_run
    code, _, err = run_cli(["run", str(recipe_file), "--out", str(res.run_dir), "--unit", "other:0"], capsys)
    assert code == 2 and "--unit other:0 is no (model, seed) of the run" in err and "'single', 'multi'" in err
    code, _, err = run_cli(["run", str(recipe_file), "--out", str(res.run_dir), "--unit", "single"], capsys)
    assert code == 2 and "--unit expects MODEL:SEED" in err


def test_the_plan_measures_every_stage_and_counts_what_the_recipe_asks_for(first_run, device, capsys):
    """mtkit run --plan: a row per stage with its measured unit and the recipe's count of units (steps per epoch ×
    epochs × seeds, batches per set), positive times, a total; nothing is trained."""
    if device.type != "cpu":
        pytest.skip("the plan on a GPU is tools/gpu-check.sh's")
    recipe_file, recipe, _ = first_run
    from mtkit.bench.plan import plan

    rows = {r.stage: r for r in plan(recipe, steps=1, log=lambda m: None)}
    assert sorted(rows) == sorted(["train single", "validate single", "evaluate single on CS", "evaluate single on K",
                                   "train multi", "validate multi", "evaluate multi on CS", "evaluate multi on K",
                                   "evaluate depth multi on Eigen"])
    assert rows["train multi"].units == 2 and rows["train multi"].unit == "step (2 + 2 images)"
    assert rows["evaluate single on CS"].units == 4 and rows["validate single"].units == 1  # images, batches
    assert all(r.seconds_per_unit > 0 for r in rows.values())
    # the cost in FLOPs, machine-independent: a training step (forward and backward of 2 + 2 images, the pose net)
    # costs more than a forward pass of a validation batch of 4
    assert all(r.flops_per_unit > 0 for r in rows.values())
    assert rows["train multi"].flops_per_unit > rows["validate multi"].flops_per_unit
    # each stage timed under its phase's math policy, as the run enters it: training (and its validation) with
    # TF32 allowed (train.tf32), evaluation and depth in IEEE fp32 (robustness.tf32)
    assert {s: r.math["tf32"] for s, r in rows.items()} == {s: s.startswith(("train", "validate")) for s in rows}
    # counted alone (steps 0), with each sweep measured on one image: the same FLOPs, since a sweep's cost grows
    # with its images and the two models' segmenters (one architecture) share one measured sweep
    from mtkit.bench import plan as planning

    sweeps: list[int] = []
    real = planning.robustness_sweep
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planning, "robustness_sweep", lambda *a, **k: sweeps.append(1) or real(*a, **k))
        counted = plan(recipe, steps=0, log=lambda m: None, sweep_images=1)
    assert all(r.seconds == 0 for r in counted) and len(sweeps) == 1  # 2 models × 2 sets of one size: one sweep
    assert sum(r.flops for r in counted) == pytest.approx(sum(r.flops for r in rows.values()), rel=1e-9)
    code, out, err = run_cli(["run", str(recipe_file), "--plan", "--jobs", "2"], capsys)
    assert code == 0, err
    assert "projected run of tiny on cpu" in out and "total:" in out and "with --jobs 2" in out
    assert "TFLOP (matmuls and convolutions" in " ".join(out.split())


def test_sigterm_stops_with_one_line_like_ctrl_c(first_run, device, capsys, monkeypatch):
    """A scheduler's SIGTERM during a run: exit code 143 and one line saying what is kept, no traceback."""
    if device.type != "cpu":
        pytest.skip("signals are the same on every device")
    import os
    import signal

    from mtkit import api

    recipe_file, _, res = first_run

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(api, "run", killed)
    code, _, err = run_cli(["run", str(recipe_file), "--out", str(res.run_dir)], capsys)
    assert code == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after main


def test_several_seeds_end_to_end_with_the_phase_hooks(tmp_path, monkeypatch):
    """``run(seeds=[0, 1])``, as ``--seeds 0,1``: every stage per seed, results for both, the verdict over 2 seeds
    with its rule; the ``mtkit_after_epoch`` hook sees every epoch of every model and seed, and
    ``mtkit_after_evaluation`` the final rows once."""
    from mtkit.plugins.hookspecs import hookimpl
    from mtkit.plugins.manager import get_plugins

    calls: dict[str, list] = {"epoch": [], "evaluation": []}

    class Recorder:
        @hookimpl
        def mtkit_after_epoch(self, run_dir, model_name, epoch, metrics):
            calls["epoch"].append((model_name, epoch, "val_miou" in metrics))

        @hookimpl
        def mtkit_after_evaluation(self, run_dir, results):
            calls["evaluation"].append(len(results))

    manager = get_plugins().manager
    recorder = Recorder()
    manager.register(recorder, name="test-recorder")
    try:
        data = tiny_recipe(**{"train.epochs": 2, "robustness.datasets": ["CS"], "robustness.sanity.enabled": False})
        data["data"]["depth_eval"] = {}
        res = run(validate(data), seeds=[0, 1], progress=False, run_dir=tmp_path / "run", log=lambda m: None)
    finally:
        manager.unregister(recorder)
    assert res.results.seeds == [0, 1]
    assert sorted((t["model"], t["seed"]) for t in res.results.training) == [
        ("multi", 0), ("multi", 1), ("single", 0), ("single", 1)]
    assert {(r.model, r.seed) for r in res.results.robustness} == {(m, s) for m in ("single", "multi") for s in (0, 1)}
    assert sorted(calls["epoch"]) == sorted((m, e, True) for m in ("single", "multi") for _ in (0, 1) for e in (1, 2))
    assert calls["evaluation"] == [len(res.results.robustness)]
    report = (res.run_dir / "report.md").read_text()
    assert "over 2 seeds" in report and "Holm-adjusted over the 2 primary tests" in report
    assert len(list((res.run_dir / "train").glob("*/done.json"))) == 4


class _FakeExecutor:
    """A stand-in for submitit's local executor: records each job's environment (its ``setup`` line) and makes
    jobs that are done after a number of polls (single:0 runs long)."""

    started: list = []

    def __init__(self, folder):
        self.folder, self.parameters = folder, {}

    def update_parameters(self, **kwargs):
        self.parameters.update(kwargs)

    def submit(self, job):
        env = dict(item.split("=", 1) for item in self.parameters["setup"][0].removeprefix("export ").split())
        _FakeExecutor.started.append((f"{job.unit[0]}:{job.unit[1]}", env, job.seeds))
        return _FakeJob({"single:0": 6}.get(f"{job.unit[0]}:{job.unit[1]}", 1), self.folder)


class _FakeJob:
    def __init__(self, polls, folder):
        self.polls, self.paths = polls, type("Paths", (), {"stdout": folder / "log.out"})

    def done(self):
        self.polls -= 1
        return self.polls <= 0

    def result(self):
        return "ok"

    def cancel(self, check=True):
        pass


def test_jobs_on_gpus_take_a_free_inherited_gpu_and_their_share(first_run, tmp_path, monkeypatch):
    """--jobs on a machine with GPUs (simulated: two visible, named by the scheduler's CUDA_VISIBLE_DEVICES): each
    job gets one of the inherited names (not an index of its own), the least busy GPU when it starts (a free
    slot, not its unit's number), its share of that GPU's memory and of the cores, and the number of jobs for
    its loader workers."""
    from mtkit.pipeline import jobs

    _, recipe, _ = first_run
    recipe = recipe.model_copy(update={"device": "auto"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3f2a,5")
    monkeypatch.setattr(jobs.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(jobs.submitit, "LocalExecutor", _FakeExecutor)
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    _FakeExecutor.started = []
    units = [("single", 0), ("multi", 0), ("single", 1)]
    lines = []
    jobs.launch(recipe, tmp_path, units, 2, False, [0, 1], run, lines.append)
    # each job is told the run's seeds: a unit of seed 1 is one of its run's
    assert all(seeds == [0, 1] for *_, seeds in _FakeExecutor.started)
    got = [(unit, env["CUDA_VISIBLE_DEVICES"]) for unit, env, _ in _FakeExecutor.started]
    # single:0 runs long on the first GPU; multi:0 ends first, so single:1 takes its GPU, not unit 2 % 2 = 0's
    assert got == [("single:0", "GPU-3f2a"), ("multi:0", "5"), ("single:1", "5")]
    for _, env, _ in _FakeExecutor.started:
        assert env["MTKIT_MEMORY_SHARE"] == "1" and env["OMP_NUM_THREADS"] == "8" and env["MTKIT_JOBS"] == "2"
        assert env["MTKIT_PARENT_PID"] == str(os.getpid())  # the job ends with this process
    assert "[job] multi seed 0: running on GPU 5" in " ".join(lines)
    # four jobs on the two GPUs: each gets half of its GPU
    _FakeExecutor.started = []
    jobs.launch(recipe, tmp_path, [("single", s) for s in range(4)], 4, False, [0, 1, 2, 3], run, lines.append)
    assert {env["MTKIT_MEMORY_SHARE"] for _, env, _ in _FakeExecutor.started} == {"0.5"}
    assert {env["OMP_NUM_THREADS"] for _, env, _ in _FakeExecutor.started} == {"4"}


def test_a_jobs_share_bounds_its_attack_passes_and_its_workers(monkeypatch):
    """A --jobs process on a GPU sizes its attack passes to its share of the free memory (two jobs asked for
    half of an 80 GB card each, not both for 40 GB), and its loader workers to its share of the cores."""
    import torch

    from mtkit.evaluation import sweep
    from mtkit.recipe.prepare import default_workers

    monkeypatch.setattr(sweep, "activation_bytes", lambda *a: 1 << 30)  # 1 GB per image
    monkeypatch.setattr(sweep, "available_memory", lambda device: 80 << 30)
    cuda = torch.device("cuda")
    assert sweep.pass_size(torch.nn.Identity(), (3, 8, 8), cuda) == 40  # half the free memory, alone
    monkeypatch.setenv("MTKIT_MEMORY_SHARE", "0.25")
    assert sweep.pass_size(torch.nn.Identity(), (3, 8, 8), cuda) == 10  # one of four jobs on the GPU
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("MTKIT_JOBS", "4")
    assert default_workers(None) == 4


def test_without_matplotlib_the_report_is_written_without_figures(first_run, tmp_path, monkeypatch):
    """A GPU image without matplotlib: the run's report is still written, tables and all, without the figures,
    and says how to get them, instead of a traceback after the whole run."""
    import importlib.util

    from mtkit.report import write_report

    _, _, res = first_run
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    paths = write_report(res.results, tmp_path)
    report = paths["report"].read_text()
    assert "figure5" not in paths and not list(tmp_path.glob("*.png"))
    assert "No figures: matplotlib is not installed" in report and "## Results" in report
