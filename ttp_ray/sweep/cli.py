"""``ttp-ray sweep SPEC``: the click command over :mod:`ttp_ray.sweep.driver`.

Bad specs, missing data, an unreachable ``--address`` and an output directory of another sweep are
``ValueError`` subclasses, which ``ttp_ray.cli.main`` turns into one ``error: ...`` line and exit code 2
(nothing written). SIGINT / SIGTERM end in :data:`ttp_ray.interrupts.INTERRUPTED_MESSAGE`, exit 130 / 143.
"""
from __future__ import annotations

import sys

import click

__all__ = ["sweep"]


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Output directory (default: the spec's output.dir, else runs/<name>).")
@click.option("--dry-run", is_flag=True, help="Print the plan (configs, distinct simulations, shards, actors, "
                                              "resources) and exit; needs no data and starts no Ray.")
@click.option("--address", default=None, envvar="RAY_ADDRESS", show_envvar=True,
              help="Attach to a running Ray cluster (e.g. after `ray up cluster.yaml`); default: local Ray on 127.0.0.1.")
@click.option("--fresh", is_flag=True, help="Discard the sweep tables already in --out instead of resuming.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of the local Ray (default: all).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr (units done / total with an ETA, kernel "
                                                 "phases); the summary on stdout is the same.")
def sweep(spec, out, dry_run, address, fresh, num_cpus, quiet) -> None:
    """Predict T_eps for a grid of hyper-parameters over datasets, distributed with Ray; Parquet out.

    Re-running the same SPEC into the same --out resumes: completed shards are skipped. Ctrl-C (or SIGTERM)
    keeps what is written: one line, exit code 130 (143).
    """
    from ..progress import Progress, using
    from .driver import dry_run as make_dry_run, run_sweep, summary_text
    from .spec import load_spec

    s = load_spec(spec)
    for line in s.deprecations():
        click.echo(f"note: {line}", err=True)
    if dry_run:
        click.echo(make_dry_run(s, address=address, num_cpus=num_cpus))
        return
    with using(Progress(enabled=not quiet)) as progress:
        result = run_sweep(s, out, address=address, fresh=fresh, num_cpus=num_cpus, progress=progress,
                           handle_signals=True)
    click.echo(summary_text(result.out, s))
    done = (f"{result.written['predictions']} shard(s) and {result.written['ground_truth']} ground-truth run(s) "
            f"written, {result.skipped['predictions'] + result.skipped['ground_truth']} skipped (already done), "
            f"{result.seconds:.1f} s")
    if result.failures:
        click.echo(f"incomplete: {done}; {len(result.failures)} failure(s):", err=True)
        for f in result.failures:
            click.echo(f"  {f}", err=True)
        click.echo("re-run the same command to retry what is missing", err=True)
        sys.exit(1)
    click.echo(f"complete: {done}")
