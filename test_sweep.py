"""Tests of sweep.py: the plan (units, shared random sets, distinct single heads, disjoint shards) and the tiny sweep
end to end (tiny-llama, a fixture CSV, the smallest sizes, no judges): every expected file exists, every result JSON
is complete, and a second run resumes with nothing left to do.

Run: python -m pytest -q test_sweep.py
"""
import json
import os

import pytest
import torch

import tqa

import heads
import models
import runfiles
import sweep
import sweep_steps

torch.set_num_threads(1)
STAGES = ["probe.py", "iti.py", "ipo_edit.py", "evaluate.py"]
METRIC_KEYS = {"mc1", "mc2", "mc3", "truth", "info", "info_truth", "ce", "kl", "n_questions"}


def write_probe_json(run, geo=heads.Geometry(3, 4, 16)):
    runfiles.write_json(f"{run}/probe/probe.json", {"geometry": vars(geo), "ranking": [[0, 0], [1, 1], [2, 2]]})
    open(f"{run}/probe/probe.safetensors", "w").close()  # the plan only checks that it exists


def test_plan_shares_random_sets_draws_distinct_single_heads_and_shards_disjointly(tmp_path, capsys):
    run = str(tmp_path)
    write_probe_json(run)
    args = sweep.parse_args(["--model", "tiny-llama", "--out", run, "--k", "3", "--n-random", "5", "--n-random-ipo",
                             "2", "--n-single", "6", "--alphas", "1", "2", "--taus", "0.1", "0.3", "0.5"])
    units = sweep.plan(args)
    names = [u["name"] for u in units]
    iti = [n.split()[1] for n in names if n.startswith("iti ")]
    ipo = [n.split()[1] for n in names if n.startswith("ipo ")]
    assert names[0] == "baseline" and iti == ["top:3"] + [f"random:3:{i}" for i in range(5)]
    singles = [s for s in ipo if s.startswith("single:")]
    assert ipo[:3] == iti[:3] and ipo[-1] == "all" and len(set(singles)) == 6  # IPO reuses the first random sets
    for unit in units[1:]:
        fit, evaluations = unit["steps"][0], unit["steps"][1:]
        assert unit["fits"] == 1 and len(fit[1]) == unit["points"] == {"iti": 2, "ipo": 3, "ablate": 1}[unit["kind"]]
        assert [os.path.basename(r)[:-5] for _, (r,) in evaluations] == [os.path.basename(e)[:-12] for e in fit[1]]
        assert all(cmd[cmd.index("--edit") + 1] == e for (cmd, _), e in zip(evaluations, fit[1]))  # one edit each
    shards = []
    for i in range(3):  # each shard prints its commands: together they cover the plan once
        sweep.main(["--model", "tiny-llama", "--out", run, "--k", "3", "--n-random", "5", "--n-random-ipo", "2",
                    "--n-single", "6", "--alphas", "1", "2", "--shard", f"{i}/3", "--dry-run"])
        shards.append([line[:-1] for line in capsys.readouterr().out.splitlines() if line.endswith(":")
                       and line.split()[0] in ("baseline:", "iti", "ipo", "ablate")])
    assert sorted(sum(shards, [])) == sorted(names) and all(shards)


def test_evaluations_are_batched_by_settings_and_folder():
    """sweep_steps.batches: one call per (settings, folder); a result not named after its edit runs alone."""
    def step(edit, out, instruction="default"):
        return (["evaluate.py", "--model", "m", "--edit", edit, "--split", "test", "--out", out, "--instruction",
                 instruction], [out])
    steps = [step("none", "r/baseline.json"), step("e/a.safetensors", "r/a.json"), step("e/b.safetensors", "r/b.json"),
             step("e/c.safetensors", "r/c.json", "none"), step("none", "r/baseline-none.json", "none"),
             step("e/d.safetensors", "q/d.json")]
    calls = sweep_steps.batches(steps)
    assert [len(part) for _, part in calls] == [3, 1, 1, 1]
    assert calls[0][0] == ["evaluate.py", "--model", "m", "--edit", "none", "e/a.safetensors", "e/b.safetensors",
                           "--split", "test", "--out", "r", "--instruction", "default"]
    assert [cmd for cmd, _ in calls[1:]] == [steps[3][0], steps[4][0], steps[5][0]]  # alone: exactly as recorded
    assert [len(part) for _, part in sweep_steps.batches(steps[:3], most=2)] == [2, 1]


