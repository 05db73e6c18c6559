"""report.py - the localization test and its verdict, with a 95% interval on every number, from result files only.

Is the claimed head set special? A head set's score is its best --metric over the alpha (ITI) or tau (IPO) grid that
every compared set has; for an ablation (method "ablate": the heads' outputs replaced by their mean) it is the drop
from the unedited model, so a larger drop means more necessary heads. The claimed set is ranked among random sets of
the same size, p = (1 + #{random >= claimed}) / (1 + n). The verdict is "stands out" when p <= --level; "does not
stand out" only when p could have reached the level (n >= 19 at 0.05) and the random sets differ by more than the
noise of one score; otherwise "inconclusive", with what would make it conclusive. Every metric carries a percentile
bootstrap interval over questions (from the rows in NAME.jsonl beside each NAME.json); comparisons are paired on the
same questions. Reading and guarding the result files, and the intervals: results.py; the per-edit checks (non-answers,
repeated answers, IPO convergence): edit_checks.py.

Reads:  RUN/results/**/*.json (evaluate.py; the unedited baseline has edit null), NAME.jsonl beside each, and for IPO
        the training log NAME.log.json beside each edit file.
Writes: RUN/report.md and RUN/report.json (strict JSON) in the first run folder (or --out):
        a headline table with intervals; per trial (ITI, IPO, IPO at single heads, ablation) the claimed score [CI],
        the random sets' min / median / max, rank, p, noise floor, spread and the verdict under --metric and under
        MC2 (no judge) side by side; "The test" with its calibration; per edit the share of non-answers and of
        repeated answers, and whether IPO training converged.

    python report.py --runs runs/smollm2
"""
import argparse
import math
import os

import numpy as np
from scipy import stats

import runfiles
from edit_checks import edit_section
from results import (METRICS, N_RESAMPLES, add_run_args, baseline, check_poolable, choose_metric, claimed_spec,
                     common_grid, grid_order, has, interval, is_plumbing_check, knob, load_results, num, roles, with_ci)

COLUMNS = ("mc1", "mc2", "mc3", "truth", "info", "info_truth")  # the headline table's order
DROP = {"ablate"}  # methods whose score is the loss from the unedited model: a larger drop = more necessary heads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "folder for report.md and report.json (default: the first run)")
    g = p.add_argument_group("the test")
    g.add_argument("--metric", default=None, choices=METRICS,
                   help="score of a head set, best over its grid (default: info_truth when judged, else mc2); the "
                        "verdict under mc2 is always given beside it")
    g.add_argument("--level", type=float, default=0.05, help="significance level of the verdict")
    g.add_argument("--resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples of the questions")
    g.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    g = p.add_argument_group("per edit")
    g.add_argument("--converged", type=float, default=0.05, help="an IPO edit has converged when its validation loss "
                   "fell by at least this fraction from its first logged value and then changed by less than it over "
                   "the last logged interval")
    return p.parse_args(argv)


# ---- The rank test, its verdict and its calibration

def rank_test(claimed, random_values):
    """One-sided permutation (rank) test of 'the claimed set scores higher than random sets'.

    Under H0 the claimed set is exchangeable with the random sets, so its rank among all n+1 is uniform and
    p = (1 + #{random >= claimed}) / (1 + n): exact, ties counted against the claim; the smallest p is 1/(n+1)."""
    random_values = np.asarray(random_values, dtype=float)
    n_at_least = int((random_values >= claimed).sum())
    return {"rank": 1 + n_at_least, "of": 1 + len(random_values), "n_at_least": n_at_least,
            "p": (1 + n_at_least) / (1 + len(random_values))}


def verdict(p, n, noise, spread, level, n_questions=None):
    """('stands out' | 'does not stand out' | 'inconclusive', [what would make it conclusive]).
    noise: the noise floor (half-width of one score's interval); spread: the random sets' standard deviation. Under
    pure noise the SD is about half the half-width (half-width = 1.96 SE), so SD > half-width means the random sets
    really differ, and a claimed set as special as they are different would be seen."""
    if p <= level:
        return "stands out", []
    needs = []
    if 1 / (n + 1) > level:
        needs.append(f"at least {math.ceil(1 / level) - 1} random sets (now {n}: the smallest p is 1/{n + 1})")
    if noise is None:
        needs.append("the per-question rows (NAME.jsonl beside each result) to know the noise floor")
    elif spread is not None and spread <= noise:
        # the noise floor shrinks as 1/sqrt(questions); TruthfulQA has 817 questions in all
        more = math.ceil(n_questions * (noise / spread) ** 2) if n_questions and spread > 0 else None
        more = "" if more is None else f" (about {more})" if more <= 817 else " (more than TruthfulQA's 817: the " \
            "random sets hardly differ)"
        needs.append(f"more questions{more}: the random sets' spread {spread:.3g} is within the noise floor "
                     f"{noise:.3g}")
    return ("inconclusive" if needs else "does not stand out"), needs


