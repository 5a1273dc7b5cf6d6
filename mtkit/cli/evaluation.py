"""The evaluation commands: eval (robustness of checkpoints and external networks), eval-depth, export."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.errors import MtkitError
from .common import console, override_opt, parse_numbers, recipe_from


@click.command("eval")
@click.argument("recipe", type=click.Path())
@override_opt
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(),
              help="a trained mtkit checkpoint (repeatable)")
@click.option("--model-factory", help="an external network: package.module:function (or a registered model) that "
              "returns an nn.Module mapping images to per-pixel logits")
@click.option("--model-kwargs", help="JSON object of keyword arguments for the factory")
@click.option("--weights", type=click.Path(), help="state dict for the factory's model (weights_only load)")
@click.option("--name", "model_name", help="the external model's name in the report (default: the function's)")
@click.option("--input-range", type=click.Choice(["gray", "unit"]), default="gray", show_default=True,
              help="what the external model expects: gray values 0..255 or [0, 1]")
@click.option("--mean", help="comma-separated per-channel mean in that range (with --std)")
@click.option("--std", help="comma-separated per-channel standard deviation in that range")
@click.option("--output-key", help="key of the logits in a dict output (default: out)")
@click.option("--class-map", help="comma-separated model channel of each dataset class")
@click.option("--no-gradient", type=click.Choice(["error", "noise-only"]), default="error", show_default=True,
              help="a model without a gradient path: stop, or evaluate the noise types only")
@click.option("--perturbation", "perturbations", multiple=True, help="perturbation name (repeatable)")
@click.option("--eps", help="comma-separated ε values in gray values")
@click.option("--dataset", "datasets", multiple=True, help="key of data.eval (repeatable)")
@click.option("--save-predictions", "predictions", type=click.Path(), help="write per-image predictions at the "
              "original resolution to DIR/<model>/<dataset>/<condition>/<format>/ (Cityscapes benchmark names)")
@click.option("--save-at", "conditions", multiple=True, help="with --save-predictions: 'clean' (the default) or "
              "'<perturbation>@<ε>', e.g. fgsm@4 (repeatable)")
@click.option("--save-format", "formats", multiple=True, type=click.Choice(["labelIds", "trainIds", "color"]),
              help="with --save-predictions: labelIds (the default, what the benchmark reads), trainIds, color "
              "(repeatable)")
@click.option("--label-resolution", type=click.Choice(["recipe", "original"]), help="score at the recipe's size "
              "(the paper's protocol) or against the full-resolution labels (the benchmark's); default: the recipe's")
@click.option("--out", "out_dir", type=click.Path(), default="runs/eval", show_default=True)
@click.option("--no-progress", is_flag=True)
def eval_cmd(recipe: str, overrides: tuple[str, ...], checkpoints: tuple[str, ...], model_factory: str | None,
             model_kwargs: str | None, weights: str | None, model_name: str | None, input_range: str,
             mean: str | None, std: str | None, output_key: str | None, class_map: str | None, no_gradient: str,
             perturbations: tuple[str, ...], eps: str | None, datasets: tuple[str, ...], predictions: str | None,
             conditions: tuple[str, ...], formats: tuple[str, ...], label_resolution: str | None, out_dir: str,
             no_progress: bool) -> None:
    """Evaluate the robustness of mtkit checkpoints and/or an external network (--model-factory) on RECIPE's
    evaluation sets, side by side; writes JSON, CSV, tables, plots, and with --save-predictions the per-image
    predictions for the Cityscapes benchmark's scripts."""
    from .. import api
    from ..core.io import ensure_writable_dir
    from ..core.runtime import current_dist
    from ..report import rich_tables, save_report

    if not checkpoints and not model_factory:
        raise MtkitError("nothing to evaluate: give --checkpoint PATH (mtkit models) and/or --model-factory "
                         "package.module:function (an external network)")
    if (conditions or formats) and not predictions:
        raise MtkitError("--save-at and --save-format go with --save-predictions DIR")
    extra = []  # as recipe overrides, validated together (a condition names a perturbation of the sweep)
    if perturbations:
        extra.append(f"robustness.perturbations={json.dumps(list(perturbations))}")
    if predictions:
        ensure_writable_dir(predictions, "--save-predictions folder")
        extra.append(f"robustness.predictions.folder={json.dumps(str(predictions))}")
        extra += [f"robustness.predictions.{k}={json.dumps(list(v))}" for k, v in (("conditions", conditions),
                                                                                 ("formats", formats)) if v]
    if label_resolution:
        extra.append(f"robustness.label_resolution={label_resolution}")
    r = recipe_from(recipe, (*overrides, *extra))
    ensure_writable_dir(out_dir)
    common = dict(perturbations=None, epsilons=parse_numbers(eps), datasets=list(datasets) or None,
                  progress=not no_progress)
    res = api.evaluate(r, list(checkpoints), **common) if checkpoints else None
    if model_factory:
        model = api.build_external(model_factory, model_kwargs, weights)
        try:
            inputs = api.InputSpec(range=input_range, mean=parse_numbers(mean, "--mean"),
                                   std=parse_numbers(std, "--std"))
        except ValueError as exc:
            msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
            raise MtkitError(f"--mean/--std: three numbers each, e.g. --mean 0.485,0.456,0.406 ({msg})") from None
        channels = parse_numbers(class_map, "--class-map", "0,1,2,5 (the model channel of each dataset class)", int)
        outputs = api.OutputSpec(key=output_key, class_map=channels or None)
        name = model_name or model_factory.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        ext = api.evaluate_model(model, r, name, inputs=inputs, outputs=outputs, factory=model_factory,
                                 on_no_gradient=no_gradient.replace("-", "_"), log=console.print, **common)
        res = ext if res is None else res.extend(ext)
    if not current_dist().main:  # torchrun: every rank evaluated its shard; rank 0 writes and prints
        return
    paths = save_report(res, Path(out_dir))
    for t in rich_tables(res):
        console.print(t)
    console.print(f"results: {paths['json']}")


