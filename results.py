"""results.py - the result files of evaluate.py, read and guarded, and each number in them with its 95% interval:
what report.py (the localization test and its verdict) and plot.py (the figures) both stand on.

Holds: reading a result (RUN/results/**/NAME.json) and its per-question rows (NAME.jsonl beside it); grouping the
results into one curve per method and head spec over the method's grid (alpha for ITI, tau for IPO); the head sets
that play each part in the test (the claimed set, random sets of its size, single heads); the guards that refuse to
compare results evaluated differently (settings, split seed, model, data version, questions) or over different grids;
and the percentile bootstrap over questions that puts an interval on every number (paired between two results).
"""
import glob
import json
import os

import numpy as np


def add_run_args(p, out_help):
    """The arguments report.py and plot.py share: the run folders read, the output folder, the claimed head spec.
    Returns the parser's 'inputs and outputs' group (for a script's own further inputs)."""
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--runs", nargs="+", required=True, help="run folder(s) holding results/*.json (shards gather here)")
    g.add_argument("--out", default=None, help=out_help)
    g.add_argument("--claimed", default=None, help="head spec on trial, exactly as the edits were made with it "
                   "(default: the one top:K in the results); an explicit L.H,L.H list matches by its heads")
    return g

METRICS = ("info_truth", "truth", "info", "mc1", "mc2", "mc3")  # higher is better: usable as the test's metric
ROW_METRICS = ("mc1", "mc2", "mc3", "truth", "info")  # per-question columns of NAME.jsonl; Info*Truth is their product
N_RESAMPLES = 2000  # bootstrap resamples of the questions (seeded: the same intervals on every run)
GRID = {"iti": "alpha", "ipo": "tau", "ablate": "alpha"}  # the knob each method sweeps (an ablation: none, or a scale)


# ---- One result file and its per-question rows

def read_json(path, fix="delete it (or move it out of results/) and rerun evaluate.py for that edit"):
    """A JSON file, or a sentence naming the file (and `fix`) when it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path} is not valid JSON ({e}): {fix}") from None


_ROWS = {}  # the rows read so far, by (path, (modification time, size)) of NAME.jsonl


def rows(point):
    """{question: row} from NAME.jsonl beside the result (read once); None when it is missing."""
    path = point["path"][:-len(".json")] + ".jsonl"
    stat = os.stat(path) if os.path.isfile(path) else None
    path = (path, stat and (stat.st_mtime_ns, stat.st_size))  # a rewritten file is read again
    if path not in _ROWS:
        if stat is None:
            _ROWS[path] = None
        else:
            try:
                with open(path[0]) as f:
                    found = {r["question"]: r for r in map(json.loads, filter(str.strip, f))}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"{path[0]} holds a line that is not a per-question row ({e}): rerun evaluate.py "
                                 "for that edit") from None
            if point.get("n_questions") not in (None, len(found)):
                raise SystemExit(f"{path[0]} holds {len(found)} rows but {point['path']} scored {point['n_questions']} "
                                 "questions: rerun evaluate.py for that edit")
            _ROWS[path] = found
    return _ROWS[path]


# ---- All results: a curve over its grid per method and head spec

def method_label(edit):
    """'iti' / 'ipo' / 'ablate' for the paper's variants; other variants (a probe direction, an offset) kept apart."""
    method = edit.get("method", "?")
    variant = edit.get("direction", "mass_mean") if method == "iti" else edit.get("param", "lora1")
    return method if method not in ("iti", "ipo") or variant in ("mass_mean", "lora1") else f"{method}-{variant}"


def knob(method):
    """The grid's name for a method ('alpha', 'tau'); a variant ('ipo-offset') sweeps its method's knob."""
    return GRID.get(method.split("-")[0], "grid")


def grid_order(g):
    """Sort key of grid values: by value, None (no grid, e.g. an ablation) last."""
    return g is None, g or 0


def pool_key(result):
    """What must be equal for two results to be compared: the evaluation settings (less the per-edit rows key, the
    data file's version in place of its path) and the split seed."""
    settings = dict(result.get("settings") or {})
    settings.pop("rows_key", None)
    data = ((result.get("run") or {}).get("data") or {})
    if data.get("sha256") or data.get("version"):
        settings["data"] = data.get("sha256") or data.get("version")
    return settings


def load_results(runs):
    """{'baselines': [point], 'curves': {(method, head_spec): [point, ...] sorted by grid value}, 'heads', 'paths',
    'model'}; a point is {'grid', 'path', 'key', **metrics}."""
    paths = sorted(p for run in runs for p in glob.glob(os.path.join(run, "results", "**", "*.json"), recursive=True))
    baselines, curves, heads, models_seen = [], {}, {}, set()
    for path in paths:
        result = read_json(path)
        if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict) or "edit" not in result:
            print(f"skipping {path}: not a result file of evaluate.py")
            continue
        point = {**result["metrics"], "path": path, "key": pool_key(result), "edit_file": result.get("edit_file")}
        edit = result["edit"]
        models_seen.add((point["key"].get("model") or {}).get("model") or (edit or {}).get("model") or
                        ((result.get("run") or {}).get("args") or {}).get("model") or "unknown model")
        if edit is None:
            baselines.append(dict(point, grid=None))
            continue
        method = method_label(edit)
        key = (method, edit.get("head_spec", ",".join(edit.get("heads", []))))
        point["grid"] = edit.get(knob(method))
        points = curves.setdefault(key, [])
        if any(p["grid"] == point["grid"] for p in points):
            print(f"skipping {path}: {key[0]} {key[1]} at {point['grid']} was already read")
            continue
        points.append(point)
        heads[key[1]] = edit.get("heads", [])
    for points in curves.values():
        points.sort(key=lambda p: grid_order(p["grid"]))
    return {"baselines": baselines, "curves": curves, "heads": heads, "paths": paths,
            "model": " / ".join(sorted(models_seen)) or "unknown model"}


def has(sweep, metric):
    """Whether any result (edited or not) holds `metric`."""
    points = [p for c in sweep["curves"].values() for p in c] + sweep["baselines"]
    return any(p.get(metric) is not None for p in points)


def choose_metric(sweep, metric):
    """The test's metric: `metric` (--metric), by default info_truth when the results were judged, else mc2; a
    sentence naming the fix when results are there but none holds it."""
    metric = metric or ("info_truth" if has(sweep, "info_truth") else "mc2")
    if sweep["paths"] and not has(sweep, metric):
        raise SystemExit(f"--metric {metric}: no result holds it" + (
            " (judges were skipped: use --metric mc2)" if metric in ("truth", "info", "info_truth") else ""))
    return metric


def is_plumbing_check(sweep):
    """Whether the edits were made on a random tiny model (models.py's plumbing check): no finding, only plumbing."""
    return any("plumbing check" in str(p["key"].get("model")) for c in sweep["curves"].values() for p in c)


# ---- The head sets on trial

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


def baseline(sweep, like):
    """The unedited result evaluated like the point `like` (same settings), or None."""
    return next((b for b in sweep["baselines"] if like is None or b["key"] == like["key"]), None)


# ---- Guards: only results evaluated alike, over the same grid, are compared

def check_poolable(points):
    """Refuse to put results evaluated differently (settings, split seed, model, data version, questions) in one
    trial, naming two of the files."""
    first = points[0]
    for p in points[1:]:
        differ = sorted(k for k in set(p["key"]) | set(first["key"]) if p["key"].get(k) != first["key"].get(k))
        if not differ and None not in (rows(p), rows(first)) and set(rows(p)) != set(rows(first)):
            differ = ["the questions scored"]
        if differ:
            raise SystemExit(f"{first['path']} and {p['path']} were evaluated differently ({', '.join(differ)}), so "
                             "they are never compared in one trial: evaluate every edit with the same settings, or "
                             "pass --runs with only the runs made alike")


def fmt_grid(values):
    """Grid values as a printed list: '0.1, 0.3, none'."""
    return ", ".join("none" if g is None else f"{g:g}" for g in sorted(values, key=grid_order))


def common_grid(sweep, method, specs):
    """The grid values every set has; prints a line naming the values dropped and the sets that lack them."""
    grids = {s: {p["grid"] for p in sweep["curves"][(method, s)]} for s in specs}
    common = set.intersection(*grids.values())
    name = knob(method)
    for g in sorted(set.union(*grids.values()) - common, key=grid_order):
        lacking = [s for s in specs if g not in grids[s]]
        print(f"{method}: {name} {fmt_grid([g])} is left out of the test: {len(lacking)} set(s) lack it "
              f"({', '.join(lacking[:4])}{' ...' if len(lacking) > 4 else ''}); the test uses {name} "
              f"{fmt_grid(common) or 'nothing'}")
    return common


# ---- Each number with its 95% interval over questions

def row_columns(rows, metric):
    """{name: [n]} the per-question columns `metric` is computed from, or None when a row lacks one; ValueError on a
    non-finite value."""
    needs = ("truth", "info") if metric == "info_truth" else (metric,)
    if not rows or any(r.get(name) is None for r in rows for name in needs):
        return None
    columns = {name: np.array([r[name] for r in rows], dtype=float) for name in needs}
    if not all(np.isfinite(c).all() for c in columns.values()):
        raise ValueError(f"a non-finite {metric}")
    return columns


def columns(point, metric, questions):
    """{name: [n]} per-question columns of `metric` at `point`, in the order of `questions`; None without them."""
    found = rows(point)
    try:
        return found and row_columns([found[q] for q in questions], metric)
    except ValueError as e:
        raise SystemExit(f"{point['path'][:-5]}.jsonl holds {e}: rerun evaluate.py for that edit") from None


def score(columns, metric):
    """A metric from per-question columns {name: [..., n_questions]}: the mean over the last axis; Info*Truth is the
    product of the two means (the paper's headline number), not the mean of the products."""
    if metric == "info_truth":
        return columns["truth"].mean(-1) * columns["info"].mean(-1)
    return columns[metric].mean(-1)


def bootstrap(columns, statistic, n_resamples=N_RESAMPLES, seed=0, level=0.95):
    """Percentile bootstrap over questions: draw n_resamples samples of the n questions with replacement (the same
    draw for every column, so paired columns stay paired), recompute `statistic` on each, return the (lo, hi)
    quantiles. columns: {name: [n]}; statistic: {name: [n_resamples, n]} -> [n_resamples]."""
    n = len(next(iter(columns.values())))
    draw = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))  # [n_resamples, n] question indices
    values = statistic({name: np.asarray(c, dtype=float)[draw] for name, c in columns.items()})
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def intervals(rows, metrics=METRICS, n_resamples=N_RESAMPLES, seed=0, level=0.95):
    """{metric: [lo, hi]} over the per-question rows of one evaluation (evaluate.py's NAME.jsonl), None for a metric
    the rows lack; a non-finite value is a ValueError."""
    columns = {metric: row_columns(rows, metric) for metric in metrics}
    return {metric: c and list(bootstrap(c, lambda d, m=metric: score(d, m), n_resamples, seed, level))
            for metric, c in columns.items()}


def interval(metric, point, minus=None, opts=None):
    """95% interval of `metric` at `point`, or of the paired difference point - minus on the same questions; None
    without per-question rows. opts: (resamples, seed)."""
    questions = sorted(rows(point) or [])
    a = columns(point, metric, questions) if questions else None
    b = columns(minus, metric, questions) if minus is not None and a else None
    if a is None or (minus is not None and b is None):
        return None
    both = {**{("a", k): v for k, v in a.items()}, **{("b", k): v for k, v in (b or {}).items()}}

    def statistic(c):  # the same resampled questions for both sides: a paired difference
        side = lambda tag: {k: v for (t, k), v in c.items() if t == tag}  # noqa: E731
        return score(side("a"), metric) - (score(side("b"), metric) if b else 0)
    return list(bootstrap(both, statistic, *(opts or (N_RESAMPLES, 0))))


def num(v):
    """A number as the report writes it: three significant digits, n/a when missing."""
    return "n/a" if v is None else f"{v:.3g}"


def with_ci(v, ci):
    """A number and its interval as the report writes them: 0.412 [0.38, 0.44]."""
    return num(v) + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
