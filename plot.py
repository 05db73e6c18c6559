"""plot.py - the paper's figures, drawn from result files only (the localization test and its verdict: report.py).

Reads every result JSON under RUN/results (written by evaluate.py; one per evaluated edit, the baseline has edit null)
with the per-question rows beside each (NAME.jsonl: the 95% intervals), the IPO training logs (NAME.log.json beside
each edit file), and RUN/probe/probe.safetensors for the heatmap. Edits are grouped by their method ("iti", "ipo",
"ablate") and head spec ("top:16", "random:16:3", "single:12.7", "all"); each group is a curve over its alpha (ITI) or
tau (IPO) grid. A head set's score is its best value of --metric over the grid every compared set has (report.py).

Writes to --out (default RUN/figures), skipping with a printed reason any figure or panel whose data is missing:
  fig1_iti_probed_vs_random.png   ITI: histogram over random sets (claimed set marked with its interval and p-value,
                                  the noise floor shown); truth vs info (95% error bars on the claimed set); MC2 vs KL
  fig2_truth_vs_info.png          ITI at the claimed heads, IPO at the claimed heads, IPO at all heads
  fig3_ipo_probed_vs_random.png   IPO: histogram over random sets; truth vs info
  fig4_ipo_single_heads.png       IPO: histogram over single heads; the best single heads vs the claimed set
  fig5_ipo_kl.png                 IPO: MC2 vs KL and truth vs KL, claimed vs random sets
  fig6_ipo_convergence.png        IPO training: validation loss and margin (the target 1/(2 tau) dashed) per log entry
  fig7_calibration.png            each random set on trial against the others: the p-values and the share <= level
  fig8_ablation.png               ablation: histogram of the drop over random sets, the claimed set marked
  probe_accuracy.png              probe validation accuracy by layer and head, claimed heads boxed
  figures.json                    what was drawn and what was skipped, and why

    python plot.py --runs runs/smollm2 && python report.py --runs runs/smollm2
"""
import argparse
import json
import os
import textwrap

import numpy as np

import report
import results
import runfiles
from edit_checks import convergence
from results import has, knob

LABELS = {"info_truth": "Info*Truth (product of the two rates)", "truth": "Truth (fraction judged true)",
          "info": "Info (fraction judged informative)", "mc1": "MC1 (fraction)", "mc2": "MC2 (mass on true answers)",
          "mc3": "MC3 (fraction)", "kl": "KL(original || edited) (nats per token)", "ce": "CE (nats per token)"}
CLAIMED_COLOR, RANDOM_COLOR, ALL_COLOR, SINGLE_COLOR = "tab:red", "0.6", "tab:green", "tab:blue"
SINGLE_COLORS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = results.add_run_args(p, "figure folder (default: RUN/figures of the first run)")
    g.add_argument("--probe", default=None, help="probe folder for the heatmap (default: RUN/probe of the first run)")
    g = p.add_argument_group("what is drawn")
    g.add_argument("--metric", default=None, choices=results.METRICS,
                   help="score of a head set, best over its grid (default: info_truth when judged, else mc2)")
    g.add_argument("--n-best-single", type=int, default=3, help="single heads drawn against the claimed set (fig 4)")
    g.add_argument("--level", type=float, default=0.05, help="significance level marked in the histograms")
    g.add_argument("--converged", type=float, default=0.05, help="IPO convergence threshold (see report.py)")
    g.add_argument("--report", action="store_true", help="also run report.py with these --runs, --claimed, "
                   "--metric and --level (kept for old command lines: run report.py instead)")
    return p.parse_args(argv)


# ---- Panels: each returns a reason (str) when its data is missing, else a function that draws it on an axis

def missing(sweep, *metrics):
    gone = [m for m in metrics if not has(sweep, m)]
    judged = {"truth", "info", "info_truth"}
    return gone and f"no {', '.join(gone)} in the results" + (" (judges were skipped)" if judged & set(gone) else "")


def error_bars(points, metric, values):
    """[[below], [above]] distances to each point's 95% interval, or None where any point lacks rows."""
    cis = [results.interval(metric, p) for p in points]
    if not points or None in cis:
        return None
    return [[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]]


