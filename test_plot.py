"""Tests of plot.py: the figures drawn from a fake sweep (plausible result files, per-question rows and IPO training
logs written by `write_fake_sweep`, with the truth planted so the answers are known). The test and its verdict are
report.py's (test_report.py).

Run: python -m pytest -q test_plot.py
"""
import json
import os

import numpy as np
import pytest

import heads
import runfiles
import plot

GEO = heads.Geometry(6, 8, 16)
BASELINE = {"mc1": 0.25, "mc2": 0.40, "mc3": 0.20, "truth": 0.30, "info": 0.95, "ce": 3.0, "kl": 0.0}


def result_file(path, metrics, edit, judged, n=20):
    """NAME.json and NAME.jsonl: n per-question rows whose means are the planted rates (to 1/n), the metrics their
    means as evaluate.py computes them."""
    rows = []
    for i in range(n):
        row = {"question": f"What is fact {i}?", "answer": "I have no comment." if i < 3 else f"Fact {i}.",
               "mc2": metrics["mc2"], "mc3": metrics["mc3"], "mc1": float(i < round(metrics["mc1"] * n))}
        if judged:
            row.update(truth=float(i < round(metrics["truth"] * n)), info=float(i >= n - round(metrics["info"] * n)))
        rows.append(row)
    means = {k: float(np.mean([r[k] for r in rows])) if judged or k not in ("truth", "info") else None
             for k in ("mc1", "mc2", "mc3", "truth", "info")}
    metrics = dict(metrics, **means, n_questions=n)
    metrics["info_truth"] = None if metrics["truth"] is None else metrics["truth"] * metrics["info"]
    runfiles.write_json(path, {"metrics": metrics, "edit": edit, "edit_file": None if edit is None else
                               path.replace("/results/", "/edits/").replace(".json", ".safetensors"),
                               "apply": edit["apply"] if edit else None, "settings": {"split": "test"},
                               "judges": {"truth": "fake"} if judged else None, "run": {"args": {"model": "fake-7b"}}})
    runfiles.write_text(path[:-5] + ".jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return metrics


def ipo_log(path, tau, strength):
    """An IPO training log beside the edit: the validation loss levels off for strong sets, not for weak ones."""
    loss = [2.8, 1.5, 1.5 - 0.6 * (1 - strength)] if strength < 1 else [2.8, 1.0, 0.99]
    runfiles.write_json(path, {"tau": tau, "epochs": [{"epoch": e, "val_loss": v, "val_margin": (2.8 - v) / 2}
                                                      for e, v in enumerate(loss)]})


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
    os.makedirs(f"{run}/edits", exist_ok=True)
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
                edit = {"model": "fake-7b", "method": method, "head_spec": spec, "seed": 0, "geometry": vars(GEO),
                        "heads": heads.format_heads(listed), "apply": "iti" if method == "iti" else "all",
                        **({"alpha": g, "direction": "mass_mean", "k": len(listed)} if method == "iti" else
                           {"tau": g, "param": "lora1"})}
                name = f"{method}-{spec.replace(':', '_')}-{g}"
                m = result_file(f"{run}/results/{name}.json", m, edit, judged)
                scores.append(m["info_truth"] if judged else m["mc2"])
                if method == "ipo":
                    ipo_log(f"{run}/edits/{name}.log.json", g, s)
            planted[(method, spec)] = max(scores)
    return planted


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("judged"))
    planted = write_fake_sweep(run)
    plot.main(["--runs", run, "--report"])
    return run, planted


# ---- Figures from a fake sweep

FIGURES = ["probe_accuracy.png", "fig1_iti_probed_vs_random.png", "fig2_truth_vs_info.png",
           "fig3_ipo_probed_vs_random.png", "fig4_ipo_single_heads.png", "fig5_ipo_kl.png", "fig6_ipo_convergence.png",
           "fig7_calibration.png"]


def test_every_figure_is_drawn_from_a_judged_sweep(judged):
    run, _ = judged
    log = json.load(open(f"{run}/figures/figures.json"))
    assert sorted(log["drawn"]) == sorted(FIGURES) and log["metric"] == "info_truth"
    assert log["skipped"] == {"fig8_ablation.png: histogram": "needs ablate results at top:4 and at the sets it is "
                                                               "compared with"}
    for name in FIGURES:
        with open(f"{run}/figures/{name}", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert log["claimed"] == "top:4" and log["run"]["command"]


def test_plot_report_flag_runs_report_py_on_the_planted_sweep(judged):
    """plot.py --report (the old command line) writes report.py's report; its ranks are the planted ones."""
    run, planted = judged
    numbers = json.load(open(f"{run}/report.json"))
    randoms = [f"random:4:{s}" for s in range(19)]
    for method in ("iti", "ipo"):
        trial = numbers["trials"][method.upper()]["info_truth"]
        claimed = planted[(method, "top:4")]
        assert trial["claimed"] == pytest.approx(claimed)
        assert trial["pool"] == pytest.approx({s: planted[(method, s)] for s in randoms})
        n_at_least = sum(planted[(method, s)] >= claimed for s in randoms)
        assert trial["rank_test"]["p"] == pytest.approx((1 + n_at_least) / 20)
    assert numbers["trials"]["ITI"]["info_truth"]["verdict"] == "stands out"  # strength 1.0 beats every random set
    assert numbers["trials"]["IPO"]["info_truth"]["rank_test"]["p"] > 0.2  # planted mid-distribution
    singles = [s for m, s in planted if m == "ipo" and s.startswith("single:")]
    assert sorted(numbers["trials"]["IPO, single heads"]["info_truth"]["pool"]) == sorted(singles)
    unconverged = [e["edit"] for e in numbers["edits"] if (e["convergence"] or {}).get("converged") is False]
    assert unconverged and all(e.startswith("ipo ") for e in unconverged)


def test_histogram_and_calibration_panels_use_the_report_numbers(judged):
    run, _ = judged
    sweep = plot.results.load_results([run])
    pool = plot.results.roles(sweep, "top:4")["random"]
    assert callable(plot.hist_panel(sweep, "iti", "top:4", pool, "info_truth", "random sets", "t", 0.05))
    assert callable(plot.calibration_panel(sweep, "iti", "top:4", "mc2", 0.05))
    assert plot.convergence_panel(sweep, "top:4", "val_loss", 0.05) != "no IPO training log with a validation curve " \
        "(NAME.log.json beside the edit files)"
    assert plot.calibration_panel(sweep, "ablate", "top:4", "mc2", 0.05).startswith("needs ablate results")


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
    assert numbers["trials"]["ITI"]["mc2"]["claimed"] == pytest.approx(planted[("iti", "top:4")])
    assert "at least 19 random sets (now 3: the smallest p is 1/4)" in open(f"{run}/report.md").read()
    with pytest.raises(SystemExit, match="judges were skipped: use --metric mc2"):
        plot.main(["--runs", run, "--metric", "truth"])


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
    with open(f"{run}/results/baseline.json", "w") as f:
        f.write("{")
    with pytest.raises(SystemExit, match=r"baseline.json is not valid JSON"):
        plot.main(["--runs", run])