def share_interval(k, n, level=0.95):
    """Clopper-Pearson interval of a share k/n."""
    ci = stats.binomtest(k, n).proportion_ci(level)
    return [float(ci.low), float(ci.high)]


def calibration(pool, level):
    """Each random set in turn on trial against the others: {p: [...], share: share of p <= level, interval}.
    pool: {spec: score}. Within one pool the ranks are a permutation, so the share is at most floor(level n)/n by
    construction: this checks that every set went through the same grid and scoring, not the claimed set."""
    specs = sorted(pool)
    if len(specs) < 2:
        return None
    p = [rank_test(pool[s], [pool[o] for o in specs if o != s])["p"] for s in specs]
    k = sum(v <= level for v in p)
    return {"p": p, "n": len(p), "share": k / len(p), "interval": share_interval(k, len(p))}


# ---- The trial: the claimed set against a pool of head sets

def set_score(sweep, method, spec, metric, grid, base):
    """(score, point): the set's best score over `grid` (for an ablation: the largest drop from the unedited model).
    A missing or non-finite score is an error naming its file."""
    best, at = None, None
    for p in sweep["curves"][(method, spec)]:
        value = p.get(metric)
        if p["grid"] not in grid:
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            judges = " with the judges (or pass --metric mc2)" if value is None else ""
            raise SystemExit(f"{p['path']}: {metric} is {value}, and a trial needs a finite score from every result: "
                             f"rerun evaluate.py for that edit{judges}, or leave it out of --runs")
        value = base[metric] - value if method in DROP else value
        if best is None or value > best:
            best, at = value, p
    return best, at


def trial(sweep, method, claimed, pool, metric, level, opts=None, descriptive=False, grid=None):
    """The claimed set's score vs the pool's over `grid` (default: the values every set has): the rank test,
    intervals, noise floor, spread and verdict; {'missing': reason} when a side is missing."""
    pool = [s for s in pool if (method, s) in sweep["curves"]]
    if (method, claimed) not in sweep["curves"] or not pool:
        return {"missing": f"needs {method} results at {claimed} and at the sets it is compared with"}
    grid = common_grid(sweep, method, [claimed] + pool) if grid is None else grid
    if not grid:
        return {"missing": f"no {knob(method)} value is shared by every set"}
    points = [p for s in [claimed] + pool for p in sweep["curves"][(method, s)] if p["grid"] in grid]
    base = baseline(sweep, points[0])
    check_poolable(points + [base] * (base is not None))
    if method in DROP and (base is None or not isinstance(base.get(metric), (int, float))):
        return {"missing": f"needs the unedited result with {metric} to measure the drop"}
    scored = {s: set_score(sweep, method, s, metric, grid, base) for s in [claimed] + pool}
    claimed_score, at = scored.pop(claimed)
    values = [v for v, _ in scored.values()]
    drop = method in DROP
    ci = {s: interval(metric, *((base, p) if drop else (p, None)), opts) for s, (_, p) in [(claimed, (0, at)),
                                                                                           *scored.items()]}
    halves = [(hi - lo) / 2 for lo, hi in filter(None, ci.values())]
    noise = float(np.median(halves)) if len(halves) == len(ci) else None
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else None
    # claimed - random on the same questions (for a drop: (base - claimed) - (base - random) = random - claimed)
    diffs = {s: interval(metric, *((p, at) if drop else (at, p)), opts) for s, (_, p) in scored.items()}
    test = rank_test(claimed_score, values)
    out = {"metric": metric, "score": "drop from unedited" if drop else "best over the grid", "claimed": claimed_score,
           "claimed_ci": ci[claimed], "claimed_at": {knob(method): at["grid"]},
           "claimed_path": at["path"], "grid": sorted(grid, key=grid_order),
           "pool": {s: v for s, (v, _) in scored.items()}, "pool_ci": {s: ci[s] for s in scored},
           "n": len(values), "min": min(values), "median": float(np.median(values)), "max": max(values),
           "rank_test": test, "noise_floor": noise, "spread": spread,
           "paired": {"above": sum(d is not None and d[0] > 0 for d in diffs.values()),
                      "below": sum(d is not None and d[1] < 0 for d in diffs.values()), "intervals": diffs},
           "n_questions": at.get("n_questions")}
    out["calibration"] = calibration(out["pool"], level)
    t = stats.ttest_1samp(values, claimed_score, alternative="less") if spread else None
    out["t_test_p"] = None if t is None else float(t.pvalue)  # the paper's style: vs the *mean* random set
    if descriptive:
        out.update(verdict="descriptive", needs=[], calibration=None)
    else:
        out["verdict"], out["needs"] = verdict(test["p"], len(values), noise, spread, level, out["n_questions"])
    return out


