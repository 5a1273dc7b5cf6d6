"""``mtkit bench``: saves a baseline, passes on unchanged code, catches an injected slowdown (the CLI in this
process; the benchmarks in the pytest process it starts)."""

from __future__ import annotations

import json

from support import ROOT, run_cli


def _bench(capsys, monkeypatch, *args, env=None):
    monkeypatch.setenv("MTKIT_BENCH_MAX_TIME", "0.2")
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    return run_cli(["bench", "--path", str(ROOT / "benchmarks"), "-k", "photometric", *args], capsys)


def test_bench_saves_compares_and_catches_a_slowdown(tmp_path, capsys, monkeypatch):
    base = tmp_path / "base.json"
    # saves, and passes against the committed CPU baseline (unchanged code; a generous threshold: another machine)
    history = tmp_path / "history"
    code, out, err = _bench(capsys, monkeypatch, "--save", str(base), "--compare", "cpu", "--fail-over", "1000",
                            "--history", str(history))
    assert code == 0, out + err
    saved = list((history / "cpu").rglob("*.json"))  # the run is also in the history, by device and commit
    info = json.loads(saved[0].read_text())["benchmarks"][0]["extra_info"]
    assert len(saved) == 1 and info["peak_flop_per_s"]
    # timed under its phase's math policy, and saying so (the depth loss is training's: TF32 allowed on CUDA)
    assert info["math"] == {"phase": "train", "tf32": True, "cudnn_benchmark": True, "deterministic": False}
    tcode, tout, terr = run_cli(["bench", "--path", str(ROOT / "benchmarks"), "--trend", "--history",
                                 str(history)], capsys)
    assert tcode == 0, terr
    assert (history / "trend-cpu.png").stat().st_size > 1000 and "trend-cpu.png" in "".join(tout.split())
    assert "REGRESSION" not in out and "no benchmark slower than cpu" in " ".join(out.split())
    data = json.loads(base.read_text())
    assert [b["name"] for b in data["benchmarks"]] == ["test_photometric_loss"]
    assert data["machine_info"]["cpu"]  # the machine details are stored with the baseline

    # six times the work per call: +500 % on any machine, against a 100 % threshold (a margin for a noisy baseline
    # median: one run here measured the base at 2.1x its own minimum)
    code, out, err = _bench(capsys, monkeypatch, "--compare", str(base), "--fail-over", "100",
                            env={"MTKIT_BENCH_INJECT_SLOWDOWN": "6"})
    assert code == 1, out + err
    assert "REGRESSION" in out and "slower than" in " ".join(err.split())
    # the regression is --fail-over's expected outcome: the table and one line, not pytest-benchmark's traceback
    assert "Traceback" not in out + err and "PerformanceRegression" not in out + err


def test_bench_missing_baseline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    code, _, err = _bench(capsys, monkeypatch, "--compare", str(tmp_path / "nope.json"))
    assert code == 2
    assert "baseline not found" in " ".join(err.split()) and "Traceback" not in err


def test_trend_without_history_says_how_to_make_one(tmp_path, capsys):
    code, _, err = run_cli(["bench", "--path", str(ROOT / "benchmarks"), "--trend", "--history", str(tmp_path)],
                           capsys)
    assert code == 2 and "mtkit bench --save" in " ".join(err.split())
