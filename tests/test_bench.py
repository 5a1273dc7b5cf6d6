"""``mtkit bench``: saves a baseline, passes on unchanged code, catches an injected slowdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import ROOT


def _bench(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mtkit", "bench", "--path", str(ROOT / "benchmarks"),
                           "-k", "photometric", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200", "MTKIT_BENCH_MAX_TIME": "0.2", **(env or {})})


def test_bench_saves_compares_and_catches_a_slowdown(tmp_path):
    base = tmp_path / "base.json"
    # saves, and passes against the committed CPU baseline (unchanged code; a generous threshold: another machine)
    out = _bench("--save", str(base), "--compare", "cpu", "--fail-over", "1000")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "REGRESSION" not in out.stdout and "no benchmark slower than cpu" in out.stdout
    data = json.loads(base.read_text())
    assert [b["name"] for b in data["benchmarks"]] == ["test_photometric_loss"]
    assert data["machine_info"]["cpu"]  # the machine details are stored with the baseline

    slow = _bench("--compare", str(base), "--fail-over", "100", env={"MTKIT_BENCH_INJECT_SLEEP": "0.1"})
    assert slow.returncode == 1, slow.stdout + slow.stderr
    assert "REGRESSION" in slow.stdout and "slower than" in slow.stderr


def test_bench_missing_baseline_is_a_clear_error(tmp_path):
    out = _bench("--compare", str(tmp_path / "nope.json"))
    assert out.returncode == 2
    assert "baseline not found" in out.stderr and "Traceback" not in out.stderr
