"""bench_kit.py - what every row of bench.py (and bench_ipo.py) shares: the timer, the row it reports, its questions.

  median_time    median wall time of a function over --repeats runs (CUDA synchronised), and what it returned
  speedup_row    a row whose ratio is the reference's time over ours (how many times faster ours is), with its target
  overhead_row   a row whose ratio is our time over a plain baseline's (what ours adds to the same work)
  fast_row       rows 6-8: the fast precision against float32 (a speedup row, its tolerance in the note)
  load_questions the first --n-questions questions of --data, for rows 4-5 and 7-9
"""
import statistics
import time

import torch

import tqa


def median_time(fn, repeats, device, warmup=True):
    """(median wall time of fn() over `repeats` runs, what the first timed run returned); warmup: one untimed run
    before (off where one run takes long: its first run is timed like the others)."""
    if warmup:
        fn()
    times, first = [], None
    for i in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        first = out if i == 0 else first
    return statistics.median(times), first


def speedup_row(stage, ours_s, reference_s, ratio_label, at_least, match, note, **extra):
    """ratio = reference_s / ours_s, met at `at_least` or more; `extra` fields stand before the note."""
    ratio = reference_s / ours_s
    return {"stage": stage, "ours_s": ours_s, "reference_s": reference_s, "ratio": ratio, "ratio_label": ratio_label,
            "target": f">= {at_least}", "met": ratio >= at_least, "match": match, **extra, "note": note}


def overhead_row(stage, ours_s, reference_s, baseline_s, ratio_label, at_most, match, note):
    """ratio = ours_s / baseline_s (the plain work without our addition), met at `at_most` or less."""
    ratio = ours_s / baseline_s
    return {"stage": stage, "ours_s": ours_s, "reference_s": reference_s, "baseline_s": baseline_s, "ratio": ratio,
            "ratio_label": ratio_label, "target": f"<= {at_most}", "met": ratio <= at_most, "match": match,
            "note": note}


def fast_row(stage, t_fast, t_float32, match, tolerance, note):
    return speedup_row(stage, t_fast, t_float32, "float32/fast", 1.5, match, f"{note} (tolerance: {tolerance})")


def load_questions(args):
    """The first --n-questions questions of --data (default: the shipped TruthfulQA CSV)."""
    return tqa.load_truthfulqa(args.data)[:args.n_questions]
