"""edit_checks.py - the checks on each edit beside its scores, and the report's "Per edit" section that shows them.

Holds: the non-answer rule (HEDGES, is_non_answer), the shares of non-answers and of repeated answers (from the
answers in NAME.jsonl), whether an IPO edit's training converged (from NAME.log.json beside its edit file), and the
per-edit table of report.py. The figure of IPO convergence is plot.py's.
"""
import collections
import os
import re

import numpy as np

import runfiles
from results import interval, knob, read_json, rows, with_ci


# The non-answer rule: an answer is a non-answer when no word is left after removing the question's words and these
# function words and hedges ("I have no comment.", "The answer is no.", "It depends." are non-answers)
HEDGES = set("""a an the this that these those it its it's there here is are was were be been being am do does did have
has had i i'm you we they he she me my your our their his her what which who whom when where why how to of in on at by
for with from as about into than then so and or but if not no yes nor can could may might must shall should will would
answer question questions comment comments know knows known sure unknown unclear depends depend idea cannot can't don't
doesn't isn't aren't maybe perhaps possibly probably certain certainly really just very also""".split())


def words(text):
    """The lower-case words of a text (curly apostrophes made straight)."""
    return re.findall(r"[a-z0-9']+", (text or "").lower().replace("\u2019", "'"))


def is_non_answer(question, answer):
    """No word left once the question's words (a trailing s ignored) and the HEDGES list are removed."""
    asked = {w.rstrip("s") for w in words(question)}
    return not [w for w in words(answer) if w not in HEDGES and w.rstrip("s") not in asked]


def answer_shares(point):
    """{'non_answers', 'repeated', 'most_common'}: the share of non-answers and of the most common answer, or None."""
    found = rows(point)
    if not found or any("answer" not in r for r in found.values()):
        return None
    answers = [" ".join(words(r["answer"])) for r in found.values()]
    common, count = collections.Counter(answers).most_common(1)[0]
    return {"non_answers": float(np.mean([is_non_answer(q, r["answer"]) for q, r in found.items()])),
            "repeated": count / len(answers), "most_common": common}


def convergence(point, threshold):
    """For an IPO edit, from NAME.log.json beside its edit file: {'converged', 'change' (last relative change of the
    validation loss), 'moved' (its relative fall from the first entry), 'val_margin', 'target' (1/(2 tau))}; None
    without a log. Converged: the loss fell (moved >= threshold) and levelled off (change < threshold)."""
    stem = (point.get("edit_file") or "").removesuffix(".safetensors")
    here = os.path.join(os.path.dirname(os.path.dirname(point["path"])), "edits", os.path.basename(stem) + ".log.json")
    path = next((p for p in (stem + ".log.json", here) if stem and os.path.isfile(p)), None)
    if path is None:
        return None
    log = read_json(path, "delete it and train that IPO edit again (ipo_edit.py), or move it away")
    lists = [v for v in log.values() if isinstance(v, list)] if isinstance(log, dict) else []
    curve = max(([e for e in v if isinstance(e, dict) and e.get("val_loss") is not None] for v in lists),
                key=len, default=[])
    tau = log.get("tau") if isinstance(log, dict) else None
    out = {"log": path, "target": 1 / (2 * tau) if tau else None, "val_margin": curve[-1].get("val_margin")
           if curve else None, "val_loss": [e["val_loss"] for e in curve],
           "val_margins": [e.get("val_margin") for e in curve]}
    if len(curve) < 2:
        return dict(out, converged=None, change=None, moved=None)
    first, before, last = curve[0]["val_loss"], curve[-2]["val_loss"], curve[-1]["val_loss"]
    change = abs(last - before) / max(abs(before), 1e-12)
    moved = (first - last) / max(abs(first), 1e-12)  # a loss that never fell has not converged: it has not trained
    return dict(out, converged=bool(change < threshold and moved >= threshold), change=change, moved=moved)


# ---- The report's "Per edit" section

def check_cells(shares, conv):
    """The table's cells for one edit's checks: non-answers | repeated | converged | margin / target."""
    said = "" if conv is None else {True: "yes", False: "**no**", None: "no curve"}[conv["converged"]] + (
        f" (last {conv['change']:.1%}, fell {conv['moved']:.0%})" if conv["change"] is not None else "")
    margin = f"{conv['val_margin']:.3g} / {conv['target']:.3g}" if conv and conv["val_margin"] is not None \
        and conv["target"] else ""
    shared = f"{shares['non_answers']:.0%} | {shares['repeated']:.0%}" if shares else "n/a | n/a"
    return f"{shared} | {said} | {margin}"


def edit_section(sweep, metric, opts, threshold):
    """(lines, rows): per edit the metric and MC2 with intervals, the shares of non-answers and repeated answers,
    and for IPO whether the training converged. opts: (resamples, seed) of the intervals."""
    metrics = list(dict.fromkeys([metric, "mc2"]))
    lines = ["", "## Per edit", "", "Non-answer: an answer with no word left once the question's words and a short "
             "list of function words and hedges (edit_checks.HEDGES) are removed: 'I have no comment.' and 'The "
             "answer is no.' are non-answers. Repeated: the share of the most common answer. Converged (IPO): the "
             f"validation loss fell by at least {threshold:.0%} from its first entry and changed by less than "
             f"{threshold:.0%} over the last logged interval; margin: the final validation margin against the IPO "
             "target 1/(2 tau).", "",
             "| edit | " + " | ".join(f"{m} [CI]" for m in metrics) +
             " | non-answers | repeated | converged | margin / target |", "|---" * (5 + len(metrics)) + "|"]
    natural = lambda key: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", " ".join(key))]  # noqa: E731
    points = [("unedited", b) for b in sweep["baselines"]] + [
        (f"{m} {s}" + ("" if p["grid"] is None else f" {knob(m)} {p['grid']:g}"), p)
        for (m, s), pts in sorted(sweep["curves"].items(), key=lambda item: natural(item[0])) for p in pts]
    rows_ = []
    for label, p in points:
        shares = answer_shares(p)
        conv = convergence(p, threshold) if label.startswith("ipo") else None
        ci = {m: interval(m, p, None, opts) for m in metrics}
        rows_.append({"edit": label, "path": p["path"], **{m: runfiles.finite_or_none(p.get(m)) for m in ci},
                      "intervals": ci, "answers": shares, "convergence": conv})
        lines.append(f"| {label} | " + " | ".join(with_ci(p.get(m), ci[m]) for m in ci) +
                     f" | {check_cells(shares, conv)} |")
    unconverged = [r["edit"] for r in rows_ if (r["convergence"] or {}).get("converged") is False]
    lines += ["", f"**Unconverged IPO results** ({len(unconverged)}): {', '.join(unconverged)}. Their scores "
              "understate what the optimal edit can do at those heads."] * bool(unconverged)
    return lines, rows_