def test_claimed_sets_are_parsed_by_heads_and_size_the_random_sets(tmp_path, capsys):
    run = str(tmp_path)
    write_probe_json(run)
    for claimed, k in [("0.1,1.2", 2), ("single:2.3", 1), ("top:3", 3)]:
        args = sweep.parse_args(["--model", "tiny-llama", "--out", run, "--claimed", claimed, "--n-random", "2"])
        names = [u["name"] for u in sweep.plan(args)]
        assert f"iti {claimed}" in names and f"iti random:{k}:1" in names
    with pytest.raises(SystemExit, match="malformed"):
        sweep.plan(sweep.parse_args(["--model", "tiny-llama", "--out", run, "--claimed", "1.x"]))
    with pytest.raises(SystemExit, match="out of range"):
        sweep.plan(sweep.parse_args(["--model", "tiny-llama", "--out", run, "--claimed", "7.1"]))


def test_presets_set_the_sizes_and_flags_override_them(tmp_path):
    cpu = not torch.cuda.is_available()
    base = ["--model", "tiny-llama", "--out", str(tmp_path)]
    course = sweep.parse_args(base + (["--preset", "course"] if not cpu else []))
    assert (course.k, course.n_random, course.n_random_ipo, course.max_questions) == (16, 19, 19, None)  # all 164
    quick = sweep.parse_args(base + ["--preset", "quick"])
    assert (quick.k, quick.n_random_ipo, quick.n_single, quick.max_questions) == (8, 1, 1, 32)
    full = sweep.parse_args(base + ["--preset", "course-full", "--n-single", "3"])
    assert (full.n_single, full.alphas, full.taus) == (3, [10, 15], [0.1, 0.3])  # the flag wins over the preset
    with pytest.raises(SystemExit):
        sweep.parse_args(base + ["--preset", "huge"])