@click.command("eval-depth")
@click.argument("recipe", type=click.Path())
@override_opt
@click.option("--checkpoint", "checkpoints", multiple=True, required=True, type=click.Path(),
              help="a trained multi-task checkpoint (repeatable)")
@click.option("--dataset", "datasets", multiple=True, help="key of data.depth_eval (repeatable; default all)")
@click.option("--skip-missing", is_flag=True, help="leave out split lines whose scan, calibration or image is "
              "missing (counted in the results) instead of stopping")
@click.option("--out", "out_dir", type=click.Path(), default="runs/eval-depth", show_default=True)
@click.option("--no-progress", is_flag=True)
def eval_depth_cmd(recipe: str, overrides: tuple[str, ...], checkpoints: tuple[str, ...], datasets: tuple[str, ...],
                   skip_missing: bool, out_dir: str, no_progress: bool) -> None:
    """Depth metrics (KITTI Eigen protocol) of multi-task checkpoints on RECIPE's data.depth_eval sets."""
    from .. import api
    from ..core.io import ensure_writable_dir
    from ..report import depth_table, save_report

    r = recipe_from(recipe, overrides)
    ensure_writable_dir(out_dir)
    res = api.evaluate_depth(r, list(checkpoints), list(datasets) or None, skip_missing, progress=not no_progress)
    paths = save_report(res, Path(out_dir))
    for t in depth_table(res):
        console.print(t)
    console.print(f"results: {paths['json']}")


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--height", type=int, default=192, show_default=True)
@click.option("--width", type=int, default=640, show_default=True)
@click.option("--static", is_flag=True, help="fix the image size to --height x --width (default: any height and "
              "width, traced at that size); the batch size stays free")
def export(checkpoint: str, output: str, height: int, width: int, static: bool) -> None:
    """Export the segmentation network of CHECKPOINT to ONNX: logits [batch, classes, height, width] for any batch
    and (unless --static) any image size; checked with onnxruntime (logits, argmax, a second batch size and a
    second size)."""
    from .. import api
    from ..core.io import ensure_writable_dir

    if Path(output).is_dir():
        raise MtkitError(f"{output} is a folder: give the ONNX file to write, e.g. {Path(output) / 'model.onnx'}")
    ensure_writable_dir(Path(output).parent, "output folder")
    path = api.export_onnx(checkpoint, output, height, width, static=static)
    from ..evaluation.export import declared_shape

    console.print(f"wrote {path}: logits {declared_shape(path)} (onnxruntime matches PyTorch)")


