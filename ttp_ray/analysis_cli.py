"""``ttp-ray rank | validate | plot OUT``: thin click commands over :mod:`ttp_ray.analysis` for a sweep's
output directory. Bad input raises :class:`ttp_ray.analysis.AnalysisError` (a ``ValueError``), which
``ttp_ray.cli.main`` turns into one ``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import json
import shutil
import sys
from typing import Optional

import click

from .analysis import DEFAULT_RANK_KEY, PLOT_KINDS, RANK_KEYS

__all__ = ["rank", "validate", "plot"]


def _console():
    from rich.console import Console

    tty = sys.stdout.isatty()
    width = None if tty else max(shutil.get_terminal_size((200, 24)).columns, 160)
    return Console(file=sys.stdout, width=width, highlight=False, soft_wrap=False)


def _echo(*renderables) -> None:
    """Print rich renderables (and plain strings) through click, trailing spaces stripped."""
    console = _console()
    with console.capture() as cap:
        for r in renderables:
            console.print(r)
    click.echo("\n".join(line.rstrip() for line in cap.get().splitlines()))


def _table(title: Optional[str], frame, sections=()):
    """A rich table of the string DataFrame ``frame``; a section line before each row index in ``sections``."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in frame.columns:
        left = col in ("dataset", "loss", "B", "flag", "config_id", "slice", "criterion", "regime", "objective",
                       "top-3")
        t.add_column(str(col), justify="left" if left else "right", no_wrap=True)
    for i, row in enumerate(frame.itertuples(index=False)):
        if i in sections:
            t.add_section()
        t.add_row(*[str(v) for v in row])
    return t


