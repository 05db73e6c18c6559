"""Tests of plot.py: the rank and t tests on cases with known answers, and the figures and report drawn from a fake
sweep (plausible result files written by `write_fake_sweep`, with the truth planted so the answers are known).

Run: python -m pytest -q test_plot.py
"""
import json
import math
import os

import numpy as np
import pytest

import heads
import models
import runfiles
import plot

GEO = heads.Geometry(6, 8, 16)
BASELINE = {"mc1": 0.25, "mc2": 0.40, "mc3": 0.20, "truth": 0.30, "info": 0.95, "ce": 3.0, "kl": 0.0}


def result_file(path, metrics, edit, judged):
    metrics = dict(metrics, n_questions=20)
    if not judged:
        metrics.update(truth=None, info=None)
    metrics["info_truth"] = None if metrics["truth"] is None else metrics["truth"] * metrics["info"]
    runfiles.write_json(path, {"metrics": metrics, "edit": edit, "edit_file": None if edit is None else "x.safetensors",
                             "apply": edit["apply"] if edit else None, "settings": {"split": "test"},
                             "judges": {"truth": "fake"} if judged else None, "run": {"args": {"model": "fake-7b"}}})


def write_fake_sweep(run, k=4, n_random=19, n_single=6, alphas=(5, 10, 15), taus=(0.1, 0.3, 0.5), judged=True,
                     iti_strength=1.0, ipo_strength=0.5, seed=0):
    """A plausible sweep's files under `run`: probe/, and results/ for the baseline, ITI at top:K and n_random
    random:K:SEED sets over alphas, IPO at those sets, n_single single heads and all heads over taus.
    Each head set has a planted 'strength' (random sets: uniform in [0, 1)); the claimed set's is given.
    Returns {(method, spec): best info_truth (or mc2 when unjudged) over the grid}, computed here by hand."""
    rng = np.random.default_rng(seed)
    accuracy = rng.uniform(0.5, 0.7, (GEO.n_layers, GEO.n_heads)).astype(np.float32)  # [L, H]
    ranking = [list(divmod(int(i), GEO.n_heads)) for i in np.argsort(-accuracy, axis=None, kind="stable")]
    os.makedirs(f"{run}/probe", exist_ok=True)
    from safetensors.numpy import save_file
    save_file({"accuracy": accuracy}, f"{run}/probe/probe.safetensors")
    runfiles.write_json(f"{run}/probe/probe.json", {"geometry": vars(GEO), "ranking": ranking, "model": "fake-7b"})
    result_file(f"{run}/results/baseline.json", BASELINE, None, judged)
    specs = {"iti": [("top:%d" % k, iti_strength)] + [(f"random:{k}:{s}", rng.uniform()) for s in range(n_random)],
             "ipo": [("top:%d" % k, ipo_strength)] + [(f"random:{k}:{s}", rng.uniform()) for s in range(n_random)]
             + [(f"single:{l}.{h}", rng.uniform()) for l, h in rng.permutation(ranking)[:n_single]] + [("all", 1.5)]}
    planted = {}
    for method, grid in [("iti", alphas), ("ipo", taus)]:
        for spec, s in specs[method]:
            listed = heads.parse_heads(spec, GEO, probe=f"{run}/probe")
            scores = []
            for g in grid:
                x = g / max(grid) if method == "iti" else 1 - g  # how hard the edit pushes
                m = dict(BASELINE, truth=0.3 + 0.4 * s * x, info=0.95 - 0.25 * x * (1.2 - s) ** 2,
                         mc2=0.4 + 0.1 * s * x, mc1=0.25 + 0.05 * s * x, kl=0.5 * x * (1.5 - s), ce=3 + 0.3 * x)
                scores.append(m["truth"] * m["info"] if judged else m["mc2"])
                edit = {"model": "fake-7b", "method": method, "head_spec": spec, "seed": 0, "geometry": vars(GEO),
                        "heads": heads.format_heads(listed), "apply": "iti" if method == "iti" else "all",
                        **({"alpha": g, "direction": "mass_mean", "k": len(listed)} if method == "iti" else
                           {"tau": g, "param": "lora1"})}
                result_file(f"{run}/results/{method}-{spec.replace(':', '_')}-{g}.json", m, edit, judged)
            planted[(method, spec)] = max(scores)
    return planted


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("judged"))
    planted = write_fake_sweep(run)
    plot.main(["--runs", run, "--report"])
    return run, planted


# ---- The tests' statistics on known answers

def test_rank_test_by_hand():
    assert plot.rank_test(5, [1, 2, 3, 4]) == {"rank": 1, "of": 5, "n_at_least": 0, "p": 0.2}
    assert plot.rank_test(3, [1, 2, 3, 4])["p"] == 3 / 5  # a tie counts against the claim
    assert plot.rank_test(0, list(range(1, 20)))["p"] == 1.0
    assert plot.rank_test(100, list(range(19)))["p"] == 0.05  # beating 19 random sets is exactly p = 0.05


def test_rank_test_is_exact_under_the_null():
    """Claimed and random scores from one distribution: P(p <= j/(n+1)) = j/(n+1) for every j."""
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(20000, 10))  # column 0 plays the claimed set, 9 random sets
    p = np.array([plot.rank_test(d[0], d[1:])["p"] for d in draws])
    for j in (1, 2, 5):
        assert abs((p <= j / 10).mean() - j / 10) < 0.01


def test_t_distribution_against_closed_forms_and_scipy():
    for t in (-2.0, -0.3, 0.0, 0.7, 3.0, 40.0):
        assert plot.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert plot.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    for df in (3, 15, 40, 200):
        for t in (-1.5, 0.2, 2.0, 8.0):
            assert plot.t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-15)


