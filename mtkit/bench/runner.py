"""``mtkit bench``: a thin command over pytest-benchmark. It runs the suite in ``benchmarks/`` with timing on,
stores the run with pytest-benchmark's own JSON output (``--benchmark-json``) as a named baseline, and compares
with a stored baseline through pytest-benchmark's own ``--benchmark-compare`` and ``--benchmark-compare-fail``
(median, percent), which print the comparison table and fail the run on a regression.

``MTKIT_BENCH_MAX_TIME=<seconds>`` shortens each benchmark (pytest-benchmark's ``--benchmark-max-time``).
Baselines live in ``benchmarks/baselines/<NAME>.json`` (every benchmark's statistics, the machine details and the
commit); ``--save`` and ``--compare`` also take a path to such a file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import MtkitError
from ..core.io import atomic_write_text

REGRESSED = "Performance has regressed"


@dataclass
class BenchResult:
    data: dict[str, Any]
    regressions: list[str] = field(default_factory=list)  # pytest-benchmark's lines for each failed check
    compared_with: Path | None = None
    saved: Path | None = None


def find_benchmarks(path: str | Path | None = None) -> Path:
    """The benchmarks folder: ``path``, else ./benchmarks, else the one beside the installed package."""
    candidates = [Path(path)] if path else [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[1] /
                                             "benchmarks"]
    for c in candidates:
        if (c / "conftest.py").is_file():
            return c
    raise MtkitError(f"no benchmarks folder found (looked at {', '.join(map(str, candidates))}); run from a clone "
                     "of mtkit or pass --path")


def check_baseline_name(name: str) -> None:
    """``--save`` takes a baseline name, stored as benchmarks/baselines/NAME.json (a plain name: letters, digits,
    - _ ., no folders), or an explicit FILE.json in a folder that exists (nothing else is created)."""
    if name.endswith(".json"):
        if not Path(name).parent.is_dir() or Path(name).is_dir():
            raise MtkitError(f"--save {name}: {Path(name).parent} is not an existing folder; give a file in a folder "
                             "that exists, or a baseline name (stored as benchmarks/baselines/NAME.json)")
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
        raise MtkitError(f"--save '{name}' is not a baseline name: give a plain name such as cpu-avx512 (letters, "
                         "digits, - _ ., no folders), stored as benchmarks/baselines/NAME.json, or a path FILE.json")


def baseline_path(bench_dir: Path, name: str) -> Path:
    """A stored baseline by name (benchmarks/baselines/<name>.json) or a path to a JSON file."""
    p = Path(name)
    if p.suffix == ".json" or p.is_file():
        return p
    return bench_dir / "baselines" / f"{name}.json"


def _check_baseline(path: Path) -> None:
    if not path.is_file():
        stored = sorted(q.stem for q in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise MtkitError(f"baseline not found: {path}; stored baselines: {', '.join(stored) or '(none)'}; "
                         "make one with mtkit bench --save NAME")
    try:
        data = json.loads(path.read_text())
        [b["stats"]["median"] for b in data["benchmarks"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise MtkitError(f"{path} is not a pytest-benchmark JSON file: {exc}") from None


def bench_device() -> torch.device:
    """The device the benchmarks run on: ``MTKIT_BENCH_DEVICE`` (cpu, cuda, cuda:N), else a GPU when present."""
    return torch.device(os.environ.get("MTKIT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_slug() -> str:
    """The benchmarked device (``bench_device``) as a folder name, e.g. ``cpu``, ``nvidia-h100-80gb-hbm3``."""
    device = bench_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def history_folder(bench_dir: Path, history: str | Path | None = None) -> Path:
    """Where saved runs accumulate (pytest-benchmark's own storage, one folder per device): ``history`` or
    ``benchmarks/history``."""
    return Path(history) if history else bench_dir / "history"


def _without_regression_traceback(text: str) -> str:
    """pytest-benchmark reports a regression by raising ``PerformanceRegression`` out of pytest's summary: its
    traceback is the expected outcome of ``--fail-over``, not an error, and is left out (the comparison table and
    the regression lines stay)."""
    if "PerformanceRegression" not in text:
        return text
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        skipping = skipping or line.startswith(("Traceback (most recent call last)", "INTERNALERROR>"))
        if not skipping:
            kept.append(line)
        elif "PerformanceRegression" in line and not line.removeprefix("INTERNALERROR>").lstrip().startswith(
                ("File", "raise")):
            skipping = False
    return "".join(kept)


def run_bench(save: str | None = None, compare_with: str | None = None, fail_over: float = 10.0,
              select: str | None = None, path: str | Path | None = None, extra: list[str] | None = None,
              history: str | Path | None = None) -> BenchResult:
    """Run the suite with timing on (in a subprocess, as pytest runs it), then save and/or compare. A saved run
    is also appended to the history (``--benchmark-autosave`` into ``history_folder()/<device>``, where
    pytest-benchmark names each run by its counter, commit and date) that ``trend`` plots."""
    if save is not None:
        check_baseline_name(save)
    bench_dir = find_benchmarks(path)
    history_store = (history_folder(bench_dir, history) / device_slug()).resolve() if save else None
    if history_store is not None:
        history_store.mkdir(parents=True, exist_ok=True)
    baseline = baseline_path(bench_dir, compare_with) if compare_with else None
    if baseline is not None:
        _check_baseline(baseline)
    # pytest-benchmark wants its storage below the working folder (it prints it relative to it)
    with tempfile.TemporaryDirectory(prefix=".mtkit-bench-", dir=bench_dir.parent) as tmp:
        json_path = Path(tmp) / "benchmark.json"
        store = history_store or Path(tmp)
        cmd = [sys.executable, "-m", "pytest", str(bench_dir), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               "--benchmark-enable", f"--benchmark-json={json_path}", f"--benchmark-storage=file://{store}",
               *(["--benchmark-autosave"] if history_store is not None else []),
               "--benchmark-columns=min,median,mean,rounds", "--benchmark-sort=fullname",
               *([f"--benchmark-max-time={os.environ['MTKIT_BENCH_MAX_TIME']}"]
                 if os.environ.get("MTKIT_BENCH_MAX_TIME") else []),
               *(["-k", select] if select else []), *(extra or [])]
        if baseline is not None:
            cmd += [f"--benchmark-compare={baseline.resolve()}", f"--benchmark-compare-fail=median:{fail_over:g}%"]
        # pytest-benchmark wants its storage below the working folder: the history may be elsewhere
        cwd = os.path.commonpath([str(bench_dir.parent.resolve()), str(store)])
        proc = subprocess.run(cmd, cwd=cwd, env={**os.environ}, capture_output=True, text=True)
        sys.stdout.write(_without_regression_traceback(proc.stdout))
        sys.stderr.write(_without_regression_traceback(proc.stderr))
        output = proc.stdout + proc.stderr
        regressions = [ln.strip() for ln in output.splitlines() if re.search(r"has failed \w+RegressionCheck", ln)]
        if (proc.returncode != 0 and REGRESSED not in output) or not json_path.is_file():
            raise MtkitError(f"the benchmark suite failed (pytest exit code {proc.returncode}); see its output above")
        data = json.loads(json_path.read_text())
    if not data.get("benchmarks"):
        raise MtkitError(f"no benchmark ran{f' for -k {select!r}' if select else ''}")
    result = BenchResult(data, regressions, baseline)
    if save:
        result.saved = baseline_path(bench_dir, save)
        atomic_write_text(result.saved, json.dumps(data, indent=2))
    return result


def summary_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(benchmark, median ms, throughput, achieved GFLOP/s, fraction of the matmul peak measured in the same run,
    ratios) per benchmark, for a readable table."""
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        median = float(b["stats"]["median"])
        n = info.get("images_per_step") or info.get("images")
        rate = f"{n / median:.1f} img/s" if n else ""
        ratios = []
        if "overhead_vs_plain_pytorch" in info:
            ratios.append(f"overhead vs plain PyTorch {100 * info['overhead_vs_plain_pytorch']:+.1f} %")
        if "speedup_vs_7_independent_runs" in info:
            ratios.append(f"{info['speedup_vs_7_independent_runs']:.2f}x faster than 7 FGSM runs")
        if "ratio_vs_torchattacks" in info:
            ratios.append(f"{info['ratio_vs_torchattacks']:.2f}x torchattacks' time")
        if "speedup_batched_vs_per_epsilon" in info:
            ratios.append(f"{info['speedup_batched_vs_per_epsilon']:.2f}x faster than one ε after another")
        if "speedup_vs_fp32_eager" in info:
            ratios.append(f"{info['speedup_vs_fp32_eager']:.2f}x faster than fp32 eager")
        flops = info.get("flops")
        achieved = flops / median if flops else None
        peak = info.get("peak_flop_per_s")
        rows.append((b["name"], f"{1000 * median:.1f}", rate, f"{achieved / 1e9:.1f}" if achieved else "",
                     f"{achieved / peak:.2f}" if achieved and peak else "", "; ".join(ratios)))
    return rows
