"""The ``mtkit`` command line: a thin layer over ``mtkit.api``.

User mistakes (bad recipe, missing dataset, unknown name) print one line and exit with code 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import MtkitError

console = Console()
err_console = Console(stderr=True)


class Context:
    debug = False


def _recipe(path: str, overrides: tuple[str, ...]):
    # imported here, like every command's work: `mtkit --help` imports neither torch nor timm nor torchvision
    from .recipe import load_recipe

    return load_recipe(path, list(overrides))


def _seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MtkitError(f"--seeds expects comma-separated integers like 0,1,2, got '{text}'") from None


def _hms(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min {s:02d} s"


def _print_plan(rows, recipe, jobs: int) -> None:
    """The projection of ``mtkit run --plan``: a row per stage, the total, and with --jobs the ideal overlap."""
    from .runtime import resolve_device

    table = Table(title=f"projected run of {recipe.name} on {resolve_device(recipe.device)}")
    for col in ("stage", "measured unit", "seconds per unit", "units", "projected"):
        table.add_column(col)
    for row in rows:
        table.add_row(row.stage, row.unit, f"{row.seconds_per_unit:.3f}", str(row.units), _hms(row.seconds))
    total = sum(row.seconds for row in rows)
    console.print(table)
    console.print(f"total: {_hms(total)} in one process")
    if jobs > 1:  # the longest (model, seed) chain bounds what N processes can overlap
        chains: dict[str, float] = {}
        for row in rows:
            chains[row.model] = chains.get(row.model, 0.0) + row.seconds / max(len(recipe.run_seeds()), 1)
        console.print(f"with --jobs {jobs}: about {_hms(max(total / jobs, max(chains.values())))} if {jobs} "
                      "processes share the device without slowing each other (an upper bound of the gain)")


def _unit(text: str) -> tuple[str, int]:
    name, _, seed = text.rpartition(":")
    try:
        return name, int(seed)
    except ValueError:
        raise MtkitError(f"--unit expects MODEL:SEED, e.g. multi-0.1:0, got '{text}'") from None


def _floats(text: str | None, option: str = "--eps", example: str = "0.25,1,4", kind=float) -> list | None:
    if text is None:
        return None
    try:
        return [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise MtkitError(f"{option} expects comma-separated {what} like {example}, got '{text}'") from None


override_opt = click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
                            help="override a recipe key, e.g. -o train.lr=1e-4 (repeatable)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtkit")
@click.option("--debug", is_flag=True, help="show tracebacks for errors")
def cli(debug: bool) -> None:
    """mtkit: robust semantic segmentation by multi-task training with self-supervised depth."""
    Context.debug = debug


@cli.command("list")
@click.argument("kind", required=False)
def list_cmd(kind: str | None) -> None:
    """List registered backbones, heads, losses, perturbations, datasets, tasks and metrics."""
    from .plugins import list_entries

    table = Table(title="mtkit registry")
    for col in ("name", "kind", "origin", "description"):
        table.add_column(col)
    for e in list_entries(kind):
        table.add_row(e["name"], e["kind"], e["origin"], e["doc"])
    console.print(table)
    _warn_plugin_failures()


@cli.command()
@click.argument("recipe", type=click.Path())
@override_opt
@click.option("--force", is_flag=True, help="rerun every stage, ignoring cached results")
@click.option("--seeds", help="comma-separated seeds to repeat the run with, e.g. 0,1,2")
@click.option("--out", "out_dir", type=click.Path(), help="run folder (default <output_dir>/<name>)")
@click.option("--skip-bad", is_flag=True, help="prepare: leave out unreadable source files instead of stopping")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="run up to N independent (model, seed) units at once, each in a process of its own (several "
                   "models on one GPU, or one GPU each where there are several); results equal --jobs 1")
@click.option("--plan", "plan_only", is_flag=True,
              help="measure a few training steps and one batch of every other stage on this device, print each "
                   "stage's projected time and the total, and stop")
@click.option("--unit", "units", multiple=True, hidden=True, metavar="MODEL:SEED",
              help="run only this (model, seed) unit's stages, no report (what each --jobs process runs)")
def run(recipe: str, overrides: tuple[str, ...], force: bool, seeds: str | None, out_dir: str | None,
        skip_bad: bool, no_progress: bool, jobs: int, plan_only: bool, units: tuple[str, ...]) -> None:
    """Run the whole protocol of RECIPE: train, evaluate, sweep perturbations, report."""
    from . import api
    from .io import ensure_writable_dir
    from .pipeline import run_folder
    from .report import depth_table, rich_tables

    r = _recipe(recipe, overrides)
    if plan_only:
        _print_plan(api.plan(r, log=lambda m: console.print(m, markup=False)), r, jobs)
        return
    ensure_writable_dir(out_dir or run_folder(r), "run folder")
    _warn_plugin_failures()
    res = api.run(r, force=force, seeds=_seeds(seeds), progress=not no_progress, run_dir=out_dir,
                  log=lambda m: console.print(m, markup=False), skip_bad=skip_bad, jobs=jobs,
                  units=[_unit(u) for u in units] or None)
    if units:
        console.print(f"unit {', '.join(units)}: stages run: {len(res.stages_run)}, cached: {len(res.stages_cached)}")
        return
    for t in [*rich_tables(res.results), *depth_table(res.results)]:
        console.print(t)
    console.print(f"stages run: {len(res.stages_run)}, cached: {len(res.stages_cached)}, "
                  f"{res.results.seconds:.0f} s")
    console.print(f"report: {res.paths['report']}")


@cli.command()
@click.argument("recipe", type=click.Path())
@override_opt
@click.option("--workers", type=int, help="decoding processes (default data.num_workers, or one per core)")
@click.option("--skip-bad", is_flag=True, help="leave out unreadable source files (counted in the manifest) "
              "instead of stopping")
@click.option("--force", is_flag=True, help="prepare again even where the cache is up to date")
@click.option("--verify", is_flag=True, help="check every cached item against its checksum (opening a folder "
                                            "checks shapes and a sample); a damaged folder is prepared again")
@click.option("--no-progress", is_flag=True)
def prepare(recipe: str, overrides: tuple[str, ...], workers: int | None, skip_bad: bool, force: bool,
            verify: bool, no_progress: bool) -> None:
    """Decode RECIPE's datasets once into the prepared cache (the first stage of run; train and eval read it)."""
    from . import api

    r = _recipe(recipe, overrides)
    table = Table(title="prepared datasets")
    for col in ("dataset", "samples", "size", "skipped", "images/s", "state", "folder"):
        table.add_column(col)
    for p in api.prepare(r, workers=workers, skip_bad=skip_bad, force=force, progress=not no_progress,
                         log=lambda m: console.print(m, markup=False), verify=verify):
        m = p.manifest
        table.add_row(p.key, str(m.count), f"{m.size[1]}x{m.size[0]}", str(len(m.skipped)),
                      "" if p.cached else f"{m.images_per_s:.0f}",
                      (f"cached ({p.reason})" if p.reason == "verified" else "cached") if p.cached
                      else f"prepared ({p.reason})",
                      escape(str(p.folder)))
    console.print(table)