# ---- The report

NAMES = {"iti": "ITI", "ipo": "IPO", "ablate": "Ablation"}
ABOUT = {"iti": "the heuristic edit", "ipo": "the optimal edit", "ablate": "what is lost when the heads are removed"}


def in_order(method):
    """Sort key: ITI, IPO, ablation, then other methods by name."""
    return (list(NAMES).index(method) if method in NAMES else len(NAMES), method)


def all_trials(sweep, claimed, metrics, level, opts):
    """{trial name: {metric: trial}}: per method, the claimed set vs random sets of its size, and (descriptive) vs
    single heads."""
    r, out = roles(sweep, claimed), {}
    for method in sorted({m for m, _ in sweep["curves"]}, key=in_order):
        for part, descriptive in (("random", False), ("single", True)):
            pool = [s for s in r[part] if (method, s) in sweep["curves"]]
            if (method, claimed) not in sweep["curves"] and not pool or descriptive and not pool:
                continue
            specs = [claimed] + pool if (method, claimed) in sweep["curves"] else []
            grid = common_grid(sweep, method, specs) if len(specs) > 1 else set()  # printed once for every metric
            name = NAMES.get(method, method.upper()) + (", single heads" if descriptive else "")
            out[name] = {m: trial(sweep, method, claimed, pool, m, level, opts, descriptive, grid) for m in metrics}
    return out


