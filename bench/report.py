"""Summary of docs/BENCHMARKS.md (issue 7): the headline figures of the other benches, each with its section and
command, gathered from the machine-readable files those benches leave (nothing re-measured here).

    .venv/bin/python bench/report.py      # writes section "summary" of docs/BENCHMARKS.md

Sources: runs/bench/kernel.json (bench/kernel.py; an older run's out/bench_kernel.json when absent),
runs/bench/sweep.json (bench/sweep.py), runs/bench/roofline.json (bench/roofline.py), runs/bench/accuracy.csv + accuracy.json (bench/accuracy.py),
runs/bench/relinearise.csv + .json (bench/relinearise.py), runs/bench/cost.json (bench/cost.py), runs/bench/tune.json
(bench/tune.py), runs/bench/scaling.json (bench/scaling.py), runs/bench/projection.json
(bench/project.py), runs/bench/gpu_check.json (bench/gpu_check.sh). A source missing here keeps the rows the
summary already has for its command (measured elsewhere, say on another machine or before a clean clone); only
a figure never measured gives a row saying so.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import ROOT, read_json  # noqa: E402
from _report import BENCHMARKS, md_table, write_section  # noqa: E402

COMMAND = ".venv/bin/python bench/report.py"


NOT_MEASURED = "not measured yet"
TARGETS = {"GD-MSE": 1.1}  # marginal cost targets of issue 19 by grid; every other grid: 1.5


def missing(what: str, section: str, command: str) -> list:
    return [what, NOT_MEASURED, section, f"`{command}`"]


def previous_rows(path: Optional[Path] = None) -> Dict[str, List[list]]:
    """The summary's rows as docs/BENCHMARKS.md (or ``path``) has them now, grouped by their section cell."""
    path = Path(path) if path is not None else BENCHMARKS
    text = path.read_text() if path.exists() else ""
    begin, end = "<!-- summary:begin -->", "<!-- summary:end -->"
    if begin not in text or end not in text:
        return {}
    out: Dict[str, List[list]] = {}
    for line in text.split(begin, 1)[1].split(end, 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not line.startswith("| ") or len(cells) != 4 or cells[0] == "figure":
            continue
        out.setdefault(cells[2], []).append(cells)
    return out


def kept(rows: List[list], before: Dict[str, List[list]], document: str = "") -> List[list]:
    """``rows``, or, when they only say a source is missing, the rows the summary had for that section; with none,
    a row that points at the section if ``document`` (docs/BENCHMARKS.md) has it, measured where its file was."""
    if rows and all(r[1] == NOT_MEASURED for r in rows):
        section = rows[0][2]
        earlier = [r for r in before.get(section, []) if r[1] != NOT_MEASURED]
        if earlier:
            return earlier
        if f"<!-- {section}:begin -->" in document:
            return [[r[0], f"in its section (its file in runs/bench/ is not here to summarise)", r[2], r[3]]
                    for r in rows]
    return rows


def kernel_rows() -> List[list]:
    k = read_json("kernel.json", ROOT / "out" / "bench_kernel.json")
    cmd, sec = ".venv/bin/python bench/kernel.py", "kernel"
    if not k:
        return [missing("kernel cost / one epoch", sec, cmd)]
    rows = []
    for model in ("digits-cnn", "digits-resnet"):
        runs = k.get(model, {}).get("cost", {}).get("runs", {})
        if not runs:
            continue
        name, r = next(iter(runs.items()))  # the first row is the default options
        rows.append([f"default kernel ({model}) / one epoch of forward+backward (B = 128)",
                     f"**{r['ratio_128']:.2f}** (with the eigen step {r['ratio_with_eigen_128']:.2f})", sec, f"`{cmd}`"])
    return rows or [missing("kernel cost / one epoch", sec, cmd)]


def sweep_rows() -> List[list]:
    s = read_json("sweep.json")
    cmd, sec = ".venv/bin/python bench/sweep.py", "sweep"
    if not s:
        return [missing("marginal cost: 500-config sweep / 1-config sweep", sec, cmd)]
    rows = []
    for m in s["marginal"]:
        target = TARGETS.get(m["grid"], 1.5)
        rows.append([f"marginal cost: {m['configs']}-config sweep / 1-config sweep ({m['grid']}, kernel "
                     f"{m['kernel'].split(' (')[0]})", f"**{m['ratio']:.2f}** (target <= {target:g})", sec, f"`{cmd}`"])
    return rows


def roofline_rows() -> List[list]:
    s = read_json("roofline.json")
    cmd, sec = ".venv/bin/python bench/roofline.py", "roofline"
    if not s:
        return [missing("simulators against the machine's GEMM rate", sec, cmd)]
    short = {"GD-CE": "GD-CE", "SGD (minibatch, heavy ball)": "minibatch SGD", "SGD (SDE, ELR), m in {0, 0.5}": "SDE"}
    probed = [c for c in s["classes"] if c["predictor"] == "probed" and c["class"] in short]
    text = "; ".join(f"{short[c['class']]} {c['configs_per_s']:.1f} configs/s ({c['gflop_per_config']:.2f} GFLOP "
                     f"each, ceiling {c['ceiling_configs_per_s']:.0f}, the 10x target needs {c['target_needs_gflops']:.0f} "
                     f"GFLOP/s)" for c in probed)
    return [[f"simulation alone, default predictor (probed), against this machine's GEMM rate ({s['gemm_gflops']:.0f} "
             f"GFLOP/s, {s['dtype'].replace('torch.', '')}, one thread)", text, sec, f"`{cmd}`"]]


def accuracy_rows() -> List[list]:
    cmd, sec = "python bench/accuracy.py", "accuracy"
    csv, meta = ROOT / "runs" / "bench" / "accuracy.csv", read_json("accuracy.json")
    if not csv.exists() or not meta:
        return [missing("T_hat_eps relative error vs real fine-tuning", sec, cmd)]
    import pandas as pd

    df = pd.read_csv(csv)
    inside = df[df.lr_fraction < 1.0].copy()
    inside["elr_fraction"] = inside.lr_fraction * (1 + inside.momentum) / (1 - inside.momentum)
    default = inside[((inside.regime == "GD") & (inside.method == "discrete-elr"))
                     | ((inside.regime == "SGD") & (inside.method == "sde-rescaled"))].dropna(subset=["rel_error"])
    lin = default[default.elr_fraction <= 1.0]

    def stats(d) -> str:
        pear = d[["pred_steps", "real_steps"]].corr().iloc[0, 1] if len(d) > 2 else float("nan")
        return f"mean {100 * d.rel_error.mean():.1f}%, median {100 * d.rel_error.median():.1f}%, Pearson {pear:.3f} ({len(d)})"

    command = meta.get("command", cmd)
    rows = [[f"T_hat_eps vs real fine-tuning, frozen kernel (the default before), default methods, all configs inside the limit ({', '.join(meta['backbones'])}, "
             f"budget {meta['budget']})", f"**{stats(default)}**", sec, f"`{command}`"],
            ["the same, linear regime (eta/(1-m) <= 2N/lambda_max)", f"**{stats(lin)}**", sec, f"`{command}`"]]
    if "probed" in set(df.method):  # the default predictor, every config (1.3x included; flags count as the budget)
        budget = meta["budget"]
        pr = df[df.method == "probed"]
        p = pr.pred_steps.where(~pr.pred_diverged.astype(bool) & pr.pred_steps.notna(), budget).astype(float)
        r = pr.real_steps.where(~pr.real_diverged.astype(bool) & pr.real_steps.notna(), budget).astype(float)
        allc = pr.assign(pred_steps=p, real_steps=r, rel_error=(p - r).abs() / r)
        held = allc[allc.dataset != meta.get("selection_dataset", "digits-5to9")]
        rows.insert(0, ["T_hat_eps vs real fine-tuning, the default predictor (probed, drift-aware), every config incl. "
                        "1.3x (a flag counts as the budget); held out: the datasets it was not chosen on",
                        f"**{stats(allc)}**; inside the limit: {stats(inside[inside.method == 'probed'].dropna(subset=['rel_error']))}; "
                        f"held out: {stats(held)}", sec, f"`{command}`"])
    if "ode-drift" in set(inside.method):  # GD warped by the drift of one real reference run per (dataset, backbone, loss)
        ref = inside["reference"].astype(str).str.lower().eq("true") if "reference" in inside else False
        keys = ["dataset", "backbone", "loss", "momentum", "lr_fraction", "criterion", "eps", "regime"]
        drift = inside[(inside.method == "ode-drift") & ~ref].dropna(subset=["rel_error"])
        combo = pd.concat([drift, default[default.regime == "SGD"].merge(drift[["dataset", "backbone"]].drop_duplicates())])
        same = default.merge(combo[keys], on=keys)
        rows.append(["T_hat_eps vs real fine-tuning, GD with the kernel drift calibrated by one real run per (dataset, "
                     "backbone, loss) + SGD default, reference configs left out",
                     f"**{stats(combo)}**; defaults on the same pairs: {stats(same)}", sec, f"`{command}`"])
    return rows


def relinearise_rows() -> List[list]:
    cmd, sec = ".venv/bin/python bench/relinearise.py", "relinearise"
    csv, meta = ROOT / "runs" / "bench" / "relinearise.csv", read_json("relinearise.json")
    acc = ROOT / "runs" / "bench" / "accuracy.csv"
    if not csv.exists() or not meta or not acc.exists():
        return [missing("re-linearised GD: T_hat_eps relative error and cost", sec, cmd)]
    import pandas as pd

    everything, a = pd.read_csv(csv), pd.read_csv(acc)
    sgd = a[(a.lr_fraction < 1.0) & (a.regime == "SGD") & (a.method == "sde-rescaled")]
    fine = meta["finetune_seconds"]
    if meta.get("only") == "flow" and meta.get("previous"):
        fine = meta["previous"]["finetune_seconds"]  # the per-config rows and their fine-tunes: the previous run
    every = everything[everything.method == "relinearised"]
    df = every[every.lr_fraction < 1.0]  # inside the limit, as the accuracy rows above
    whole = pd.concat([df, sgd]).dropna(subset=["rel_error"])
    per = every.drop_duplicates(["dataset", "backbone", "loss", "momentum", "lr_fraction"])  # cost: every config
    ratios = []
    for (d, b), g in per.groupby(["dataset", "backbone"]):
        ft = fine.get(f"{d}/{b}")
        if ft:
            ratios.append(f"{d}/{b} {g.seconds.median() / ft:.2f}x")
    command = meta.get("command", cmd)
    cfg_command = meta["previous"].get("command", cmd) if meta.get("only") == "flow" and meta.get("previous") else command

    def stats(d) -> str:
        return (f"**mean {100 * d.rel_error.mean():.1f}%, median {100 * d.rel_error.median():.1f}%, Pearson "
                f"{d[['pred_steps', 'real_steps']].corr().iloc[0, 1]:.3f} ({len(d)})**")

    rows = [["T_hat_eps vs real fine-tuning, GD re-linearised per config + SGD default, all configs inside the limit",
             stats(whole), sec, f"`{cfg_command}`"],
            ["per-config re-linearised prediction time / one real full-batch fine-tune (median over all 64 GD configs, "
             "the 1.3x ones included)", "**" + ", ".join(ratios) + "**", sec, f"`{cfg_command}`"]]
    flow = everything[(everything.method == "flow-relinearised") & (everything.lr_fraction < 1.0)]
    if len(flow):
        rows.append(["the same with GD on one shared re-linearised flow path per (dataset, backbone, loss)",
                     stats(pd.concat([flow, sgd]).dropna(subset=["rel_error"])), sec, f"`{command}`"])
    return rows


def cost_rows() -> List[list]:
    c = read_json("cost.json")
    cmd, sec = ".venv/bin/python bench/cost.py", "cost"
    if not c:
        return [missing("fine-tuning / prediction, whole grid", sec, cmd)]
    ra, ft = c["ratios"], c["finetune"]
    how = "measured" if ft["measured_all"] else f"extrapolated from K = {ft['sampled']}"
    command = cmd + (f" --sample {c['sample']}" if c.get("sample") else "")
    one_api = ", ".join(f"{k} {v:.3g}x" for k, v in ra["per_config_one_api"].items())
    one_sweep = ", ".join(f"{k} {v:.3g}x" for k, v in ra["per_config_one_sweep"].items())
    return [
        [f"fine-tuning / prediction, whole grid ({c['configs']} configs; fine-tuning {how}), wall, kernel computed "
         "(cached)", f"**{ra['grid_wall_computed']:.0f}x** ({ra['grid_wall_cached']:.0f}x); CPU "
                     f"{ra['grid_cpu_computed']:.0f}x ({ra['grid_cpu_cached']:.0f}x) (goal >= 300x)", sec, f"`{command}`"],
        ["per config: mean fine-tune / marginal prediction (actor shard time per config)",
         f"**{ra['per_config_marginal']:.0f}x** (amortised over the grid {ra['per_config_amortised']:.0f}x)", sec,
         f"`{command}`"],
        ["per config: mean fine-tune / 1 config predicted with its kernel (API, no Ray; 1-config sweep)",
         f"**{one_api}**; {one_sweep} (paper: 30-45x)", sec, f"`{command}`"],
    ]


def tune_rows() -> List[list]:
    t = read_json("tune.json")
    cmd, sec = ".venv/bin/python bench/tune.py", "tune"
    if not t:
        return [missing("tuning: ASHA compute / ttp-ray compute", sec, cmd)]
    a = t["arms"]
    return [[f"tuning {t['facts']['configs']} configs: ASHA compute / ttp-ray compute (predict + top "
             f"{t['facts']['top']}, predicted budgets); regret of the pick (real cost to target / the grid's best)",
             f"**{t['asha_over_ttp_compute']:.1f}x**; regret ttp-ray {a['ttp-ray']['pick_regret']:.2f}, ASHA "
             f"{a['ASHA']['pick_regret']:.2f} (goal >= 5x within 1.10)", sec, f"`{cmd}`"]]


def scaling_rows() -> List[list]:
    s = read_json("scaling.json")
    cmd, sec = ".venv/bin/python bench/scaling.py", "scaling"
    if not s:
        return [missing("fitted exponents", sec, cmd)]
    f = s["fits"]
    fmt = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items() if not math.isnan(v))  # noqa: E731
    return [[f"time ~ N^a (N >= k = {s['fit_n_min']})", fmt(f["n"]), sec, f"`{cmd}`"],
            ["time ~ k^a", fmt(f["k"]), sec, f"`{cmd}`"], ["time ~ C^a", fmt(f["c"]), sec, f"`{cmd}`"]]