@cli.command()
@click.argument("recipe", type=click.Path())
@override_opt
@click.option("--model", "model_name", help="which model of the recipe (default: all, one after the other)")
@click.option("--seed", type=int, help="seed (default: the recipe's)")
@click.option("--out", "out_dir", type=click.Path(), help="folder for checkpoints (default <output_dir>/<name>/train)")
@click.option("--resume", is_flag=True, help="continue from the folder's last.pt")
@click.option("--overwrite", is_flag=True, help="start again in a folder that holds a model (its files are kept in "
              "previous-<time>/)")
@click.option("--no-progress", is_flag=True)
def train(recipe: str, overrides: tuple[str, ...], model_name: str | None, seed: int | None, out_dir: str | None,
          resume: bool, overwrite: bool, no_progress: bool) -> None:
    """Train the models of RECIPE (torchrun --nproc_per_node N -m mtkit train ... for DDP)."""
    from . import api
    from .io import ensure_writable_dir

    r = _recipe(recipe, overrides)
    specs = [m.name for m in r.models] if model_name is None else [model_name]
    base = Path(out_dir) if out_dir else Path(r.output_dir) / r.name / "train"
    folders = {name: base / name if (model_name is None or out_dir is None) else base for name in specs}
    for folder in folders.values():
        ensure_writable_dir(folder, "checkpoint folder")
    for name, folder in folders.items():
        res = api.train(r, name, folder, seed=seed, resume=resume, progress=not no_progress, overwrite=overwrite)
        console.print(f"{name}: {res.steps} steps, val mIoU {100 * res.val_miou:.1f} % "
                      f"(best {100 * res.best_val_miou:.1f} %), checkpoints in {res.run_dir}")


