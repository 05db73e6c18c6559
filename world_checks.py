"""world_checks.py - the planting checks of world.py: does the truth of the world model pass through its planted
heads H*? MC1/MC2 on the world's questions (scored as evaluate.py scores them, many questions per batch) under the
toolkit's prompt without and with a tag, the same with H* or random head sets mean-ablated (heads.py's edit), and
the toolkit's probe on every head. world.py runs them after training (and on --recheck) and stores their numbers in
world.json; world.py re-exports every name here.

Reads:  the world's CSV (world.csv), a planted model (world.load).
Writes: nothing (run_checks returns the numbers).

    python world.py --recheck      # the checks again on the saved model, into world.json
"""
import contextlib
import csv
import json
import time

import numpy as np
import torch

import tqa
from world_data import ENCYCLOPEDIA_TAG, SEED, batch_tensors_raw


# ---- Checks: MC on the world's questions, mean-ablation, probes

def mc_scores(model, tokenizer, questions, prompt, rows_per_batch=384):
    """Per question (MC1, MC2) as evaluate.py scores them (summed log-probs of ' ' + closed answer after the prompt);
    prompt: a function question text -> prompt text. The answers of many questions run as one right-padded batch."""
    import evaluate
    items = []  # (prompt ids, answer ids), the answers of each question in turn
    meta = []  # (n_correct, i_best) per question
    for q in questions:
        correct = q["correct"] + ([q["best"]] if q["best"] not in q["correct"] else [])
        p = tokenizer(prompt(q["question"]))["input_ids"]
        items += [(p, tokenizer(tqa.ANSWER_TEMPLATE.format(answer=a), add_special_tokens=False)["input_ids"])
                  for a in correct + q["incorrect"]]
        meta.append((len(correct), correct.index(q["best"])))
    scores = []
    with torch.no_grad():
        for i in range(0, len(items), rows_per_batch):
            chunk = items[i:i + rows_per_batch]
            x, mask = batch_tensors_raw([p + a for p, a in chunk], tokenizer.pad_token_id)
            logp = model(input_ids=x, attention_mask=mask).logits.float().log_softmax(-1)  # [rows, T, vocab]
            for r, (p, a) in enumerate(chunk):
                scores.append(float(logp[r, len(p) - 1 + torch.arange(len(a)), torch.tensor(a)].sum()))
    out, k = [], 0
    for qi, (n_correct, i_best) in enumerate(meta):
        n = n_correct + len(questions[qi]["incorrect"])
        m = evaluate.mc_metrics(scores[k:k + n_correct], scores[k + n_correct:k + n], i_best)
        out.append((m["mc1"], m["mc2"]))
        k += n
    return np.array(out)  # [n_questions, 2]


@contextlib.contextmanager
def mean_ablated(model, head_set, means):
    """Inside the block, the heads in `head_set` output their mean `means` [L, H, D] at every token: heads.py's
    mean-ablation edit (heads.Edit(..., ablate=means), as iti.py --ablate makes it). An empty set: the model as is."""
    import heads
    if not head_set:
        yield
        return
    geo = heads.geometry(model)
    edit = heads.Edit(geo, heads.heads_to_mask(head_set, geo), ablate=means)
    with heads.edited(model, edit):
        yield


def head_means(model, tokenizer, texts, batch=64):
    """Mean of every head's output at the last token of `texts` (the probe's inputs): [L, H, D]."""
    import heads
    total = None
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True)
        o = heads.record_heads(model, heads.last_positions(enc["attention_mask"]), **enc)  # [b, L, H, D]
        total = o.sum(0) if total is None else total + o.sum(0)
    return total / len(texts)


def prompts():
    """The prompts of the checks: the toolkit's qa_prompt without and with a tag."""
    return {"neutral": lambda q: tqa.qa_prompt(q, "none"),
            "instruction": lambda q: tqa.qa_prompt(q, "default"),
            "encyclopedia": lambda q: ENCYCLOPEDIA_TAG + "\n\n" + tqa.qa_prompt(q, "none")}


def tag_effect(model, tokenizer, questions, head_set=None, means=None):
    """{prompt: {mc1, mc2}} on `questions`, optionally with `head_set` mean-ablated, and 'effect': per tag prompt the
    MC1 gain over the neutral prompt [mean, 95% interval] (paired bootstrap over questions, 2000 draws)."""
    out, mc1 = {}, {}
    with mean_ablated(model, head_set, means):
        for name, prompt in prompts().items():
            s = mc_scores(model, tokenizer, questions, prompt)
            out[name] = {"mc1": round(float(s[:, 0].mean()), 4), "mc2": round(float(s[:, 1].mean()), 4)}
            mc1[name] = s[:, 0]
    draws = np.random.default_rng(0).integers(len(questions), size=(2000, len(questions)))
    out["effect"] = {}
    for name in ("instruction", "encyclopedia"):
        diff = mc1[name] - mc1["neutral"]
        lo, hi = np.quantile(diff[draws].mean(1), [0.025, 0.975])
        out["effect"][name] = [round(float(diff.mean()), 4), round(float(lo), 4), round(float(hi), 4)]
    return out


def random_head_sets(model, n_sets, size):
    """The sweep's random sets: heads.parse_heads('random:SIZE:SEED') for SEED = 0..n_sets-1."""
    import heads
    geo = heads.geometry(model)
    return [heads.parse_heads(f"random:{size}:{seed}", geo) for seed in range(n_sets)]


