"""plot.py - the paper's figures and the localization test, drawn from result files only.

Reads every result JSON under RUN/results (written by evaluate.py; one per evaluated edit, the baseline has edit null)
and RUN/probe/probe.safetensors for the heatmap. Edits are grouped by their method ("iti", "ipo") and head spec
("top:16", "random:16:3", "single:12.7", "all"); each group is a curve over its alpha (ITI) or tau (IPO) grid.
A head set's score is its best value of --metric over that grid.

Writes to --out (default RUN/figures), skipping with a printed reason any figure or panel whose data is missing:
  fig1_iti_probed_vs_random.png   ITI: histogram over random sets (claimed set marked, p-value); truth vs info;
                                  MC2 vs KL
  fig2_truth_vs_info.png          ITI at the claimed heads, IPO at the claimed heads, IPO at all heads
  fig3_ipo_probed_vs_random.png   IPO: histogram over random sets; truth vs info
  fig4_ipo_single_heads.png       IPO: histogram over single heads; the best single heads vs the claimed set
  fig5_ipo_kl.png                 IPO: MC2 vs KL and truth vs KL, claimed vs random sets
  probe_accuracy.png              probe validation accuracy by layer and head, claimed heads boxed
  figures.json                    what was drawn and what was skipped, and why
With --report, also RUN/report.md (one page: the claimed set's rank among random sets and a one-sided permutation
p-value, under ITI and under IPO) and RUN/report.json (the same numbers).

    python plot.py --runs runs/smollm2 --report
"""
import argparse
import glob
import json
import math
import os
import textwrap

import numpy as np

import models
import runfiles

METRICS = ("info_truth", "truth", "info", "mc1", "mc2", "mc3")  # higher is better: usable as the test's metric
LABELS = {"info_truth": "Info*Truth (product of the two rates)", "truth": "Truth (fraction judged true)",
          "info": "Info (fraction judged informative)", "mc1": "MC1 (fraction)", "mc2": "MC2 (mass on true answers)",
          "mc3": "MC3 (fraction)", "kl": "KL(original || edited) (nats per token)", "ce": "CE (nats per token)"}