def test_bad_arguments_are_refused_with_a_sentence(tmp_path):
    for argv, message in [(["--shard", "2/2"], "--shard 2/2: give I/N"), (["--shard", "x"], "give I/N"),
                          (["--n-random", "1", "--n-random-ipo", "2"], "at most --n-random"),
                          (["--methods", "rome"], "choose from iti, ipo, ablate"), (["--max-pairs", "-1"], "0 \\(all\\)"),
                          (["--taus", "inf"], "finite and positive"), (["--alphas", "nan"], "finite"),
                          (["--lr-scale", "0"], "positive factor")]:
        with pytest.raises(SystemExit, match=message):
            sweep.parse_args(["--model", "tiny-llama", "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit, match="run it once first: python probe.py"):
        sweep.main(["--model", "tiny-llama", "--out", str(tmp_path), "--shard", "0/2"])


@pytest.mark.skipif(not all(os.path.isfile(os.path.join(sweep.HERE, s)) for s in STAGES),
                    reason="a stage script has not landed yet")
def test_tiny_sweep_end_to_end_and_resume(tmp_path, capsys, fixture_csv):
    run, data = str(tmp_path / "run"), fixture_csv(tmp_path / "tqa.csv", n=15)
    argv = ["--model", "tiny-llama", "--data", data, "--out", run, "--k", "2", "--n-random", "2", "--n-random-ipo",
            "1", "--n-single", "1", "--alphas", "5", "--taus", "0.1", "--max-pairs", "8", "--judges", "none",
            "--n-texts", "2", "--eval-args", "--max-new-tokens 4 --text-tokens 8", "--ipo-args", "--max-val-pairs 4",
            "--methods", "iti,ipo,ablate"]
    sweep.main(argv)
    assert "a plumbing check, not a finding" in capsys.readouterr().out
    units = sweep.plan(sweep.parse_args(argv))
    names = [u["name"] for u in units]
    ipo = [n for n in names if n.startswith("ipo ")]
    assert ipo[-3] == "ipo random:2:0" and ipo[-2].startswith("ipo single:") and ipo[-1] == "ipo all"
    assert [n for n in names if n.startswith("ablate ")] == ["ablate top:2", "ablate random:2:0", "ablate random:2:1"]
    for unit in units:
        for _, outputs in unit["steps"]:
            for path in outputs:
                assert os.path.isfile(path), path
        for _, (path,) in unit["steps"][unit["fits"]:]:
            result = json.load(open(path))
            assert set(result["metrics"]) >= METRIC_KEYS and result["metrics"]["n_questions"] >= 1
            assert all(result["metrics"][k] is not None for k in METRIC_KEYS - {"truth", "info", "info_truth"})
            assert result["run"]["command"] and "settings" in result
            if unit["name"] != "baseline":
                assert result["apply"] == ("iti" if unit["kind"] == "iti" else "all")
                edit = result["edit"]
                assert edit["method"] == unit["kind"] and edit["head_spec"] == unit["name"].split()[1]
                assert {"model", "fingerprint", "apply", "seed", "run", "heads", "geometry"} <= set(edit)
                assert {"iti": edit.get("alpha") == 5, "ipo": edit.get("tau") == 0.1,
                        "ablate": "alpha" not in edit and "tau" not in edit}[unit["kind"]]
            assert os.path.isfile(path[:-5] + ".jsonl")
    for name in ["probe_accuracy.png", "fig1_iti_probed_vs_random.png", "fig3_ipo_probed_vs_random.png",
                 "fig5_ipo_kl.png", "figures.json"]:
        assert os.path.isfile(f"{run}/figures/{name}"), name
    report = json.load(open(f"{run}/report.json"))
    assert report["metric"] == "mc2" and report["trials"]["ITI"]["mc2"]["rank_test"]["of"] == 3
    assert "plumbing check" in open(f"{run}/report.md").read()
    # every stage's edits were evaluated in one call, and equal an evaluation of one edit alone (its recorded command)
    times = sweep.read_jsonl(f"{run}/sweep_times.jsonl")
    assert [r["points"] for r in times if r["kind"] == "evaluate"] == [4, 4, 3]  # baseline + 3 ITI; 4 IPO; 3 ablations
    cmd, (batched,) = units[2]["steps"][1]
    alone = str(tmp_path / "alone.json")
    sweep.run_command(cmd[:cmd.index("--out") + 1] + [alone] + cmd[cmd.index("--out") + 2:], False)
    a, b = json.load(open(alone))["metrics"], json.load(open(batched))["metrics"]
    assert all(abs(a[k] - b[k]) < 1e-5 for k in METRIC_KEYS - {"truth", "info", "info_truth", "n_questions"}), (a, b)
    stamp = os.path.getmtime(units[1]["steps"][-1][1][0])
    sweep.main(argv)  # resume: nothing left, nothing rewritten
    assert "0 left" in capsys.readouterr().out and os.path.getmtime(units[1]["steps"][-1][1][0]) == stamp
    # other settings: the units they change are redone (and say why), the others are kept
    with open(f"{run}/sweep_times.jsonl", "a") as f:
        f.write('{"unit": "cut sho')  # a line cut by a kill must not break later sweeps
    # a sweep killed between a refit and its evaluation: the old result must not pass for the new edit's
    killed = next(u for u in units if u["name"] == "ipo random:2:0")
    refit = ([a if a != "8" else "6" for a in killed["steps"][0][0]], killed["steps"][0][1])
    assert sweep.run_command(refit[0], False) == 0
    sweep_steps.record_done(refit)  # what the killed sweep had recorded; its evaluation never ran
    sweep.main([a if a != "8" else "6" for a in argv])  # --max-pairs 8 -> 6: every IPO unit, nothing else
    out = capsys.readouterr().out
    redone = {line[len("redoing "):].split(" (")[0] for line in out.splitlines() if line.startswith("redoing ")}
    assert redone == {n for n in names if n.startswith("ipo ")} and "other settings" in out
    assert "redoing ipo random:2:0 (ipo-random2-0-t0.1.json: edits/ipo-random2-0-t0.1.safetensors was remade" in out
    assert os.path.getmtime(units[1]["steps"][-1][1][0]) == stamp  # the baseline was kept


def test_a_result_of_other_judges_is_judged_again_and_kept(tmp_path):
    """An evaluation's record holds the judges' checksums: new judge files make it stale with the reason that tells
    run_stage to keep its rows (evaluate.py then only judges them again); a refit edit makes it stale outright."""
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "edits").mkdir()
    edit, truth, info = run / "edits" / "e.safetensors", tmp_path / "truth.safetensors", tmp_path / "info.safetensors"
    for f, text in ((edit, "edit"), (truth, "t1"), (info, "i1")):
        f.write_text(text)
    out = run / "results" / "e.json"
    step = (["evaluate.py", "--edit", str(edit), "--out", str(out), "--truth-judge", str(truth), "--info-judge",
             str(info)], [str(out)])
    out.write_text("{}")
    sweep_steps.record_done(step)
    assert sweep_steps.stale(step) is None and sweep_steps.done(step)
    truth.write_text("t2")  # a retrained truth judge
    why = sweep_steps.stale(step)
    assert why.startswith(sweep_steps.JUDGES_CHANGED) and "truth" in why and "info" not in why
    sweep_steps.record_done(step)
    assert sweep_steps.done(step)
    edit.write_text("edit, refit")
    assert "edits/e.safetensors was remade" in sweep_steps.stale(step)
    none = (step[0][:5] + ["--judges", "none"], step[1])
    assert sweep_steps.judges_of(none[0]) == {}


def test_a_stage_in_its_own_process_dies_with_the_sweep(tmp_path):
    """--subprocess: a stage must not run on alone when the sweep is killed, even by kill -9 (PDEATHSIG)."""
    import signal
    import subprocess
    import sys
    import time
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time, sweep_steps\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "preexec_fn=sweep_steps._die_with_parent)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n")], cwd=sweep.HERE)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    child = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(50):  # the child gets SIGTERM from the kernel when its parent dies
        try:
            os.kill(child, 0)
            if open(f"/proc/{child}/stat").read().split()[2] == "Z":
                break  # a zombie: dead, waiting to be reaped by init
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the stage outlived the killed sweep")
