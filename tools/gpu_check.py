"""Prove that a GPU machine runs mtkit: the GPU test subset, the quickstart from an empty cache (timed), the benchmarks
on the GPU at the paper's size, and a 2-process torchrun train + evaluate whose rows must equal one process's.

Run through ``tools/gpu-check.sh`` (``--help`` there). Writes ``summary.json`` (device, torch, timings, pass/fail per
part) and one log per part into the output folder, prints a table, exits 1 when any part failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "quickstart", "bench", "torchrun", "jobs", "plan")
# seconds each part may take (the whole check is meant to fit 20 minutes on one H100: the quickstart includes
# rendering and preparing its data from an empty cache, the bench compiles the step with inductor at 640x192)
LIMITS = {"tests": 300, "quickstart": 300, "bench": 420, "torchrun": 180, "jobs": 240, "plan": 120}
# gray values of an attack row's mIoU two runs may differ by on CUDA: the backward passes of bilinear upsampling
# and grid_sample accumulate with atomics, so a gradient's sign can flip where it is about zero
ATTACK_MIOU_TOL = 1e-3


def device_info(python: str) -> dict:
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'gpus': torch.cuda.device_count(), "
            "'name': torch.cuda.get_device_name(0) if c else None, "
            "'memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise SystemExit(f"gpu-check: cannot run --python {python} ({exc.strerror}): name a Python with "
                         "torch") from None
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"gpu-check: {python} cannot import torch ({last}): name a Python with torch and "
                         "torchvision (--python), or install them there")
    return json.loads(out.stdout.strip().splitlines()[-1])


def card_slug(name: str | None) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``h100``: the baseline file's name."""
    if not name:
        return "cpu"
    m = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"\W+", "-", name)).lower()


