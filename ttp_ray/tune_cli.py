"""``ttp-ray tune SPEC --top K``: the click command over :func:`ttp_ray.tune.run_tune`.

Bad input (the spec, the options, an OUT of another sweep) is a ``ValueError``, which ``ttp_ray.cli.main`` turns
into one ``error: ...`` line and exit code 2. The spec goes through the sweep's checks (``ttp-ray sweep``'s
options ``--allow-code``, ``--max-configs``, ``--max-memory-gb``, ``--max-classes``; the grid's size from the YAML,
then the preflight of :mod:`ttp_ray.sweep.preflight`) before Ray starts and before anything is written.
"""
from __future__ import annotations

import sys

import click

from .sweep.cli import checked_spec, spec_options

__all__ = ["tune"]


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--top", type=int, default=3, show_default=True, help="Configs trained per dataset, best-ranked first.")
@click.option("--out", default=None, help="The sweep's output directory (default: the spec's output.dir, else "
                                          "runs/<name>); predicted there first, or reused when already done.")
@click.option("--by", default=None, help="Ranking (as `ttp-ray rank --by`); default: predicted cost to a common target.")
@click.option("--criterion", default=None, help="loss or error (default: the spec's first).")
@click.option("--eps", type=float, default=None, help="Which eps of the sweep (default: the spec's first).")
@click.option("--target-error", type=float, default=None, help="Common error target (default: derived from the grid).")
@click.option("--target-loss", type=float, default=None, help="Common loss target (default: derived from the grid).")
@click.option("--max-final-error", type=float, default=None,
              help="Do not try configs predicted to end above this error.")
@click.option("--margin", type=float, default=1.2, show_default=True,
              help="A trial's budget: margin x its predicted steps (a row's interval upper bound, when present, "
                   "instead); the trial stops there or when it reaches the target.")
@click.option("--full-budget", is_flag=True, help="No stopper: every trial runs the spec's whole budget (its T_eps "
                                                  "is measured too).")
@click.option("--dataset", "datasets", multiple=True, help="Only these datasets (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Minibatch order of the runs.")
@click.option("--checkpoint-every", type=int, default=10, show_default=True,
              help="Logged steps between two checkpoints of a trial.")
@click.option("--max-concurrent", type=int, default=None, help="Trials at once (default: as resources allow).")
@click.option("--address", default=None, envvar="RAY_ADDRESS", show_envvar=True,
              help="Attach to a running Ray cluster; default: local Ray on 127.0.0.1.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of the local Ray (default: all).")
@click.option("--fresh", is_flag=True, help="Discard OUT's sweep tables and tune runs first.")
@click.option("--quiet", is_flag=True, help="No progress lines, no Tune status tables.")
@spec_options
def tune(spec, top, out, by, criterion, eps, target_error, target_loss, max_final_error, margin, full_budget, datasets,
         seed, checkpoint_every, max_concurrent, address, num_cpus, fresh, quiet, allow_code, max_configs,
         max_memory_gb, max_classes) -> None:
    """Predict SPEC (or reuse OUT), then fine-tune the top K configs per dataset as Ray Tune trials.

    Each trial stops at its predicted budget or when its real curve reaches the target; its curve and T_eps
    go to OUT/ground_truth (so `validate`, `plot` and the notebook include them), Tune's files to OUT/tune.
    Re-running resumes: configs already fine-tuned are skipped, an interrupted Tune experiment is restored.
    """
    from .preflight import ResourceLimits

    limits = ResourceLimits(max_configs=max_configs, max_memory_gb=max_memory_gb, max_classes=max_classes)
    s = checked_spec(spec, limits, allow_code)
    from .tune import SweepIncomplete, TuneOptions, check_options, run_tune, tune_text

    kw = {} if by is None else {"by": by}
    options = TuneOptions(top=top, criterion=criterion, eps=eps, target_error=target_error, target_loss=target_loss,
                          max_final_error=max_final_error, margin=margin, full_budget=full_budget, seed=seed,
                          checkpoint_every=checkpoint_every, max_concurrent_trials=max_concurrent,
                          datasets=tuple(datasets), verbose=0 if quiet else 1, **kw)
    check_options(s, options)
    try:
        outcome = run_tune(s, out, options=options, address=address, num_cpus=num_cpus, fresh=fresh,
                           progress=not quiet, limits=limits, echo=lambda line: click.echo(line, err=True))
    except SweepIncomplete as exc:  # as `ttp-ray sweep` ends: its failures, and whether a re-run can help
        click.echo(f"incomplete: {len(exc.failures)} sweep failure(s), no trial run:", err=True)
        for f in exc.failures:
            click.echo(f"  {f}", err=True)
        click.echo("re-run the same command to retry what is missing" if exc.retryable
                   else "fix the input named above: a re-run fails the same way", err=True)
        sys.exit(1 if exc.retryable else 2)
    click.echo(tune_text(outcome))
    if outcome.failures:
        click.echo(f"incomplete: {len(outcome.failures)} trial(s) did not finish:", err=True)
        for f in outcome.failures:
            click.echo(f"  {f}", err=True)
        click.echo("re-run the same command to resume them", err=True)
        sys.exit(1)
