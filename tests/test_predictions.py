"""Per-image predictions for the Cityscapes benchmark (``mtkit.evaluation.predictions``): written at the original
resolution under any perturbation, named as the benchmark's scripts expect, and scored by cityscapesScripts' own
evaluator equal to mtkit's mIoU at ``label_resolution: original``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from support import tiny_recipe

from mtkit import api
from mtkit.cli import main
from mtkit.core.errors import MtkitError, RecipeError
from mtkit.data import layouts, synthetic
from mtkit.evaluation.predictions import numpy_compat, official_miou, parse_condition, upsampled_argmax
from mtkit.recipe.load import validate


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    """A Cityscapes val tree at 64x128 (the recipe evaluates at half of it, 32x64)."""
    root = tmp_path_factory.mktemp("cityscapes")
    city = synthetic.generate(synthetic.SyntheticSpec("city", sequences=2, frames=2, height=64, width=128, seed=5))
    layouts.write_cityscapes(root, city, "val")
    return root


def _recipe(root, **over):
    return validate(tiny_recipe(**{
        "data.eval": {"CS": {"name": "cityscapes", "root": str(root), "split": "val", "height": 32, "width": 64}},
        "robustness.perturbations": ["gaussian", "fgsm"], "robustness.epsilons": [4.0],
        "robustness.datasets": ["CS"], "robustness.sanity.enabled": False, **over}))


def test_cityscapes_scripts_score_the_saved_predictions_as_mtkit_does(cityscapes, trained, tmp_path, capsys):
    checkpoint = tmp_path / "m.pt"
    torch.save(trained[0].checkpoint, checkpoint)
    recipe = _recipe(cityscapes)
    res = api.save_predictions(recipe, [checkpoint], tmp_path / "pred", conditions=["clean", "fgsm@4"],
                               formats=["labelIds", "color"], label_resolution="original", progress=False)
    model = res.clean[0].model
    gt = sorted((cityscapes / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    fgsm = next(r for r in res.robustness if r.perturbation == "fgsm")
    for condition, miou in (("clean", res.clean[0].miou), ("fgsm@4", fgsm.miou)):
        folder = tmp_path / "pred" / model / "CS" / condition
        preds = [folder / "labelIds" / g.name.replace("_gtFine_labelIds.png", "_pred.png") for g in gt]
        assert all(Image.open(p).size == (128, 64) for p in preds)  # the original resolution, not the recipe's
        assert len(list((folder / "color").glob("*.png"))) == len(gt)
        scores = official_miou(preds, gt)  # cityscapesScripts' evaluateImgLists, numpy 2.4 shimmed meanwhile
        assert scores["miou"] == pytest.approx(miou, abs=1e-12)
    assert not hasattr(np, "in1d") or np.__version__ < "2.4"  # the shim is taken back
    assert {p.parent.name for p in (tmp_path / "pred" / model / "CS").glob("*/labelIds")} == {"clean", "fgsm@4"}
    # at the recipe's resolution the same logits are written: the files equal; through the CLI, with trainIds
    main(["eval", str(_save(recipe, tmp_path)), "--checkpoint", str(checkpoint), "--no-progress",
          "--out", str(tmp_path / "cli"), "--save-predictions", str(tmp_path / "cli-pred"), "--save-format",
          "labelIds", "--save-format", "trainIds"])
    for g in gt:
        name = g.name.replace("_gtFine_labelIds.png", "_pred.png")
        ours = np.array(Image.open(tmp_path / "cli-pred" / model / "CS" / "clean" / "labelIds" / name))
        assert np.array_equal(ours, np.array(Image.open(tmp_path / "pred" / model / "CS" / "clean" / "labelIds" /
                                                        name)))
        train_ids = np.array(Image.open(tmp_path / "cli-pred" / model / "CS" / "clean" / "trainIds" / name))
        assert train_ids.max() < 19 and train_ids.shape == (64, 128)
    recipe_res = api.RunResults.read(tmp_path / "cli" / "results.json").clean[0].miou
    assert recipe_res != res.clean[0].miou  # nearest-resized labels at 32x64 score otherwise


def _save(recipe, folder):
    import json

    path = folder / "recipe.json"
    path.write_text(json.dumps(recipe.to_dict()))
    return path


def test_prediction_conditions_are_checked_before_any_work(cityscapes, trained):
    assert parse_condition("pgd@16") == ("pgd", 16.0) and parse_condition("clean") == ("clean", 0.0)
    with pytest.raises(RecipeError, match="'pgd@4': pgd is not one of robustness.perturbations"):
        _recipe(cityscapes, **{"robustness.predictions": {"folder": "x", "conditions": ["pgd@4"]}})
    with pytest.raises(MtkitError, match="fgsm is swept at \\[4.0\\], not at 8"):
        api.save_predictions(_recipe(cityscapes), [], "x", conditions=["fgsm@8"], model=trained[0].segmenter,
                             progress=False)
    with pytest.raises(MtkitError, match="need a dataset read from files"):  # generated data has no file names
        api.save_predictions(validate(tiny_recipe(**{"robustness.datasets": ["CS"]})), [], "x",
                             model=trained[0].segmenter, progress=False)
    with numpy_compat():
        assert np.in1d(np.array([[1, 2], [3, 4]]), [2, 3]).tolist() == [False, True, True, False]


def test_images_of_other_sizes_are_upsampled_each_to_its_own_and_padded_alike():
    """KITTI's images differ by a few pixels: each prediction is its own image's size, padded (0, void in the
    labels) to the batch's largest, so that the passes of one batch stack."""
    logits = torch.randn(2, 19, 4, 6, generator=torch.Generator().manual_seed(0))
    out = upsampled_argmax(logits, [(8, 12), (6, 10)], pad_to=(9, 13))
    assert out.shape == (2, 9, 13)
    for k, (h, w) in enumerate([(8, 12), (6, 10)]):
        want = torch.nn.functional.interpolate(logits[k:k + 1], size=(h, w), mode="bilinear", align_corners=False)
        assert torch.equal(out[k, :h, :w].long(), want.argmax(1)[0])
        assert int(out[k, h:].sum()) == 0 and int(out[k, :, w:].sum()) == 0
