"""evaluate.py - score the model under test, unedited or edited, on TruthfulQA: MC1/MC2/MC3, greedy generations judged
for Truth and Info, and CE / KL(original || edited) on unrelated text (method.md section 3).

Reads:  --data (default: the shipped data/TruthfulQA.csv); --edit files written by iti.py / ipo_edit.py (several: evaluated together, in one pass:
        every forward runs rows of all the edits at once, heads.EditBatch; the word `none` stands for the unedited
        baseline); the judges (judges/*.safetensors, or any causal LM); --text.
Writes: --out NAME.json (metrics, the edit's metadata, settings, precision, provenance) and NAME.jsonl beside it, one row
        per question (answer scores, MC1/2/3, the generation, judge probabilities), appended as questions complete: a
        killed run restarted with the same arguments resumes. With several edits --out is a folder: one NAME per edit
        file stem (`baseline` for `none`).
Where an edit applies follows edit.meta["apply"] (or --apply), decided for every stage by heads.edit_start alone. The
primer (ITI's instruction and the QA primer, tqa.shared_prefix_length tokens every prompt starts with) runs once, shared
by the baseline and every edit that does not reach the prompt, and once per edit that does (apply 'all').
The method's stages, in its order: MC and generation in scoring.py (each plain definition beside its fast version),
CE/KL and its text in ce_kl.py, judging here; this script also holds the arguments, the run and the result files.

    python evaluate.py --edit runs/smollm2/iti/top16.safetensors --judges none --out runs/smollm2/results/iti_top16.json
"""
import argparse
import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import heads
import judge
import models
import runfiles
import tqa
# the stages' functions; plain_answer_logprobs, plain_greedy and NEUTRAL_PROMPTS only for those importing them from here
from ce_kl import NEUTRAL_PROMPTS, add_text_args, ce_kl, load_texts  # noqa: F401
from scoring import (CUT_RULE, PROMPT_END, Target, answer_logprobs, cut_answer, edit_batch,  # noqa: F401
                     encode_question, generate, make_primer, mc_metrics, plain_answer_logprobs, plain_greedy)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
models.add_model_args(parser)
tqa.add_data_args(parser)
what = parser.add_argument_group("what to evaluate")
what.add_argument("--edit", nargs="*", default=["none"], help="edit file(s), evaluated in one pass; `none` = unedited")
what.add_argument("--out", required=True,
                  help="NAME.json for one edit (NAME.jsonl beside it); a folder for several (one NAME per edit stem)")
what.add_argument("--split", default="test", help="questions to score: train, val, test, all, or a sum (train+val)")
what.add_argument("--max-questions", type=int, default=None, help="a seeded subset of the split (quick runs)")
what.add_argument("--instruction", default="default", choices=list(tqa.INSTRUCTIONS),
                  help="ITI's instruction sentence before the QA primer (default), the informative variant, or none")
what.add_argument("--apply", default=None, choices=list(heads.APPLY),
                  help="where edits apply: iti (ITI's positions) or all (every token); default: the edit file's")
what.add_argument("--skip", default="", help="comma list of stages to leave out: mc, generation, text")
how = parser.add_argument_group("how")
how.add_argument("--batch-size", type=int, default=32, help="rows per forward: (edit, answer) rows in MC, (edit, "
                 "question) rows in generation; decoding reads every weight per token, so more rows cost little more")
how.add_argument("--max-new-tokens", type=int, default=50, help="greedy generation length limit")
how.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
judging = parser.add_argument_group("judges")
judging.add_argument("--judges", default="default", choices=["default", "none"],
                     help="none: skip Truth and Info (judge later with --judge-only)")
judging.add_argument("--truth-judge", default=judge.DEFAULT_JUDGES["truth"],
                     help="judge file (written by train_judge.py; default: the committed one) or causal LM id/folder")
judging.add_argument("--info-judge", default=judge.DEFAULT_JUDGES["info"],
                     help="judge file (written by train_judge.py; default: the committed one) or causal LM id/folder")
judging.add_argument("--judge-device", default=None, help="device of the judges (default: --device)")
judging.add_argument("--judge-only", action="store_true",
                     help="only judge saved generations: an earlier run (e.g. with --judges none) wrote NAME.json")
add_text_args(parser)


# ---- Judging (Truth, Info)

def judge_id(spec, sha256=None):
    """Which judge: its spec, and for a judge file its content's hash too (a retrained judge judges again). sha256:
    the hash of the judge as loaded (what scored the rows, even if the file has been replaced since)."""
    if sha256 is None and os.path.isfile(spec):
        sha256 = judge.checksum(spec)
    return f"{spec}#{sha256[:16]}" if sha256 else spec


