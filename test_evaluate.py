"""Tests of evaluate.py: MC1/2/3 by hand, the batched MC scorer against a plain one-forward-per-answer scorer, where
edits apply in generation, CE/KL, the judge path (a tiny random LM as the stand-in judge), resuming, bad input.

Run: python -m pytest -q test_evaluate.py        Benchmark (batched vs per-answer MC scoring): bench.py, row 4
"""
import json
import math
import os

import pytest
import torch

import evaluate
from conftest import write_fixture_csv
import heads
import judge
import models
import tqa

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama():
    return models.load_model("tiny-llama")


def save_test_edit(path, model, kind, scale=1.0, apply=None):
    """An ITI-like offset edit (applies at ITI's positions) or an IPO-like rank-1 edit (every token)."""
    geo = heads.geometry(model)
    g = torch.Generator().manual_seed(1)
    mask = heads.heads_to_mask([(0, 1), (1, 2), (2, 0)], geo)
    hd = geo.n_heads * geo.head_dim
    if kind == "iti":
        edit = heads.Edit(geo, mask, offset=scale * torch.randn(geo.n_layers, geo.n_heads, geo.head_dim, generator=g))
    else:
        edit = heads.Edit(geo, mask, a=scale * torch.randn(geo.n_layers, hd, generator=g),
                          b=scale * torch.randn(geo.n_layers, hd, generator=g))
    edit.meta.update(model="tiny-llama", fingerprint=heads.fingerprint(model), method=kind, head_spec="0.1,1.2,2.0",
                     apply=apply or ("iti" if kind == "iti" else "all"), seed=0)
    heads.save_edit(str(path), edit)
    return heads.load_edit(str(path), model)


def target(edit=None):
    return evaluate.Target(edit=edit, apply=None if edit is None else edit.meta["apply"])


def primer_of(tokenizer, prompts):
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    return ids[0][:tqa.shared_prefix_length(ids)]


def run(tmp_path, *args, data=None, text=True):
    """evaluate.main on the fixture CSV with small settings; returns nothing (reads happen in the tests)."""
    data = data or write_fixture_csv(tmp_path / "tqa.csv", n=15)
    argv = ["--model", "tiny-llama", "--dtype", "float32", "--data", data,
            "--max-new-tokens", "6", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), *args]
    if text and "--text" not in args:
        (tmp_path / "docs.txt").write_text("The cat sat on the mat and looked at the door.\n\nA quick brown fox "
                                           "jumps over the lazy dog. Nothing happens.\n\nI have no comment. Yes. No.")
        argv += ["--text", str(tmp_path / "docs.txt")]
    evaluate.main(argv)


def load(path):
    with open(path) as f:
        return json.load(f)


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- MC1 / MC2 / MC3

def test_mc_metrics_by_hand():
    # correct answers (best is index 1) and incorrect ones, as summed log-probs
    true, false = [math.log(0.2), math.log(0.5), math.log(0.05)], [math.log(0.1), math.log(0.3)]
    m = evaluate.mc_metrics(true, false, i_best=1)
    assert m["mc1"] == 1.0  # 0.5 beats 0.1 and 0.3
    assert m["mc2"] == pytest.approx(0.75 / 1.15)  # (0.2+0.5+0.05) / (0.2+0.5+0.05+0.1+0.3)
    assert m["mc3"] == pytest.approx(1 / 3)  # only 0.5 beats the best incorrect 0.3
    m = evaluate.mc_metrics(true, false, i_best=0)  # best 0.2 loses to 0.3
    assert m["mc1"] == 0.0 and m["mc3"] == pytest.approx(1 / 3)
    # very long answers: exp() of the raw scores underflows, the normalised mass does not
    assert evaluate.mc_metrics([-1000.0], [-1000.0 - math.log(3)], 0)["mc2"] == pytest.approx(0.75)


# ---- the fast scorer and generation against the plain ones, and an edit batch against one edit at a time