def curves_panel(sweep, lines, x, y, title):
    """lines: [(method, spec, label, style)]: `y` against `x` along each curve over its grid, the baseline a star;
    the annotated (claimed) curves and the baseline carry 95% error bars where the rows allow."""
    lines = [line for line in lines if sweep["curves"].get(line[:2])]
    if missing(sweep, x, y) or not lines:
        return missing(sweep, x, y) or "no results for these edits"

    def draw(ax):
        for method, spec, label, style in lines:
            points = [p for p in sweep["curves"][(method, spec)] if p.get(x) is not None and p.get(y) is not None]
            style = dict(style)
            annotate = style.pop("annotate", False)
            xs, ys = [p[x] for p in points], [p[y] for p in points]
            ax.plot(xs, ys, marker="o", ms=3, label=label, **style)
            if annotate:
                ax.errorbar(xs, ys, xerr=error_bars(points, x, xs), yerr=error_bars(points, y, ys), fmt="none",
                            ecolor=style.get("color"), elinewidth=0.8, capsize=2, alpha=0.6)
            for p in points if annotate else []:  # the grid value beside each point
                ax.annotate(f"{knob(method)}={p['grid']:g}", (p[x], p[y]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points", color=style.get("color"))
        base = results.baseline(sweep, points[0] if points else None) or {}  # evaluated like the curves
        if base.get(x) is not None and base.get(y) is not None:
            ax.errorbar([base[x]], [base[y]], xerr=error_bars([base], x, [base[x]]),
                        yerr=error_bars([base], y, [base[y]]), fmt="k*", ms=11, label="unedited", zorder=5,
                        elinewidth=0.8, capsize=2)
        ax.set(xlabel=LABELS[x], ylabel=LABELS[y], title=title)
        ax.legend(fontsize=7)
    return draw


def hist_panel(sweep, method, claimed, pool, metric, pool_name, title, level, marks=(), descriptive=False):
    """Histogram of the pool's scores (report.trial), the claimed set's marked with its 95% interval and its rank and
    p-value, the noise floor (median half-width of one set's interval) drawn as a bar around the pool's median;
    marks: [(label, value, line style)] more vertical lines (the unedited model, IPO at all heads);
    descriptive: count the pool members that do as well instead of a p-value (a pool of another size)."""
    result = report.trial(sweep, method, claimed, pool, metric, level, descriptive=descriptive)
    if "missing" in result:
        return missing(sweep, metric) or result["missing"]
    marks = [(label, value, style) for label, value, style in marks if value is not None]

    def draw(ax):
        from matplotlib.ticker import MaxNLocator
        values, test = list(result["pool"].values()), result["rank_test"]
        counts, _, _ = ax.hist(values, bins=max(5, min(20, len(values) // 2)), color=RANDOM_COLOR, edgecolor="white",
                               label=f"{len(values)} {pool_name}")
        ax.axvline(result["claimed"], color=CLAIMED_COLOR, lw=2.5, label=f"claimed {claimed}: " + (
            f"rank {test['rank']} of {test['of']}, p = {test['p']:.3g}: {result['verdict']}" if not descriptive else
            f"{test['n_at_least']} of {len(values)} {pool_name} do as well"))
        if result["claimed_ci"]:
            ax.axvspan(*result["claimed_ci"], color=CLAIMED_COLOR, alpha=0.15, label="its 95% interval")
        if result["noise_floor"]:
            ax.errorbar([result["median"]], [1.1 * max(counts)], xerr=[[result["noise_floor"]]] * 2, fmt="o",
                        color="k", ms=3, capsize=4, label=f"noise floor +-{result['noise_floor']:.2g} around the "
                        f"median (spread: SD {result['spread'] or 0:.2g})")
        for label, value, style in marks:
            ax.axvline(value, lw=1.5, label=label, **style)
        what = f"drop of {LABELS[metric]} from unedited" if result["score"].startswith("drop") else \
            f"best {LABELS[metric]} over the {knob(method)} grid"
        ax.set(xlabel=what, ylabel="number of head sets", title=title, ylim=(0, 2.2 * max(counts)))  # legend room
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(5))  # long tick labels when the scores differ in the 4th digit
        ax.legend(fontsize=7, loc="upper left")
    return draw


def convergence_panel(sweep, claimed, field, threshold):
    """IPO validation loss (or margin, with each target 1/(2 tau) dashed) along each edit's log, by head set role."""
    logs = [(spec, convergence(p, threshold)) for (method, spec), points in sorted(sweep["curves"].items())
            if method.startswith("ipo") for p in points]
    logs = [(spec, c) for spec, c in logs if c and len(c[field]) > 1]
    if not logs:
        return "no IPO training log with a validation curve (NAME.log.json beside the edit files)"

    def draw(ax):
        from matplotlib.ticker import MaxNLocator
        seen = set()
        for spec, c in logs:
            role = "claimed" if spec == claimed else "all heads" if spec == "all" else spec.split(":")[0]
            color = {"claimed": CLAIMED_COLOR, "all heads": ALL_COLOR, "single": SINGLE_COLOR}.get(role, RANDOM_COLOR)
            ax.plot(range(len(c[field])), c[field], color=color, lw=2 if role == "claimed" else 0.8, marker="o",
                    ms=2, label=None if role in seen else role, zorder=3 if role == "claimed" else 2)
            seen.add(role)
            if field == "val_margins" and c["target"]:
                ax.axhline(c["target"], color=color, ls="--", lw=0.6)
        n_conv = sum(bool(c["converged"]) for _, c in logs)
        ax.set(xlabel="log entry (epoch, or every N steps)", ylabel="validation " + (
            "margin h (dashed: target 1/(2 tau))" if field == "val_margins" else "IPO loss"),
               title=f"{n_conv} of {len(logs)} IPO edits converged (fell, then changed < {threshold:.0%})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return draw


def calibration_panel(sweep, method, claimed, metric, level):
    """The leave-one-out p-values of the random sets (each on trial against the others) and the share <= level."""
    pool = results.roles(sweep, claimed)["random"]
    result = report.trial(sweep, method, claimed, pool, metric, level)
    c = result.get("calibration")
    if not c:
        return result.get("missing") or "fewer than two random sets"

    def draw(ax):
        from matplotlib.ticker import MaxNLocator
        counts, _, _ = ax.hist(c["p"], bins=np.linspace(0, 1, 21), color=RANDOM_COLOR, edgecolor="white",
                               label=f"{c['n']} random sets, each on trial")
        ax.axhline(c["n"] / 20, color="k", ls=":", lw=1, label="expected under H0 (uniform)")
        ax.axvline(level, color=CLAIMED_COLOR, lw=1.5, label=f"level {level}: share p <= level {c['share']:.3g} "
                   f"[{c['interval'][0]:.2g}, {c['interval'][1]:.2g}]")
        ax.set(xlabel="rank p-value of a random set against the others", ylabel="number of random sets",
               title=f"{report.NAMES.get(method, method)}, {metric}", ylim=(0, 1.7 * max(counts)))  # legend room
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper right")
    return draw


def best_score(sweep, method, spec, metric):
    """A head set's best score over its own grid (report.set_score), or None without results."""
    points = sweep["curves"].get((method, spec))
    return points and report.set_score(sweep, method, spec, metric, {p["grid"] for p in points}, None)[0]


def figures(sweep, claimed, metric, args):
    """[(file name, title, [(panel name, panel)])]: the paper's figures 1-5 (method.md section 4), IPO convergence,
    the test's calibration and the ablation."""
    r, level = results.roles(sweep, claimed), args.level
    like = next((pts[0] for (method, _), pts in sweep["curves"].items() if method != "ablate" and pts), None)
    k, base = r["k"], (results.baseline(sweep, like) or {}).get(metric)  # the unedited model evaluated like the edits
    pool_name = f"random {k}-head sets"
    claimed_style = {"color": CLAIMED_COLOR, "lw": 2, "annotate": True, "zorder": 4}

    def versus_random(method):
        return [(method, claimed, f"{method.upper()} at claimed {claimed}", claimed_style)] + [
            (method, s, f"{method.upper()} at {pool_name}" if i == 0 else None, {"color": RANDOM_COLOR, "lw": 0.8})
            for i, s in enumerate(r["random"])]

    def versus(method, pool, name, title, marks=(), descriptive=False):
        return hist_panel(sweep, method, claimed, pool, metric, name, title, level, marks, descriptive)

    three = [("iti", claimed, f"ITI at {claimed}", claimed_style),
             ("ipo", claimed, f"IPO at {claimed}", {"color": "tab:blue", "lw": 2, "annotate": True}),
             ("ipo", "all", "IPO at all heads", {"color": ALL_COLOR, "lw": 2, "annotate": True})]
    singles = sorted((s for s in r["single"] if ("ipo", s) in sweep["curves"]),
                     key=lambda s: -best_score(sweep, "ipo", s, metric))
    best_singles = [("ipo", s, f"IPO at {s}", {"lw": 1.2, "color": SINGLE_COLORS[i % len(SINGLE_COLORS)]})
                    for i, s in enumerate(singles[:args.n_best_single])]
    unedited = ("unedited", base, {"color": "k", "ls": ":"})
    all_heads = ("IPO at all heads", best_score(sweep, "ipo", "all", metric), {"color": ALL_COLOR, "ls": "--"})
    return [
        ("fig1_iti_probed_vs_random.png", f"ITI: claimed heads {claimed} vs {pool_name}", [
            ("histogram", versus("iti", r["random"], pool_name, "ITI, best over alpha", [unedited])),
            ("truth vs info", curves_panel(sweep, versus_random("iti"), "info", "truth", "ITI over alpha")),
            ("MC2 vs KL", curves_panel(sweep, versus_random("iti"), "kl", "mc2", "ITI over alpha"))]),
        ("fig2_truth_vs_info.png", "Heuristic vs optimal edit: ITI and IPO at the claimed heads, IPO at all heads", [
            ("truth vs info", curves_panel(sweep, three, "info", "truth", "truth vs info")),
            ("MC2 vs KL", curves_panel(sweep, three, "kl", "mc2", "MC2 vs KL"))]),
        ("fig3_ipo_probed_vs_random.png", f"IPO: claimed heads {claimed} vs {pool_name}", [
            ("histogram", versus("ipo", r["random"], pool_name, "IPO, best over tau", [unedited, all_heads])),
            ("truth vs info", curves_panel(sweep, versus_random("ipo"), "info", "truth", "IPO over tau"))]),
        ("fig4_ipo_single_heads.png", f"IPO at single heads vs the claimed {k} heads", [
            ("histogram", versus("ipo", r["single"], "single heads", "IPO, best over tau", [unedited, all_heads],
                                 descriptive=True)),
            ("truth vs info", curves_panel(sweep, [("ipo", claimed, f"IPO at {claimed}", claimed_style)] + best_singles,
                                           "info", "truth", f"the {len(best_singles)} best single heads"))]),
        ("fig5_ipo_kl.png", f"IPO: claimed heads {claimed} vs {pool_name}, against KL", [
            ("MC2 vs KL", curves_panel(sweep, versus_random("ipo"), "kl", "mc2", "MC2 vs KL over tau")),
            ("truth vs KL", curves_panel(sweep, versus_random("ipo"), "kl", "truth", "truth vs KL over tau"))]),
        ("fig6_ipo_convergence.png", "IPO training: has each edit converged?", [
            ("validation loss", convergence_panel(sweep, claimed, "val_loss", args.converged)),
            ("validation margin", convergence_panel(sweep, claimed, "val_margins", args.converged))]),
        ("fig7_calibration.png", f"Calibration of the rank test: each random {k}-head set on trial against the others",
         [(method, calibration_panel(sweep, method, claimed, metric, level)) for method in ("iti", "ipo", "ablate")
          if any(m == method for m, _ in sweep["curves"])]),
        ("fig8_ablation.png", f"Ablation: what is lost when the claimed heads {claimed} are removed, vs {pool_name}", [
            ("histogram", versus("ablate", r["random"], pool_name, "mean-ablation, drop from unedited"))]),
    ]


def heatmap_panel(probe, boxed):
    """Probe validation accuracy [L, H], the boxed (claimed) heads outlined."""
    path = os.path.join(probe or "", "probe.safetensors")
    if not probe or not os.path.isfile(path):
        return f"no probe file {path or 'RUN/probe/probe.safetensors'}"
    from safetensors.numpy import load_file
    accuracy = load_file(path)["accuracy"]  # [L, H]

    def draw(ax):
        from matplotlib.patches import Rectangle
        from matplotlib.ticker import MaxNLocator
        image = ax.imshow(accuracy, aspect="auto", origin="lower", cmap="viridis")
        ax.figure.colorbar(image, ax=ax, label="validation accuracy")
        for l, h in boxed:
            ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec=CLAIMED_COLOR, lw=1.5))
        ax.set(xlabel="head", ylabel="layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    draw.size = (min(14, max(5.5, 2.5 + 0.35 * accuracy.shape[1])), min(12, max(4, 2 + 0.22 * accuracy.shape[0])))
    return draw


def draw_figure(path, title, panels, provenance):
    """One PNG with the panels that have data (5 x 4.3 inches each, or a lone panel's .size); returns the skip
    reasons {panel: reason}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    skipped = {name: panel for name, panel in panels if isinstance(panel, str)}
    drawable = [panel for _, panel in panels if not isinstance(panel, str)]
    for name, reason in skipped.items():
        print(f"{os.path.basename(path)}: skipped {name}: {reason}")
    if drawable:
        size = getattr(drawable[0], "size", (5.0, 4.3))
        fig, axes = plt.subplots(1, len(drawable), figsize=(size[0] * len(drawable), size[1]), squeeze=False)
        for ax, panel in zip(axes[0], drawable):
            panel(ax)
        fig.suptitle(textwrap.fill(title, int(13 * fig.get_figwidth())), fontsize=10)  # ~13 characters an inch
        fig.tight_layout()
        runfiles.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110,
                                                          metadata={"Description": json.dumps(provenance)}))
        plt.close(fig)
        print(f"wrote {path}")
    return skipped


def main(argv=None):
    args = parse_args(argv)
    sweep = results.load_results(args.runs)
    out = args.out or os.path.join(args.runs[0], "figures")
    probe = args.probe or next((f"{r}/probe" for r in args.runs if os.path.isdir(f"{r}/probe")), None)
    if not sweep["paths"] and not probe:
        raise SystemExit(f"nothing to plot: no results/*.json and no probe/ under {', '.join(args.runs)}; "
                         "run sweep.py (or evaluate.py) first")
    metric = results.choose_metric(sweep, args.metric)
    claimed = results.claimed_spec(sweep, args.claimed) if sweep["curves"] else None
    tiny = results.is_plumbing_check(sweep)
    model = sweep["model"] + (" [random tiny model: a plumbing check, not a finding]" if tiny else "")
    boxed = [tuple(map(int, h.split("."))) for h in sweep["heads"].get(claimed, [])]
    plan = [("probe_accuracy.png", "probe accuracy by head" + (f", {claimed} boxed" if boxed else ""),
             [("heatmap", heatmap_panel(probe, boxed))])]
    if claimed:
        k = results.roles(sweep, claimed)["k"]
        plan += [(name, f"{title} (K={k})", panels) for name, title, panels in figures(sweep, claimed, metric, args)]
    provenance, log = runfiles.run_info(args), {"drawn": [], "skipped": {}}
    for name, title, panels in plan:
        skipped = draw_figure(os.path.join(out, name), f"{model}: {title}", panels or [("all", "no results")],
                              provenance)
        log["skipped"].update({f"{name}: {panel}": reason for panel, reason in skipped.items()})
        log["drawn"] += [name] if len(skipped) < len(panels) else []
    runfiles.write_json(os.path.join(out, "figures.json"), {**log, "metric": metric, "claimed": claimed,
                                                          "results": sweep["paths"], "run": provenance})
    if args.report:  # old command lines (sweep.py): the report is report.py's job
        report.main(["--runs", *args.runs, "--level", str(args.level), "--converged", str(args.converged)] +
                    ["--claimed", args.claimed] * bool(args.claimed) + ["--metric", args.metric] * bool(args.metric))


if __name__ == "__main__":
    main()