def run_part(name: str, cmd: list[str], log: Path, env: dict, timeout: float, cwd: Path = ROOT) -> dict:
    """One command with its output in ``log``: passed, seconds, the exit code, the log's last lines on failure."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.perf_counter() - t0
    tail = "" if rc == 0 else "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    return {"passed": rc == 0, "seconds": round(seconds, 1), "rc": rc,
            "detail": "timed out" if rc == 124 else ("" if rc == 0 else f"exit code {rc}"), "tail": tail}


def tiny_recipe(folder: Path, device: str) -> Path:
    """A miniature multi-task recipe on the synthetic data: batches divisible by 2 ranks, 8 evaluation images in
    batches of 3 (ranks take unequal shares), every paper perturbation and APGD, the sanity checks."""
    import yaml

    size = {"height": 32, "width": 64}
    syn = {"sequences": 2, "frames": 8}
    recipe = {
        "name": "gpu-check", "seed": 0, "device": device, "model": {"backbone": "resnet18", "pretrained": False,
                                                                    "pose_pretrained": False},
        "data": {"segmentation": {"name": "synthetic", "split": "train", **size, "options": {"domain": "city", **syn}},
                 "segmentation_val": {"name": "synthetic", "split": "val", **size, "limit": 4,
                                      "options": {"domain": "city", **syn}},
                 "depth": {"name": "synthetic_video", "split": "train", **size, "options": {"domain": "drive", **syn}},
                 "eval": {"CS": {"name": "synthetic", "split": "val", **size, "limit": 8,
                                 "options": {"domain": "city", **syn}}},
                 "num_workers": 0},
        "train": {"epochs": 1, "steps_per_epoch": 4, "seg_batch_size": 2, "depth_batch_size": 2, "log_every": 1},
        "models": [{"name": "multi", "tasks": ["segmentation", "depth"], "lambda": 0.1}],
        "robustness": {"perturbations": ["gaussian", "salt_pepper", "fgsm", "pgd", "apgd"], "epsilons": [1.0, 4.0],
                       "batch_size": 3, "pass_images": 8},
        "output_dir": str(folder / "runs"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gpu-check.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def compare_rows(one: Path, two: Path) -> tuple[bool, str]:
    """The rows of two ``results.json``: clean and noise rows equal exactly, attack rows within ATTACK_MIOU_TOL."""
    a, b = (json.loads(p.read_text()) for p in (one, two))
    problems = []
    if [(r["dataset"], r["miou"]) for r in a["clean"]] != [(r["dataset"], r["miou"]) for r in b["clean"]]:
        problems.append("clean mIoU differs")
    ra = {(r["perturbation"], r["level"]): r for r in a["robustness"]}
    rb = {(r["perturbation"], r["level"]): r for r in b["robustness"]}
    if set(ra) != set(rb):
        problems.append(f"row keys differ: {sorted(set(ra) ^ set(rb))}")
    worst = 0.0
    for key in sorted(set(ra) & set(rb)):
        x, y = ra[key], rb[key]
        if x["attack"]:
            d = abs((x["miou"] or 0) - (y["miou"] or 0))
            worst = max(worst, d)
            if d > ATTACK_MIOU_TOL:
                problems.append(f"{key}: mIoU {x['miou']:.5f} vs {y['miou']:.5f}")
        elif (x["miou"], x["epsilon_measured"]) != (y["miou"], y["epsilon_measured"]):
            problems.append(f"{key}: {x['miou']}/{x['epsilon_measured']} vs {y['miou']}/{y['epsilon_measured']}")
    rows = len(ra)
    if problems:
        return False, "; ".join(problems[:4])
    return True, f"{rows} rows equal (attacks within {worst:.1e} mIoU)"


def jobs_part(python: str, work: Path, env: dict, log: Path, device: str) -> dict:
    """``mtkit run --jobs 2`` of the tiny recipe against ``--jobs 1``: two units at once on the GPU(s), each with
    its share of the memory and cores; the rows must be those of one process (attacks within ATTACK_MIOU_TOL)."""
    recipe = tiny_recipe(work, device)
    t0 = time.perf_counter()
    for jobs in (1, 2):
        cmd = [python, "-m", "mtkit", "run", str(recipe), "--out", str(work / f"jobs-{jobs}"), "--no-progress",
               "--jobs", str(jobs), "--seeds", "0,1"]  # two (model, seed) units
        res = run_part("jobs", cmd, log, env, LIMITS["jobs"] - (time.perf_counter() - t0))
        if not res["passed"]:
            return {**res, "seconds": round(time.perf_counter() - t0, 1)}
    ok, detail = compare_rows(work / "jobs-1" / "results.json", work / "jobs-2" / "results.json")
    return {"passed": ok, "seconds": round(time.perf_counter() - t0, 1), "rc": 0 if ok else 1,
            "detail": f"--jobs 2 vs 1: {detail}", "tail": ""}


def torchrun_part(python: str, work: Path, env: dict, gpus: int, log: Path, device: str) -> dict:
    """2-process torchrun: DDP training, then sharded evaluation of its checkpoint; the same evaluation in one
    process; rows compared. NCCL with ≥ 2 GPUs (each rank its own), else gloo with two ranks sharing one GPU."""
    recipe = tiny_recipe(work, device)
    backend = "nccl" if device == "cuda" and gpus >= 2 else "gloo"
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mtkit"]
    t0 = time.perf_counter()
    steps = [(torchrun + ["train", str(recipe), "--model", "multi", "--out", str(work / "ddp"), "--no-progress"]),
             (torchrun + ["eval", str(recipe), "--checkpoint", str(work / "ddp" / "last.pt"), "--out",
                          str(work / "eval-2"), "--no-progress"]),
             ([python, "-m", "mtkit", "eval", str(recipe), "--checkpoint", str(work / "ddp" / "last.pt"), "--out",
               str(work / "eval-1"), "--no-progress"])]
    for cmd in steps:
        res = run_part("torchrun", cmd, log, env, LIMITS["torchrun"] - (time.perf_counter() - t0))
        if not res["passed"]:
            res.update(backend=backend, seconds=round(time.perf_counter() - t0, 1))
            return res
    ok, detail = compare_rows(work / "eval-1" / "results.json", work / "eval-2" / "results.json")
    return {"passed": ok, "seconds": round(time.perf_counter() - t0, 1), "rc": 0 if ok else 1, "backend": backend,
            "detail": f"{backend}: {detail}", "tail": ""}


def bench_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    out = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        median = b["stats"]["median"]
        n = info.get("images_per_step") or info.get("images")
        out.append({"name": b["name"], "median_ms": round(1000 * median, 2),
                    "images_per_s": round(n / median, 1) if n else None,
                    "peak_fraction": round(info["flops"] / median / info["peak_flop_per_s"], 4)
                    if info.get("flops") and info.get("peak_flop_per_s") else None,
                    "speedup_vs_fp32_eager": info.get("speedup_vs_fp32_eager")})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu-check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--allow-cpu", action="store_true", help="run on a machine without a GPU (checks the check)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    python = sys.executable
    info = device_info(python)
    if not info["gpus"] and not args.allow_cpu:
        print("gpu-check: torch sees no CUDA GPU on this machine (torch "
              f"{info['torch']}); run it on a GPU machine, or with --allow-cpu to check the check itself",
              file=sys.stderr)
        return 2
    device = "cuda" if info["gpus"] else "cpu"
    out = args.out.resolve()
    if out.exists() and not out.is_dir():
        raise SystemExit(f"gpu-check: --out {args.out} is a file: give a folder for the summary and the logs")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="mtkit-gpu-check-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MTKIT_CACHE": str(work / "cache"),  # an empty cache
           "MTKIT_BENCH_DEVICE": device, "MTKIT_BENCH_PRECISION_SIZE": "paper"}
    summary = {"device": info, "python": platform.python_version(), "host": platform.node(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {}}
    bench_json = out / f"bench-{card_slug(info['name'])}.json"
    commands = {
        # on a GPU the CUDA cases of every test on the `device` fixture; with --allow-cpu the device tests only
        "tests": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--device", device,
                  *(["-m", "gpu", "tests"] if device == "cuda" else ["tests/test_device.py"])],
        "quickstart": [python, "-m", "mtkit", "run", "recipes/quickstart.yaml", "--no-progress",
                       "--out", str(work / "quickstart"), "-o", f"device={device}"],
        "bench": [python, "-m", "mtkit", "bench", "-k", "train_step or pgd_sweep or fgsm_sweep or photometric",
                  "--save", str(bench_json)],
        # the projection on the device, each stage under its phase's math policy (the tiny recipe: no datasets)
        "plan": [python, "-m", "mtkit", "run", str(tiny_recipe(work / "plan", device)), "--plan", "--jobs", "2"],
    }
    for part in parts:
        log = out / f"{part}.log"
        print(f"gpu-check: {part} …", flush=True)
        if part == "torchrun":
            res = torchrun_part(python, work / "torchrun", env, info["gpus"], log, device)
        elif part == "jobs":
            res = jobs_part(python, work / "jobs", env, log, device)
        else:
            if part == "quickstart":
                shutil.rmtree(work / "cache", ignore_errors=True)
            res = run_part(part, commands[part], log, env, LIMITS[part])
            if part == "tests" and res["passed"]:
                m = re.findall(r"(\d+) (passed|failed|skipped|deselected)", log.read_text())
                res["detail"] = ", ".join(f"{n} {w}" for n, w in m[-3:])
            if part == "bench" and res["passed"] and bench_json.is_file():
                res["benchmarks"] = bench_rows(bench_json)
            if part == "quickstart" and res["passed"]:
                res["detail"] = f"end to end from an empty cache in {res['seconds']:.0f} s"
        summary["parts"][part] = res
        print(f"gpu-check: {part} {'ok' if res['passed'] else 'FAILED'} in {res['seconds']} s {res['detail']}",
              flush=True)
    summary["passed"] = all(p["passed"] for p in summary["parts"].values())
    summary["seconds"] = round(sum(p["seconds"] for p in summary["parts"].values()), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False, default=str))
    _print_table(summary)
    shutil.rmtree(work, ignore_errors=True)
    print(f"gpu-check: summary in {out / 'summary.json'}")
    return 0 if summary["passed"] else 1


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    d = summary["device"]
    table = Table(title=f"mtkit gpu-check on {d['name'] or 'CPU'} ({d['gpus']} GPU(s), torch {d['torch']})")
    for col in ("part", "result", "seconds", "detail"):
        table.add_column(col)
    for name, p in summary["parts"].items():
        table.add_row(name, "ok" if p["passed"] else "FAILED", f"{p['seconds']:.1f}", p["detail"])
    Console(width=160).print(table)
    for p in summary["parts"].values():
        for b in p.get("benchmarks", []):
            frac = b["peak_fraction"]
            print(f"  {b['name']}: {b['median_ms']} ms, {b['images_per_s']} img/s"
                  + (f", {100 * frac:.1f} % of peak" if frac is not None and math.isfinite(frac) else ""))
        if not p["passed"] and p.get("tail"):
            print(p["tail"])


if __name__ == "__main__":
    sys.exit(main())
