"""Reliability: no finished model or result is lost, no temporary file is orphaned, a user mistake is one line
with exit code 2 (never a traceback), nothing silently wrong; and a fuzz of the recipe loader and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("hypothesis", reason="the fuzzing needs hypothesis (a test extra)")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import run_cli, tiny_recipe, with_plugins_on_path

from mtkit.core.checkpoint import atomic_torch_save, load_checkpoint
from mtkit.core.errors import CheckpointError, MtkitError, RecipeError
from mtkit.core.io import atomic_write_text, clean_stale_temporaries
from mtkit.core.results import RunResults
from mtkit.core.runtime import resolve_device
from mtkit.evaluation.robustness import evaluate_checkpoint
from mtkit.evaluation.sweep import robustness_sweep
from mtkit.recipe.load import apply_overrides, load_recipe, parse_override, validate
from mtkit.report import save_report
from mtkit.training.trainer import train


def _recipe_file(tmp_path: Path, **over) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**over)))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------- work is not lost

def test_a_finished_model_is_never_emptied_by_a_fresh_run(tmp_path, capsys):
    recipe = validate(tiny_recipe())
    train(recipe, "single", tmp_path / "m", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir() if p.is_file() and p.suffix != ".lock"}
    recipe_file = _recipe_file(tmp_path)
    code, _, err = run_cli(["train", str(recipe_file), "--model", "single", "--out", str(tmp_path / "m"),
                          "--no-progress"], capsys)
    assert code == 2 and "already holds a trained model" in err and "--resume" in err and "--overwrite" in err
    after = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir() if p.is_file() and p.suffix != ".lock"}
    assert after == before  # nothing was deleted or rewritten
    code, _, err = run_cli(["train", str(recipe_file), "--model", "single", "--out", str(tmp_path / "m"),
                          "--no-progress", "--overwrite"], capsys)
    assert code == 0, err
    (kept,) = (tmp_path / "m").glob("previous-*")
    assert (kept / "last.pt").read_bytes() == before["last.pt"] and (kept / "best.pt").is_file()
    assert (tmp_path / "m" / "last.pt").is_file()


def test_resume_truncates_the_log_and_a_second_writer_is_refused(tmp_path):
    recipe = validate(tiny_recipe(**{"train.epochs": 2}))
    train(recipe, "single", tmp_path, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    # a crash after the epoch-1 checkpoint: the log went on to step 3 (of epoch 2) before the kill
    ckpt = load_checkpoint(tmp_path / "last.pt")
    ckpt.update(epoch=1, step=2, step_in_epoch=0)
    atomic_torch_save(ckpt, tmp_path / "last.pt")
    train(recipe, "single", tmp_path, resume=True, progress=False)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["type"] == "step"]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4] and len(lines) == len(
        (tmp_path / "metrics.jsonl").read_text().splitlines())
    from mtkit.core.io import run_lock

    with run_lock(tmp_path), pytest.raises(MtkitError, match="is being written by mtkit pid"):
        train(recipe, "single", tmp_path, resume=True, progress=False)


def test_outputs_are_checked_before_the_work(tmp_path, capsys, trained, monkeypatch):
    recipe_file = _recipe_file(tmp_path)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    checkpoint = tmp_path / "ck.pt"
    atomic_torch_save(trained[0].checkpoint, checkpoint)
    for args in (["eval", str(recipe_file), "--checkpoint", str(checkpoint), "--out", str(a_file)],
                 ["eval", str(recipe_file), "--checkpoint", str(checkpoint), "--out", str(a_file / "sub")],
                 ["run", str(recipe_file), "--out", str(a_file / "run")],
                 ["train", str(recipe_file), "--out", str(a_file / "t")],
                 ["export", str(checkpoint), str(a_file / "m.onnx")]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and f"{a_file} is a file" in err and "Traceback" not in err, (args, err)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root (as in CI) ignores permissions: the folder refuses writes as a read-only
        # mount would, through the same OSError the probe meets without root
        real = Path.write_bytes

        def refuse(self, data):
            if self.parent == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, data)
        monkeypatch.setattr(Path, "write_bytes", refuse)
    code, _, err = run_cli(["eval", str(recipe_file), "--checkpoint", str(checkpoint), "--out", str(locked)], capsys)
    assert code == 2 and f"{locked} is not writable" in err and "Permission denied" in err, err


def test_results_are_rescued_when_the_final_write_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("MTKIT_CACHE", str(tmp_path / "cache"))
    results = RunResults(recipe_name="x", seeds=[0])
    run_dir = tmp_path / "run"
    (run_dir / "results.json").mkdir(parents=True)  # the final write cannot replace a folder
    with pytest.raises(MtkitError, match="they were saved to .*rescued"):
        save_report(results, run_dir)
    (rescued,) = (tmp_path / "cache" / "rescued").glob("results-*.json")
    assert RunResults.read(rescued) == results


def test_an_empty_model_list_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="models"):
        validate(tiny_recipe(models=[]))


def test_stale_temporaries_of_dead_processes_are_cleaned_and_a_failed_export_leaves_none(tmp_path, trained,
                                                                                      monkeypatch):
    dead = _dead_pid()
    orphan = tmp_path / f".last.pt.tmp{dead}.pt"
    orphan.write_bytes(b"\0" * 1024)
    mine = tmp_path / f".other.tmp{os.getpid()}"
    mine.write_bytes(b"")
    atomic_write_text(tmp_path / "x.txt", "hello")
    assert not orphan.exists() and mine.exists()  # a live process's temporary is left alone
    assert clean_stale_temporaries(tmp_path) == []
    from mtkit.evaluation import export

    checkpoint = tmp_path / "ck.pt"
    atomic_torch_save(trained[0].checkpoint, checkpoint)
    real = export.onnx_logits
    monkeypatch.setattr(export, "onnx_logits", lambda path, x: real(path, x) + 1.0)
    with pytest.raises(MtkitError, match="differs from PyTorch"):
        export.export_segmenter(checkpoint, tmp_path / "out" / "m.onnx", 32, 64)
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------------------------------ silent nonsense

def test_a_multitask_model_needs_lambda():
    data = tiny_recipe()
    del data["models"][1]["lambda"]
    with pytest.raises(RecipeError, match="no lambda.*lambda: 0.1"):
        validate(data)
    single = validate(tiny_recipe())
    assert single.models[0].lam == 1.0


def test_a_set_without_labelled_pixels_gives_null_with_a_reason_and_strict_json(trained, tmp_path):
    loaded, ds, _, _ = trained

    class Void(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            s = ds[i]
            return {"image": s["image"], "label": torch.full_like(s["label"], 255)}

    from mtkit.recipe.build import build_perturbation

    sweep = robustness_sweep(loaded.segmenter, Void(), {"gaussian": build_perturbation("gaussian")}, [1.0], 19)
    assert sweep.clean.miou is None and "no labelled pixel" in sweep.clean.note
    assert sweep.rows[0].q is None and sweep.rows[0].note
    results = RunResults(clean=[sweep.clean], robustness=sweep.rows)
    text = results.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    results.write(tmp_path / "r.json")
    assert RunResults.read(tmp_path / "r.json") == results


def test_num_classes_must_fit_the_checkpoint_and_the_labels(trained, tmp_path):
    loaded = trained[0]
    with pytest.raises(MtkitError, match="trained for 19 classes, the recipe's model.num_classes is 20"):
        evaluate_checkpoint(loaded, validate(tiny_recipe(**{"model.num_classes": 20})), ["CS"], 0)
    with pytest.raises(MtkitError, match="model.num_classes is 5"):
        train(validate(tiny_recipe(**{"model.num_classes": 5, "loss.class_weights": "none"})), "single", tmp_path,
              progress=False)


@pytest.mark.parametrize("over, msg", [({"train.lr_drop_epochs": [-3]}, "lr_drop_epochs.0"),
                                       ({"train.grad_clip": -1.0}, "grad_clip"),
                                       ({"robustness.epsilons": [float("inf")]}, "finite")])
def test_nonsense_values_are_refused_at_load(over, msg):
    with pytest.raises(RecipeError, match=msg):
        validate(tiny_recipe(**over))


def test_device_names_are_checked():
    with pytest.raises(MtkitError, match="'gpu' is not a device name"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(MtkitError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


# ---------------------------------------------------------------------------------- one line, exit code 2

def test_resuming_a_weights_only_checkpoint_is_a_clear_error(tmp_path):
    recipe = validate(tiny_recipe())
    train(recipe, "single", tmp_path, progress=False)
    shutil.copy(tmp_path / "best.pt", tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="holds weights only .* cannot be resumed"):
        train(recipe, "single", tmp_path, resume=True, progress=False)


def test_a_corrupt_image_in_a_loader_worker_is_one_line(tmp_path):
    from mtkit.data import layouts, synthetic

    city = synthetic.generate(synthetic.SyntheticSpec("city", sequences=2, frames=4, height=32, width=64, seed=5))
    paths = layouts.write_cityscapes(tmp_path / "cs", city, "train")
    paths[1].write_bytes(b"broken")
    data = tiny_recipe(**{"data.num_workers": 1})
    data["data"]["segmentation"] = {"name": "cityscapes", "root": str(tmp_path / "cs"), "split": "train",
                                    "height": 32, "width": 64, "options": {"downscale": 1.0}}
    data["models"] = [data["models"][0]]
    data["loss"] = {"class_weights": "none"}
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "mtkit", "train", str(recipe_file), "--out", str(tmp_path / "t"),
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"cannot read image {paths[1]}" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and "DataLoader worker" not in out.stderr


def test_checkpoint_refusal_says_it_carries_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "carries code" in str(err.value) and "will not run it" in str(err.value)
    assert "weights_only=False" not in str(err.value)


def test_a_typo_inside_an_eval_dataset_gets_suggestions():
    data = tiny_recipe()
    data["data"]["eval"]["CS"]["heigth"] = 32
    with pytest.raises(RecipeError, match=r"unknown key 'data.eval.CS.heigth'; did you mean 'height'"):
        validate(data)


def test_show_and_run_warn_once_about_a_broken_plugin(tmp_path, capsys, monkeypatch):
    from plugin_utils import BROKEN_PLUGIN, make_dist

    site = make_dist(tmp_path / "site", "mtkit-broken", "0.1", "mtkit_broken", BROKEN_PLUGIN)
    recipe_file = _recipe_file(tmp_path)
    with_plugins_on_path(site, monkeypatch)
    code, _, err = run_cli(["show", str(recipe_file)], capsys)
    assert code == 0 and err.count("mtkit_broken") == 1, err


# ------------------------------------------------------------------------------------------------- fuzzing

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
KEYS = st.sampled_from([
    "name", "seed", "seeds", "device", "model", "model.backbone", "model.num_classes", "model.mean", "model.head",
    "data", "data.eval", "data.eval.CS", "data.eval.CS.height", "data.eval.CS.options", "data.segmentation.name",
    "data.depth", "data.augment.hue", "data.num_workers", "loss.class_weights", "loss.segmentation",
    "loss.num_scales", "train.epochs", "train.lr", "train.lr_drop_epochs", "train.amp", "train.grad_clip",
    "models", "models.0", "models.1.lambda", "models.1.tasks", "models.0.task_scales", "robustness",
    "robustness.epsilons", "robustness.options", "robustness.options.pgd", "robustness.options.pgd.iterations",
    "robustness.perturbations", "robustness.datasets", "depth_evaluation.max_depth", "extends", "unknown.key"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=KEYS, value=VALUES)
def test_fuzz_recipe_values_give_a_recipe_or_an_mtkit_error(key, value):
    data = tiny_recipe()
    node = data
    parts = key.split(".")
    try:
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        elif isinstance(node, dict):
            node[parts[-1]] = value
        else:
            return
    except (IndexError, TypeError, AttributeError):
        return  # the path does not exist in this shape: nothing to validate
    try:
        validate(data)
    except MtkitError:
        pass


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40))
def test_fuzz_override_text_gives_a_recipe_or_an_mtkit_error(text):
    try:
        validate(apply_overrides(tiny_recipe(), [text]))
    except MtkitError:
        pass
    try:
        parse_override(text)
    except MtkitError:
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(override=st.tuples(KEYS, st.sampled_from(["1", "-1", "nan", "inf", "[]", "{}", "x", "null", "[1, 2]",
                                                  "{a: 1}", "1e-4", "true", ": :", "[", "'"])))
def test_fuzz_cli_show_exits_0_or_2_without_traceback(override, tmp_path_factory, capsys):
    recipe_file = _recipe_file(tmp_path_factory.mktemp("fuzz"))
    code, _, err = run_cli(["show", str(recipe_file), "-o", f"{override[0]}={override[1]}"], capsys)
    assert code in (0, 2) and "Traceback" not in err, (override, err)
    if code == 0:
        load_recipe(recipe_file, [f"{override[0]}={override[1]}"])


def test_a_cache_or_folder_that_refuses_writes_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only cache that lacks a dataset (Errno 30 where prepare writes it), or a full output disk: one line
    naming the folder and the fix, exit 2, no traceback (before: an OSError traceback)."""
    import errno

    import mtkit.api

    recipe_file = _recipe_file(tmp_path)
    cache = Path(os.environ["MTKIT_CACHE"])

    def refuse(path, code):
        def raising(*args, **kwargs):
            raise OSError(code, os.strerror(code), str(path))
        return raising

    monkeypatch.setattr(mtkit.api, "prepare_recipe", refuse(cache / "synthetic", errno.EROFS))
    code, _, err = run_cli(["prepare", str(recipe_file)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"cannot write {cache / 'synthetic'} (Read-only file system)" in " ".join(err.split())
    assert "MTKIT_CACHE" in err
    monkeypatch.setattr(mtkit.api, "prepare_recipe", refuse(tmp_path / "out" / "x.json", errno.ENOSPC))
    code, _, err = run_cli(["prepare", str(recipe_file)], capsys)
    assert code == 2 and "No space left on device" in err and "--out or output_dir" in err


# ------------------------------------------------------------------ the input classes the first fuzzing missed

def _paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a recipe's data (list elements by index)."""
    out = [prefix] if prefix else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in children:
        out += _paths(v, (*prefix, str(k)))
    return out


RECIPE_PATHS = _paths(tiny_recipe())
OVERRIDE_PATHS = st.builds(
    lambda base, extra: ".".join((*base, *extra)),
    st.sampled_from(RECIPE_PATHS),
    st.lists(st.one_of(st.sampled_from(["0", "1", "-1", "9", "x", "name", "height", "options"]),
                       st.text("abc.0", min_size=0, max_size=3)), max_size=2))


@settings(max_examples=200, deadline=None)
@given(path=OVERRIDE_PATHS, value=st.sampled_from(["1", "0.5", "x", "[]", "{}", "[1, 2]", "{a: 1}", "null", "-3",
                                                   "nan", "inf", "'../x'", "/abs", "é"]))
def test_fuzz_overrides_through_lists_scalars_and_missing_keys(path, value):
    """Override paths built from the recipe's own structure, continued through list elements, scalar values and
    keys that do not exist: a recipe or one MtkitError, never another exception (the class behind
    ``-o robustness.epsilons.0.x=1``)."""
    try:
        validate(apply_overrides(tiny_recipe(), [f"{path}={value}"]))
    except MtkitError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.one_of(st.binary(max_size=200), st.text(max_size=80).map(lambda t: t.encode("utf-16")),
                      st.sampled_from([b"name: \xe9t\xe9\n", b"\xff\xfe\x00", b"extends: [", b"- 1\n- 2\n", b""])))
def test_fuzz_arbitrary_bytes_as_a_recipe_file(blob, tmp_path_factory, capsys):
    """Any bytes as a recipe file: `mtkit show` exits 2 with one error line naming the file, or 0 for a valid
    recipe; never a traceback (the class behind a Latin-1 recipe's UnicodeDecodeError)."""
    path = tmp_path_factory.mktemp("bytes") / "r.yaml"
    path.write_bytes(blob)
    code, _, err = run_cli(["show", str(path)], capsys)
    assert code in (0, 2) and "Traceback" not in err, (blob, err)
    if code == 2:
        assert str(path) in " ".join(err.split()) or "r.yaml" in err, err


NAMES = st.one_of(st.text(st.sampled_from("ab./\\\\~ .-_"), min_size=0, max_size=8),
                  st.sampled_from(["..", ".", "/", "/abs/path", "../../escape", "a/b", "a\\\\b", "~", " ", "ok-name"]))


@settings(max_examples=150, deadline=None)
@given(name=NAMES, model=NAMES)
def test_fuzz_names_with_separators_dots_and_absolute_paths_stay_inside_the_output_folder(name, model):
    """A recipe name or a model name with separators, '..', an absolute path or nothing: refused with one
    MtkitError, or accepted as a plain name whose folders stay inside output_dir."""
    from mtkit.pipeline.runner import run_folder

    data = tiny_recipe(name=name)
    data["models"][0]["name"] = model
    try:
        recipe = validate(data)
    except MtkitError:
        return
    out = Path("/runs-root")
    recipe.output_dir = str(out)
    folder = run_folder(recipe)
    assert folder.parent == out and os.path.normpath(folder) == str(folder), folder
    for spec in recipe.models:
        assert "/" not in spec.name and "\\\\" not in spec.name and spec.name not in ("", ".", ".."), spec.name


def test_a_symlinked_recipe_and_output_folder_are_followed_and_shown_resolved(tmp_path, capsys):
    """A recipe reached through a symlink loads (``extends`` relative to the real file's folder), and an output
    folder that is a symlink is written through: `mtkit run --plan` and `show` work, no traceback."""
    real = tmp_path / "real"
    real.mkdir()
    recipe_file = _recipe_file(real)
    link = tmp_path / "link.yaml"
    link.symlink_to(recipe_file)
    code, out, err = run_cli(["show", str(link)], capsys)
    assert code == 0 and "Traceback" not in err and '"name"' in out
    target = tmp_path / "out-real"
    target.mkdir()
    (tmp_path / "out-link").symlink_to(target)
    from mtkit.core.io import ensure_writable_dir

    assert ensure_writable_dir(tmp_path / "out-link" / "run") == tmp_path / "out-link" / "run"