def check_scorer(model, tokenizer, questions, tmp_path, tol=1e-4):
    """One call scores every answer under the baseline, an ITI edit (unedited prompt, shared) and an every-token edit
    (its own prompt): equal to the plain one-forward-per-answer scorer, and to the same call one target at a time."""
    iti = save_test_edit(tmp_path / "iti.safetensors", model, "iti", scale=2.0)
    ipo = save_test_edit(tmp_path / "ipo.safetensors", model, "ipo", scale=0.3)
    targets = [target(), target(iti), target(ipo)]
    batch = evaluate.edit_batch(targets)
    primer_ids = primer_of(tokenizer, [tqa.qa_prompt(q["question"]) for q in questions])
    assert len(primer_ids) > 100  # the instruction and the six-question primer, shared by every prompt
    primer = evaluate.make_primer(model, primer_ids, targets, batch, "mc")
    assert primer.variants == [heads.NO_EDIT, 1]  # unedited (baseline and ITI), and the every-token edit's own
    for q in questions:
        prompt_ids, answer_ids, _, _ = evaluate.encode_question(tokenizer, q, "default")
        plain = [evaluate.plain_answer_logprobs(model, prompt_ids, answer_ids, t) for t in targets]
        assert not plain[1] == pytest.approx(plain[0], abs=1e-3) and not plain[2] == pytest.approx(plain[0], abs=1e-3)
        for p in (primer, None):
            together = evaluate.answer_logprobs(model, prompt_ids, answer_ids, targets, batch, p)
            for t, want, got in zip(targets, plain, together):
                assert got == pytest.approx(want, abs=tol)
                one = [evaluate.Target(edit=t.edit, apply=t.apply)]
                alone = evaluate.answer_logprobs(model, prompt_ids, answer_ids, one, evaluate.edit_batch(one),
                                                 evaluate.make_primer(model, primer_ids, one, evaluate.edit_batch(
                                                     one), "mc") if p else None)[0]
                assert got == pytest.approx(alone, abs=1e-5)


def test_fast_scorer_equals_plain_scorer_on_fixture_rows(llama, tmp_path, fixture_csv):
    model, tokenizer, _ = llama
    questions = tqa.load_truthfulqa(fixture_csv(tmp_path / "t.csv", n=3))
    check_scorer(model, tokenizer, questions, tmp_path)


def test_fast_scorer_equals_plain_scorer_on_real_rows(llama, tmp_path):
    model, tokenizer, _ = llama
    check_scorer(model, tokenizer, tqa.load_truthfulqa(tqa.DEFAULT_DATA)[:2], tmp_path)


def test_iti_edit_leaves_the_first_answer_token_and_prompt_alone(llama, tmp_path):
    """ITI's MC convention: edit from the first answer token, whose own log-prob comes from the unedited prompt."""
    model, tokenizer, _ = llama
    q = {"question": "Why?", "correct": ["Yes."], "incorrect": ["No."], "best": "Yes."}
    iti = save_test_edit(tmp_path / "iti.safetensors", model, "iti", scale=5.0)
    prompt_ids, answer_ids, _, _ = evaluate.encode_question(tokenizer, q, "none")
    one_token = [[a[0]] for a in answer_ids]
    targets = [target(), target(iti)]
    base, edited = evaluate.answer_logprobs(model, prompt_ids, one_token, targets, evaluate.edit_batch(targets))
    assert base == edited


