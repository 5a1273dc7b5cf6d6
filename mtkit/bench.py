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
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .build import build_dataset, build_perturbations, build_segmentation_loss
from .errors import MtkitError
from .evaluate import evaluation_sets
from .io import atomic_write_text
from .runtime import resolve_device, resolve_precision
from .sweep import robustness_sweep
from .train import Trainer

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


def run_bench(save: str | None = None, compare_with: str | None = None, fail_over: float = 10.0,
              select: str | None = None, path: str | Path | None = None, extra: list[str] | None = None,
              history: str | Path | None = None) -> BenchResult:
    """Run the suite with timing on (in a subprocess, as pytest runs it), then save and/or compare. A saved run
    is also appended to the history (``--benchmark-autosave`` into ``history_folder()/<device>``, where
    pytest-benchmark names each run by its counter, commit and date) that ``trend`` plots."""
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
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
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


# ----------------------------------------------------------------------------------- CPU-side proxies of GPU speed
#: aten operators that make the host wait for the device (reading a value back, or a data-dependent shape)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "_linalg_check_errors", "equal", "item",
                      "masked_select", "unique_dim", "_unique2", "bincount"})
#: Tensor methods that copy to the host (invisible to a dispatch mode on the CPU, where they are no copy at all)
SYNC_METHODS = ("tolist", "cpu", "numpy", "item", "__bool__", "__float__", "__int__", "__index__")
#: matrix products whose one side is a small matrix (≤ 4 rows or columns) and the other more than this many points
#: belong in elementwise math (a 3x3 times 122,880 points ran as a 1.1 ms fp32 gemm on an H100)
LARGE_SMALL_MATMUL = 10_000


#: operators that only make a view or read metadata (no kernel on a GPU)
VIEW_OPS = frozenset({"detach", "view", "_unsafe_view", "slice", "select", "expand", "unbind", "alias", "as_strided",
                      "t", "transpose", "permute", "unsqueeze", "squeeze", "reshape", "_reshape_alias", "split",
                      "split_with_sizes", "chunk", "narrow", "movedim", "lift_fresh", "unfold", "diagonal", "empty",
                      "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_to_copy_view", "view_as"})


@dataclass
class OpCount:
    """What one call dispatched: every aten operator (``ops``), the ones that synchronise the host with the
    device (``syncs``: operators and host-copy Tensor methods), and the small-matrix products over many points
    (``small_matmuls``, shapes)."""

    ops: dict[str, int]
    syncs: dict[str, int]
    small_matmuls: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """The operators that run a kernel on a GPU (all but views, metadata and allocation)."""
        return sum(n for op, n in self.ops.items() if op not in VIEW_OPS)