def load_judges(args):
    """{kind: judge}: loaded before the long part, so a judge that cannot load stops the run before any scoring."""
    return {kind: judge.load_judge(spec, kind, args.judge_device or args.device, args.dtype)
            for kind, spec in (("truth", args.truth_judge), ("info", args.info_judge))}


def judge_rows(targets, judges, chunk=256):
    """Truth and Info for every row lacking them (or judged by another judge): each distinct (question, answer) is
    judged once, whichever edits gave it, by both judges together (judge.score_together: the fine-tuned judges share
    their base model's frozen pass), a question's answers side by side; rows rewritten after each chunk (a killed run
    resumes)."""
    abouts = {kind: dict(scorer.about, id=judge_id(scorer.about["judge"], scorer.about.get("sha256")))
              for kind, scorer in judges.items()}
    rows_of = {}  # (question, answer) -> [(target, row)] that some judge has still to judge
    for t in targets:
        for r in t.rows.values():
            if any(r.get(f"{kind}_spec") != abouts[kind]["id"] for kind in judges):
                rows_of.setdefault((r["question"], r["answer"]), []).append((t, r))
    pairs = sorted(rows_of)  # by question: its answers in one call
    for i in tqdm(range(0, len(pairs), chunk), desc=f"judging ({len(pairs)} distinct answers, {' and '.join(judges)})"):
        part = pairs[i:i + chunk]
        probs = judge.score_together(judges, [q for q, _ in part], [a for _, a in part])
        for kind, p_kind in probs.items():
            for pair, p in zip(part, map(runfiles.finite_or_none, p_kind)):
                for _, row in rows_of[pair]:
                    row.update({f"{kind}_p": p, kind: None if p is None else float(p >= judge.THRESHOLD),
                                f"{kind}_spec": abouts[kind]["id"], f"{kind}_judge": abouts[kind]})
        for t in {id(t): t for pair in part for t, _ in rows_of[pair]}.values():
            runfiles.write_text(t.jsonl, runfiles.json_lines(t.rows.values()))
    return abouts


# ---- Rows, metrics, results

def mc_row(scores, n_correct, i_best):
    """A question's MC fields; a non-finite score (an edit that overflows the model) gives nulls, never NaN."""
    finite = [runfiles.finite_or_none(s) for s in scores]
    m = mc_metrics(scores[:n_correct], scores[n_correct:], i_best) if None not in finite else {}
    return dict(scores_true=finite[:n_correct], scores_false=finite[n_correct:],
                **{k: runfiles.finite_or_none(m.get(k)) for k in ("mc1", "mc2", "mc3")})


def metrics(rows, text_scores):
    """Means over questions; Info*Truth = mean(truth) * mean(info), the product of the two averages. A metric some
    row lacks a finite value of is null, with the reason under 'null_reasons'."""
    m, reasons = {}, {}
    for name in ("mc1", "mc2", "mc3", "truth", "info"):
        values = [r.get(name) for r in rows if name in r]
        m[name] = float(np.mean(values)) if len(values) == len(rows) and None not in values else None
        if values and None in values:
            reasons[name] = f"{values.count(None)} of {len(rows)} questions have no finite value (NaN/inf scores)"
    m["info_truth"] = None if m["truth"] is None or m["info"] is None else m["truth"] * m["info"]
    text = {k: runfiles.finite_or_none(v) for k, v in (text_scores or {"ce": None, "kl": None}).items()}
    reasons.update({k: "the edited model's CE/KL is NaN or inf" for k, v in text.items() if v is None and text_scores})
    return dict(m, **text, n_questions=len(rows), null_reasons=reasons)