GRID = {"iti": "alpha", "ipo": "tau"}  # the knob each method sweeps
CLAIMED_COLOR, RANDOM_COLOR, ALL_COLOR = "tab:red", "0.6", "tab:green"
SINGLE_COLORS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run folder(s) holding results/*.json (shards gather here)")
    p.add_argument("--out", default=None, help="figure folder (default: RUN/figures of the first run)")
    p.add_argument("--probe", default=None, help="probe folder for the heatmap (default: RUN/probe of the first run)")
    p.add_argument("--claimed", default=None, help="head spec on trial, exactly as the edits were made with it "
                   "(default: the one top:K in the results); an explicit L.H,L.H list matches by its heads")
    p.add_argument("--metric", default=None, choices=METRICS,
                   help="score of a head set, best over its grid (default: info_truth when judged, else mc2)")
    p.add_argument("--n-best-single", type=int, default=3, help="single heads drawn against the claimed set (fig 4)")
    p.add_argument("--level", type=float, default=0.05, help="significance level of the report's verdict")
    p.add_argument("--report", action="store_true", help="also write RUN/report.md and RUN/report.json")
    return p.parse_args(argv)


# ---- Statistics

def rank_test(claimed, random_values):
    """One-sided permutation (rank) test of 'the claimed set scores higher than random sets'.

    Under H0 the claimed set is exchangeable with the random sets, so its rank among all n+1 is uniform and
    p = (1 + #{random >= claimed}) / (1 + n): exact, ties counted against the claim; the smallest p is 1/(n+1)."""
    random_values = np.asarray(random_values, dtype=float)
    n_at_least = int((random_values >= claimed).sum())
    return {"rank": 1 + n_at_least, "of": 1 + len(random_values), "n_at_least": n_at_least,
            "p": (1 + n_at_least) / (1 + len(random_values))}


def betainc(a, b, x):
    """Regularised incomplete beta I_x(a, b), by Lentz's continued fraction (Numerical Recipes 6.4)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1 - betainc(b, a, 1 - x)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - math.lgamma(a) - math.lgamma(b) + math.lgamma(a + b)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(300):
        m = i // 2
        num = 1.0 if i == 0 else (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)) if i % 2 == 0
                                  else -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)))
        d, c = 1 + num * d, 1 + num / c
        d, c = 1 / (d if abs(d) > 1e-300 else 1e-300), (c if abs(c) > 1e-300 else 1e-300)
        f *= c * d
        if abs(c * d - 1) < 1e-14:
            break
    return front * (f - 1)


def t_sf(t, df):
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1 - tail


def one_sample_t(claimed, random_values):
    """The paper's style of test: H0 'the random sets' mean score equals the claimed set's', one-sided against a
    lower mean. It asks whether the claimed set beats the *average* random set, so its p shrinks with n whatever the
    spread: shown for comparison only; the rank test is the verdict."""
    r = np.asarray(random_values, dtype=float)
    if len(r) < 2 or r.std(ddof=1) == 0:
        return None
    t = (claimed - r.mean()) / (r.std(ddof=1) / math.sqrt(len(r)))
    return {"t": float(t), "df": len(r) - 1, "p": t_sf(t, len(r) - 1)}


# ---- Result files -> curves

def method_label(edit):
    """'iti' / 'ipo' for the paper's variants; other variants (a probe direction, a learned offset) kept apart."""
    method = edit.get("method", "?")
    variant = edit.get("direction", "mass_mean") if method == "iti" else edit.get("param", "lora1")
    return method if variant in ("mass_mean", "lora1") else f"{method}-{variant}"


def load_results(runs):
    """{'baseline': metrics or None, 'curves': {(method, head_spec): [point, ...] sorted by grid value}, ...}."""
    paths = sorted(p for run in runs for p in glob.glob(os.path.join(run, "results", "**", "*.json"), recursive=True))
    baseline, curves, heads, models_seen, n_questions = None, {}, {}, set(), set()
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        if not isinstance(result, dict) or "metrics" not in result or "edit" not in result:
            print(f"skipping {path}: not a result file of evaluate.py")
            continue
        n_questions.add(result["metrics"].get("n_questions"))
        edit = result["edit"]
        if edit is None:
            if baseline is not None:
                print(f"skipping {path}: a second baseline result (kept the first)")
            baseline = baseline or result["metrics"]
            models_seen.add(((result.get("run") or {}).get("args") or {}).get("model"))
            continue
        key = (method_label(edit), edit.get("head_spec", ",".join(edit.get("heads", []))))
        grid = edit.get(GRID.get(edit.get("method"), "alpha"))
        points = curves.setdefault(key, [])
        if any(p["grid"] == grid for p in points):
            print(f"skipping {path}: {key[0]} {key[1]} at {grid} was already read")
            continue
        points.append({"grid": grid, "path": path, **result["metrics"]})
        heads[key[1]] = edit.get("heads", [])
        models_seen.add(edit.get("model"))
    for points in curves.values():
        points.sort(key=lambda p: (p["grid"] is None, p["grid"] or 0))
    if len(n_questions) > 1:
        print(f"note: results were evaluated on different numbers of questions {sorted(map(str, n_questions))}")
    models_seen.discard(None)
    return {"baseline": baseline, "curves": curves, "heads": heads, "paths": paths,
            "model": " / ".join(sorted(models_seen)) or "unknown model"}


def has(sweep, metric):
    points = [p for c in sweep["curves"].values() for p in c] + [sweep["baseline"] or {}]
    return any(p.get(metric) is not None for p in points)


def claimed_spec(sweep, claimed):
    """The head spec on trial: --claimed, matched to the specs in the results, or the one top:K found there."""
    specs = sorted({spec for _, spec in sweep["curves"]})
    if claimed is None:
        tops = [s for s in specs if s.startswith("top:")]
        if len(tops) != 1:
            raise SystemExit(f"cannot choose the claimed head set: the results hold {len(tops)} top:K specs "
                             f"({', '.join(tops) or 'none'}); pass --claimed SPEC (one of: {', '.join(specs)})")
        return tops[0]
    if claimed in specs:
        return claimed
    wanted = sorted(claimed.replace("single:", "").split(","))
    for spec in specs:
        if sorted(sweep["heads"].get(spec, [])) == wanted and not spec.startswith("random:"):
            return spec
    raise SystemExit(f"--claimed {claimed}: no result was made at those heads; the results hold {', '.join(specs)}")


def roles(sweep, claimed):
    """The head specs playing each part in the test, from the head counts recorded in the edits."""
    k = len(sweep["heads"].get(claimed, [])) or None
    specs = sorted({spec for _, spec in sweep["curves"]})
    size = lambda s: len(sweep["heads"].get(s, []))  # noqa: E731
    return {"k": k, "random": [s for s in specs if s.startswith("random:") and size(s) == k and s != claimed],
            "single": [s for s in specs if size(s) == 1 and s != claimed and s != "all"]}


def best(points, metric):
    """(best value of `metric` over a curve, the point where it is reached), or (None, None)."""
    scored = [p for p in points or [] if p.get(metric) is not None]
    if not scored:
        return None, None
    top = max(scored, key=lambda p: p[metric])
    return top[metric], top


def trial(sweep, method, claimed, pool, metric):
    """The claimed set's best score vs the pool's best scores, with both tests; None if either side is missing."""
    claimed_best, at = best(sweep["curves"].get((method, claimed)), metric)
    pool_best = {s: best(sweep["curves"].get((method, s)), metric)[0] for s in pool}
    pool_best = {s: v for s, v in pool_best.items() if v is not None}
    if claimed_best is None or not pool_best:
        return None
    values = list(pool_best.values())
    return {"claimed": claimed_best, "claimed_at": {GRID.get(method, "grid"): at["grid"]}, "pool": pool_best,
            "min": min(values), "median": float(np.median(values)), "max": max(values),
            "rank_test": rank_test(claimed_best, values), "t_test": one_sample_t(claimed_best, values)}


# ---- Panels: each returns a reason (str) when its data is missing, else a function that draws it on an axis

def missing(sweep, *metrics):
    gone = [m for m in metrics if not has(sweep, m)]
    judged = {"truth", "info", "info_truth"}
    return gone and f"no {', '.join(gone)} in the results" + (" (judges were skipped)" if judged & set(gone) else "")


def curves_panel(sweep, lines, x, y, title):
    """lines: [(method, spec, label, style)]: `y` against `x` along each curve over its grid, the baseline a star."""
    lines = [line for line in lines if sweep["curves"].get(line[:2])]
    if missing(sweep, x, y) or not lines:
        return missing(sweep, x, y) or "no results for these edits"

    def draw(ax):
        for method, spec, label, style in lines:
            points = [p for p in sweep["curves"][(method, spec)] if p.get(x) is not None and p.get(y) is not None]
            style = dict(style)
            annotate = style.pop("annotate", False)
            ax.plot([p[x] for p in points], [p[y] for p in points], marker="o", ms=3, label=label, **style)
            for p in points if annotate else []:  # the grid value beside each point
                ax.annotate(f"{GRID.get(method[:3], '')}={p['grid']:g}", (p[x], p[y]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points", color=style.get("color"))
        base = sweep["baseline"] or {}
        if base.get(x) is not None and base.get(y) is not None:
            ax.plot(base[x], base[y], "k*", ms=11, label="unedited", zorder=5)
        ax.set(xlabel=LABELS[x], ylabel=LABELS[y], title=title)
        ax.legend(fontsize=7)
    return draw


def hist_panel(sweep, method, claimed, pool, metric, pool_name, title, marks=(), descriptive=False):
    """Histogram of the pool's best scores, the claimed set's best marked with its rank and p-value;
    marks: [(label, value, line style)] more vertical lines (the unedited model, IPO at all heads);
    descriptive: count the pool members that do as well instead of a p-value (a pool of another size)."""
    result = trial(sweep, method, claimed, pool, metric)
    if result is None:
        return missing(sweep, metric) or f"needs {method} results at {claimed} and at {pool_name}"
    marks = [(label, value, style) for label, value, style in marks if value is not None]

    def draw(ax):
        from matplotlib.ticker import MaxNLocator
        values, test = list(result["pool"].values()), result["rank_test"]
        counts, _, _ = ax.hist(values, bins=max(5, min(20, len(values) // 2)), color=RANDOM_COLOR, edgecolor="white",
                               label=f"{len(values)} {pool_name}")
        ax.axvline(result["claimed"], color=CLAIMED_COLOR, lw=2.5, label=f"claimed {claimed}: " + (
            f"rank {test['rank']} of {test['of']}, p = {test['p']:.3g}" if descriptive is False else
            f"{test['n_at_least']} of {len(values)} {pool_name} do as well"))
        for label, value, style in marks:
            ax.axvline(value, lw=1.5, label=label, **style)
        ax.set(xlabel=f"best {LABELS[metric]} over the {GRID.get(method, 'grid')} grid",
               ylabel="number of head sets", title=title, ylim=(0, 1.5 * max(counts)))  # room for the legend
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(5))  # long tick labels when the scores differ in the 4th digit
        ax.legend(fontsize=7, loc="upper left")
    return draw


def figures(sweep, claimed, metric, n_best_single):
    """[(file name, title, [(panel name, panel)])]: the paper's figures 1-5 (method.md section 4)."""
    r = roles(sweep, claimed)
    k, base = r["k"], (sweep["baseline"] or {}).get(metric)
    pool_name = f"random {k}-head sets"
    claimed_style = {"color": CLAIMED_COLOR, "lw": 2, "annotate": True, "zorder": 4}

    def versus_random(method):
        return [(method, claimed, f"{method.upper()} at claimed {claimed}", claimed_style)] + [
            (method, s, f"{method.upper()} at {pool_name}" if i == 0 else None, {"color": RANDOM_COLOR, "lw": 0.8})
            for i, s in enumerate(r["random"])]

    three = [("iti", claimed, f"ITI at {claimed}", claimed_style),
             ("ipo", claimed, f"IPO at {claimed}", {"color": "tab:blue", "lw": 2, "annotate": True}),
             ("ipo", "all", "IPO at all heads", {"color": ALL_COLOR, "lw": 2, "annotate": True})]
    singles = sorted(r["single"], key=lambda s: -(best(sweep["curves"].get(("ipo", s)), metric)[0] or -math.inf))
    best_singles = [("ipo", s, f"IPO at {s}", {"lw": 1.2, "color": SINGLE_COLORS[i % len(SINGLE_COLORS)]})
                    for i, s in enumerate(singles[:n_best_single])]
    unedited = ("unedited", base, {"color": "k", "ls": ":"})
    all_heads = ("IPO at all heads", best(sweep["curves"].get(("ipo", "all")), metric)[0],
                 {"color": ALL_COLOR, "ls": "--"})
    return [
        ("fig1_iti_probed_vs_random.png", f"ITI: claimed heads {claimed} vs {pool_name}", [
            ("histogram", hist_panel(sweep, "iti", claimed, r["random"], metric, pool_name, "ITI, best over alpha",
                                     [unedited])),
            ("truth vs info", curves_panel(sweep, versus_random("iti"), "info", "truth", "ITI over alpha")),
            ("MC2 vs KL", curves_panel(sweep, versus_random("iti"), "kl", "mc2", "ITI over alpha"))]),
        ("fig2_truth_vs_info.png", "Heuristic vs optimal edit: ITI and IPO at the claimed heads, IPO at all heads", [
            ("truth vs info", curves_panel(sweep, three, "info", "truth", "truth vs info")),
            ("MC2 vs KL", curves_panel(sweep, three, "kl", "mc2", "MC2 vs KL"))]),
        ("fig3_ipo_probed_vs_random.png", f"IPO: claimed heads {claimed} vs {pool_name}", [
            ("histogram", hist_panel(sweep, "ipo", claimed, r["random"], metric, pool_name, "IPO, best over tau",
                                     [unedited, all_heads])),
            ("truth vs info", curves_panel(sweep, versus_random("ipo"), "info", "truth", "IPO over tau"))]),
        ("fig4_ipo_single_heads.png", f"IPO at single heads vs the claimed {k} heads", [
            ("histogram", hist_panel(sweep, "ipo", claimed, r["single"], metric, "single heads", "IPO, best over tau",
                                     [unedited, all_heads], descriptive=True)),
            ("truth vs info", curves_panel(sweep, [("ipo", claimed, f"IPO at {claimed}", claimed_style)] + best_singles,
                                           "info", "truth", f"the {len(best_singles)} best single heads"))]),
        ("fig5_ipo_kl.png", f"IPO: claimed heads {claimed} vs {pool_name}, against KL", [
            ("MC2 vs KL", curves_panel(sweep, versus_random("ipo"), "kl", "mc2", "MC2 vs KL over tau")),
            ("truth vs KL", curves_panel(sweep, versus_random("ipo"), "kl", "truth", "truth vs KL over tau"))]),
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


# ---- The localization report

def verdict(name, result, k, level):
    if result is None:
        return f"- **{name}**: not tested (results missing at the claimed heads or at the random {k}-head sets)."
    test, n = result["rank_test"], len(result["pool"])
    where = f"rank {test['rank']} of {test['of']}, p = {test['p']:.3g}"
    if test["p"] <= level:
        return f"- **{name}**: the claimed heads beat the random {k}-head sets ({where} <= {level})."
    line = f"- **{name}**: the random {k}-head sets do as well as the claimed heads ({where} > {level})."
    if 1 / (n + 1) > level:
        line += (f" With {n} random sets the smallest attainable p is 1/{n + 1} = {1 / (n + 1):.3g}: "
                 f"run at least {math.ceil(1 / level) - 1} for a verdict at level {level}.")
    return line


def report(sweep, claimed, metric, level):
    """(markdown text, numbers): the claimed head set on trial against random head sets under ITI and under IPO."""
    r = roles(sweep, claimed)
    k, base = r["k"], sweep["baseline"] or {}
    trials = {"ITI": trial(sweep, "iti", claimed, r["random"], metric),
              "IPO": trial(sweep, "ipo", claimed, r["random"], metric),
              "IPO, single heads": trial(sweep, "ipo", claimed, r["single"], metric)}
    ipo_all = best(sweep["curves"].get(("ipo", "all")), metric)[0]
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    lines = [f"# Localization report: `{claimed}` on {sweep['model']}", ""]
    if any(name in models.TINY_CONFIGS for name in sweep["model"].split(" / ")):
        lines += ["**A random tiny model: every number below is a plumbing check, not a finding.**", ""]
    n_questions = sorted({str(p.get("n_questions")) for c in sweep["curves"].values() for p in c})
    lines += [f"Claimed head set `{claimed}` ({k} heads: {', '.join(sweep['heads'].get(claimed, []))}), put on trial "
              f"against random {k}-head sets. Score of a head set: its best **{metric}** over its alpha (ITI) or "
              f"tau (IPO) grid, on {' / '.join(n_questions)} test questions. Unedited model: {metric} = "
              f"{fmt(base.get(metric))}" + (f", MC2 = {fmt(base.get('mc2'))}." if metric != "mc2" else "."), "",
              "| edit | claimed set (best at) | compared with | their min / median / max | claimed rank | "
              "rank p-value | t-test p (paper's style) |", "|---|---|---|---|---|---|---|"]
    for name, result in trials.items():
        if result is None:
            lines.append(f"| {name} | missing | | | | | |")
            continue
        test, t = result["rank_test"], result["t_test"]
        pool = f"{len(result['pool'])} {'single heads' if 'single' in name else f'random {k}-head sets'}"
        at = ", ".join(f"{key} {value:g}" for key, value in result["claimed_at"].items() if value is not None)
        p = f"{test['p']:.3g} | {fmt(t and t['p'])}" if "single" not in name else "(descriptive) | "
        lines.append(f"| {name} | {result['claimed']:.3g} ({at}) | {pool} | {result['min']:.3g} / "
                     f"{result['median']:.3g} / {result['max']:.3g} | {test['rank']} of {test['of']} | {p} |")
    single = trials["IPO, single heads"]
    lines += ["", f"IPO at all heads: best {metric} = {fmt(ipo_all)}."]
    if single:
        lines.append(f"{single['rank_test']['n_at_least']} of {len(single['pool'])} single heads edited by IPO score "
                     f"at least as well as the claimed {k} heads.")
    lines += ["", "## Verdict", "", verdict("ITI (the heuristic edit)", trials["ITI"], k, level),
              verdict("IPO (the optimal edit)", trials["IPO"], k, level), ""]
    test = trials["IPO"] and trials["IPO"]["rank_test"]
    if test and test["p"] <= level:
        lines.append("Under the optimal edit the claimed heads stand out from random heads: editing them gives "
                     "evidence, by this test, that the behaviour is localized there.")
    elif test and test["rank"] == 1:
        lines.append("Under the optimal edit the claimed heads rank first, but too few random sets were run for the "
                     "test to reach its level: inconclusive.")
    elif test:
        lines.append("Under the optimal edit the claimed heads do not stand out from random heads: that editing them "
                     "works gives no evidence that the behaviour is localized there (the paper's argument).")
    lines += ["", "## The test", "",
              "One-sided permutation (rank) test. H0: the claimed set is exchangeable with random sets of the same "
              "size, so its rank among all n+1 sets is uniform. p = (1 + #{random sets scoring >= the claimed set}) "
              "/ (1 + n): exact under H0, ties counted against the claim; the smallest attainable p is 1/(n+1). "
              "The t-test (H0: the random sets' mean equals the claimed score) asks only whether the claimed set "
              "beats the *average* random set; its p-value falls with n however wide the spread, so it is shown "
              "for comparison with the paper, not as the verdict. Single heads are a different population from "
              f"{k}-head sets: their row is descriptive."]
    numbers = {"model": sweep["model"], "claimed": claimed, "k": k, "metric": metric, "level": level,
               "baseline": sweep["baseline"], "ipo_all": ipo_all, "trials": trials}
    return "\n".join(lines) + "\n", numbers


def main(argv=None):
    args = parse_args(argv)
    sweep = load_results(args.runs)
    out = args.out or os.path.join(args.runs[0], "figures")
    probe = args.probe or next((f"{r}/probe" for r in args.runs if os.path.isdir(f"{r}/probe")), None)
    if not sweep["paths"] and not probe:
        raise SystemExit(f"nothing to plot: no results/*.json and no probe/ under {', '.join(args.runs)}; "
                         "run sweep.py (or evaluate.py) first")
    metric = args.metric or ("info_truth" if has(sweep, "info_truth") else "mc2")
    if sweep["paths"] and not has(sweep, metric):
        raise SystemExit(f"--metric {metric}: no result holds it" + (
            " (judges were skipped: use --metric mc2)" if metric in ("truth", "info", "info_truth") else ""))
    claimed = claimed_spec(sweep, args.claimed) if sweep["curves"] else None
    model = sweep["model"] + (" [random tiny model: a plumbing check, not a finding]"
                              if sweep["model"] in models.TINY_CONFIGS else "")
    boxed = [tuple(map(int, h.split("."))) for h in sweep["heads"].get(claimed, [])]
    plan = [("probe_accuracy.png", "probe accuracy by head" + (f", {claimed} boxed" if boxed else ""),
             [("heatmap", heatmap_panel(probe, boxed))])]
    if claimed:
        k = roles(sweep, claimed)["k"]
        plan += [(name, f"{title} (K={k})", panels) for name, title, panels in
                 figures(sweep, claimed, metric, args.n_best_single)]
    provenance, log = runfiles.run_info(args), {"drawn": [], "skipped": {}}
    for name, title, panels in plan:
        skipped = draw_figure(os.path.join(out, name), f"{model}: {title}", panels, provenance)
        log["skipped"].update({f"{name}: {panel}": reason for panel, reason in skipped.items()})
        log["drawn"] += [name] if len(skipped) < len(panels) else []
    runfiles.write_json(os.path.join(out, "figures.json"), {**log, "metric": metric, "claimed": claimed,
                                                          "results": sweep["paths"], "run": provenance})
    if args.report:
        if not claimed:
            raise SystemExit("--report needs edited results: run sweep.py (or iti.py, ipo_edit.py, evaluate.py) first")
        text, numbers = report(sweep, claimed, metric, args.level)
        text += f"\nMade by `{provenance['command']}` at {provenance['time']}.\n"
        folder = os.path.dirname(os.path.abspath(out))  # beside the figures: RUN/report.md
        runfiles.write_atomic(f"{folder}/report.md", lambda tmp: open(tmp, "w").write(text))
        runfiles.write_json(f"{folder}/report.json", {**numbers, "run": provenance})
        print(text)


if __name__ == "__main__":
    main()
