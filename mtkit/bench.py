"""``mtkit bench``: run the pytest-benchmark suite in ``benchmarks/``, save its JSON as a named baseline, compare
with a stored baseline and report regressions beyond a threshold.

Baselines live in ``benchmarks/baselines/<NAME>.json`` (pytest-benchmark's JSON: every benchmark's statistics,
the machine details and the commit). Comparison uses each benchmark's median time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MtkitError
from .report import atomic_write_text


@dataclass
class Comparison:
    name: str
    baseline_s: float
    current_s: float

    @property
    def change_pct(self) -> float:
        return 100.0 * (self.current_s / self.baseline_s - 1.0)


@dataclass
class BenchResult:
    data: dict[str, Any]
    comparisons: list[Comparison] = field(default_factory=list)
    regressions: list[Comparison] = field(default_factory=list)
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


def baseline_path(bench_dir: Path, name: str) -> Path:
    """A stored baseline by name (benchmarks/baselines/<name>.json) or a path to a JSON file."""
    p = Path(name)
    if p.suffix == ".json" or p.is_file():
        return p
    return bench_dir / "baselines" / f"{name}.json"


def load_baseline(path: Path) -> dict[str, Any]:
    if not path.is_file():
        stored = sorted(q.stem for q in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise MtkitError(f"baseline not found: {path}; stored baselines: {', '.join(stored) or '(none)'}; "
                         "make one with mtkit bench --save NAME")
    try:
        data = json.loads(path.read_text())
        _medians(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise MtkitError(f"{path} is not a pytest-benchmark JSON file: {exc}") from None
    return data


def _medians(data: dict[str, Any]) -> dict[str, float]:
    return {b["fullname"]: float(b["stats"]["median"]) for b in data["benchmarks"]}


def compare(baseline: dict[str, Any], current: dict[str, Any], fail_over: float) -> tuple[list[Comparison],
                                                                                          list[Comparison]]:
    """Benchmarks present in both, and those whose median is slower than the baseline's by more than fail_over %."""
    old, new = _medians(baseline), _medians(current)
    rows = [Comparison(name, old[name], new[name]) for name in new if name in old]
    return rows, [c for c in rows if c.change_pct > fail_over]


def run_bench(save: str | None = None, compare_with: str | None = None, fail_over: float = 10.0,
              select: str | None = None, path: str | Path | None = None, extra: list[str] | None = None
              ) -> BenchResult:
    """Run the suite with timing on (in a subprocess, as pytest runs it), then save and/or compare."""
    bench_dir = find_benchmarks(path)
    baseline = load_baseline(baseline_path(bench_dir, compare_with)) if compare_with else None
    with tempfile.TemporaryDirectory(prefix="mtkit-bench-") as tmp:
        json_path = Path(tmp) / "benchmark.json"
        cmd = [sys.executable, "-m", "pytest", str(bench_dir), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               "--benchmark-enable", f"--benchmark-json={json_path}", "--benchmark-columns=min,median,mean,rounds",
               "--benchmark-sort=fullname", *(["-k", select] if select else []), *(extra or [])]
        proc = subprocess.run(cmd, cwd=bench_dir.parent, env={**os.environ})
        if proc.returncode != 0 or not json_path.is_file():
            raise MtkitError(f"the benchmark suite failed (pytest exit code {proc.returncode}); see its output above")
        data = json.loads(json_path.read_text())
    if not data.get("benchmarks"):
        raise MtkitError(f"no benchmark ran{f' for -k {select!r}' if select else ''}")
    result = BenchResult(data)
    if save:
        result.saved = baseline_path(bench_dir, save)
        atomic_write_text(result.saved, json.dumps(data, indent=2))
    if baseline is not None:
        result.comparisons, result.regressions = compare(baseline, data, fail_over)
        if not result.comparisons:
            raise MtkitError(f"the baseline '{compare_with}' shares no benchmark with this run")
    return result


def summary_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, median ms, throughput, ratios) per benchmark, for a readable table."""
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
        rows.append((b["name"], f"{1000 * median:.1f}", rate, "; ".join(ratios)))
    return rows
