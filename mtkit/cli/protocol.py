"""The protocol's commands: list, show, run (and its --plan), prepare, train."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ..core.progress import hms
from .common import console, override_opt, parse_seeds, parse_unit, recipe_from, warn_plugin_failures


@click.command("list")
@click.argument("what", required=False, metavar="[KIND|NAME]")
@click.option("--json", "as_json", is_flag=True, help="every entry in full as JSON, for scripts")
def list_cmd(what: str | None, as_json: bool) -> None:
    """List the registry: one line per entry (name, kind, origin, summary), never cut, so `mtkit list | grep`
    finds every name. KIND (backbone, head, loss, perturbation, dataset, task, model, detector) lists one kind;
    NAME shows that entry's whole description and its options."""
    from ..core.errors import MtkitError, did_you_mean
    from ..core.registry import KINDS
    from ..plugins.manager import entry_details, get_registry

    reg = get_registry()
    if what is None or what in KINDS:
        entries = [e for e in reg if what is None or e.kind == what]
        if as_json:
            click.echo(json.dumps([entry_details(e) for e in entries], indent=1, default=str))
        else:
            width = max((len(e.name) for e in entries), default=0)
            origin = max((len(e.origin) for e in entries), default=0)
            for e in entries:
                click.echo(f"{e.name:<{width}}  {e.kind:<12}  {e.origin:<{origin}}  {e.doc}".rstrip())
    else:
        entries = [e for e in reg if e.name == what]
        if not entries:
            names = sorted({e.name for e in reg})
            raise MtkitError(f"'{what}' is neither a registry kind ({', '.join(KINDS)}) nor an entry's name"
                             f"{did_you_mean(what, names, cutoff=0.5)}; `mtkit list` shows every entry")
        if as_json:
            click.echo(json.dumps([entry_details(e) for e in entries], indent=1, default=str))
        for e in [] if as_json else entries:
            _print_entry(entry_details(e))
    warn_plugin_failures()


def _print_entry(d: dict) -> None:
    console.print(f"[bold]{escape(d['name'])}[/bold] ({d['kind']}, {escape(d['origin'])})", soft_wrap=True)
    click.echo("")
    click.echo(d["description"] or "(no description)")
    if d.get("epsilon"):
        click.echo(f"\nε: {d['epsilon']}")
    if d["options"]:
        table = Table(title="options", show_lines=False)
        for col in ("option", "type", "default", "description"):
            table.add_column(col, overflow="fold")
        for o in d["options"]:
            table.add_row(o["name"], escape(o["type"]), "(required)" if o["required"] else escape(repr(o["default"])),
                          escape(o["description"]))
        console.print(table)
    click.echo("")


@click.command()
@click.argument("recipe", type=click.Path())
@override_opt
def show(recipe: str, overrides: tuple[str, ...]) -> None:
    """Print RECIPE resolved (extends and overrides applied) and validated, as JSON."""
    warn_plugin_failures()
    console.print_json(json.dumps(recipe_from(recipe, overrides).to_dict()))


def print_plan(rows, recipe, jobs: int) -> None:
    """The projection of ``mtkit run --plan``: a row per stage, the total, and with --jobs the ideal overlap."""
    from ..core.runtime import resolve_device

    table = Table(title=f"projected run of {recipe.name} on {resolve_device(recipe.device)}")
    for col in ("stage", "measured unit", "seconds per unit", "GFLOP per unit", "units", "projected"):
        table.add_column(col)
    for row in rows:
        table.add_row(row.stage, row.unit, f"{row.seconds_per_unit:.3f}", f"{row.flops_per_unit / 1e9:.3g}",
                      str(row.units), hms(row.seconds))
    total = sum(row.seconds for row in rows)
    console.print(table)
    flops = sum(row.flops for row in rows)
    console.print(f"total: {hms(total)} in one process, {flops / 1e12:.3g} TFLOP (matmuls and convolutions, "
                  "torch.utils.flop_counter: the same on every machine)")
    if jobs > 1:  # the longest (model, seed) chain bounds what N processes can overlap
        chains: dict[str, float] = {}
        for row in rows:
            chains[row.model] = chains.get(row.model, 0.0) + row.seconds / max(len(recipe.run_seeds()), 1)
        console.print(f"with --jobs {jobs}: about {hms(max(total / jobs, max(chains.values())))} if {jobs} "
                      "processes share the device without slowing each other (an upper bound of the gain)")


@click.command()
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
                   "stage's projected time and FLOPs and the total, and stop")
