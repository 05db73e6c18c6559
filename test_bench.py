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
    rows = bench.main(SMALL + ["--json", str(tmp_path / "bench.json")])
    assert [r["stage"][0] for r in rows] == ["1", "2", "3", "4", "5"]
    for r in rows:
        assert r["match"] is True, r
        assert r["ratio"] > 0 and r["ours_s"] > 0 and r["reference_s"] > 0, r
        assert isinstance(r["met"], bool) and r["target"], r
    assert rows[2]["top_k_overlap"] == 16
    with open(tmp_path / "bench.json") as f:
        saved = json.load(f)
    assert "tiny-llama" in saved["header"] and "1 CPU thread" in saved["header"] and len(saved["rows"]) == 5


def test_a_wrong_answer_is_reported_as_not_matching(monkeypatch):
    """The checks before the timings are real: MC scores off by 1e-3 (row 4), or cached reference log-probs of
    the chosen answers off by 1e-2 (row 5), make the row say that the outputs differ."""
    scorer, reference = evaluate.answer_logprobs, ipo_edit.reference_logps
    monkeypatch.setattr(evaluate, "answer_logprobs", lambda *a, **k: [s + 1e-3 for s in scorer(*a, **k)])
    shifted = lambda chosen, rejected: (chosen + 1e-2, rejected)  # the same shift on both would cancel in h
    monkeypatch.setattr(ipo_edit, "reference_logps", lambda *a, **k: shifted(*reference(*a, **k)))
    rows = bench.main(SMALL + ["--stages", "4,5"])
    assert [r["match"] for r in rows] == [False, False]


def test_bad_arguments_stop_with_a_sentence():
    with pytest.raises(SystemExit, match="choose rows from"):
        bench.main(["--quick", "--stages", "1,7"])
    with pytest.raises(SystemExit, match="HEADS,DIMS,EXAMPLES"):
        bench.main(["--quick", "--probe-shape", "64,32"])