@cli.command("eval")
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
@click.option("--out", "out_dir", type=click.Path(), default="runs/eval", show_default=True)
@click.option("--no-progress", is_flag=True)
def eval_cmd(recipe: str, overrides: tuple[str, ...], checkpoints: tuple[str, ...], model_factory: str | None,
             model_kwargs: str | None, weights: str | None, model_name: str | None, input_range: str,
             mean: str | None, std: str | None, output_key: str | None, class_map: str | None, no_gradient: str,
             perturbations: tuple[str, ...], eps: str | None, datasets: tuple[str, ...], out_dir: str,
             no_progress: bool) -> None:
    """Evaluate the robustness of mtkit checkpoints and/or an external network (--model-factory) on RECIPE's
    evaluation sets, side by side; writes JSON, CSV, tables, plots."""
    from . import api
    from .io import ensure_writable_dir
    from .report import rich_tables, save_report
    from .runtime import current_dist

    if not checkpoints and not model_factory:
        raise MtkitError("nothing to evaluate: give --checkpoint PATH (mtkit models) and/or --model-factory "
                         "package.module:function (an external network)")
    r = _recipe(recipe, overrides)
    ensure_writable_dir(out_dir)
    common = dict(perturbations=list(perturbations) or None, epsilons=_floats(eps), datasets=list(datasets) or None,
                  progress=not no_progress)
    res = api.evaluate(r, list(checkpoints), **common) if checkpoints else None
    if model_factory:
        model = api.build_external(model_factory, model_kwargs, weights)
        try:
            inputs = api.InputSpec(range=input_range, mean=_floats(mean, "--mean"), std=_floats(std, "--std"))
        except ValueError as exc:
            msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
            raise MtkitError(f"--mean/--std: three numbers each, e.g. --mean 0.485,0.456,0.406 ({msg})") from None
        channels = _floats(class_map, "--class-map", "0,1,2,5 (the model channel of each dataset class)", int)
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


@cli.command("eval-depth")
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
    from . import api
    from .io import ensure_writable_dir
    from .report import depth_table, save_report

    r = _recipe(recipe, overrides)
    ensure_writable_dir(out_dir)
    res = api.evaluate_depth(r, list(checkpoints), list(datasets) or None, skip_missing, progress=not no_progress)
    paths = save_report(res, Path(out_dir))
    for t in depth_table(res):
        console.print(t)
    console.print(f"results: {paths['json']}")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--height", type=int, default=192, show_default=True)
@click.option("--width", type=int, default=640, show_default=True)
def export(checkpoint: str, output: str, height: int, width: int) -> None:
    """Export the segmentation network of CHECKPOINT to ONNX (checked with onnxruntime)."""
    from . import api
    from .io import ensure_writable_dir

    ensure_writable_dir(Path(output).parent, "output folder")
    path = api.export_onnx(checkpoint, output, height, width)
    console.print(f"wrote {path} (onnxruntime matches PyTorch)")