def count_ops(fn, *args, **kwargs) -> tuple[Any, OpCount]:
    """Run ``fn(*args, **kwargs)`` under a ``TorchDispatchMode`` that counts the aten operators it dispatches
    (forward and backward), and with the host-copy Tensor methods wrapped: the CPU-side proxy of a GPU step's
    kernel launches and host synchronisations."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    ops: Counter[str] = Counter()
    syncs: Counter[str] = Counter()
    small: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            ops[name] += 1
            if name in SYNC_OPS:
                syncs[name] += 1
            elif name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
                    if i is not None):
                syncs[f"{name} (boolean mask)"] += 1  # a data-dependent shape: nonzero inside
            if name in ("bmm", "mm", "addmm", "baddbmm", "matmul") and len(args) >= 2:
                a, b = (x for x in args[-2:])
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                    (m, k), n = a.shape[-2:], b.shape[-1]
                    if min(m, k, n) <= 4 and max(m, n) > LARGE_SMALL_MATMUL:
                        small.append((name, tuple(a.shape), tuple(b.shape)))
            return func(*args, **(kwargs or {}))

    originals = {m: getattr(torch.Tensor, m) for m in SYNC_METHODS}

    def counting(method: str):
        real = originals[method]

        def call(self, *a, **k):
            syncs[f"Tensor.{method}"] += 1
            return real(self, *a, **k)
        return call

    try:
        for m in SYNC_METHODS:
            setattr(torch.Tensor, m, counting(m))
        with Mode():
            out = fn(*args, **kwargs)
    finally:
        for m, real in originals.items():
            setattr(torch.Tensor, m, real)
    return out, OpCount(dict(ops), dict(syncs), small)


# ------------------------------------------------------------------------------------------ projection of a run
@dataclass
class PlanRow:
    """One stage of a run, of one model: what was measured (seconds per unit: a step, a batch, an image), how many
    units the recipe asks for, and the projected seconds."""

    model: str
    stage: str
    unit: str
    seconds_per_unit: float
    units: int

    @property
    def seconds(self) -> float:
        return self.seconds_per_unit * self.units


def _timed(fn, repeats: int, device) -> float:
    """Seconds per call of ``fn`` on ``device``: one warm-up call (allocation, cudnn autotuning), then the mean of
    ``repeats`` calls, each ended by a device synchronisation."""
    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def plan(recipe, steps: int = 3, log=print) -> list[PlanRow]:
    """Project the run of ``recipe`` on this machine's device without running it: a few training steps of each
    model on batches of the recipe's shapes, one validation batch, one robustness batch of every perturbation at
    every ε (the recipe's options) on each evaluation set's image size, one depth batch; each multiplied by the
    counts the recipe implies (steps per epoch × epochs, set sizes / batch sizes, seeds). The data is not read:
    the batches are random, the set sizes come from the datasets' indexes."""
    device = resolve_device(recipe.device)
    seeds = len(recipe.run_seeds())
    rows: list[PlanRow] = []
    d, t, rob = recipe.data, recipe.train, recipe.robustness
    g = torch.Generator().manual_seed(0)
    n = recipe.model.num_classes

    def size_of(key: str, cfg) -> int:
        return len(build_dataset(cfg, where=key))

    def images(b: int, cfg) -> torch.Tensor:
        return torch.rand(b, 3, cfg.height, cfg.width, generator=g) * 255

    seg_len = size_of("data.segmentation", d.segmentation)
    val_len = size_of("data.segmentation_val", d.segmentation_val)
    for spec in recipe.models:
        log(f"[plan] measuring {spec.name} on {device}")
        tr = Trainer(recipe, spec, "unused", progress=False)
        tr.build(torch.ones(n))
        seg = {"image": images(tr.seg_batch, d.segmentation).to(device),
               "label": torch.randint(0, n, (tr.seg_batch, d.segmentation.height, d.segmentation.width),
                                      generator=g).to(device)}
        dep = None
        if tr.multitask:
            frames = torch.rand(tr.depth_batch, 3, 3, d.depth.height, d.depth.width, generator=g) * 255
            k = torch.eye(4).repeat(tr.depth_batch, 1, 1)
            k[:, 0, 0], k[:, 1, 1] = 0.58 * d.depth.width, 1.92 * d.depth.height
            k[:, 0, 2], k[:, 1, 2] = d.depth.width / 2, d.depth.height / 2
            dep = {"frames": frames.to(device), "frames_raw": frames.to(device), "K": k.to(device)}
        per_epoch = t.steps_per_epoch or max(1, seg_len // tr.seg_batch)
        step = _timed(lambda tr=tr, seg=seg, dep=dep: tr.train_step(seg, dep), steps, device)
        rows.append(PlanRow(spec.name, f"train {spec.name}", f"step ({tr.seg_batch} + {tr.depth_batch} images)", step,
                            per_epoch * t.epochs * seeds))
        segmenter = tr.model.segmenter().eval()
        vb = rob.batch_size if isinstance(rob.batch_size, int) else tr.seg_batch
        val = images(vb, d.segmentation_val).to(device)
        with torch.no_grad():
            v = _timed(lambda s=segmenter, x=val: s(x), steps, device)
        rows.append(PlanRow(spec.name, f"validate {spec.name}", f"batch of {vb}", v,
                            math.ceil(val_len / vb) * t.epochs * seeds))
        perts = build_perturbations(rob.perturbations, rob.options)
        loss = build_segmentation_loss(recipe.loss.segmentation, torch.ones(n))
        precision = resolve_precision(rob.amp, rob.channels_last, rob.compile, device, "robustness", rob.tf32)
        for key in evaluation_sets(recipe):
            cfg = d.eval[key]
            b = rob.batch_size if isinstance(rob.batch_size, int) else 8
            batch = [{"image": x, "label": y} for x, y in zip(
                images(b, cfg), torch.randint(0, n, (b, cfg.height, cfg.width), generator=g))]
            sweep = _timed(partial(robustness_sweep, segmenter, batch, perts, rob.epsilons, n, torch.ones(n), b, 0,
                                   device, loss=loss, precision=precision, pass_images=rob.pass_images,
                                   sanity=rob.sanity), 1, device)
            rows.append(PlanRow(spec.name, f"evaluate {spec.name} on {key}",
                                f"batch of {b}: clean, {len(perts)} perturbations × {len(rob.epsilons)} ε", sweep,
                                math.ceil(size_of(f"data.eval.{key}", cfg) / b) * seeds))
        if tr.multitask:
            for key, cfg in d.depth_eval.items():
                x = images(recipe.depth_evaluation.batch_size, cfg).to(device)
                with torch.no_grad():
                    dt = _timed(lambda m=tr.model, x=x: m.predict_depth(x), steps, device)
                rows.append(PlanRow(spec.name, f"evaluate depth {spec.name} on {key}",
                                    f"batch of {recipe.depth_evaluation.batch_size}", dt,
                                    math.ceil(size_of(f"data.depth_eval.{key}", cfg)
                                              / recipe.depth_evaluation.batch_size) * seeds))
        del tr
    return rows


def trend(path: str | Path | None = None, history: str | Path | None = None) -> list[Path]:
    """One PNG per device of the history (``history_folder``): each benchmark's fraction of the device's matmul
    peak (measured in the same run, so comparable across machines of different speed) over the saved runs, in
    the order pytest-benchmark numbered them, labelled by commit. Returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = history_folder(find_benchmarks(path), history)
    devices = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    written = []
    for device in devices:
        runs = sorted(device.rglob("*.json"), key=lambda p: p.name)
        series: dict[str, list[tuple[int, float]]] = {}
        labels = []
        for i, run in enumerate(runs):
            data = json.loads(run.read_text())
            labels.append((data.get("commit_info") or {}).get("id", "")[:7] or run.stem.split("_")[0])
            for b in data.get("benchmarks", []):
                info, median = b.get("extra_info", {}), b["stats"]["median"]
                if info.get("flops") and info.get("peak_flop_per_s") and median:
                    series.setdefault(b["name"], []).append((i, info["flops"] / median / info["peak_flop_per_s"]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(runs)), 4.5))
        for name, points in sorted(series.items()):
            ax.plot([i for i, _ in points], [100 * f for _, f in points], marker="o", label=name)
        ax.set_xticks(range(len(runs)), labels, rotation=45, ha="right")
        ax.set_ylabel("% of the device's matmul peak")
        ax.set_title(f"mtkit benchmarks on {device.name}: {len(runs)} saved runs")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        out = folder / f"trend-{device.name}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    if not written:
        raise MtkitError(f"no saved benchmark runs with FLOP counts under {folder}: save some with mtkit bench --save "
                         "NAME (each one is also added to the history)")
    return written
