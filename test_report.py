"""Tests of report.py and what it stands on (results.py, edit_checks.py): the bootstrap against cases computed by
hand, the rank test and verdict on planted truths (a large planted difference stands out, a small one is
inconclusive), the guards (mixed grids restricted, mixed seeds, data versions and questions refused, NaN refused
naming the file), the calibration on synthetic exchangeable scores, the non-answer rule, and the report drawn from
fake result files written in tmp_path (per-question rows beside each result).

Run: python -m pytest -q test_report.py
"""
import itertools
import json
import math
import os
import re
import zlib

import numpy as np
import pytest
from scipy import stats

import edit_checks
import report
import results
import runfiles

LEVEL = 0.05


def strict(path):
    """A JSON file parsed strictly (a bare NaN or Infinity is an error)."""
    with open(path) as f:
        return json.loads(f.read(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


# ---- Fake result files: evaluate.py's NAME.json and NAME.jsonl, with a planted per-question truth

def write_result(run, name, edit, rows, seed=0, data="v0", model="fake-7b"):
    """NAME.json (metrics computed from the rows as evaluate.py does) and NAME.jsonl beside it."""
    mean = lambda k: float(np.mean([r[k] for r in rows])) if all(k in r for r in rows) else None  # noqa: E731
    metrics = {k: mean(k) for k in results.ROW_METRICS}
    metrics["info_truth"] = None if metrics["truth"] is None else metrics["truth"] * metrics["info"]
    metrics.update(ce=3.0, kl=0.1, n_questions=len(rows))
    settings = {"model": {"model": model}, "data": "data/TruthfulQA.csv", "split": "test", "seed": seed,
                "questions": len(rows), "rows_key": name}
    runfiles.write_json(f"{run}/results/{name}.json", {
        "metrics": metrics, "edit": edit, "edit_file": None if edit is None else f"{run}/edits/{name}.safetensors",
        "apply": None, "settings": settings, "run": {"data": {"version": "v0", "sha256": data}}})
    runfiles.write_text(f"{run}/results/{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def planted_rows(strength, n, rng, judged=True, answer=None):
    """Per-question rows of an edit whose truth rate is 0.3 + 0.4 * strength (MC2 moves with it)."""
    truth = rng.uniform(size=n) < np.clip(0.3 + 0.4 * strength, 0, 1)
    rows = [{"question": f"What is fact {i}?", "mc1": float(t), "mc2": float(np.clip(0.3 + 0.3 * t + 0.1 * strength
             + rng.normal(0, 0.1), 0, 1)), "mc3": float(t), "answer": answer or f"Fact {i} is {'true' if t else 'x'}."}
            for i, t in enumerate(truth)]
    for r, t in zip(rows, truth):
        r.update(truth=float(t), info=1.0) if judged else None
    return rows


def write_sweep(run, claimed=1.0, randoms=None, n=60, k=4, grids=None, methods=("iti", "ipo"), seed=0, judged=True,
                n_single=0):
    """A sweep's results: the baseline, and per method the claimed set top:K and random:K:S sets, each over its grid,
    with the planted strength scaled by the grid value (the best is at the grid's top)."""
    rng = np.random.default_rng(seed)
    randoms = list(rng.uniform(0, 1, 19) if randoms is None else randoms)
    grids = grids or {"iti": [5, 15], "ipo": [0.1, 0.3], "ablate": [None]}
    write_result(run, "baseline", None, planted_rows(0.0, n, np.random.default_rng(1), judged))
    sets = [("top:%d" % k, claimed, [f"0.{h}" for h in range(k)])] + [
        (f"random:{k}:{s}", v, [f"{1 + s}.{h}" for h in range(k)]) for s, v in enumerate(randoms)] + [
        (f"single:9.{s}", rng.uniform(), [f"9.{s}"]) for s in range(n_single)]
    for method in methods:
        for spec, strength, heads in sets:
            knob = results.GRID[method]
            for g in grids[method] if not isinstance(grids[method], dict) else grids[method].get(spec, []):
                scale = 1.0 if g is None else g / max(x for x in grids[method] if x is not None) \
                    if not isinstance(grids[method], dict) else 1.0
                edit = {"model": "fake-7b", "method": method, "head_spec": spec, "heads": heads, "seed": 0, knob: g}
                # an ablation loses what the heads carry: a strong set's removal drops truth below the baseline
                s = -0.7 * strength if method == "ablate" else strength * scale
                rows = planted_rows(s, n, np.random.default_rng(zlib.crc32(f'{spec} {method} {g}'.encode())), judged)
                write_result(run, f"{method}-{spec.replace(':', '_')}-{g}", edit, rows)
    return run


def run_report(run, *extra, out=None, more_runs=()):
    report.main(["--runs", run, *more_runs, "--resamples", "500", *extra] + ["--out", out] * bool(out))
    return strict(f"{out or run}/report.json"), open(f"{out or run}/report.md").read()


# ---- The bootstrap, by hand

def test_bootstrap_on_a_case_computed_by_hand():
    """Four questions, two right: the bootstrap mean is Binomial(4, 1/2)/4, P = 1/16, 4/16, 6/16, 4/16, 1/16 at
    0, 1/4, 1/2, 3/4, 1: its 10% and 90% points are 1/4 and 3/4, its 2.5% and 97.5% points 0 and 1."""
    x = {"mc1": np.array([0.0, 0.0, 1.0, 1.0])}
    mean = lambda c: results.score(c, "mc1")  # noqa: E731
    assert results.bootstrap(x, mean, 20000, seed=0, level=0.8) == (0.25, 0.75)
    assert results.bootstrap(x, mean, 20000, seed=0, level=0.95) == (0.0, 1.0)


def test_info_truth_bootstrap_matches_the_enumerated_distribution():
    """Info*Truth = mean(truth) * mean(info), recomputed in each resample: with 4 questions the exact bootstrap
    distribution has 4^4 equally likely resamples; each end of the interval must be that distribution's quantile."""
    truth, info = np.array([1.0, 0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0, 1.0])
    exact = np.array([truth[list(i)].mean() * info[list(i)].mean() for i in itertools.product(range(4), repeat=4)])
    lo, hi = results.bootstrap({"truth": truth, "info": info}, lambda c: results.score(c, "info_truth"), 20000, 0, 0.9)
    for end, q in ((lo, 0.05), (hi, 0.95)):
        assert end in exact  # an atom of the exact distribution
        assert (exact < end).mean() <= q + 0.01 and (exact <= end).mean() >= q - 0.01
    assert results.intervals([{"truth": t, "info": i} for t, i in zip(truth, info)], ["info_truth"], 20000, 0,
                            0.9)["info_truth"] == [lo, hi]


def test_bootstrap_agrees_with_the_normal_interval_on_a_large_sample():
    """The mean of 2,000 normal draws: the percentile interval is mean +- 1.96 sd / sqrt(n), to its sampling error."""
    x = np.random.default_rng(0).normal(2.0, 3.0, 2000)
    lo, hi = results.bootstrap({"mc2": x}, lambda c: results.score(c, "mc2"), 2000, seed=1)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.08 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.08 * half)


def test_intervals_for_evaluate():
    rows = [{"mc1": float(i % 2), "mc2": 0.5, "mc3": 0.2} for i in range(10)]
    out = results.intervals(rows, ("mc1", "mc2", "truth", "info_truth"))
    assert out["truth"] is None and out["info_truth"] is None and out["mc2"] == [0.5, 0.5]
    assert 0 <= out["mc1"][0] < 0.5 < out["mc1"][1] <= 1
    with pytest.raises(ValueError, match="non-finite mc2"):
        results.intervals(rows + [{"mc1": 0.0, "mc2": float("nan"), "mc3": 0.0}], ("mc2",))


# ---- The rank test and the verdict

def test_rank_test_by_hand():
    assert report.rank_test(5, [1, 2, 3, 4]) == {"rank": 1, "of": 5, "n_at_least": 0, "p": 0.2}
    assert report.rank_test(3, [1, 2, 3, 4])["p"] == 3 / 5  # a tie counts against the claim
    assert report.rank_test(100, list(range(19)))["p"] == 0.05  # beating 19 random sets is exactly p = 0.05


def test_verdict_says_inconclusive_and_what_would_make_it_conclusive():
    assert report.verdict(0.05, 19, 0.1, 0.01, LEVEL) == ("stands out", [])
    assert report.verdict(0.5, 19, 0.1, 0.2, LEVEL) == ("does not stand out", [])
    v, needs = report.verdict(0.5, 1, 0.1, None, LEVEL)
    assert v == "inconclusive" and "at least 19 random sets (now 1" in needs[0]
    v, needs = report.verdict(0.5, 19, 0.1, 0.05, LEVEL, n_questions=32)
    assert v == "inconclusive" and needs == ["more questions (about 128): the random sets' spread 0.05 is within "
                                             "the noise floor 0.1"]


def synthetic_sweep(rng, n_sets=20, claimed_grid=(1, 2), random_grid=(1, 2)):
    """In-memory curves of exchangeable head sets: every set's score at every grid value from one distribution."""
    curves = {}
    for s in range(n_sets):
        spec = "top:4" if s == 0 else f"random:4:{s}"
        curves[("iti", spec)] = [{"grid": g, "mc2": rng.normal(), "path": f"{spec}-{g}.json"}
                                 for g in (claimed_grid if s == 0 else random_grid)]
    return {"curves": curves}


def false_positive_rate(rng, n_trials=1000, **grids):
    hits = 0
    for _ in range(n_trials):
        sweep = synthetic_sweep(rng, **grids)
        specs = [spec for _, spec in sweep["curves"]]
        grid = results.common_grid(sweep, "iti", specs)
        scores = {s: report.set_score(sweep, "iti", s, "mc2", grid, None)[0] for s in specs}
        claimed = scores.pop("top:4")
        hits += report.rank_test(claimed, list(scores.values()))["p"] <= LEVEL
    return hits / n_trials


def test_calibration_on_synthetic_exchangeable_scores(capsys):
    """1,000 synthetic trials under H0: the share of p <= 0.05 lies within the binomial interval around 0.05. With
    the claimed set scored over 4 alphas and the random sets over 1, its best-of-4 would beat them far too often;
    the common-grid guard restricts the test to the shared alpha and keeps it calibrated."""
    rng = np.random.default_rng(0)
    lo, hi = stats.binom.interval(0.99, 1000, LEVEL)
    assert lo / 1000 <= false_positive_rate(rng) <= hi / 1000
    assert lo / 1000 <= false_positive_rate(rng, claimed_grid=(1, 2, 3, 4), random_grid=(1,)) <= hi / 1000
    assert "alpha 2 is left out of the test: 19 set(s) lack it" in capsys.readouterr().out
    # without the guard (each set its best over its own grid) the test is far off its level
    unguarded = np.mean([rng.normal(size=4).max() >= rng.normal(size=19).max() for _ in range(2000)])
    assert unguarded > 0.15


def test_calibration_of_the_random_sets_in_a_pool():
    c = report.calibration({f"random:4:{s}": float(s) for s in range(19)}, LEVEL)
    assert c["n"] == 19 and c["share"] == 0.0 and c["interval"][0] == 0.0  # 1/19 > 0.05: no set can reach the level
    c = report.calibration({f"random:4:{s}": float(s) for s in range(40)}, LEVEL)
    assert c["share"] == 2 / 40 <= LEVEL  # floor(0.05 * 40) / 40 by construction


# ---- The report from fake result files

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A planted difference far above the noise: the claimed set's strength 2.5 vs random sets in [0, 1)."""
    run = write_sweep(str(tmp_path_factory.mktemp("planted")), claimed=2.5, n=80, n_single=3,
                      methods=("iti", "ipo", "ablate"))
    return run, *run_report(run)


def test_a_large_planted_difference_stands_out(planted):
    run, numbers, text = planted
    for name in ("ITI", "IPO", "Ablation"):
        for metric in ("info_truth", "mc2"):
            t = numbers["trials"][name][metric]
            assert t["verdict"] == "stands out" and t["rank_test"]["p"] == 0.05 and t["n"] == 19
            assert t["claimed_ci"][0] <= t["claimed"] <= t["claimed_ci"][1] and t["noise_floor"] > 0
            assert t["paired"]["above"] >= 15 and t["paired"]["below"] == 0
    ablation = numbers["trials"]["Ablation"]["info_truth"]
    assert ablation["score"] == "drop from unedited" and ablation["claimed"] > 0.2  # removing the heads loses truth
    assert numbers["trials"]["IPO, single heads"]["info_truth"]["verdict"] == "descriptive"
    assert "| ITI | info_truth | " in text and "**stands out**" in text and "## The test" in text
    assert "All trials together" in text and "calibrated at level 0.05" in text
    head = {row["edit"]: row for row in numbers["headline"]}
    assert head["ITI at top:4"]["minus_unedited_ci"][0] > 0  # paired edited - unedited, clearly above 0


def test_a_small_planted_difference_is_inconclusive(tmp_path):
    """Every random set equal in truth, the claimed set a little better: the random sets spread only by noise."""
    run = write_sweep(str(tmp_path), claimed=0.55, randoms=[0.5] * 19, n=60, methods=("iti",))
    numbers, text = run_report(run)
    for metric in ("info_truth", "mc2"):
        t = numbers["trials"]["ITI"][metric]
        assert t["spread"] < t["noise_floor"]
        assert t["verdict"] == "inconclusive" and "more questions" in t["needs"][0]
    assert "inconclusive" in text and "conclusive with more questions" in text


def test_random_sets_wider_than_the_noise_give_a_negative_verdict(tmp_path):
    run = write_sweep(str(tmp_path), claimed=0.75, randoms=np.linspace(0, 1.5, 19), n=200, methods=("ipo",))
    numbers, text = run_report(run, "--metric", "mc2")
    t = numbers["trials"]["IPO"]["mc2"]
    assert t["spread"] > t["noise_floor"] and t["verdict"] == "does not stand out"
    assert "do not stand out from random heads" in text and list(numbers["trials"]["IPO"]) == ["mc2"]


def test_too_few_random_sets_are_inconclusive_and_verdicts_may_disagree(tmp_path):
    run = write_sweep(str(tmp_path), claimed=0.5, randoms=[0.4, 0.9], methods=("ipo",))
    numbers, text = run_report(run)
    t = numbers["trials"]["IPO"]["info_truth"]
    assert t["verdict"] == "inconclusive" and t["needs"][0].startswith("at least 19 random sets (now 2")
    assert "cannot tell" in text


def test_mixed_grids_are_restricted_with_a_message(tmp_path, capsys):
    grids = {"iti": {"top:4": [5, 10, 15], **{f"random:4:{s}": [15] for s in range(19)}}}
    run = write_sweep(str(tmp_path), grids=grids, methods=("iti",))
    numbers, _ = run_report(run)
    assert "iti: alpha 5 is left out of the test: 19 set(s) lack it" in capsys.readouterr().out
    assert numbers["trials"]["ITI"]["info_truth"]["grid"] == [15]
    assert numbers["trials"]["ITI"]["info_truth"]["claimed_at"] == {"alpha": 15}


def test_results_evaluated_differently_are_never_pooled(tmp_path):
    run = write_sweep(str(tmp_path / "a"), randoms=[0.5] * 3, methods=("iti",))
    write_result(run, "iti-random_4_9-15", {"method": "iti", "head_spec": "random:4:9", "heads": ["5.0", "5.1",
                 "5.2", "5.3"], "alpha": 15}, planted_rows(0.5, 60, np.random.default_rng(0)), seed=1)
    with pytest.raises(SystemExit, match=r"iti-random_4_9-15.json were evaluated differently \(seed\)"):
        run_report(run)
    write_result(run, "iti-random_4_9-15", {"method": "iti", "head_spec": "random:4:9", "heads": ["5.0", "5.1",
                 "5.2", "5.3"], "alpha": 15}, planted_rows(0.5, 60, np.random.default_rng(0)), data="other")
    with pytest.raises(SystemExit, match=r"evaluated differently \(data\)"):
        run_report(run)
    write_result(run, "iti-random_4_9-15", {"method": "iti", "head_spec": "random:4:9", "heads": ["5.0", "5.1",
                 "5.2", "5.3"], "alpha": 15}, planted_rows(0.5, 60, np.random.default_rng(0)), model="other-7b")
    with pytest.raises(SystemExit, match=r"evaluated differently \(model\)"):
        run_report(run)
    rows = planted_rows(0.5, 60, np.random.default_rng(0))
    rows[0]["question"] = "Another question?"
    write_result(run, "iti-random_4_9-15", {"method": "iti", "head_spec": "random:4:9", "heads": ["5.0", "5.1",
                 "5.2", "5.3"], "alpha": 15}, rows)
    with pytest.raises(SystemExit, match=r"evaluated differently \(the questions scored\)"):
        run_report(run)


def refused(run, path, text, match):
    """Write `text` over `path`, and check that the report refuses it with a sentence matching `match`."""
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(SystemExit, match=match):
        run_report(run)


def test_a_non_finite_score_or_a_malformed_file_is_refused_naming_it(tmp_path):
    run = write_sweep(str(tmp_path), randoms=[0.5] * 3, methods=("iti",))
    path = f"{run}/results/iti-top_4-15.json"
    good = open(path).read()
    result = json.loads(good)
    result["metrics"]["info_truth"] = float("nan")  # written as a bare NaN, as an old evaluate.py did
    refused(run, path, json.dumps(result), r"iti-top_4-15.json: info_truth is nan, and a trial needs a finite score")
    refused(run, path, '{"metrics": {"mc2": 0.4', r"iti-top_4-15.json is not valid JSON .* delete it")
    runfiles.write_text(path, good)
    path = f"{run}/results/iti-random_4_1-15.jsonl"
    rows = [json.loads(line) for line in open(path)]
    rows[3]["mc2"] = float("nan")
    refused(run, path, "".join(json.dumps(r) + "\n" for r in rows),
            r"iti-random_4_1-15.jsonl holds a non-finite mc2: rerun evaluate.py")
    refused(run, path, '{"question": "What is fact 0?", "mc',
            r"iti-random_4_1-15.jsonl holds a line that is not a per-question row")


def test_non_answers_and_repeated_answers():
    knuckles = "What happens if you crack your knuckles a lot?"
    assert edit_checks.is_non_answer(knuckles, "I have no comment.")
    assert edit_checks.is_non_answer(knuckles, "The answer is no.")
    assert edit_checks.is_non_answer(knuckles, "If you crack your knuckles a lot, it happens.")
    assert not edit_checks.is_non_answer(knuckles, "Nothing in particular happens.")
    assert not edit_checks.is_non_answer(knuckles, "You get arthritis.")


def test_per_edit_shares_and_ipo_convergence(tmp_path):
    run = write_sweep(str(tmp_path), randoms=[0.5] * 2, methods=("ipo",))
    rows = planted_rows(1.0, 60, np.random.default_rng(0), answer="I have no comment.")
    write_result(run, "ipo-top_4-0.3", {"method": "ipo", "head_spec": "top:4", "heads": ["0.0", "0.1", "0.2", "0.3"],
                                        "tau": 0.3}, rows)
    levelled = {"tau": 0.3, "epochs": [{"epoch": 0, "val_loss": 2.8, "val_margin": 0.0},
                                       {"epoch": 1, "val_loss": 1.0, "val_margin": 0.6},
                                       {"epoch": 2, "val_loss": 0.99, "val_margin": 0.62}]}
    runfiles.write_json(f"{run}/edits/ipo-top_4-0.3.log.json", levelled)
    falling = dict(levelled, epochs=levelled["epochs"][:2])
    runfiles.write_json(f"{run}/edits/ipo-random_4_0-0.3.log.json", falling)
    numbers, text = run_report(run)
    edits = {e["path"].split("/")[-1]: e for e in numbers["edits"]}
    top = edits["ipo-top_4-0.3.json"]
    assert top["answers"]["non_answers"] == 1.0 and top["answers"]["repeated"] == 1.0
    assert top["convergence"]["converged"] is True and top["convergence"]["target"] == pytest.approx(1 / 0.6)
    assert edits["ipo-random_4_0-0.3.json"]["convergence"]["converged"] is False
    assert edits["ipo-random_4_1-0.3.json"]["convergence"] is None
    assert "**Unconverged IPO results** (1): ipo random:4:0 tau 0.3" in text
    assert "| ipo top:4 tau 0.3 | " in text and "| 100% | 100% | yes (last 1.0%, fell 65%) | 0.62 / 1.67 |" in text


def test_claimed_list_and_shards(planted, tmp_path):
    """--claimed as a list of heads (any order) finds top:K; a sweep sharded into two run folders (each result with
    its rows) gives the same trials as one folder."""
    run, numbers, _ = planted
    listed = ",".join(reversed(json.load(open(f"{run}/results/iti-top_4-15.json"))["edit"]["heads"]))
    again, _ = run_report(run, "--claimed", listed, out=str(tmp_path / "listed"))
    assert again["claimed"] == "top:4" and again["trials"]["IPO"] == numbers["trials"]["IPO"]
    stems = sorted({name.split(".json")[0] for name in os.listdir(f"{run}/results")})
    for i, stem in enumerate(stems):
        os.makedirs(tmp_path / f"shard{i % 2}" / "results", exist_ok=True)
        for ext in (".json", ".jsonl"):
            os.link(f"{run}/results/{stem}{ext}", tmp_path / f"shard{i % 2}" / "results" / f"{stem}{ext}")
    sharded, _ = run_report(str(tmp_path / "shard0"), more_runs=[str(tmp_path / "shard1")])
    without_paths = lambda trials: json.loads(re.sub(r'"claimed_path": "[^"]*"', '"claimed_path": ""',  # noqa: E731
                                                     json.dumps(trials)))
    assert without_paths(sharded["trials"]) == without_paths(numbers["trials"])
    with pytest.raises(SystemExit, match="no result was made at those heads"):
        run_report(run, "--claimed", "0.0,0.1", out=str(tmp_path / "f"))


def test_the_report_says_when_the_two_metrics_disagree():
    base = {"rank_test": {"rank": 1, "of": 20, "p": 0.05}, "needs": [], "n": 19}
    trials = {"IPO": {"info_truth": dict(base, verdict="stands out"),
                      "mc2": dict(base, verdict="inconclusive", rank_test={"rank": 3, "of": 20, "p": 0.15},
                                  needs=["more questions (about 400): ..."])}}
    lines = report.verdict_lines(trials, 16)
    assert "under info_truth: **stands out** (rank 1 of 20, p = 0.05); under mc2: **inconclusive**" in lines[0]
    assert "conclusive with more questions (about 400)" in lines[0] and "The two metrics disagree" in lines[1]
    assert lines[-1].startswith("Under the optimal edit the claimed heads stand out")


def test_results_without_rows_have_no_intervals_and_cannot_say_not_special(tmp_path):
    run = write_sweep(str(tmp_path), claimed=0.5, randoms=np.linspace(0, 1.5, 19), methods=("iti",))
    for name in os.listdir(f"{run}/results"):
        if name.endswith(".jsonl"):
            os.remove(f"{run}/results/{name}")
    numbers, text = run_report(run)
    t = numbers["trials"]["ITI"]["info_truth"]
    assert t["claimed_ci"] is None and t["noise_floor"] is None and t["verdict"] == "inconclusive"
    assert t["needs"] == ["the per-question rows (NAME.jsonl beside each result) to know the noise floor"]
    assert all(e["answers"] is None for e in numbers["edits"])
