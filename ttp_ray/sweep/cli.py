"""``ttp-ray sweep SPEC``: the click command over :mod:`ttp_ray.sweep.driver`.

Bad specs, missing data, an unreachable ``--address``, a plan above a resource limit and an output directory of
another sweep (or in use by one) are ``ValueError`` subclasses, which ``ttp_ray.cli.main`` turns into one
``error: ...`` line and exit code 2 (nothing written). A grid's size is checked on the YAML form before anything is
expanded. A spec naming Python code (``model: package.module:function``) runs only with ``--allow-code`` (or
``TTP_RAY_ALLOW_CODE=1``). SIGINT / SIGTERM end in :data:`ttp_ray.interrupts.INTERRUPTED_MESSAGE`, exit 130 / 143.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import click

from ..preflight import DEFAULT_MAX_CLASSES, DEFAULT_MAX_CONFIGS, DEFAULT_MAX_MEMORY_GB

__all__ = ["sweep", "spec_options", "checked_spec"]


def spec_options(command):
    """The options of a command that runs a spec (``sweep``, ``tune``): consent to code, and the resource limits
    its preflight holds the spec to (:class:`~ttp_ray.preflight.ResourceLimits`)."""
    for option in reversed((
        click.option("--allow-code", is_flag=True, envvar="TTP_RAY_ALLOW_CODE", show_envvar=True,
                     help="Allow a spec's model: package.module:function (Python code the sweep imports and calls on "
                          "the driver and in every actor). Without it such a spec is refused."),
        click.option("--max-configs", type=click.IntRange(min=1), default=DEFAULT_MAX_CONFIGS, show_default=True,
                     help="Refuse a grid with more configs (counted from the spec's axes before anything is "
                          "expanded)."),
        click.option("--max-memory-gb", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_MEMORY_GB,
                     show_default=True, help="Refuse a plan whose estimated memory per actor (kernel N x k, "
                                             "simulation of a shard: paths x configs x N x C, per-step records) "
                                             "exceeds this many GB."),
        click.option("--max-classes", type=click.IntRange(min=1), default=DEFAULT_MAX_CLASSES, show_default=True,
                     help="Refuse a dataset with more classes."),
    )):
        command = option(command)
    return command


def checked_spec(path: str, limits, allow_code: bool, on_huge_grid: Optional[Callable[[str], None]] = None):
    """The spec at ``path``, refused before anything is expanded or torch imported when its grid exceeds ``limits``
    (``on_huge_grid`` is handed the grid's size first: ``--dry-run`` prints it), then parsed and refused when it
    names code without ``allow_code``; deprecation notes go to stderr. Raises one-line ``ValueError`` subclasses."""
    from ..preflight import ResourceError
    from .grid import grid_axes, grid_size_text, read_spec
    from .preflight import check_grid

    data = read_spec(path)
    try:
        check_grid(data, limits)
    except ResourceError:
        if on_huge_grid is not None:
            on_huge_grid(grid_size_text(grid_axes(data), limits.max_configs))
        raise
    from .spec import check_code, parse_spec

    spec = parse_spec(data)
    check_code(spec, allow_code)
    for line in spec.deprecations():
        click.echo(f"note: {line}", err=True)
    return spec


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Output directory (default: the spec's output.dir, else runs/<name>).")
@click.option("--dry-run", is_flag=True, help="Print the plan (configs, distinct simulations, shards, actors, "
                                              "resources, memory per actor) and exit; needs no data and starts no Ray.")
@click.option("--address", default=None, envvar="RAY_ADDRESS", show_envvar=True,
              help="Attach to a running Ray cluster (e.g. after `ray up cluster.yaml`); default: local Ray on 127.0.0.1.")
@click.option("--fresh", is_flag=True, help="Discard the sweep tables already in --out instead of resuming (only in a "
                                            "directory whose manifest.json says it is a ttp-ray sweep's OUT).")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of the local Ray (default: all).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr (units done / total with an ETA, kernel "
                                                 "phases); the summary on stdout is the same.")
@spec_options
def sweep(spec, out, dry_run, address, fresh, num_cpus, quiet, allow_code, max_configs, max_memory_gb,
          max_classes) -> None:
    """Predict T_eps for a grid of hyper-parameters over datasets, distributed with Ray; Parquet out.

    Re-running the same SPEC into the same --out resumes: completed shards are skipped (so are fine-tunes already
    run when only the spec's ground_truth changed). One sweep at a time per --out. Ctrl-C (or SIGTERM) keeps what
    is written: one line, exit code 130 (143).
    """
    from ..preflight import ResourceError, ResourceLimits
    from ..progress import Progress, using

    limits = ResourceLimits(max_configs=max_configs, max_memory_gb=max_memory_gb, max_classes=max_classes)
    s = checked_spec(spec, limits, allow_code, on_huge_grid=click.echo if dry_run else None)
    from .driver import dry_run as make_dry_run, run_sweep, summary_text

    if dry_run:
        text, refusal = make_dry_run(s, address=address, num_cpus=num_cpus, limits=limits)
        click.echo(text)
        if refusal:
            raise ResourceError(refusal)
        return
    with using(Progress(enabled=not quiet)) as progress:
        result = run_sweep(s, out, address=address, fresh=fresh, num_cpus=num_cpus, progress=progress,
                           handle_signals=True, limits=limits, echo=lambda line: click.echo(line, err=True))
    click.echo(summary_text(result.out, s))
    done = (f"{result.written['predictions']} shard(s) and {result.written['ground_truth']} ground-truth run(s) "
            f"written, {result.skipped['predictions'] + result.skipped['ground_truth']} skipped (already done), "
            f"{result.seconds:.1f} s")
    if result.failures:
        click.echo(f"incomplete: {done}; {len(result.failures)} failure(s):", err=True)
        for f in result.failures:
            click.echo(f"  {f}", err=True)
        if result.retryable:
            click.echo("re-run the same command to retry what is missing", err=True)
            sys.exit(1)
        click.echo("fix the input named above: a re-run fails the same way", err=True)
        sys.exit(2)
    click.echo(f"complete: {done}")