@click.option("--no-projection", is_flag=True,
              help="start at once, without the projected time of the stages to run (a few seconds measured)")
@click.option("--unit", "units", multiple=True, hidden=True, metavar="MODEL:SEED",
              help="run only this (model, seed) unit's stages, no report (what each job runs)")
@click.option("--launcher", type=click.Choice(["local", "slurm"]),
              help="where the units run: this machine (--jobs at once) or a SLURM job array, both through "
                   "submitit (default: the recipe's launcher.kind, local)")
@click.option("--slurm-partition", help="SLURM partition (launcher.slurm_partition)")
@click.option("--slurm-account", help="SLURM account (launcher.slurm_account)")
@click.option("--slurm-gpus-per-job", type=click.IntRange(min=0), help="GPUs of each job (launcher.slurm_gpus_per_job)")
@click.option("--slurm-time", help="each job's time limit, minutes or D-HH:MM:SS (launcher.slurm_time)")
@click.option("--slurm-extra", multiple=True, metavar="KEY=VALUE",
              help="a further sbatch option, e.g. constraint=a100 (launcher.slurm_extra; repeatable)")
@click.option("--detach", is_flag=True, help="with --launcher slurm: submit and exit; the same mtkit run collects")
def run(recipe: str, overrides: tuple[str, ...], force: bool, seeds: str | None, out_dir: str | None,
        skip_bad: bool, no_progress: bool, jobs: int, plan_only: bool, no_projection: bool, units: tuple[str, ...],
        launcher: str | None, slurm_partition: str | None, slurm_account: str | None,
        slurm_gpus_per_job: int | None, slurm_time: str | None, slurm_extra: tuple[str, ...], detach: bool) -> None:
    """Run the whole protocol of RECIPE: train, evaluate, sweep perturbations, report."""
    from .. import api
    from ..core.io import ensure_writable_dir
    from ..pipeline.runner import run_folder
    from ..report import depth_table, rich_tables

    given = {"kind": launcher, "slurm_partition": slurm_partition, "slurm_account": slurm_account,
             "slurm_gpus_per_job": slurm_gpus_per_job, "slurm_time": slurm_time}
    launch = [f"launcher.{k}={v}" for k, v in given.items() if v is not None]
    for item in slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"'{item}' is not KEY=VALUE (e.g. constraint=a100)", param_hint="--slurm-extra")
        launch.append(f"launcher.slurm_extra.{key.strip()}={value}")
    r = recipe_from(recipe, (*overrides, *launch))
    if plan_only:
        print_plan(api.plan(r, log=lambda m: console.print(m, markup=False)), r, jobs)
        return
    ensure_writable_dir(out_dir or run_folder(r), "run folder")
    warn_plugin_failures()
    res = api.run(r, force=force, seeds=parse_seeds(seeds), progress=not no_progress, run_dir=out_dir,
                  log=lambda m: console.print(m, markup=False), skip_bad=skip_bad, jobs=jobs,
                  units=[parse_unit(u) for u in units] or None, detach=detach, project=not no_projection)
    if res.detached:
        return
    if units:
        console.print(f"unit {', '.join(units)}: stages run: {len(res.stages_run)}, cached: {len(res.stages_cached)}")
        return
    if not res.paths:  # a torchrun rank other than 0: rank 0 writes the report and prints
        return
    for t in [*rich_tables(res.results), *depth_table(res.results)]:
        console.print(t)
    console.print(f"stages run: {len(res.stages_run)}, cached: {len(res.stages_cached)}, "
                  f"{res.results.seconds:.0f} s")
    console.print(f"report: {res.paths['report']}")


@click.command()
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
    from .. import api

    r = recipe_from(recipe, overrides)
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


@click.command()
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
    from .. import api
    from ..core.io import ensure_writable_dir

    r = recipe_from(recipe, overrides)
    specs = [m.name for m in r.models] if model_name is None else [model_name]
    base = Path(out_dir) if out_dir else Path(r.output_dir) / r.name / "train"
    folders = {name: base / name if (model_name is None or out_dir is None) else base for name in specs}
    for folder in folders.values():
        ensure_writable_dir(folder, "checkpoint folder")
    for name, folder in folders.items():
        res = api.train(r, name, folder, seed=seed, resume=resume, progress=not no_progress, overwrite=overwrite)
        console.print(f"{name}: {res.steps} steps, val mIoU {100 * res.val_miou:.1f} % "
                      f"(best {100 * res.best_val_miou:.1f} %), checkpoints in {res.run_dir}")


