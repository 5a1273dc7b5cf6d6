from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from support import ROOT, run_cli, tiny_recipe

from mtkit.core.errors import RecipeError
from mtkit.recipe.load import apply_overrides, load_recipe, validate


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_paper_and_quickstart_recipes_validate():
    paper = load_recipe(ROOT / "recipes" / "paper.yaml")
    assert paper.model.backbone == "resnet18"
    assert (paper.train.lr, paper.train.lr_drop_epochs, paper.train.epochs) == (1e-4, [30], 40)
    assert (paper.train.batch_size, paper.train.seg_batch_size, paper.train.depth_batch_size) == (12, 6, 6)
    lams = sorted(m.lam for m in paper.models if "depth" in m.tasks)
    assert lams == [0.1, 0.2, 0.3, 0.5, 0.6, 0.9]
    assert paper.robustness.epsilons == [0.25, 0.5, 1, 2, 4, 8, 16]
    assert (paper.data.segmentation.height, paper.data.segmentation.width) == (192, 640)
    base = load_recipe(ROOT / "recipes" / "synthetic.yaml")
    assert base.data.segmentation.name == "synthetic"
    assert base.loss.ssim_alpha == 0.85 and base.train.seg_batch_size == 6  # inherited from paper.yaml
    quick = load_recipe(ROOT / "recipes" / "quickstart.yaml")  # synthetic.yaml at a third of its FLOPs
    assert quick.loss.ssim_alpha == 0.85 and quick.robustness.epsilons == paper.robustness.epsilons
    assert (quick.train.seg_batch_size, quick.train.depth_batch_size, quick.data.eval["CS"].height) == (3, 3, 48)
    for name in ("detection", "targeted", "quickstart-seeds"):  # the studies keep the models they were measured on
        study = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        assert (study.train.batch_size, study.train.lr, study.model.pretrained) == (12, 5e-4, False)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.lrr", 1, r"unknown key 'train.lrr'; did you mean 'lr'\?"),
        ("train.lr", "fast", r"key 'train.lr': Input should be a valid number"),
        ("robustness.epsilons", [], r"key 'robustness.epsilons': the ε list is empty"),
        ("robustness.epsilons", [-1, 2], r"ε must be positive"),
        ("models", [{"name": "x", "tasks": ["depth"]}], r"key 'models.0.tasks'"),
    ],
)
def test_validation_errors_name_the_key_path(tmp_path, key, value, message):
    data = apply_overrides(tiny_recipe(), [])
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    path = write(tmp_path / "r.yaml", data)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_missing_required_key(tmp_path):
    data = tiny_recipe()
    del data["data"]["segmentation_val"]
    with pytest.raises(RecipeError, match="missing required key 'data.segmentation_val'"):
        load_recipe(write(tmp_path / "r.yaml", data))


def test_extends_merges_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", tiny_recipe())
    write(tmp_path / "child.yaml", {"extends": "base.yaml", "name": "child", "train": {"epochs": 3},
                                    "models": [{"name": "only", "tasks": ["segmentation"]}]})
    r = load_recipe(tmp_path / "child.yaml", ["train.lr=1e-3", "models.0.name=renamed", "data.augment.hflip=false"])
    assert r.name == "child"
    assert r.train.epochs == 3  # child wins
    assert r.train.steps_per_epoch == 2  # merged from base
    assert r.train.lr == pytest.approx(1e-3)  # override, "1e-3" parsed as a number
    assert [m.name for m in r.models] == ["renamed"]  # lists are replaced, then overridden by index
    assert r.data.augment.hflip is False


def test_extends_cycle_and_bad_override(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path / "ok.yaml", tiny_recipe())
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(tmp_path / "ok.yaml", ["train.lr"])
    with pytest.raises(RecipeError, match="list index"):
        load_recipe(tmp_path / "ok.yaml", ["models.7.name=x"])


def test_depth_model_needs_depth_data():
    data = tiny_recipe()
    del data["data"]["depth"]
    with pytest.raises(RecipeError, match="data.depth is not set"):
        validate(data)


def test_cli_recipe_error_is_one_line_exit_2(tmp_path, capsys):
    path = write(tmp_path / "r.yaml", tiny_recipe())
    # the real entry point, in a process of its own: one line, exit 2, no traceback
    out = subprocess.run([sys.executable, "-m", "mtkit", "show", str(path), "-o", "train.epochz=2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown key 'train.epochz'; did you mean 'epochs'?" in out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(RecipeError, match="train.epochz"):  # --debug: the exception goes up, traceback and all
        run_cli(["--debug", "show", str(path), "-o", "train.epochz=2"], capsys)


def test_cli_version_and_missing_dataset_message(tmp_path, capsys, monkeypatch):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and "mtkit" in out
    for var in ("CITYSCAPES_ROOT", "KITTI_ROOT", "KITTI2015_ROOT"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run_cli(["run", str(ROOT / "recipes" / "paper.yaml"), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert "CITYSCAPES_ROOT" in err and "KITTI_ROOT" in err and "quickstart.yaml" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("over, fragment", [
    ({"name": "../../escape"}, "not a plain name"), ({"name": "/abs/path"}, "not a plain name"),
    ({"name": ""}, "not a plain name"), ({"name": ".."}, "not a plain name"),
    ({"models.0.name": "../x"}, "not a plain name"), ({"models.0.name": ""}, "not a plain name"),
    ({"robustness.epsilons": [4.0, 4.0]}, "listed more than once"), ({"train.lr": float("inf")}, "finite"),
    ({"train.lr": float("nan")}, "finite"), ({"seeds": []}, "at least 1"), ({"device": "gpu"}, "not a device"),
])
def test_recipes_refuse_names_that_leave_their_folder_and_values_that_mean_nothing(tmp_path, capsys, over, fragment):
    """Each refused when the recipe loads, by `mtkit show` as by `mtkit run`: a one-line error, exit code 2."""
    data = tiny_recipe()
    for key, value in over.items():
        node, parts = data, key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["show", str(path)], capsys)
    assert code == 2 and fragment in " ".join(err.split()) and "Traceback" not in err, err


def test_overrides_through_values_files_that_are_not_recipes_and_missing_parents_are_explained(tmp_path, capsys):
    path = write(tmp_path / "r.yaml", tiny_recipe())
    code, _, err = run_cli(["show", str(path), "-o", "robustness.epsilons.0.x=1"], capsys)
    assert code == 2 and "'robustness.epsilons.0' is the value 1.0, not a mapping" in " ".join(err.split())
    code, _, err = run_cli(["show", str(path), "-o", "name.sub=1"], capsys)  # a mapping where a name belongs
    assert code == 2 and "key 'name': Input should be a valid string" in " ".join(err.split())
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(yaml.safe_dump(tiny_recipe(description="Straße"), allow_unicode=True).encode("latin-1"))
    code, _, err = run_cli(["show", str(latin)], capsys)
    assert code == 2 and "not UTF-8 text" in err and "Traceback" not in err
    code, _, err = run_cli(["show", str(tmp_path)], capsys)
    assert code == 2 and "is a folder, not a recipe file" in " ".join(err.split())
    child = tmp_path / "child.yaml"
    child.write_text("extends: missing-parent.yaml\nname: child\n")
    code, _, err = run_cli(["show", str(child)], capsys)
    assert code == 2 and "child.yaml: extends 'missing-parent.yaml'" in " ".join(err.split())
