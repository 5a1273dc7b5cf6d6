"""``mtkit bench --trend``: a PNG of every benchmark's median over the stored runs of a history folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import MtkitError
from .runner import find_benchmarks, history_folder


def _saved_run(path: Path) -> dict:
    """One saved run of the history, checked: pytest-benchmark's JSON with a name and a median per benchmark."""
    try:
        data = json.loads(path.read_text())
        for b in data["benchmarks"]:
            str(b["name"]), float(b["stats"]["median"]), dict(b.get("extra_info", {}))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise MtkitError(f"{path} is not a saved pytest-benchmark run ({type(exc).__name__}: {exc}): move it out of "
                         "the history folder, or delete it") from None
    return data


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
            data = _saved_run(run)
            labels.append(str((data.get("commit_info") or {}).get("id", ""))[:7] or run.stem.split("_")[0])
            for b in data["benchmarks"]:
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