def projection_rows() -> List[list]:
    p = read_json("projection.json")
    cmd, sec = ".venv/bin/python bench/project.py", "docs/SCALING.md"
    if not p:
        return [missing("all_datasets on GPUs", sec, cmd)]
    one = next((t for t in p["cluster"] if t["actors"] == 1), None)
    u = p["uniform_actors_1h"]
    src = "GPU-measured" if p["gpu_check"] else "projected from CPU measurements and stated GPU assumptions"
    return [[f"sweeps/all_datasets.yaml ({p['configs']} configs) on H200s, {src}",
             (f"**{one['hours']:.2f} h on {one['gpus']} GPUs**; " if one else "")
             + (f"within 1 h: {u * len(p['datasets'])} GPUs (`resources.actors: {u}`)" if u else "no uniform actor "
                "count within 1 h"), sec, f"`{cmd}`"]]


def gpu_rows() -> List[list]:
    g = read_json("gpu_check.json")
    if not g or g.get("facts", {}).get("smoke"):
        return [["GPU check (kernel and sweep on CUDA, N = 50,000, ResNet-18; CPU/GPU agreement)",
                 "**not run yet** (no GPU machine so far; `--smoke` passes on the CPU)", "gpu", "`bench/gpu_check.sh`"]]
    b, ag = g["big"], g["agreement"]
    return [[f"GPU check on {g['facts']['device']}: kernel N = {b['n']} / eigen / SDE-CE per config",
             f"{b['kernel']['seconds']:.1f} s / {b['eigen']['seconds']:.1f} s / {b['SDE-CE']['per_config_s']:.2f} s; "
             f"CPU/GPU agreement: {'yes' if ag['ok'] else 'NO'}", "gpu", "`bench/gpu_check.sh`"]]


def main() -> None:
    before = previous_rows()
    document = BENCHMARKS.read_text() if BENCHMARKS.exists() else ""
    rows = [r for source in (kernel_rows, sweep_rows, roofline_rows, cost_rows, accuracy_rows, relinearise_rows,
                             tune_rows, scaling_rows, projection_rows, gpu_rows) for r in kept(source(), before, document)]
    # rows of sections no source here writes (e.g. the CLI start-up's) stay as they are
    rows += [r for section, earlier in before.items() if section not in {row[2] for row in rows} for r in earlier]
    body = "\n".join([
        "## Summary (headline figures; bench/report.py)",
        "",
        "Gathered from the files the benches leave in runs/bench/ (each row: its section below and the command "
        "that measured it); nothing here is measured anew. Ratios are within one run.",
        "",
        md_table(["figure", "value", "section", "command"], rows),
    ])
    print(body)
    write_section("summary", body, COMMAND)


if __name__ == "__main__":
    main()