def test_fast_generation_equals_plain_greedy(llama, tmp_path):
    """Left-padded, KV-cached, after the cached primer, rows of three targets in one batch: as plain greedy decoding."""
    model, tokenizer, _ = llama
    prompts = [tqa.qa_prompt("What is fact 1?"), tqa.qa_prompt("Why is the sky blue on a clear day?")]
    iti = save_test_edit(tmp_path / "iti.safetensors", model, "iti", scale=3.0)
    ipo = save_test_edit(tmp_path / "ipo.safetensors", model, "ipo", scale=0.3)
    targets = [target(), target(iti), target(ipo)]
    want = [evaluate.plain_greedy(model, tokenizer, p, 8, t) for t in targets for p in prompts]
    assert want[:2] != want[2:4] and want[:2] != want[4:]  # both edits move the generations
    batch = evaluate.edit_batch(targets)
    rows = [t for t in targets for _ in prompts]
    for primer in (None, evaluate.make_primer(model, primer_of(tokenizer, prompts), targets, batch, "generate")):
        assert evaluate.generate(model, tokenizer, prompts * 3, 8, rows, batch, primer, stop=False) == want


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-neox", "tiny-gemma3", "tiny-opt"])
def test_edit_batch_equals_one_edit_at_a_time_across_architectures(tiny, name, tmp_path):
    """Scores and generations of three edits (offset, rank-1, mean ablation) in one pass, each row tagged with its
    edit, equal the edits applied one at a time (float32, 1e-5)."""
    model, tokenizer, _ = tiny[name]
    geo = heads.geometry(model)
    g = torch.Generator().manual_seed(2)
    mask = heads.heads_to_mask([(0, 1), (2, 3)], geo)
    L, H, D = geo.n_layers, geo.n_heads, geo.head_dim
    edits = [heads.Edit(geo, mask, offset=2 * torch.randn(L, H, D, generator=g), meta={"apply": "iti"}),
             heads.Edit(geo, mask, a=torch.randn(L, H * D, generator=g), b=torch.randn(L, H * D, generator=g),
                        meta={"apply": "all"}),
             heads.Edit(geo, heads.heads_to_mask([(1, 0)], geo), ablate=torch.randn(L, H, D, generator=g))]
    targets = [target()] + [target(e) for e in edits]
    batch = evaluate.edit_batch(targets)
    q = tqa.load_truthfulqa(tqa.DEFAULT_DATA)[5]
    prompt_ids, answer_ids, _, _ = evaluate.encode_question(tokenizer, q, "none")
    together = evaluate.answer_logprobs(model, prompt_ids, answer_ids, targets, batch)
    prompts = [tqa.qa_prompt(q["question"], "none"), tqa.qa_prompt("Why?", "none")]
    rows = [t for t in targets for _ in prompts]
    texts = evaluate.generate(model, tokenizer, prompts * 4, 6, rows, batch, stop=False)
    for i, t in enumerate(targets):
        one = [evaluate.Target(edit=t.edit, apply=t.apply)]
        alone = evaluate.answer_logprobs(model, prompt_ids, answer_ids, one, evaluate.edit_batch(one))[0]
        assert together[i] == pytest.approx(alone, abs=1e-5)
        assert texts[2 * i:2 * i + 2] == evaluate.generate(model, tokenizer, prompts, 6, one * 2,
                                                           evaluate.edit_batch(one), stop=False)
    assert len({tuple(s) for s in together}) == 4  # every edit moves the scores


def test_ce_kl_of_several_edits_at_once_equal_a_plain_computation(llama, tmp_path):
    """CE and KL(original || edited) of three targets in shared forwards, against one document at a time, each edit
    alone at every token (heads.edit_start's 'text' stage), by the textbook formulas."""
    model, tokenizer, _ = llama
    docs = ["The cat sat on the mat and looked at the door.", "A quick brown fox jumps. Nothing happens.", "Yes. No."]
    edits = [save_test_edit(tmp_path / f"{k}.safetensors", model, k, scale=s) for k, s in (("iti", 2.0), ("ipo", 0.3))]
    targets = [target()] + [target(e) for e in edits]
    got = evaluate.ce_kl(model, tokenizer, docs, targets, evaluate.edit_batch(targets), 12, 2)
    for t, result in zip(targets, got):
        ce, kl, n = 0.0, 0.0, 0
        for doc in docs:
            ids = tokenizer(doc, return_tensors="pt", truncation=True, max_length=12)["input_ids"]
            with torch.no_grad():
                p0 = model(ids).logits[0, :-1].log_softmax(-1)  # [seq-1, vocab]
                with heads.edited(model, t.edit) if t.edit is not None else torch.no_grad():
                    p = model(ids).logits[0, :-1].log_softmax(-1)
            ce -= p.gather(1, ids[0, 1:, None]).sum().item()
            kl += (p0.exp() * (p0 - p)).sum().item()
            n += ids.shape[1] - 1
        assert result["ce"] == pytest.approx(ce / n, abs=1e-5) and result["kl"] == pytest.approx(kl / n, abs=1e-5)
    assert got[0]["kl"] == 0.0 and got[1]["kl"] > 1e-3 and got[2]["kl"] > 1e-3


