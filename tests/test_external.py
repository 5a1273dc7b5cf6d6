"""Bring your own network: external segmentation models through ``api.evaluate_model`` and ``mtkit eval
--model-factory``, with untrained weights (no downloads), on the embedded synthetic data."""

from __future__ import annotations

import json
import time

import pytest
import torch
from support import tiny_recipe
from torch import nn

from mtkit import api
from mtkit.cli import main
from mtkit.core.errors import MtkitError
from mtkit.evaluation.external import ExternalSegmenter, InputSpec, OutputSpec, build_external
from mtkit.recipe.load import validate

IMAGENET = {"range": "unit", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
ALL = ["gaussian", "salt_pepper", "fgsm", "pgd", "segpgd", "mifgsm"]  # every noise type, every gradient attack


@pytest.fixture(scope="module")
def recipe():
    return validate(tiny_recipe(**{"robustness.epsilons": [2.0], "robustness.datasets": ["CS"],
                                   "robustness.options": {"pgd": {"iterations": 2}},
                                   "robustness.sanity.enabled": False}))  # the checks: tests/test_masking.py


MODELS = {  # factory, its kwargs (untrained: no downloads), the input it expects
    "deeplab": ("torchvision.models.segmentation:deeplabv3_mobilenet_v3_large",
                {"weights": None, "weights_backbone": None, "num_classes": 19}, IMAGENET),
    "unet": ("segmentation_models_pytorch:Unet", {"encoder_name": "tu-resnet18", "encoder_weights": None,
                                                  "classes": 19}, IMAGENET),
    "mtkit": ("mtkit.api:load_segmenter", {"checkpoint": "CHECKPOINT"}, {"range": "gray"}),
}


def _check(res, name: str, perts: list[str]) -> None:
    assert res.models[name].factory
    assert {r.perturbation for r in res.robustness} == {*perts, "worst_case"}  # the strongest attack per image
    assert all(0 <= r.miou <= 1 and 0 < r.epsilon_measured < 2.0 + 0.3 for r in res.robustness)  # gray values
    assert all(abs(r.epsilon_measured - 2.0) < 0.3 for r in res.robustness
               if r.perturbation in ("gaussian", "salt_pepper", "fgsm"))


@pytest.mark.parametrize("kind", list(MODELS))
def test_each_model_kind_through_the_api_and_the_cli_with_every_perturbation(kind, recipe, trained, tmp_path):
    """torchvision's DeepLabV3 (dict output), an smp U-Net with a timm encoder, and mtkit's own segmenter from a
    checkpoint: the same rows through api.evaluate_model and `mtkit eval --model-factory`."""
    checkpoint = tmp_path / "mtkit.pt"
    torch.save(trained[0].checkpoint, checkpoint)
    factory, kwargs, inputs = MODELS[kind]
    kwargs = {k: str(checkpoint) if v == "CHECKPOINT" else v for k, v in kwargs.items()}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = api.evaluate_model(build_external(factory, kwargs), recipe, kind, perturbations=ALL, inputs=inputs,
                             factory=factory, progress=False)
    print(f"{kind}: sweep of {len(ALL)} perturbations in {time.perf_counter() - t0:.1f} s")
    _check(res, kind, ALL)
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(json.dumps(recipe.to_dict()))
    torch.manual_seed(0)
    cli = ["eval", str(recipe_file), "--model-factory", factory, "--model-kwargs", json.dumps(kwargs), "--name",
           kind, "--input-range", inputs["range"], "--out", str(tmp_path / "cli"), "--no-progress"]
    if "mean" in inputs:
        cli += ["--mean", ",".join(map(str, inputs["mean"])), "--std", ",".join(map(str, inputs["std"]))]
    main(cli + [arg for p in ALL for arg in ("--perturbation", p)])
    via_cli = api.RunResults.read(tmp_path / "cli" / "results.json")
    _check(via_cli, kind, ALL)
    assert [(r.perturbation, r.miou) for r in via_cli.robustness] == [(r.perturbation, r.miou)
                                                                       for r in res.robustness]
    if kind == "mtkit":  # the factory path gives the checkpoint's own numbers
        own = api.evaluate(recipe, [checkpoint], perturbations=["fgsm"], progress=False)
        assert own.clean[0].miou == pytest.approx(res.clean[0].miou, abs=1e-12)


def test_the_adapter_upsamples_maps_classes_and_normalises():
    class Coarse(nn.Module):
        def forward(self, z):
            self.seen = z
            return {"logits": torch.arange(21.0).view(1, 21, 1, 1).expand(z.shape[0], 21, z.shape[2] // 4,
                                                                            z.shape[3] // 4)}

    inner = Coarse()
    seg = ExternalSegmenter(inner, 3, InputSpec(**IMAGENET), OutputSpec(key="logits", class_map=[20, 0, 7]))
    x = torch.full((2, 3, 8, 16), 255.0)
    out = seg(x)
    assert out.shape == (2, 3, 8, 16) and out[0, :, 5, 5].tolist() == [20.0, 0.0, 7.0]
    assert torch.allclose(inner.seen[0, :, 0, 0], (1 - torch.tensor(IMAGENET["mean"])) / torch.tensor(IMAGENET["std"]))


def test_an_external_model_and_an_mtkit_checkpoint_side_by_side_in_one_report(trained, tmp_path):
    """One `mtkit eval` with an mtkit checkpoint and an smp U-Net (timm encoder) built by its factory, with
    weights from a file: one report, one Figure 5, both models."""
    from segmentation_models_pytorch import Unet

    checkpoint = tmp_path / "mtkit.pt"
    torch.save(trained[0].checkpoint, checkpoint)
    kwargs = {"encoder_name": "tu-resnet18", "encoder_weights": None, "classes": 19}
    torch.manual_seed(0)
    weights = tmp_path / "unet.pth"
    torch.save({"state_dict": Unet(**kwargs).state_dict()}, weights)
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(json.dumps(tiny_recipe(**{"robustness.datasets": ["CS"]})))
    out = tmp_path / "eval"
    t0 = time.perf_counter()
    main(["eval", str(recipe_file), "--checkpoint", str(checkpoint), "--model-factory",
          "segmentation_models_pytorch:Unet", "--model-kwargs", json.dumps(kwargs), "--weights", str(weights),
          "--input-range", "unit", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--name", "unet",
          "--eps", "2", "--out", str(out), "--no-progress"])
    print(f"smp Unet + mtkit checkpoint sweep: {time.perf_counter() - t0:.1f} s")
    res = api.RunResults.read(out / "results.json")
    assert set(res.models) == {"single", "unet"} and res.models["unet"].factory == "segmentation_models_pytorch:Unet"
    assert {(r.model, r.perturbation) for r in res.robustness} == {
        (m, p) for m in ("single", "unet") for p in ("gaussian", "salt_pepper", "fgsm", "pgd", "worst_case")}
    report = (out / "report.md").read_text()
    assert "unet (external)" in report and (out / "figure5_robustness.png").stat().st_size > 0



def test_bad_models_get_one_line_errors(recipe, capsys):
    for spec, match in (("no_such_module_x:f", "cannot import no_such_module_x"),
                        ("torch:no_such_function", "torch has no 'no_such_function'"),
                        ("math:pi", "not callable"), ("collections:OrderedDict", "not a torch.nn.Module"),
                        ("unregistered", "package.module:function")):
        with pytest.raises(MtkitError, match=match):
            build_external(spec)
    with pytest.raises(MtkitError, match="not JSON"):
        build_external("torch.nn:Identity", "{oops")

    class Wrong(nn.Module):  # 21 VOC-style channels for a 19-class dataset
        def forward(self, x):
            return torch.zeros(x.shape[0], 21, *x.shape[-2:])

    with pytest.raises(MtkitError, match=r"output \(1, 21, 32, 64\) does not fit the labels \(1, 32, 64\) with 19"):
        api.evaluate_model(Wrong(), recipe, "wrong", perturbations=["gaussian"], progress=False)

    class Frozen(nn.Module):  # an exported model: no gradient path to the input
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 19, 1)

        def forward(self, x):
            with torch.no_grad():
                return self.conv(x)

    with pytest.raises(MtkitError, match=r"no gradient .* the attacks \['fgsm'\] need one"):
        api.evaluate_model(Frozen(), recipe, "frozen", perturbations=["gaussian", "fgsm"], progress=False)
    res = api.evaluate_model(Frozen(), recipe, "frozen", perturbations=["gaussian", "fgsm"],
                             on_no_gradient="noise_only", progress=False, log=print)
    assert {r.perturbation for r in res.robustness} == {"gaussian"}
    assert "leaving out fgsm" in capsys.readouterr().out


def test_a_plugin_registers_a_model_factory(recipe, request):
    from mtkit.plugins.manager import get_registry

    reg = get_registry()
    request.addfinalizer(lambda: reg.remove_provider("test-model-factory"))  # the entry leaves with the test
    reg.add("model", "tiny_conv", lambda num_classes=19: nn.Conv2d(3, num_classes, 3, padding=1),
            provider="test-model-factory")
    model = build_external("tiny_conv", {"num_classes": 19})
    res = api.evaluate_model(model, recipe, "tiny_conv", perturbations=["fgsm"], factory="tiny_conv", progress=False)
    assert res.models["tiny_conv"].factory == "tiny_conv" and len(res.robustness) == 1