def _selection_options(f):
    opts = [
        click.option("--criterion", default=None, help="T_eps of the loss or the error curve [default: the "
                                                       "spec's first criterion]."),
        click.option("--eps", type=float, default=None, help="Threshold eps [default: the spec's first]."),
        click.option("--dataset", "datasets", multiple=True, help="Only this dataset label (repeatable)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _timing_options(f):
    """``--criterion``, ``--eps`` (repeatable), ``--eps-mode``: T_eps for any of them, re-timed from the stored
    curves when the sweep did not use them (``ttp_ray.analysis.retime``)."""
    opts = [
        click.option("--criterion", type=click.Choice(["loss", "error"]), default=None,
                     help="T_eps of the loss or the error curve [default: the spec's first criterion]."),
        click.option("--eps", type=float, multiple=True,
                     help="Threshold eps, repeatable [default: the spec's first]. A value (or --eps-mode, "
                          "--criterion) the sweep did not use is read off the stored curves (OUT/curves): no "
                          "re-run, no --fresh."),
        click.option("--eps-mode", type=click.Choice(["absolute", "relative"]), default=None,
                     help="absolute: |L_t - L_T| < eps; relative: < eps x (L_0 - L_T) [default: the sweep's]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _retimed_line(A, t, criteria, eps_values, eps_mode) -> str:
    own_mode = A.timing_settings(t.manifest)[0]
    return (f"T̂ε re-timed from the stored curves ({t.root}/curves): criterion {', '.join(criteria)}, eps "
            f"{', '.join(f'{e:g}' for e in eps_values)} ({eps_mode or own_mode}); the sweep wrote eps "
            f"{', '.join(f'{e:g}' for e in sorted(set(t.predictions.eps)))} ({own_mode})")


def _targets_line(ranked) -> str:
    """``target (criterion): dataset/loss value (rule), ...`` of the rows of a cost-to-target ranking."""
    t = ranked[["dataset", "loss", "criterion", "target", "target_rule"]].drop_duplicates(["dataset", "loss"])
    from .analysis import fmt

    parts = [f"{r.dataset}/{r.loss} {fmt(r.target, '.4g')} ({r.target_rule})" for r in t.itertuples(index=False)]
    crit = str(t.criterion.iloc[0]) if len(t) else ""
    return f"target {crit}: " + ", ".join(parts)


@click.command()
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--by", type=click.Choice(RANK_KEYS), default=DEFAULT_RANK_KEY, show_default=True,
              help="Rank by predicted cost to a common target (s; steps: predicted_steps_to_target), by predicted "
                   "cost T_eps x step time (s), predicted T_eps (steps) or final error.")
@click.option("--target-error", type=float, default=None,
              help="Target error rate (criterion error) for the cost to target [default: derived per (dataset, "
                   "loss): min + 0.25 x (median - min) of the predicted final errors].")
@click.option("--target-loss", type=float, default=None,
              help="Target loss (criterion loss) for the cost to target [default: derived as for the error].")
@click.option("--pareto", is_flag=True, help="Show only the Pareto front per (dataset, loss): configs not "
                                             "dominated in (cost to target or to their plateau, final error).")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Show the N best configs and at most N flagged ones (0: all).")
@click.option("--max-final-error", type=float, default=None,
              help="Do not rank configs whose predicted final error is above this fraction (flagged instead).")
@_timing_options
@click.option("--dataset", "datasets", multiple=True, help="Only this dataset label (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per eps: every ranked (top N) and "
                                                       "every flagged row (--pareto: every front row).")
def rank(out, by, target_error, target_loss, pareto, top, max_final_error, criterion, eps, eps_mode, datasets,
         as_json) -> None:
    """Rank a sweep's configs (OUT: the --out of `ttp-ray sweep`) by predicted cost to a common target;
    configs that never reach it and diverging ones are listed after the ranked ones, flagged. One ranking per
    --eps."""
    from . import analysis as A

    needs_curves = by in A.TARGET_RANK_KEYS or pareto or target_error is not None or target_loss is not None
    asked = bool(eps) or eps_mode is not None or criterion is not None
    t = A.load_sweep(out, tables=("predictions", "curves") if needs_curves or asked else ("predictions",))
    pred = A.select(t.predictions, datasets=datasets or None)
    dflt = A.default_selection(pred, t.manifest)
    criterion = criterion or dflt[0]
    eps_values = [float(e) for e in eps] or [dflt[1]]
    pred, _, retimed = A.with_timing(pred, None, t.curves if asked else None, t.manifest, criteria=[criterion],
                                     eps=eps_values, eps_mode=eps_mode)
    notes = [_retimed_line(A, t, [criterion], eps_values, eps_mode)] if retimed else []
    for value in eps_values:
        _rank_one(A, t, pred, out, by=by, target_error=target_error, target_loss=target_loss, pareto=pareto, top=top,
                  max_final_error=max_final_error, criterion=criterion, eps=value, curves=needs_curves,
                  as_json=as_json, notes=notes, retimed=retimed)


def _rank_one(A, t, pred, out, *, by, target_error, target_loss, pareto, top, max_final_error, criterion, eps, curves,
              as_json, notes, retimed) -> None:
    """One ranking of ``rank``: the rows of (criterion, eps)."""
    import pandas as pd

    ranked = A.rank(pred, by, curves=t.curves if curves else None, target_error=target_error,
                    target_loss=target_loss, criterion=criterion, eps=eps, max_final_error=max_final_error)
    eps_mode = str(ranked.eps_mode.iloc[0]) if len(ranked) and "eps_mode" in ranked.columns else None
    to_target = "predicted_cost_to_target_s" in ranked.columns
    good, flagged = ranked[ranked["rank"].notna()], ranked[ranked["rank"].isna()]
    counts = {k: int(v) for k, v in ranked.flag.replace("", "ranked").value_counts().items()}
    shown = good if not top else good.head(top)
    cols = ["rank", "flag", "dataset", "config_id", "model", "loss", "lr", "lr_fraction", "momentum",
            "batch_size", "full_batch", "criterion", "eps", "budget_steps", "predicted_steps",
            "predicted_fraction", "predicted_final_loss", "predicted_final_error", "step_time_s",
            "predicted_cost_s", "diverged", "max_stable_lr", "elr_over_gd_limit"]
    if to_target:
        cols += ["target", "target_rule", "predicted_steps_to_target", "predicted_cost_to_target_s"]
    note = ("regime: lr/(1-m) over the plain-GD limit 2N/lambda_max; 'linear' at most 1, above it the real "
            "network leaves the linear regime and T̂ε is less reliable (docs/ACCURACY.md); diverges = lr beyond "
            "the stability limit 2(1+m)N/lambda_max")
    if pareto:
        front = A.pareto_front(ranked)
        if as_json:
            click.echo(json.dumps(A.to_jsonable({
                "out": str(out), "by": by, "criterion": criterion, "eps": eps, "eps_mode": eps_mode,
                "retimed": retimed, "pareto": True, "datasets": sorted(set(pred.dataset)),
                "front": front[cols + ["pareto_cost_s"]]})))
            return
        title = (f"Pareto front of {len(ranked)} configs of {out} per (dataset, loss): {len(front)} not dominated in "
                 f"(cost to target or to their plateau, predicted final error); criterion {criterion}, eps {eps:g}")
        frame = A.rank_display(front)
        frame.insert(list(frame.columns).index("cost to target (s)"), "front cost (s)",
                     [A.fmt(v, ".3g") for v in front.pareto_cost_s])
        _echo(_table(title, frame.drop(columns=["T̂ε"])), _targets_line(ranked), *notes,
              "front cost = cost to target, or to the config's own plateau (T̂ε x step time) when it never reaches "
              "it, or the whole budget x step time when neither; " + note)
        return
    if as_json:
        click.echo(json.dumps(A.to_jsonable({
            "out": str(out), "by": by, "criterion": criterion, "eps": eps, "eps_mode": eps_mode, "retimed": retimed,
            "datasets": sorted(set(pred.dataset)), "counts": counts, "ranked": shown[cols],
            "flagged": flagged[cols]})))
        return
    show_flagged = flagged if not top else flagged.head(top)
    title = (f"{len(ranked)} configs of {out} ranked by {by} (ascending); criterion {criterion}, eps {eps:g}: "
             + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    frame = A.rank_display(pd.concat([shown, show_flagged]))
    hidden = (len(good) - len(shown), len(flagged) - len(show_flagged))
    cost = ("cost to target = steps to target (the first logged step at which the predicted curve reaches the "
            "target) x measured step time; T̂ε = predicted T_eps (steps, against the run's own final value; "
            "--by predicted_cost_s ranks by T̂ε x step time)"
            if to_target else "cost = predicted T_eps (steps) x measured step time")
    _echo(_table(title, frame, sections=(len(shown),) if len(shown) and len(show_flagged) else ()),
          *([_targets_line(ranked)] if to_target else []),
          *([f"(not shown: {hidden[0]} ranked, {hidden[1]} flagged; --top 0 shows all)"] if any(hidden) else []),
          *notes, f"{cost}; {note}")


@click.command()
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--target-error", type=float, default=None,
              help="Target error rate for the cost-to-target ranking [default: derived per (dataset, loss)].")
@click.option("--target-loss", type=float, default=None,
              help="Target loss for the cost-to-target ranking [default: derived per (dataset, loss)].")
@_timing_options
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
def validate(out, target_error, target_loss, criterion, eps, eps_mode, as_json) -> None:
    """Compare predicted with real T_eps (the sweep's ground truth): writes OUT/validation.parquet and
    prints the relative error |T_hat - T| / T (mean, median) and Pearson r, overall and per
    (dataset, loss, GD/SGD); then how well the predicted costs rank the fine-tuned configs (Spearman rho,
    top-1 regret, top-3 hit) per (dataset, model, loss, criterion, eps), for the cost to a common target and
    for T_eps x step time. --eps / --eps-mode / --criterion: the comparison for those, both sides re-timed from
    the stored curves when the sweep did not use them [default: every criterion and eps of the sweep]."""
    import pandas as pd

    from . import analysis as A

    t = A.load_sweep(out, tables=("predictions", "ground_truth", "curves"))
    pred, gt, retimed = t.predictions, t.ground_truth, False
    if eps or eps_mode is not None or criterion is not None:
        if gt.empty:
            A.validation_table(pred, gt)  # no ground truth: its one-line error
        pred, gt, retimed = A.with_timing(pred, gt, t.curves, t.manifest, criteria=[criterion] if criterion else None,
                                          eps=eps or None, eps_mode=eps_mode)
    notes = [_retimed_line(A, t, sorted(set(pred.criterion)), sorted(set(pred.eps)), eps_mode)] if retimed else []
    val = A.validation_table(pred, gt, t.curves if len(t.curves) else None,
                             target_error=target_error,
                             target_loss=target_loss)
    path = A.write_validation(val, t.root)
    m = A.validation_metrics(val)
    rk = A.ranking_metrics(val)
    summary = A.ranking_summary(rk)
    if as_json:
        click.echo(json.dumps(A.to_jsonable({"out": str(out), "validation": str(path), "retimed": retimed, **m,
                                             "ranking": {"groups": rk, "summary": summary}})))
        return

    def line(name, d):
        return {"slice": name, "configs": str(d["configs"]), "rows": str(d["rows"]), "compared": str(d["compared"]),
                "mean |T̂-T|/T": A.fmt(d["mean_relative_error"], ".3f"),
                "median |T̂-T|/T": A.fmt(d["median_relative_error"], ".3f"), "Pearson r": A.fmt(d["pearson"], ".3f")}

    rows = [line("overall", m["overall"])]
    rows += [line(f"{s['dataset']} / {s['loss']} / {s['regime']}", s) for s in m["slices"]]
    rows += [line(f"criterion {s['criterion']}", s) for s in m["by_criterion"]]
    o = m["overall"]
    title = (f"predicted vs real T_eps in {out}: {o['rows']} ground-truth rows of {o['configs']} configs, "
             f"{o['compared']} compared (status: " + ", ".join(f"{k} {v}" for k, v in m["status"].items()) + ")")
    _echo(_table(title, pd.DataFrame(rows), sections=(1, 1 + len(m["slices"]))),
          f"wrote {path} (one row per config, criterion, eps and seed)", *notes, "",
          _table("ranking of the fine-tuned configs by predicted cost (objective: cost_to_target = steps to the "
                 "common target x step time; cost = T_eps x step time)", _ranking_frame(A, rk)),
          *_ranking_summary_lines(A, summary),
          "reached: configs that reach (eps, or the target), predicted / real; flagged: rows that diverge or never "
          "reach, ranked at the budget (budget steps x step time). rho: Spearman over the configs (n/a below 3 "
          "configs, or when none reaches on one side); regret: real cost of the predicted-cheapest config / "
          "cheapest real cost; top-3: the truly cheapest is among the 3 predicted cheapest.")


def _ranking_frame(A, rk):
    """:func:`ttp_ray.analysis.ranking_metrics` rows as strings."""
    import pandas as pd

    rows = []
    for r in rk.itertuples(index=False):
        eps = "-" if r.eps is None or pd.isna(r.eps) else f"{r.eps:g}"
        rows.append({"objective": r.objective, "slice": f"{r.dataset} / {r.model} / {r.loss} / {r.criterion} / {eps}",
                     "configs": str(r.configs), "reached pred/real": f"{r.reached_predicted}/{r.reached_actual}",
                     "flagged pred/real": f"{r.flagged_predicted}/{r.flagged_actual}",
                     "rho": A.fmt(r.spearman, ".2f", "n/a"), "top-1 regret": A.fmt(r.top1_regret, ".2f"),
                     "top-3": "-" if r.top3_hit is None else ("hit" if r.top3_hit else "miss")})
    return pd.DataFrame(rows)


def _ranking_summary_lines(A, summary):
    out = []
    for obj, s in summary.items():
        out.append(f"{obj}: over {s['groups']} group(s) with >= 3 configs: median rho {A.fmt(s['median_spearman'], '.2f')}, "
                   f"min rho {A.fmt(s['min_spearman'], '.2f')}, top-1 regret mean {A.fmt(s['mean_top1_regret'], '.2f')} "
                   f"max {A.fmt(s['max_top1_regret'], '.2f')}, top-3 hit rate {A.fmt(s['top3_hit_rate'], '.2f')}; "
                   f"{s['groups_nothing_reached']} more group(s) where no config reaches on one side; flagged rows "
                   f"{s['flagged_predicted']} predicted, {s['flagged_actual']} real")
    return out


@click.command()
@click.argument("sweep_dir", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for the PNGs.")
@_selection_options
@click.option("--only", "kinds", multiple=True, type=click.Choice(PLOT_KINDS),
              help="Only these plots (repeatable) [default: all].")
def plot(sweep_dir, out_dir, criterion, eps, datasets, kinds) -> None:
    """PNG plots of a sweep (headless): real vs predicted curves per validated config, predicted vs real
    T_eps, the Theta spectrum with its power-law fit, predicted cost over (lr, batch size) per dataset."""
    from . import analysis as A

    t = A.load_sweep(sweep_dir)
    paths, notes = A.write_plots(t, out_dir, criterion=criterion, eps=eps, datasets=datasets or None,
                                 kinds=kinds or PLOT_KINDS)
    for p in paths:
        click.echo(str(p))
    for n in notes:
        click.echo(f"skipped {n}", err=True)