def test_cut_answer():
    assert evaluate.cut_answer(" Paris is the capital.\nB: yes") == "Paris is the capital."
    assert evaluate.cut_answer(" Nothing happens. Q: What next?") == "Nothing happens."
    assert evaluate.cut_answer(" I have no comment.\n\nQ: x") == "I have no comment."
    assert evaluate.cut_answer("\nA") == ""


# ---- the whole run: zero edit, strong edit, results, judges, resume

def test_zero_edit_gives_kl_zero_and_baseline_mc_strong_edit_moves_kl(llama, tmp_path):
    model, _, _ = llama
    zero = save_test_edit(tmp_path / "zero.safetensors", model, "iti", scale=0.0)
    strong = save_test_edit(tmp_path / "strong.safetensors", model, "ipo", scale=1.0)
    assert not zero.offset.any()
    run(tmp_path, "--edit", "none", str(tmp_path / "zero.safetensors"), str(tmp_path / "strong.safetensors"),
        "--judges", "none", "--out", str(tmp_path / "results"))
    base, z, s = (load(tmp_path / "results" / f"{n}.json") for n in ("baseline", "zero", "strong"))
    assert base["metrics"]["kl"] == 0.0 and z["metrics"]["kl"] == 0.0 and s["metrics"]["kl"] > 0.01
    assert z["metrics"]["ce"] == base["metrics"]["ce"] and s["metrics"]["ce"] != base["metrics"]["ce"]
    for k in ("mc1", "mc2", "mc3"):
        assert z["metrics"][k] == base["metrics"][k]
    assert base["metrics"]["n_questions"] == 3 and base["metrics"]["truth"] is None  # 15 questions: test = 3
    assert z["apply"] == "iti" and s["apply"] == "all" and base["apply"] is None and base["edit"] is None
    assert s["edit"]["method"] == "ipo" and s["edit_file"].endswith("strong.safetensors")
    assert base["settings"]["generation"]["rule"] == evaluate.CUT_RULE and base["settings"]["text"]["n_documents"] == 3
    r = rows(tmp_path / "results" / "baseline.jsonl")
    assert [x["question"] for x in r] == [q["question"] for q in tqa.load_split(str(tmp_path / "tqa.csv"), 0, "test")]
    assert base["metrics"]["mc2"] == pytest.approx(sum(x["mc2"] for x in r) / 3)
    run(tmp_path, "--edit", str(tmp_path / "strong.safetensors"), "--apply", "iti", "--judges", "none",
        "--out", str(tmp_path / "override.json"))
    assert load(tmp_path / "override.json")["apply"] == "iti"


