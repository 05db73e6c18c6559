"""Tests of bench.py: every row runs at the smallest sizes, its two implementations agree, its ratio is a number.

Run: python -m pytest -q test_bench.py
"""
import json

import pytest
import torch

import bench
import evaluate
import ipo_edit

torch.set_num_threads(1)
SMALL = ["--quick", "--threads", "1", "--repeats", "1", "--batch-size", "2", "--n-prompts", "4", "--n-questions", "2",
         "--pairs", "2", "--k", "4"]


def test_every_row_agrees_with_its_reference(tmp_path):
    """Each row's two sides do the same work and agree: the same outputs (rows 1-5, 9), or agreement within the
    row's stated tolerance (rows 6-8: bf16 vs float32). The timings are not asserted: they are what the row reports."""
    rows = bench.main(SMALL + ["--json", str(tmp_path / "bench.json")])
    assert [r["stage"].split()[0] for r in rows] == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]
    for r in rows:
        assert r["match"] is True, r
        assert r["threads"] == 1 and r["matrix_units"] in ("AMX-BF16", "AVX512-BF16", "AMX-BF16+AVX512-BF16", "none")
    assert rows[2]["top_k_overlap"] == 16 and "accuracies differ at 0 heads" in rows[2]["note"]
    assert float(rows[-2]["note"].rsplit(" ", 1)[1]) <= 1e-5  # the edit batch: the same scores
    assert float(rows[-1]["note"].rsplit(" ", 1)[1]) <= 1e-4  # judges together: each judge's P(yes) (tiny model)
    with open(tmp_path / "bench.json") as f:
        saved = json.load(f)
    assert "tiny-llama" in saved["header"] and "1 CPU thread" in saved["header"] and len(saved["rows"]) == len(rows)
    assert "CPU bf16 matrix units: " in saved["header"]


def test_a_wrong_answer_is_reported_as_not_matching(monkeypatch):
    """The checks before the timings are real: MC scores off by 1e-3 (row 4; row 9 when only the edit batch is off),
    or cached reference log-probs of the chosen answers off by 1e-2 (row 5), make the row say the outputs differ."""
    scorer, reference = evaluate.answer_logprobs, ipo_edit.reference_logps
    monkeypatch.setattr(evaluate, "answer_logprobs", lambda *a, **k: [[s + 1e-3 for s in t] for t in scorer(*a, **k)])
    shifted = lambda chosen, rejected: (chosen + 1e-2, rejected)  # the same shift on both would cancel in h
    monkeypatch.setattr(ipo_edit, "reference_logps", lambda *a, **k: shifted(*reference(*a, **k)))
    rows = bench.main(SMALL + ["--stages", "4,5"])
    assert [r["match"] for r in rows] == [False, False]
    monkeypatch.setattr(evaluate, "answer_logprobs", lambda model, p, a, targets=(evaluate.Target(),), *rest, **k: [
        [s + 1e-3 * (len(targets) > 1) for s in t] for t in scorer(model, p, a, targets, *rest, **k)])
    assert bench.main(SMALL + ["--stages", "9"])[0]["match"] is False


def test_bad_arguments_stop_with_a_sentence():
    with pytest.raises(SystemExit, match="choose rows from"):
        bench.main(["--quick", "--stages", "1,12"])
    with pytest.raises(SystemExit, match="HEADS,DIMS,EXAMPLES"):
        bench.main(["--quick", "--probe-shape", "64,32"])
