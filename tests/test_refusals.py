"""Bad files, names and values refused in one line (exit code 2, no traceback), and what is accepted but likely
not meant said in one line: target files and universal perturbations of the targeted attacks, oversized image
headers, baseline names and benchmark histories, export paths, deep ``extends`` chains, sizes and learning-rate
milestones; and the run lock that a dead holder or a forked worker leaves."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from support import ROOT, run_cli, tiny_recipe

from mtkit.core.errors import DatasetError, MtkitError, RecipeError
from mtkit.core.io import clear_tree, run_lock
from mtkit.data.common import image_is_readable, read_image
from mtkit.recipe.load import load_recipe, validate

pytest.importorskip("mtkit_attacks", reason="the targeted attacks are the mtkit-attacks plugin's")
from mtkit_attacks.metzen import read_target_file  # noqa: E402
from mtkit_attacks.uap import load_uap, save_uap  # noqa: E402


def _one_line_error(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 or err.strip().startswith("error:"), err
    return " ".join(err.split())


@pytest.mark.parametrize("content, why", [
    (np.full((4, 6), 50), "ids 50..50"), (np.full((4, 6), -1), "ids -1..-1"),
    (np.array([[0.0, np.nan]]), "not whole numbers"), (np.zeros((2, 4, 6), np.int64), "of shape (2, 4, 6)"),
    (np.array([[0.5, 1.0]]), "not whole numbers"), (np.zeros((0, 3), np.int64), "ids"),
    (np.array([["a", "b"]]), "holds <U1"), (np.array([{"x": 1}], dtype=object), "cannot read"),
    (b"not an array at all", "cannot read"), ("rgb", "of shape (4, 6, 3)"),
    (b"\x89PNG\r\n\x1a\n broken", "cannot read")])
def test_a_bad_target_file_is_refused_naming_it_and_what_was_expected(tmp_path, content, why):
    """metzen_static's options.target_file: every kind of wrong file is one error naming the file, what it holds
    and the expected (H, W) map of class ids, where each was a traceback."""
    if isinstance(content, bytes):
        path = tmp_path / ("t.png" if content.startswith(b"\x89PNG") else "t.npy")
        path.write_bytes(content)
    elif isinstance(content, str):
        path = tmp_path / "t.png"
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(path)
    else:
        path = tmp_path / "t.npy"
        np.save(path, content, allow_pickle=True)
    with pytest.raises(MtkitError) as refused:
        read_target_file(path, 19, "metzen_static")
    message = str(refused.value)
    assert str(path) in message and why in message and "(H, W) map of class ids 0..18" in message, message


def test_a_good_target_file_reads_as_class_ids(tmp_path):
    labels = np.arange(24).reshape(4, 6) % 19
    np.save(tmp_path / "t.npy", labels.astype(np.float32))
    Image.fromarray(labels.astype(np.uint8)).save(tmp_path / "t.png")
    for name in ("t.npy", "t.png"):
        got = read_target_file(tmp_path / name, 19, "metzen_static")
        assert got.dtype == torch.int64 and got.tolist() == labels.tolist()


def test_a_target_index_beyond_the_dataset_is_refused():
    from mtkit_attacks.metzen import MetzenStatic

    from mtkit.perturbations.context import AttackContext

    attack = MetzenStatic(MetzenStatic.Options.model_validate({"target_index": 9, "target_dataset": {
        "name": "synthetic", "split": "val", "height": 32, "width": 64, "limit": 2,
        "options": {"domain": "city", "sequences": 2, "frames": 8}}}))
    ctx = AttackContext(model=torch.nn.Identity(), class_weights=None, generator=torch.Generator())
    with pytest.raises(MtkitError, match=r"target_index 9 is not an image of options.target_dataset \(2 images"):
        attack.static_target(ctx, torch.zeros(1, 3, 32, 64))


def test_a_universal_perturbation_of_the_wrong_shape_is_refused(tmp_path):
    path = save_uap(tmp_path / "uap.pt", torch.zeros(3, 16, 16), 4.0, "fp", {})
    assert load_uap(path, "fp", (16, 16)).shape == (3, 16, 16)
    with pytest.raises(MtkitError, match=r"is \(3, 16, 16\) torch.float32, expected finite floats of shape \(3, 32"):
        load_uap(path, "fp", (32, 64))
    save_uap(path, torch.full((3, 8, 8), float("nan")), 4.0, "fp", {})
    with pytest.raises(MtkitError, match="expected finite floats"):
        load_uap(path, "fp", (8, 8))


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height pixels (valid checksums) and whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [30000, 9000])
def test_an_image_header_beyond_the_size_limit_is_refused_before_decoding(tmp_path, side, recwarn):
    """30000x30000 (PIL's decompression bomb: a traceback that stopped prepare even with --skip-bad) and
    9000x9000 (81 MP: decoded for seconds with a bare warning) are refused from their headers, naming the file;
    --skip-bad leaves them out."""
    path = _png_header(tmp_path / "big.png", side, side)
    with pytest.raises(DatasetError) as refused:
        read_image(path)
    assert str(path) in str(refused.value) and "not decoded" in str(refused.value)
    assert not image_is_readable(path)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


@pytest.mark.parametrize("name", ["../escape", "sub/dir/name", "", "/tmp/abs-name", "..", "nowhere/x.json"])
def test_bench_save_takes_a_plain_name_or_a_json_file_in_an_existing_folder(name, capsys, tmp_path):
    before = sorted(p.name for p in ROOT.iterdir())
    baselines = sorted((ROOT / "benchmarks" / "baselines").rglob("*"))
    code, _, err = run_cli(["bench", "--path", str(ROOT / "benchmarks"), "--save", name], capsys)
    assert "baseline name" in _one_line_error(code, err) or "existing folder" in " ".join(err.split())
    assert sorted(p.name for p in ROOT.iterdir()) == before
    assert sorted((ROOT / "benchmarks" / "baselines").rglob("*")) == baselines


@pytest.mark.parametrize("content", ["{not json", json.dumps({"benchmarks": [{"name": "x"}]}), "[1, 2]",
                                     json.dumps({"benchmarks": [{"name": "x", "stats": {"median": "fast"}}]})])
def test_bench_trend_over_a_damaged_history_file_names_it(tmp_path, capsys, content):
    (tmp_path / "cpu").mkdir()
    bad = tmp_path / "cpu" / "0001_bad.json"
    bad.write_text(content)
    code, _, err = run_cli(["bench", "--path", str(ROOT / "benchmarks"), "--trend", "--history", str(tmp_path)],
                           capsys)
    assert str(bad) in _one_line_error(code, err).replace(" ", "") or "not a saved pytest-benchmark run" in err


def test_export_onto_an_existing_folder_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["export", str(tmp_path / "missing.pt"), str(tmp_path)], capsys)
    assert "is a folder: give the ONNX file to write" in _one_line_error(code, err)


def test_an_extends_chain_beyond_its_depth_is_one_line(tmp_path, capsys):
    (tmp_path / "r0.yaml").write_text(yaml.safe_dump(tiny_recipe()))
    for i in range(1, 1000):
        (tmp_path / f"r{i}.yaml").write_text(f"extends: r{i - 1}.yaml\n")
    with pytest.raises(RecipeError, match="more than 32 recipes deep"):
        load_recipe(tmp_path / "r999.yaml")
    load_recipe(tmp_path / "r20.yaml")  # a real chain loads


def test_sizes_beyond_the_bound_are_refused_by_the_schema():
    with pytest.raises(RecipeError, match=r"data.segmentation.height.*less than or equal to 8192"):
        validate(tiny_recipe(**{"data.segmentation.height": 100000}))


def test_a_learning_rate_milestone_beyond_the_last_epoch_is_said_in_one_line(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**{"train.epochs": 6, "train.lr_drop_epochs": [3, 50]})))
    code, _, err = run_cli(["show", str(path)], capsys)
    lines = [ln for ln in err.splitlines() if "lr_drop_epochs" in ln]
    assert code == 0 and lines and lines[0].startswith("warning: train.lr_drop_epochs [50] lie at or beyond")
    assert "Warning:" not in err and ".py:" not in err  # one line, not Python's two with a source location


def test_a_dead_holders_lock_is_taken_over_with_a_notice_and_a_fork_does_not_keep_it(tmp_path):
    """A run lock left by a process that died (its name still in .lock) is taken over with a notice; a worker
    forked while the lock is held (a loader or prepare worker) does not keep the folder locked after its parent
    let go, or died."""
    (tmp_path / ".lock").write_text("mtkit pid 999999")
    notices: list[str] = []
    with run_lock(tmp_path, wait=notices.append):
        pid = os.fork()
        if pid == 0:  # a forked worker that outlives the lock's holder
            import time

            time.sleep(1)
            os._exit(0)
    assert notices == [f"{tmp_path}: taking over from mtkit pid 999999, which ended without releasing it (killed "
                       "or crashed)"]
    with run_lock(tmp_path):  # free at once, although the forked child is still alive
        assert (tmp_path / ".lock").read_text() == f"mtkit pid {os.getpid()}"
    assert (tmp_path / ".lock").read_text() == ""
    os.waitpid(pid, 0)


def test_a_symlinked_folder_is_cleared_through_its_link(tmp_path):
    target = tmp_path / "scratch" / "train"
    (target / "sub").mkdir(parents=True)
    (target / "last.pt").write_bytes(b"x")
    (target / "sub" / "f").write_bytes(b"y")
    link = tmp_path / "run-train"
    link.symlink_to(target)
    clear_tree(link)
    assert link.is_symlink() and target.is_dir() and not list(target.iterdir())


def test_a_symlinked_prepared_folder_to_prepare_again_is_one_line(tmp_path):
    from mtkit.data.cache_writer import prepare_folder

    real = tmp_path / "elsewhere"
    real.mkdir()
    link = tmp_path / "cache" / "cityscapes-abc"
    link.parent.mkdir()
    link.symlink_to(real)
    with pytest.raises(DatasetError, match="is a symlink .* remove the link, or set MTKIT_CACHE"):
        prepare_folder(None, link, {}, False, ([], "key"), log=lambda m: None)


def test_gpu_check_refuses_a_python_without_torch_a_wheels_folder_it_cannot_write_and_an_out_file(tmp_path):
    script = str(ROOT / "tools" / "gpu-check.sh")
    no_torch = "/usr/bin/python3"
    if subprocess.run([no_torch, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("this machine's system Python has torch")
    out = subprocess.run(["bash", script, "--python", no_torch], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "cannot import torch" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out = subprocess.run(["bash", script, "--wheels", str(a_file / "wheels")], capture_output=True, text=True)
    assert out.returncode == 2 and "cannot write wheels" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--allow-cpu", "--out",
                          str(a_file)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "is a file" in out.stderr and "Traceback" not in out.stderr


hypothesis = pytest.importorskip("hypothesis", reason="the fuzzing needs hypothesis (a test extra)")


@hypothesis.settings(max_examples=40, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(blob=hypothesis.strategies.binary(max_size=300),
                  kind=hypothesis.strategies.sampled_from(["target.npy", "target.png", "uap.pt", "ckpt.pt",
                                                           "history.json", "baseline.json"]))
def test_fuzz_every_file_a_recipe_or_an_option_names_fails_only_as_a_clean_error(tmp_path, blob, kind):
    """Arbitrary bytes (truncated, empty, random) in each kind of file mtkit reads on a user's behalf: the target
    segmentation, a universal perturbation, a checkpoint, a benchmark history and a baseline either load or
    raise mtkit's one-line error, never another exception."""
    from mtkit.bench.runner import _check_baseline
    from mtkit.bench.trend import _saved_run
    from mtkit.core.checkpoint import load_checkpoint

    path = tmp_path / kind
    path.write_bytes(blob)
    readers = {"target.npy": lambda: read_target_file(path, 19, "metzen_static"),
               "target.png": lambda: read_target_file(path, 19, "metzen_static"),
               "uap.pt": lambda: load_uap(path, "fp", (8, 8)), "ckpt.pt": lambda: load_checkpoint(path),
               "history.json": lambda: _saved_run(path), "baseline.json": lambda: _check_baseline(path)}
    try:
        readers[kind]()
    except MtkitError:
        pass