def test_one_sample_t_by_hand():
    out = plot.one_sample_t(4.0, [1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/sqrt(3): t = 2 sqrt(3), 2 df
    t = 2 * math.sqrt(3)
    assert out["t"] == pytest.approx(t) and out["df"] == 2
    assert out["p"] == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)))
    assert plot.one_sample_t(4.0, [1.0]) is None and plot.one_sample_t(4.0, [2.0, 2.0]) is None


# ---- Figures and report from a fake sweep

def test_every_figure_is_drawn_from_a_judged_sweep(judged):
    run, _ = judged
    log = json.load(open(f"{run}/figures/figures.json"))
    names = ["probe_accuracy.png", "fig1_iti_probed_vs_random.png", "fig2_truth_vs_info.png",
             "fig3_ipo_probed_vs_random.png", "fig4_ipo_single_heads.png", "fig5_ipo_kl.png"]
    assert log["skipped"] == {} and sorted(log["drawn"]) == sorted(names) and log["metric"] == "info_truth"
    for name in names:
        with open(f"{run}/figures/{name}", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert log["claimed"] == "top:4" and log["run"]["command"]


def test_report_ranks_the_claimed_set_as_planted(judged):
    run, planted = judged
    numbers = json.load(open(f"{run}/report.json"))
    randoms = [f"random:4:{s}" for s in range(19)]
    for method in ("iti", "ipo"):
        trial = numbers["trials"][method.upper()]
        claimed = planted[(method, "top:4")]
        assert trial["claimed"] == pytest.approx(claimed)
        assert trial["pool"] == pytest.approx({s: planted[(method, s)] for s in randoms})
        n_at_least = sum(planted[(method, s)] >= claimed for s in randoms)
        assert trial["rank_test"]["p"] == pytest.approx((1 + n_at_least) / 20)
    assert numbers["trials"]["ITI"]["rank_test"]["rank"] == 1  # planted strength 1.0 beats every random set
    assert numbers["trials"]["ITI"]["rank_test"]["p"] == 0.05
    assert numbers["trials"]["IPO"]["rank_test"]["p"] > 0.2  # planted mid-distribution
    singles = [s for m, s in planted if m == "ipo" and s.startswith("single:")]
    assert sorted(numbers["trials"]["IPO, single heads"]["pool"]) == sorted(singles)
    assert numbers["ipo_all"] == pytest.approx(planted[("ipo", "all")])
    text = open(f"{run}/report.md").read()
    assert "rank 1 of 20, p = 0.05 <= 0.05" in text and "do not stand out from random heads" in text
    assert "permutation (rank) test" in text and "| ITI | " in text


def test_unjudged_sweep_draws_the_mc_figures_and_says_why_it_skips(tmp_path, capsys):
    run = str(tmp_path)
    planted = write_fake_sweep(run, n_random=3, judged=False)
    plot.main(["--runs", run, "--report"])
    log = json.load(open(f"{run}/figures/figures.json"))
    assert log["metric"] == "mc2"
    assert "fig5_ipo_kl.png" in log["drawn"] and "fig2_truth_vs_info.png" in log["drawn"]  # its MC2 vs KL panel
    reason = log["skipped"]["fig2_truth_vs_info.png: truth vs info"]
    assert reason == "no info, truth in the results (judges were skipped)"
    assert "fig1_iti_probed_vs_random.png: truth vs info" in log["skipped"]
    assert "judges were skipped" in capsys.readouterr().out
    numbers = json.load(open(f"{run}/report.json"))
    assert numbers["trials"]["ITI"]["claimed"] == pytest.approx(planted[("iti", "top:4")])
    assert "smallest attainable p is 1/4" in open(f"{run}/report.md").read()
    with pytest.raises(SystemExit, match="judges were skipped: use --metric mc2"):
        plot.main(["--runs", run, "--metric", "truth"])


def test_claimed_list_and_shards(judged, tmp_path):
    run, _ = judged
    top = json.load(open(f"{run}/report.json"))
    listed = ",".join(reversed(json.load(open(f"{run}/results/iti-top_4-5.json"))["edit"]["heads"]))  # other order
    plot.main(["--runs", run, "--claimed", listed, "--out", str(tmp_path / "f"), "--report"])
    again = json.load(open(tmp_path / "report.json"))
    assert again["claimed"] == "top:4" and again["trials"]["IPO"] == top["trials"]["IPO"]
    # a sweep sharded into two run folders gives the same verdict as one folder
    files = sorted(os.listdir(f"{run}/results"))
    for i, name in enumerate(files):
        os.makedirs(tmp_path / f"shard{i % 2}" / "results", exist_ok=True)
        os.link(f"{run}/results/{name}", tmp_path / f"shard{i % 2}" / "results" / name)
    plot.main(["--runs", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--report", "--probe", f"{run}/probe"])
    sharded = json.load(open(tmp_path / "shard0" / "report.json"))
    assert sharded["trials"] == top["trials"]


def test_bad_input_is_refused_with_a_sentence(tmp_path, judged):
    with pytest.raises(SystemExit, match="nothing to plot"):
        plot.main(["--runs", str(tmp_path)])
    with pytest.raises(SystemExit, match="no result was made at those heads"):
        plot.main(["--runs", judged[0], "--claimed", "0.0,0.1", "--out", str(tmp_path / "f")])
    run = str(tmp_path / "two")
    write_fake_sweep(run, n_random=1, n_single=0)
    write_fake_sweep(run + "b", k=3, n_random=1, n_single=0)
    with pytest.raises(SystemExit, match="pass --claimed SPEC"):
        plot.main(["--runs", run, run + "b"])