def test_judge_path_with_a_tiny_stand_in_judge(tmp_path, monkeypatch):
    run(tmp_path, "--judges", "none", "--out", str(tmp_path / "r.json"), "--skip", "text")
    assert load(tmp_path / "r.json")["metrics"]["truth"] is None
    stand_in = judge.load_judge("tiny-llama", "truth")
    r = rows(tmp_path / "r.jsonl")
    probs = stand_in.score([x["question"] for x in r], [x["answer"] for x in r])
    threshold = sorted(probs)[1]  # the random judge's probabilities are tiny: put the threshold among them
    monkeypatch.setattr(judge, "THRESHOLD", threshold)
    run(tmp_path, "--judge-only", "--truth-judge", "tiny-llama", "--info-judge", "tiny-gpt2",
        "--out", str(tmp_path / "r.json"), "--skip", "text")
    result, r = load(tmp_path / "r.json"), rows(tmp_path / "r.jsonl")
    for x, p in zip(r, probs):
        assert 0 <= x["truth_p"] <= 1 and 0 <= x["info_p"] <= 1
        assert x["truth_p"] == pytest.approx(p, abs=1e-6) and x["truth"] == float(x["truth_p"] >= threshold)
    m = result["metrics"]
    assert m["truth"] == pytest.approx(2 / 3) and m["info"] == sum(x["info"] for x in r) / 3
    assert m["info_truth"] == pytest.approx(m["truth"] * m["info"])
    assert result["judges"]["truth"]["judge"] == "tiny-llama" and result["judges"]["info"]["judge"] == "tiny-gpt2"


def test_each_distinct_answer_is_judged_once_and_every_row_gets_its_score():
    """judge_rows: rows of several edits sharing a (question, answer) are judged once, with the same score."""
    class Counting:
        about = {"judge": "stand-in"}
        calls = []

        def score(self, questions, answers):
            self.calls.append(list(zip(questions, answers)))
            return [len(q + a) / 100 for q, a in zip(questions, answers)]  # a score computed from the pair alone

    def target(name, answers):
        rows = {q: {"question": q, "answer": a} for q, a in answers.items()}
        return type("T", (), {"rows": rows, "jsonl": os.devnull})()
    a = target("a", {"Q1?": "Yes.", "Q2?": "No."})
    b = target("b", {"Q1?": "Yes.", "Q2?": "Maybe so."})
    scorer = Counting()
    evaluate.judge_rows([a, b], {"truth": scorer}, chunk=2)
    judged = [pair for call in scorer.calls for pair in call]
    assert sorted(judged) == [("Q1?", "Yes."), ("Q2?", "Maybe so."), ("Q2?", "No.")]  # the shared answer once
    for t in (a, b):
        for r in t.rows.values():
            assert r["truth_p"] == len(r["question"] + r["answer"]) / 100
            assert r["truth"] == float(r["truth_p"] >= judge.THRESHOLD) and r["truth_spec"] == "stand-in"
    evaluate.judge_rows([a, b], {"truth": scorer})  # judged already by this judge: nothing to do
    assert len(judged) == sum(map(len, scorer.calls))


def test_killed_run_resumes_to_the_same_results(tmp_path, capsys, fixture_csv):
    data = fixture_csv(tmp_path / "tqa.csv", n=25)  # test split: 5 questions, 3 chunks of 2
    args = ["--judges", "default", "--truth-judge", "tiny-llama", "--info-judge", "tiny-llama", "--skip", "text"]
    run(tmp_path, *args, "--out", str(tmp_path / "whole.json"), data=data)
    whole = rows(tmp_path / "whole.jsonl")
    # a kill after the first chunk, in the middle of writing the second
    with open(tmp_path / "cut.jsonl", "w") as f:
        f.write("".join(json.dumps({k: v for k, v in x.items() if not k.startswith(("truth", "info"))}) + "\n"
                        for x in whole[:2]) + json.dumps(whole[2])[:40])
    run(tmp_path, *args, "--out", str(tmp_path / "cut.json"), data=data)
    assert rows(tmp_path / "cut.jsonl") == whole
    assert load(tmp_path / "cut.json")["metrics"] == load(tmp_path / "whole.json")["metrics"]
    capsys.readouterr()
    run(tmp_path, *args, "--out", str(tmp_path / "cut.json"), data=data)  # all done: nothing is recomputed
    assert "already done, skipped" in capsys.readouterr().out