@cli.command()
@click.option("--save", metavar="NAME", help="store this run as baseline NAME (benchmarks/baselines/NAME.json)")
@click.option("--compare", "compare_with", metavar="BASELINE", help="compare with a stored baseline (name or file)")
@click.option("--fail-over", type=float, default=10.0, show_default=True, metavar="PCT",
              help="with --compare: exit 1 when a benchmark's median is slower by more than PCT %")
@click.option("-k", "select", metavar="EXPR", help="run only the benchmarks matching this pytest -k expression")
@click.option("--path", type=click.Path(), help="the benchmarks folder (default ./benchmarks)")
@click.option("--history", type=click.Path(), help="where --save also appends the run, one folder per device "
                                                  "(default <benchmarks>/history)")
@click.option("--trend", "plot_trend", is_flag=True,
              help="plot each benchmark's fraction of the device's peak over the saved runs (a PNG per device) "
                   "and stop")
def bench(save: str | None, compare_with: str | None, fail_over: float, select: str | None,
          path: str | None, history: str | None, plot_trend: bool) -> None:
    """Run the throughput benchmarks (pytest-benchmark); save a baseline, compare with one, plot the trend."""
    from . import api
    from .bench import summary_rows

    if plot_trend:
        for png in api.trend(path, history):
            console.print(f"wrote {png}")
        return
    res = api.bench(save=save, compare_with=compare_with, fail_over=fail_over, select=select, path=path,
                    history=history)
    table = Table(title="mtkit benchmarks")
    for col in ("benchmark", "median [ms]", "throughput", "GFLOP/s", "of peak", "side by side"):
        table.add_column(col)
    for row in summary_rows(res.data):
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    if res.saved:
        console.print(f"saved baseline {res.saved}")
    if res.compared_with is not None:
        for line in res.regressions:
            console.print(f"[red]REGRESSION[/red] {escape(line)}")
        if res.regressions:
            err_console.print(f"error: {len(res.regressions)} benchmark(s) slower than {compare_with} by more than "
                              f"{fail_over:g} % (median)", style="bold red", markup=False)
            sys.exit(1)
        console.print(f"no benchmark slower than {compare_with} by more than {fail_over:g} % (median)")


@cli.command()
@click.argument("recipe", type=click.Path())
@override_opt
def show(recipe: str, overrides: tuple[str, ...]) -> None:
    """Print RECIPE resolved (extends and overrides applied) and validated, as JSON."""
    _warn_plugin_failures()
    console.print_json(json.dumps(_recipe(recipe, overrides).to_dict()))


def _warn_plugin_failures() -> None:
    """One warning per plugin that failed to load (list, show and run say it alike)."""
    from .plugins import plugin_failures

    for failure in plugin_failures():
        err_console.print(f"[yellow]warning:[/yellow] {escape(failure)}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or torchrun's stop), handled like Ctrl-C: one line, the finished work kept."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


RESUME_HINT = "finished stages and the last checkpoint are kept: the same command continues where it stopped"


def main(argv: list[str] | None = None) -> None:
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        _main(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C (and our SIGTERM) into Abort
        if isinstance(exc.__cause__, Terminated):
            err_console.print(f"terminated (SIGTERM): {RESUME_HINT}")
            sys.exit(143)
        err_console.print(f"interrupted: {RESUME_HINT}")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MtkitError as exc:
        if Context.debug:
            raise
        msg = str(exc)
        err_console.print(f"error: {msg}", style="bold red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Terminated:
        err_console.print(f"terminated (SIGTERM): {RESUME_HINT}")
        sys.exit(143)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {RESUME_HINT}")
        sys.exit(130)


if __name__ == "__main__":
    main()
