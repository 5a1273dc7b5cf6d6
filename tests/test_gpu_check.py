"""tools/gpu-check.sh: its help, its refusal without a GPU, and the comparison that decides its torchrun part (the
whole check runs on a GPU machine; ``--allow-cpu`` runs it here by hand)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from support import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_help_says_what_it_runs():
    out = subprocess.run(["bash", str(ROOT / "tools" / "gpu-check.sh"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for part in ("tests", "quickstart", "bench", "torchrun", "jobs", "plan", "--python", "--wheels", "summary.json"):
        assert part in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr and "--allow-cpu" in out.stderr


def _results(path, rows, clean=0.5):
    path.write_text(json.dumps({"clean": [{"dataset": "CS", "miou": clean}], "robustness": [
        {"perturbation": p, "level": e, "miou": m, "epsilon_measured": em, "attack": a} for p, e, m, em, a in rows]}))
    return path


def test_rows_must_be_equal_and_attacks_within_the_atomics_tolerance(tmp_path):
    base = [("gaussian", 1.0, 0.4, 1.0, False), ("fgsm", 1.0, 0.3, 1.0, True)]
    one = _results(tmp_path / "one.json", base)
    assert gpu_check.compare_rows(one, _results(tmp_path / "same.json", base))[0]
    near = [base[0], ("fgsm", 1.0, 0.3 + gpu_check.ATTACK_MIOU_TOL / 2, 1.0, True)]
    assert gpu_check.compare_rows(one, _results(tmp_path / "near.json", near))[0]
    for bad in ([("gaussian", 1.0, 0.4 + 1e-9, 1.0, False), base[1]],  # noise: exactly equal
                [base[0], ("fgsm", 1.0, 0.31, 1.0, True)],
                [base[0]]):
        ok, detail = gpu_check.compare_rows(one, _results(tmp_path / "bad.json", bad))
        assert not ok and detail
    assert not gpu_check.compare_rows(one, _results(tmp_path / "clean.json", base, clean=0.6))[0]


def test_card_names_give_baseline_file_names():
    assert gpu_check.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_check.card_slug("NVIDIA H200") == "h200"
    assert gpu_check.card_slug("NVIDIA A100-SXM4-40GB") == "a100"
    assert gpu_check.card_slug(None) == "cpu"


def test_the_wheel_set_carries_what_a_registry_free_gpu_image_lacks():
    """The --wheels set names typing_extensions (pydantic_core 2.50 imports its Sentinel, >= 4.14) and the test
    extras the suite's collection and timeouts need (hypothesis with sortedcontainers, pytest-timeout)."""
    script = (ROOT / "tools" / "gpu-check.sh").read_text()
    listed = script.split("pkgs=(", 1)[1].split(")", 1)[0].split()
    for name in ("typing_extensions", "hypothesis", "sortedcontainers", "pytest-timeout", "pydantic_core"):
        assert name in listed, name