def probe_check(model, tokenizer, questions, prompt_format, seed=SEED, prefix=""):
    """The toolkit's probe (probe.probe_examples' inputs and labels, probe.fit_probes) on every head, each input after
    `prefix`: validation accuracy [L, H], and the majority-class rate. (A probe of "tag present" is no test of H*:
    the tokens after a tag are seen by every head, so every head tells the two inputs apart.)"""
    import heads
    import probe
    examples, _ = probe.probe_examples(questions, seed, prompt_format)
    texts = [prefix + e["text"] for e in examples]
    acts = []
    for i in range(0, len(texts), 128):
        enc = tokenizer(texts[i:i + 128], return_tensors="pt", padding=True)
        acts.append(heads.record_heads(model, heads.last_positions(enc["attention_mask"]), **enc))
    acts = torch.cat(acts)  # [N, L, H, D]
    N, L, H, D = acts.shape
    labels = torch.tensor([e["label"] for e in examples])
    train = torch.tensor([e["split"] == "train" for e in examples])
    acc, _ = probe.fit_probes(acts[train].view(-1, L * H, D), labels[train], acts[~train].view(-1, L * H, D),
                              labels[~train])
    p = labels[~train].float().mean().item()
    return acc.view(L, H), max(p, 1 - p)


def run_checks(model, tokenizer, csv_path, n_random=8, log=print):
    """The planting checks: the tag effect with nothing, H*, and n_random random sets mean-ablated; probes at H*.
    H* is the model's own: model.config.planted_heads, which world.plant sets."""
    import probe
    planted_heads = [tuple(x) for x in model.config.planted_heads]  # [(layer, head)]
    questions = tqa.load_truthfulqa(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        types = {r["Question"]: r["Type"] for r in csv.DictReader(f)}
    myth = [q for q in questions if types[q["question"]] == "Myth"]
    plain = [q for q in questions if types[q["question"]] == "Plain"]
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    examples, _ = probe.probe_examples(questions, SEED, "random_question")
    means = head_means(model, tokenizer, [e["text"] for e in examples])
    checks = {"questions": {"myth": len(myth), "plain": len(plain)}}
    t0 = time.time()
    checks["unablated"] = {"myth": tag_effect(model, tokenizer, myth), "plain": tag_effect(model, tokenizer, plain)}
    log(f"unablated: {json.dumps(checks['unablated'])}")
    checks["ablate_planted"] = {"heads": [f"{l}.{h}" for l, h in planted_heads],
                                "myth": tag_effect(model, tokenizer, myth, planted_heads, means),
                                "plain": tag_effect(model, tokenizer, plain, planted_heads, means)}
    log(f"H* ablated: {json.dumps(checks['ablate_planted'])}")
    checks["ablate_random"] = []
    for hs in random_head_sets(model, n_random, len(planted_heads)):
        r = {"heads": [f"{l}.{h}" for l, h in hs], "myth": tag_effect(model, tokenizer, myth, hs, means)}
        checks["ablate_random"].append(r)
        log(f"random {r['heads']} ablated: {json.dumps(r['myth'])}")
    checks["mean_ablation"] = ("heads.Edit(ablate=mean): o_h <- its mean at the last token of probe.py's "
                               "random_question inputs (train+val), at every token")
    checks["tag_effect_mc1"] = summarise(checks)
    log(f"tag effect (MC1 gain over the neutral prompt, myth questions): {json.dumps(checks['tag_effect_mc1'])}")
    checks["probe"] = {}
    probes = {"random_question": ("random_question", ""), "plain": ("plain", ""),
              "random_question+instruction": ("random_question", tqa.INSTRUCTIONS["default"] + "\n\n")}
    for name, (fmt, prefix) in probes.items():
        acc, majority = probe_check(model, tokenizer, questions, fmt, prefix=prefix)
        order = sorted(range(L * H), key=lambda i: (-float(acc.flatten()[i]), i))  # probe.py's ranking
        checks["probe"][name] = {
            "planted_accuracy": [round(float(acc[l, h]), 4) for l, h in planted_heads],
            "planted_rank": [order.index(l * H + h) + 1 for l, h in planted_heads],
            "best": [f"{i // H}.{i % H}" for i in order[:6]], "best_accuracy": round(float(acc.max()), 4),
            "median_accuracy": round(float(acc.median()), 4), "majority_rate": round(majority, 4),
            "accuracy_by_layer": [[round(float(x), 3) for x in row] for row in acc]}
        log(f"probe {name}: {json.dumps({k: v for k, v in checks['probe'][name].items() if k != 'accuracy_by_layer'})}")
    checks["seconds"] = round(time.time() - t0, 1)
    return checks


def summarise(checks):
    """MC1 gain from the tag on myth questions, [mean, 95% interval]: unablated, H* ablated, each random set ablated."""
    def effect(r, tag):
        return r["myth"]["effect"][tag]
    return {tag: {"unablated": effect(checks["unablated"], tag),
                  "planted_ablated": effect(checks["ablate_planted"], tag),
                  "random_ablated": [effect(r, tag) for r in checks["ablate_random"]]}
            for tag in ("instruction", "encyclopedia")}