def headline(sweep, claimed, metric, opts):
    """(table lines, rows): the unedited model and each method's best edit at the claimed heads and at all heads,
    every metric with its interval, and the paired difference from the unedited model."""
    edits = []
    by_method = lambda c: (in_order(c[0][0]), c[0][1] == "all")  # noqa: E731
    for (method, spec), points in sorted(sweep["curves"].items(), key=by_method):
        base = baseline(sweep, points[0])
        if spec in (claimed, "all") and (base is not None or method not in DROP):
            _, at = set_score(sweep, method, spec, metric, {p["grid"] for p in points}, base)
            check_poolable([at] + [base] * (base is not None))
            edits.append((f"{NAMES.get(method, method)} at {'all heads' if spec == 'all' else spec}", at, base))
    first = baseline(sweep, edits[0][1] if edits else None)
    if first is None and sweep["baselines"]:
        print(f"note: the unedited result {sweep['baselines'][0]['path']} was evaluated differently from the edits: "
              "no comparison with it (evaluate it again with the edits' settings)")
    lines = ["| edit (best over its grid) | " + " | ".join(COLUMNS) + f" | {metric} - unedited |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    rows_ = []
    for label, point, base in [("unedited", first, None)] * (first is not None) + edits:
        ci = {m: interval(m, point, None, opts) for m in COLUMNS}
        value = {m: runfiles.finite_or_none(point.get(m)) for m in COLUMNS}
        diff = None if base is None or None in (value[metric], base.get(metric)) else value[metric] - base[metric]
        diff_ci = None if base is None else interval(metric, point, base, opts)
        rows_.append({"edit": label, "path": point["path"], "metrics": value, "intervals": ci,
                      "minus_unedited": diff, "minus_unedited_ci": diff_ci})
        lines.append(f"| {label} | " + " | ".join(with_ci(value[m], ci[m]) for m in COLUMNS) +
                     f" | {'' if base is None else with_ci(diff, diff_ci)} |")
    return lines, rows_


def trial_lines(trials):
    """The trials table: per trial and metric, the claimed score [CI], the pool, the rank test and the verdict."""
    lines = ["| trial | metric | claimed [CI] (at) | random min / median / max | n | rank | p | noise floor | spread "
             "| claimed - random: above / below | verdict |", "|" + "---|" * 11]
    for name, by_metric in trials.items():
        for m, t in by_metric.items():
            if "missing" in t:
                lines.append(f"| {name} | {m} | not tested: {t['missing']} |" + " |" * 8)
                continue
            at = "".join(f" ({key} {v:g})" for key, v in t["claimed_at"].items() if v is not None)
            test = t["rank_test"]
            lines.append(f"| {name} | {m} | {with_ci(t['claimed'], t['claimed_ci'])}{at} | {num(t['min'])} / "
                         f"{num(t['median'])} / {num(t['max'])} | {t['n']} | {test['rank']} of {test['of']} | "
                         f"{num(test['p'])} | {num(t['noise_floor'])} | {num(t['spread'])} | "
                         f"{t['paired']['above']} / {t['paired']['below']} | {t['verdict']} |")
    return lines


def verdict_lines(trials, k):
    """The verdict in words: per trial under each metric, a warning where the metrics disagree, and what the optimal
    edit's (IPO's) verdict says of localization."""
    lines = []
    for name, by_metric in trials.items():
        tested = {m: t for m, t in by_metric.items() if "missing" not in t}
        if name.endswith("single heads"):
            lines += [f"- **{name}** (descriptive): {t['rank_test']['n_at_least']} of {t['n']} single heads score at "
                      f"least as well as the claimed {k} heads under {m}." for m, t in list(tested.items())[:1]]
            continue
        said = [f"under {m}: " + (f"not tested ({t['missing']})" if m not in tested else f"**{t['verdict']}** (rank "
                f"{t['rank_test']['rank']} of {t['rank_test']['of']}, p = {t['rank_test']['p']:.3g}" +
                "".join(f"; conclusive with {' and '.join(t['needs'])}" for _ in t["needs"][:1]) + ")")
                for m, t in by_metric.items()]
        method = next((m for m, n in NAMES.items() if n == name), None)
        lines.append(f"- **{name}**" + (f" ({ABOUT[method]})" if method else "") + f": the claimed heads against "
                     f"random {k}-head sets, " + "; ".join(said) + ".")
        if len({t["verdict"] for t in tested.values()}) > 1:
            lines.append("  The two metrics disagree: the judged score and the judge-free MC2 tell different stories "
                         "here; trust neither alone.")
    ipo = next(iter((trials.get("IPO") or {}).values()), {"missing": "no IPO trial"})
    if "missing" in ipo:
        return lines
    return lines + ["", {"stands out": "Under the optimal edit the claimed heads stand out from random heads: editing "
                         "them gives evidence, by this test, that the behaviour is localized there.",
                         "does not stand out": "Under the optimal edit the claimed heads do not stand out from random "
                         "heads: that editing them works gives no evidence that the behaviour is localized there "
                         "(the paper's argument).",
                         "inconclusive": "Under the optimal edit this run cannot tell whether the claimed heads stand "
                         "out: the verdict is inconclusive."}[ipo["verdict"]]]


def report(sweep, claimed, metric, args):
    """(markdown text, numbers for report.json)."""
    opts, k = (args.resamples, args.seed), roles(sweep, claimed)["k"]
    trials = all_trials(sweep, claimed, [metric] + ["mc2"] * (metric != "mc2" and has(sweep, "mc2")), args.level,
                        opts)
    table, headline_rows = headline(sweep, claimed, metric, opts)
    edit_lines, edits = edit_section(sweep, metric, opts, args.converged)
    lines = [f"# Localization report: `{claimed}` on {sweep['model']}", "",
             *["**A random tiny model: every number below is a plumbing check, not a finding.**", ""] *
             is_plumbing_check(sweep),
             f"Claimed head set `{claimed}` ({k} heads: {', '.join(sweep['heads'].get(claimed, []))}), on trial "
             f"against random {k}-head sets. Every number carries its 95% bootstrap interval over questions "
             f"({args.resamples} resamples, seed {args.seed}); a difference between edits is paired on the same "
             "questions.", "", "## Headline", "", *table, "", "## Trials", "",
             "Score of a head set: its best value over the grid every compared set has (for an ablation: the largest "
             "drop from the unedited model); its interval is at the chosen grid value (picking the best of several "
             "values lifts every set's score a little alike). Noise floor: the median half-width of one set's "
             "interval. Spread: the standard deviation of the random sets' scores. Claimed - random: how many random "
             "sets the claimed set is above / below by a paired interval that excludes 0.", "",
             *trial_lines(trials), "", "## Verdict", "", *verdict_lines(trials, k),
             *test_section(trials, metric, args.level), *edit_lines]
    return "\n".join(lines) + "\n", {
        "model": sweep["model"], "claimed": claimed, "k": k, "metric": metric, "level": args.level,
        "resamples": args.resamples, "seed": args.seed, "headline": headline_rows, "trials": trials, "edits": edits}


def test_section(trials, metric, level):
    """'The test': the rule and its calibration on these results (all trials together: under `metric`)."""
    rows_, k_all, n_all = [], 0, 0
    for name, by_metric in trials.items():
        for m, t in by_metric.items():
            c = t.get("calibration")
            if c:
                if m == metric:
                    k_all, n_all = k_all + round(c["share"] * c["n"]), n_all + c["n"]
                rows_.append(f"| {name} | {m} | {c['n']} | {c['share']:.3g} | [{c['interval'][0]:.3g}, "
                             f"{c['interval'][1]:.3g}] |")
    lines = ["", "## The test", "",
             "One-sided permutation (rank) test. H0: the claimed set is exchangeable with random sets of the same "
             "size, so its rank among all n+1 sets is uniform: p = (1 + #{random sets scoring >= the claimed set}) "
             "/ (1 + n), exact under H0, ties counted against the claim; the smallest attainable p is 1/(n+1). "
             "Every set is scored over the same grid values (values some set lacks are left out, with a printed "
             "line) and only results evaluated alike (settings, split seed, model, data version, questions) are "
             "compared. The verdict is 'stands out' when p <= the level; 'does not stand out' only when p could "
             "have reached the level (n >= 1/level - 1) and the random sets' spread (standard deviation) exceeds "
             "the noise floor (the half-width of one set's interval; under pure noise the SD is about half of "
             "it); otherwise 'inconclusive'. The t-test p in report.json (H0: the random sets' mean equals the "
             "claimed score) asks only whether the claimed set beats the *average* random set; it falls with n "
             "however wide the spread, so it is shown for comparison with the paper, not as the verdict.", "",
             f"**Calibration.** Each random set in turn on trial against the others: the share of p <= {level} must "
             f"be at most {level} within sampling error (a 95% Clopper-Pearson interval). Within one pool the "
             "ranks are a permutation, so the share is at most floor(level n)/n by construction: a share above "
             "it would mean sets were scored differently.", ""]
    if not n_all:
        return lines + ["Not computed: no trial has two random sets or more."]
    ci = share_interval(k_all, n_all)
    return lines + ["| trial | metric | sets on trial | share p <= level | 95% interval |", "|---|---|---|---|---|",
                    *rows_, "", f"All trials together under {metric}: {k_all} of {n_all} = {k_all / n_all:.3g} "
                    f"[{ci[0]:.3g}, {ci[1]:.3g}]: " + ("calibrated" if ci[0] <= level else "NOT calibrated") +
                    f" at level {level}."]


def main(argv=None):
    args = parse_args(argv)
    if not 0 < args.level < 1 or args.resamples < 100:
        raise SystemExit("--level must lie between 0 and 1 (e.g. 0.05) and --resamples be at least 100 (e.g. 2000)")
    sweep = load_results(args.runs)
    if not sweep["curves"]:
        raise SystemExit(f"no edited results under {', '.join(args.runs)}: run sweep.py (or iti.py / ipo_edit.py "
                         "and evaluate.py) first")
    metric = choose_metric(sweep, args.metric)
    text, numbers = report(sweep, claimed_spec(sweep, args.claimed), metric, args)
    provenance = runfiles.run_info(args)
    folder = args.out or args.runs[0]
    runfiles.write_text(os.path.join(folder, "report.md"),
                        text + f"\nMade by `{provenance['command']}` at {provenance['time']}.\n")
    runfiles.write_json(os.path.join(folder, "report.json"), {**numbers, "run": provenance})
    print(text)


if __name__ == "__main__":
    main()