def write_result(t, questions, text_scores, judges_about, settings, args):
    m = metrics([t.rows[q["question"]] for q in questions], text_scores)
    runfiles.write_json(t.json, {"metrics": m, "edit": t.meta, "edit_file": t.edit_file, "apply": t.apply,
                                 "precision": settings["precision"], "settings": dict(settings, rows_key=t.key),
                                 "judges": judges_about, "run": runfiles.run_info(args)})
    print(f"{t.json}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float)))


def finished(t, settings, judges):
    """True when an earlier run with these settings already wrote this edit's results (and judged them with the
    same judges, if asked: the rows of a run judged by others are kept, and only judged again).
    judges: {kind: judge_id} of the judges asked for, or None (no judging)."""
    if not os.path.isfile(t.json):
        return False
    result = runfiles.read_json(t.json)
    if result["settings"] != dict(settings, rows_key=t.key):
        print(f"{t.json}: made with other settings, redone")
        return False
    if judges and {kind: (result["judges"] or {}).get(kind, {}).get("id") for kind in judges} != judges:
        print(f"{t.json}: judged by other judges (or not at all), judged again")
        return False
    print(f"{t.json}: already done, skipped")
    return True


# ---- The run

def select_questions(args):
    questions = tqa.load_split(args.data, args.seed, args.split)
    if args.max_questions is not None and args.max_questions < len(questions):
        if args.max_questions < 1:
            raise SystemExit(f"--max-questions {args.max_questions}: give at least 1")
        keep = np.random.default_rng(args.seed).choice(len(questions), args.max_questions, replace=False)
        questions = [questions[i] for i in sorted(keep.tolist())]
    return questions


def plan_targets(args):
    """One Target per --edit (name, edit file, output files), each output checked writable before any work."""
    if len(args.edit) != len(set(args.edit)) or not args.edit:
        raise SystemExit("--edit names a file twice (or nothing): give each edit file once (`none` = baseline)")
    several = len(args.edit) > 1
    if several and args.out.endswith(".json"):
        raise SystemExit(f"--out {args.out}: with {len(args.edit)} edits --out must be a folder (a NAME.json per edit)")
    targets = []
    for path in args.edit:
        name = "baseline" if path == "none" else os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(args.out, name + ".json") if several or not args.out.endswith(".json") else args.out
        runfiles.check_writable(out)
        targets.append(Target(name, edit_file=None if path == "none" else path, json=out))
    if len({t.json for t in targets}) != len(targets):
        raise SystemExit("two --edit files share a file stem: rename one, results are named after the stem")
    return targets


def check_edit_split(t, args):
    """Refuses an edit fitted on other questions than the split scored assumes: another --seed or --data (its test
    questions are then partly its training questions), or a scored split holding its training questions."""
    seed, data = t.meta.get("seed"), t.meta.get("data") or (t.meta.get("run") or {}).get("data")
    if seed is not None and str(seed) != str(args.seed):
        raise SystemExit(f"{t.edit_file} was fitted with --seed {seed}, this run scores --seed {args.seed}: its "
                         f"training questions would be among the scored ones; pass --seed {seed} or refit the edit")
    ours = tqa.data_version(args.data)
    if isinstance(data, dict) and (data.get("sha256"), data.get("data") == "hub") != (ours["sha256"],
                                                                                       ours["data"] == "hub"):
        raise SystemExit(f"{t.edit_file} was fitted on --data {data.get('data')} ({data.get('version')}), this run "
                         f"scores --data {args.data} ({ours['version']}): pass the edit's data, or refit the edit")
    names = {"train", "val", "test"} if args.split == "all" else set(args.split.split("+"))
    fitted_on = {"train", "val"} & names
    if fitted_on:
        raise SystemExit(f"--split {args.split} holds the {' and '.join(sorted(fitted_on))} questions an edit is "
                         f"fitted on (probe statistics, IPO training and validation): score {t.edit_file} on "
                         "--split test")


def score_questions(model, tokenizer, questions, targets, args, skip):
    """MC and generation for every target in one pass: per question, one MC forward holds the answers of all targets
    (--batch-size rows at a time); generation rows are (target, question) pairs. Rows are appended per chunk of
    questions (a resume step)."""
    batch = edit_batch(targets)
    prompts = [tqa.qa_prompt(q["question"], args.instruction) for q in questions]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    primer_ids = prompt_ids[0][:tqa.shared_prefix_length(prompt_ids)]
    primers = {stage: make_primer(model, primer_ids, targets, batch, stage) for stage in ("mc", "generate")}
    per_chunk = max(1, args.batch_size // len(targets))  # questions per chunk: a generation batch of all targets
    for c0 in tqdm(range(0, len(questions), per_chunk), desc="questions"):
        chunk = range(c0, min(c0 + per_chunk, len(questions)))
        todo = [t for t in targets if any(questions[i]["question"] not in t.rows for i in chunk)]
        rows = {t.name: {i: {"question": questions[i]["question"], "category": questions[i]["category"],
                             "key": t.key} for i in chunk} for t in todo}
        for i in chunk if "mc" not in skip else ():
            prompt, answers, n_correct, i_best = encode_question(tokenizer, questions[i], args.instruction)
            group = max(1, args.batch_size // len(answers))  # targets per MC forward
            for g in range(0, len(todo), group):
                part = todo[g:g + group]
                for t, scores in zip(part, answer_logprobs(model, prompt, answers, part, batch, primers["mc"])):
                    rows[t.name][i].update(mc_row(scores, n_correct, i_best))
        pairs = [(t, i) for t in todo for i in chunk]
        for p0 in range(0, len(pairs) if "generation" not in skip else 0, args.batch_size):
            part = pairs[p0:p0 + args.batch_size]
            raw = generate(model, tokenizer, [prompts[i] for _, i in part], args.max_new_tokens, [t for t, _ in part],
                           batch, primers["generate"])
            for (t, i), text in zip(part, raw):
                rows[t.name][i].update(generation=text, answer=cut_answer(text))
        for t in todo:
            new = [r for r in rows[t.name].values() if r["question"] not in t.rows]
            runfiles.append_rows(t.jsonl, new)
            t.rows.update({r["question"]: r for r in new})


def judge_only(args, targets, questions):
    """Judge the generations an earlier run saved, and add Truth, Info and Info*Truth to its results."""
    for t in targets:
        if not os.path.isfile(t.json):
            raise SystemExit(f"--judge-only: {t.json} is missing; first run without --judge-only "
                             "(e.g. with --judges none)")
        t.result = runfiles.read_json(t.json)
        t.rows = runfiles.read_rows(t.jsonl, t.result["settings"]["rows_key"])
        if any("answer" not in t.rows.get(q["question"], {}) for q in questions):
            raise SystemExit(f"--judge-only: {t.jsonl} lacks generations for some of these questions; rerun without "
                             "--judge-only and the same arguments to finish them")
    abouts = judge_rows(targets, load_judges(args))
    for t in targets:
        r = t.result
        text = {k: r["metrics"][k] for k in ("ce", "kl")}
        r.update(metrics=metrics([t.rows[q["question"]] for q in questions], text), judges=abouts)
        r["run_judges"] = runfiles.run_info(args)
        runfiles.write_json(t.json, r)
        print(f"{t.json}: truth {r['metrics']['truth']}, info {r['metrics']['info']}")


def check_args(args):
    """The arguments' sentences, before anything loads."""
    skip = {s for s in args.skip.split(",") if s}
    if skip - {"mc", "generation", "text"}:
        raise SystemExit(f"--skip {args.skip}: choose from mc, generation, text (comma-separated)")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.n_texts < 1 or args.text_tokens < 2:
        raise SystemExit("--batch-size, --max-new-tokens and --n-texts must be at least 1, --text-tokens at least 2")
    for device in {args.device, args.judge_device or args.device}:
        models.check_device(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return skip


def main(argv=None):
    args = parser.parse_args(argv)
    skip = check_args(args)
    questions, targets = select_questions(args), plan_targets(args)
    if args.judge_only:
        with runfiles.locked([t.json for t in targets], "evaluate.py"):
            return judge_only(args, targets, questions)
    use_judges = args.judges != "none" and "generation" not in skip
    model, tokenizer, model_about = models.load_model(args.model, args.dtype, args.device)
    settings = {"model": model_about, "data": args.data, "split": args.split, "seed": args.seed,
                "max_questions": args.max_questions, "questions": len(questions), "instruction": args.instruction,
                "mc": "summed log-probs of the tokens of ' ' + closed answer after tqa.qa_prompt",
                "generation": {"max_new_tokens": args.max_new_tokens, "prompt_end": PROMPT_END, "rule": CUT_RULE},
                "skip": sorted(skip), "precision": {"dtype": args.dtype, "note": model_about.get("precision",
                                                     f"weights and activations in {args.dtype}")}}
    for t in targets:
        if t.edit_file is not None:
            t.edit = heads.load_edit(t.edit_file, model)
            t.apply = args.apply or t.meta.get("apply") or ("iti" if t.meta.get("method") == "iti" else "all")
            check_edit_split(t, args)
        t.key = hashlib.sha1(json.dumps([settings, t.meta, t.apply], sort_keys=True).encode()).hexdigest()[:16]
    if "text" not in skip:  # before the long part: a bad --text stops the run here, not after the questions
        docs, settings["text"] = load_texts(args, model, tokenizer, model_about)
        settings["text"].update(max_tokens=args.text_tokens, apply="every token", kl="KL(original || edited), "
                                "mean over the tokens that predict a next token")
    judges = {"truth": judge_id(args.truth_judge), "info": judge_id(args.info_judge)} if use_judges else None
    with runfiles.locked([t.json for t in targets], "evaluate.py"):
        for t in targets:
            t.rows = runfiles.read_rows(t.jsonl, t.key)
        targets = [t for t in targets if not finished(t, settings, judges)]
        if not targets:
            return
        scorers = load_judges(args) if use_judges else None  # a judge that cannot load stops the run here
        score_questions(model, tokenizer, questions, targets, args, skip)
        text_scores = [None] * len(targets)
        if "text" not in skip:
            text_scores = ce_kl(model, tokenizer, docs, targets, edit_batch(targets), args.text_tokens,
                                args.text_batch_size)
        abouts = judge_rows(targets, scorers) if use_judges else None
        for t, text in zip(targets, text_scores):
            write_result(t, questions, text, abouts, settings, args)


if __name__ == "__main__":
    main()
