"""mtkit bench: the throughput benchmarks, their baselines, history and trend."""

from __future__ import annotations

import sys

import click
from rich.markup import escape
from rich.table import Table

from .common import console, err_console


@click.command()
@click.option("--save", metavar="NAME", help="store this run as baseline NAME (benchmarks/baselines/NAME.json, a "
              "plain name), or in FILE.json")
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
    from .. import api
    from ..bench.runner import summary_rows

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