def test_a_retrained_judge_file_judges_again(tmp_path):
    """Rows remember which judge scored them: a judge file retrained at the same path is a different judge."""
    path = tmp_path / "truth.safetensors"
    path.write_bytes(b"one judge")
    first = evaluate.judge_id(str(path))
    assert first.startswith(str(path)) and evaluate.judge_id(str(path)) == first
    path.write_bytes(b"another judge")
    assert evaluate.judge_id(str(path)) != first
    assert evaluate.judge_id("allenai/truthfulqa-truth-judge-llama2-7B") == "allenai/truthfulqa-truth-judge-llama2-7B"


# ---- offline text, bad input

def test_offline_self_text_is_recorded_and_cached(tmp_path):
    argv = ["--text", "self", "--n-texts", "3", "--text-tokens", "12", "--judges", "none", "--skip", "mc,generation"]
    run(tmp_path, *argv, "--out", str(tmp_path / "a.json"), text=False)
    about = load(tmp_path / "a.json")["settings"]["text"]
    assert about["source"] == "self" and os.path.isfile(about["cache"]) and len(load(about["cache"])) == 3
    run(tmp_path, *argv, "--out", str(tmp_path / "b.json"), text=False)
    assert load(tmp_path / "b.json")["metrics"]["ce"] == load(tmp_path / "a.json")["metrics"]["ce"] > 0


def test_bad_input_stops_with_a_sentence_and_no_json(tmp_path, fixture_csv):
    other, _, _ = models.load_model("tiny-qwen3")
    geo = heads.geometry(other)
    edit = heads.Edit(geo, heads.heads_to_mask([(0, 0)], geo), offset=torch.zeros(3, 4, 24), meta={"apply": "iti"})
    heads.save_edit(str(tmp_path / "qwen.safetensors"), edit)
    llama, _, _ = models.load_model("tiny-llama")
    save_test_edit(tmp_path / "seed1.safetensors", llama, "iti")
    seed1 = heads.load_edit(str(tmp_path / "seed1.safetensors"), llama)
    seed1.meta.update(seed=1)
    heads.save_edit(str(tmp_path / "seed1.safetensors"), seed1)
    seed1.meta.update(seed=0, run={"data": {"data": "other.csv", "version": "other", "sha256": "0" * 64}})
    heads.save_edit(str(tmp_path / "otherdata.safetensors"), seed1)
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "a-file").write_text("not a folder")
    cases = [(["--edit", str(tmp_path / "qwen.safetensors")], "fitted on", None),
             (["--split", "val"], "is empty", fixture_csv(tmp_path / "two.csv", n=2)),
             (["--truth-judge", str(tmp_path / "no-such-judge")], "cannot load the truth judge.*--judges none", None),
             (["--text", str(tmp_path / "empty.txt")], "holds no text", None),
             (["--text", str(tmp_path / "notext.jsonl")], "line 2 .*has no \"text\" string", None),
             (["--edit", "none", str(tmp_path / "qwen.safetensors")], "must be a folder", None),
             (["--judge-only"], "first run without --judge-only", None),
             # an edit fitted on other questions than the split assumes: train/test leakage
             (["--edit", str(tmp_path / "seed1.safetensors")], "fitted with --seed 1, this run scores --seed 0", None),
             (["--edit", str(tmp_path / "otherdata.safetensors")], "fitted on --data other.csv", None),
             (["--edit", str(tmp_path / "qwen.safetensors").replace("qwen", "seed1"), "--seed", "1", "--split",
               "train"], "holds the train questions", None),
             (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "gpu0"], "--device", None),
             ([], "not a UTF-8 CSV", str(tmp_path / "binary.csv"))]
    for i, (extra, message, data) in enumerate(cases):
        skip = [] if "--text" in extra else ["--skip", "text"]
        with pytest.raises(SystemExit, match=message):
            run(tmp_path, *extra, *skip, "--out", str(tmp_path / f"out{i}.json"), data=data)
        assert not (tmp_path / f"out{i}.json").exists() and not (tmp_path / f"out{i}.jsonl").exists()
    with pytest.raises(SystemExit, match="a-file is a file, not a folder"):  # before the model loads
        evaluate.main(["--model", "no-such-model-is-loaded", "--out", str(tmp_path / "a-file" / "r.json")])


def test_non_finite_metrics_are_null_with_a_reason(tmp_path, monkeypatch):
    """A NaN score (an edit that overflows the model) is never written as a number: null, and the reason."""
    fast = evaluate.answer_logprobs

    def nan_for_one(model, prompt_ids, answer_ids, targets, *args):
        scores = fast(model, prompt_ids, answer_ids, targets, *args)
        return [[float("nan")] + s[1:] for s in scores] if "fact 1?" in tokenizer.decode(prompt_ids) else scores
    tokenizer = models.load_model("tiny-llama")[1]
    monkeypatch.setattr(evaluate, "answer_logprobs", nan_for_one)
    monkeypatch.setattr(evaluate, "ce_kl", lambda *a: [{"ce": float("inf"), "kl": float("nan")}])
    run(tmp_path, "--judges", "none", "--out", str(tmp_path / "r.json"), "--skip", "generation",
        data=write_fixture_csv(tmp_path / "t.csv", n=10))  # test split: questions 1 and 6
    def strict(constant):
        raise AssertionError(f"{constant} written as a number")
    for line in [(tmp_path / "r.json").read_text()] + (tmp_path / "r.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=strict)
    m, r = json.loads((tmp_path / "r.json").read_text())["metrics"], rows(tmp_path / "r.jsonl")
    assert [x["mc2"] is None for x in r] == [True, False] and r[0]["scores_true"][0] is None
    assert m["mc2"] is None and m["null_reasons"]["mc2"] == "1 of 2 questions have no finite value (NaN/inf scores)"
    assert m["ce"] is None and m["kl"] is None and "NaN or inf" in m["null_reasons"]["kl"]


def test_two_runs_on_one_out_are_refused(tmp_path):
    """A second evaluate.py on the same --out while the first runs (its lock names a live process) is refused; a
    stale lock of a dead process is taken over."""
    (tmp_path / "r.json.lock").write_text(str(os.getppid()))  # a live process that is not this one
    with pytest.raises(SystemExit, match="being written by another evaluate.py run"):
        run(tmp_path, "--judges", "none", "--skip", "text,generation", "--out", str(tmp_path / "r.json"))
    assert not (tmp_path / "r.jsonl").exists()
    (tmp_path / "r.json.lock").write_text("999999999")  # no such process
    run(tmp_path, "--judges", "none", "--skip", "text,generation", "--out", str(tmp_path / "r.json"))
    assert (tmp_path / "r.json").exists() and not (tmp_path / "r.json.lock").exists()


def test_generation_that_stops_early_keeps_what_cut_answer_keeps():
    """With stop, finished rows leave the batch; the answers cut_answer keeps equal those of a full-length run.
    On SmolLM2, whose answers end in a newline at different lengths (a random tiny model rarely writes one)."""
    model, tokenizer, _ = models.load_model("smollm2-135m")
    prompts = [tqa.qa_prompt(q, "none") for q in ("What is the capital of France?", "Why is the sky blue?",
                                                  "Who wrote Hamlet?", "What happens if you eat watermelon seeds?")]
    full = evaluate.generate(model, tokenizer, prompts, 30, stop=False)
    short = evaluate.generate(model, tokenizer, prompts, 30, stop=True)
    assert [evaluate.cut_answer(t) for t in short] == [evaluate.cut_answer(t) for t in full]
    assert all(f.startswith(s) for s, f in zip(short, full))
    assert len({len(s) for s in short}) > 1 and any(len(s) < len(f) for s, f in zip(short, full)), short
