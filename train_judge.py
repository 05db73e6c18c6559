"""train_judge.py - train the offline Truth and Info judges that judge.py loads, and measure them honestly.

Reads TruthfulQA's official judge-training sets (finetune_truth.jsonl, finetune_info.jsonl from the TruthfulQA
repository: `Q: ...\\nA: ...\\nTrue:` -> " yes"/" no", ~22,400 rows each over the 817 questions), caches the feature
model's hidden states under --cache (judge.hidden_features; resumed if interrupted), and measures each judge by
cross-validation on two honest splits:
  (A) new answers to known questions: folds of (question, normalised answer text), so no held-out answer's text is
      in training for its question; the known-question judge with the training folds as its bank;
  (B) held-out questions: folds of questions; the unknown-question judge.
Then fits on everything and writes OUT/truth.safetensors and OUT/info.safetensors (each <= 5 MB, with the training
data's checksum, the accuracies and the command). About 30 minutes on 2 CPU cores with an empty cache (most of it
the feature pass), about 6 with a full one.

    python train_judge.py --truth-data ../shared/data/finetune_truth.jsonl \\
        --info-data ../shared/data/finetune_info.jsonl --out judges/ --threads 1
"""
import argparse
import hashlib
import json
import os
import shlex

import numpy as np
import torch
from tqdm import tqdm

from judge import (FEATURE_LAYERS, FEATURE_MODEL, FEATURE_TEXT, SIMILARITY_LAYER, TEMPLATES, THRESHOLD, checksum,
                   feature_model, flat, hidden_features, known_features, make_bank, normalise, predict_logistic,
                   predict_logit, project)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth-data", required=True, help="the official truth judge set, finetune_truth.jsonl")
    p.add_argument("--info-data", required=True, help="the official info judge set, finetune_info.jsonl")
    p.add_argument("--out", default="judges", help="folder for truth.safetensors and info.safetensors")
    p.add_argument("--cache", default="runs/judge_cache", help="folder for the cached hidden states (resumable)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds for the (A) and (B) accuracies")
    p.add_argument("--folds-run", type=int, default=0, help="measure on only this many of the folds (0 = all)")
    p.add_argument("--bank-dims", type=int, default=48, help="PCA dimensions of the similarity embeddings in the bank")
    p.add_argument("--l2", type=float, default=0.03, help="L2 penalty of the logistic regressions")
    p.add_argument("--batch-size", type=int, default=32, help="feature-pass batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return p.parse_args(argv)


METHOD = (f"{FEATURE_MODEL} hidden states (layers {FEATURE_LAYERS}: last token, answer mean) -> logistic regression; "
          "for a known question, stacked with similarity to its labelled answers (tf-idf and hidden-state cosine) "
          "and the rank of the answer's logit among theirs -> logistic regression")


# ---- Judge-training sets

def read_judge_set(path, kind):
    """Unique (question, answer) pairs of an official judge set with their share of ' yes' labels:
    lists questions, answers, p_yes (duplicated prompts are merged: 22,434 rows -> 18,311 pairs)."""
    suffix = TEMPLATES[kind].rsplit("\n", 1)[1]
    votes = {}
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                row = json.loads(line)
                text = row["prompt"]
                if not (text.startswith("Q: ") and text.endswith("\n" + suffix) and "\nA: " in text):
                    raise ValueError(f"line {n} is not a `Q: ...\\nA: ...\\n{suffix}` prompt")
                question, answer = text[3:-len(suffix) - 1].split("\nA: ", 1)
                votes.setdefault((question, answer), []).append(row["completion"].strip() == "yes")
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--{kind}-data {path}: not an official judge set ({e}); pass finetune_{kind}.jsonl from "
                         "the TruthfulQA repository (data/finetune_{kind}.jsonl)") from None
    keys = sorted(votes)
    return [k[0] for k in keys], [k[1] for k in keys], np.array([np.mean(votes[k]) for k in keys], np.float32)


# ---- The classifier: L2-regularised logistic regression on standardised features (soft targets = share of yes)

def fit_logistic(features, p_yes, l2=1e-3, steps=200):
    """-> dict of tensors mean, std [F], weight [F], bias []: P(yes) = sigmoid(((x - mean) / std) @ weight + bias)."""
    x = torch.as_tensor(features, dtype=torch.float32)  # [n, F]
    y = torch.as_tensor(p_yes, dtype=torch.float32)  # [n]
    mean, std = x.mean(0), x.std(0).clamp(min=1e-4)
    x = (x - mean) / std
    weight, bias = torch.zeros(x.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return {"mean": mean, "std": std, "weight": weight.detach(), "bias": bias.detach()}


def accuracies(p_yes_true, p_yes_judged):
    """accuracy and balanced accuracy of the judge's decisions (>= THRESHOLD) on pairs with a majority label."""
    keep = p_yes_true != 0.5  # the few pairs labelled both ways
    truth, judged = p_yes_true[keep] > 0.5, p_yes_judged[keep] >= THRESHOLD
    recall = [float((judged[truth == c] == c).mean()) for c in (True, False)]
    return {"accuracy": float((judged == truth).mean()), "balanced_accuracy": float(np.mean(recall)),
            "n": int(keep.sum())}


# ---- Similarity embeddings: the PCA the judge file ships (judge.project applies it)

def fit_projection(hidden, dims):
    """PCA of the answer-mean hidden states: mean [hidden], components [hidden, dims]."""
    x = torch.as_tensor(hidden[:, SIMILARITY_LAYER, 1], dtype=torch.float32)  # [n, hidden]
    mean = x.mean(0)
    dims = min(dims, *x.shape)
    _, _, v = torch.pca_lowrank(x - mean, q=dims, center=False, niter=4)
    return mean, v[:, :dims]


# ---- Measuring a judge on the two honest splits

def fold_of(groups, n_folds, seed):
    """Each group (a question, or a question's answer text) to one of n_folds folds, at random."""
    ids = {}
    index = np.array([ids.setdefault(g, len(ids)) for g in groups])
    return np.random.default_rng(seed).permutation(len(ids))[index] % n_folds


def answer_folds(questions, answers, n_folds, seed):
    """Folds of (question, normalised answer): no answer's text is on both sides for the same question."""
    return fold_of(zip(questions, map(normalise, answers)), n_folds, seed)


def fit_known(questions, answers, p_yes, hidden, args):
    """The known-question judge: stage 1, a logistic regression on the hidden states; stage 2, a logistic regression
    on the neighbour features. The bank's stage-1 logits are cross-fitted over answer folds, so that each is what
    stage 1 says of an answer it never saw, as it will be for a new answer."""
    x, fold = flat(hidden), answer_folds(questions, answers, args.folds, args.seed)
    logits = np.zeros(len(p_yes), np.float32)
    for f in range(args.folds):
        logits[fold == f] = predict_logit(fit_logistic(x[fold != f], p_yes[fold != f], args.l2), x[fold == f])
    projection = fit_projection(hidden, args.bank_dims)
    bank = dict(make_bank(questions, answers, p_yes, project(hidden, *projection)), logit=logits)
    known = {"projection": projection, "bank": bank, "stage1": fit_logistic(x, p_yes, args.l2)}
    features = known_features(known, hidden, questions, answers, logits, leave_out_same_text=True)
    return dict(known, classifier=fit_logistic(features, p_yes, args.l2))


def cross_validate(kind, questions, answers, p_yes, hidden, args):
    """(A) new answers to known questions: folds of (question, normalised answer text), the known-question judge with
    the training folds as its bank. (B) held-out questions: folds of questions, the unknown-question judge."""
    questions, answers = np.array(questions, object), np.array(answers, object)
    x = flat(hidden)
    splits = {"A": answer_folds(questions, answers, args.folds, args.seed),
              "B": fold_of(questions, args.folds, args.seed)}
    result = {}
    for split, fold in splits.items():
        judged = np.full(len(p_yes), np.nan, np.float32)
        for f in tqdm(range(args.folds_run or args.folds), desc=f"{kind} split {split}"):
            train, test = fold != f, fold == f
            if split == "A":
                known = fit_known(questions[train], answers[train], p_yes[train], hidden[train], args)
                classifier = known["classifier"]
                features = known_features(known, hidden[test], questions[test], answers[test])
            else:
                classifier, features = fit_logistic(x[train], p_yes[train], args.l2), x[test]
            judged[test] = predict_logistic(classifier, features)
        done = ~np.isnan(judged)
        result[split] = accuracies(p_yes[done], judged[done])
    return result


# ---- The offline judge file: classifiers, PCA, and the bank of labelled answers, with provenance

def save_judge(path, kind, known, unknown, about):
    from safetensors.torch import save_file
    from runfiles import write_atomic
    bank = known["bank"]
    questions = sorted(set(bank["questions"]))
    index = {q: i for i, q in enumerate(questions)}
    tensors = {**{f"{name}.{k}": v for name in ("stage1", "classifier") for k, v in known[name].items()},
               **{f"unknown.{k}": v for k, v in unknown.items()},
               "projection.mean": known["projection"][0], "projection.components": known["projection"][1],
               "bank.projected": torch.as_tensor(bank["projected"]).half(),
               "bank.p_yes": torch.as_tensor(bank["p_yes"]), "bank.logit": torch.as_tensor(bank["logit"]),
               "bank.question": torch.tensor([index[q] for q in bank["questions"]], dtype=torch.int32)}
    header = {"judge": json.dumps(dict(about, kind=kind, feature_model=FEATURE_MODEL, feature_layers=FEATURE_LAYERS,
                                       feature_text=FEATURE_TEXT, similarity_layer=SIMILARITY_LAYER)),
              "bank": json.dumps({"questions": questions, "answers": bank["answers"], "idf": bank["idf"]})}
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))


# ---- Training

def cached_hidden_features(questions, answers, cache, batch_size):
    """hidden_features of every pair, computed in chunks of 512 (in a seeded random order, so any finished prefix is
    a random sample) and cached under `cache`: an interrupted run resumes. -> [n, layers, 2, hidden]"""
    from runfiles import write_atomic
    pairs = [[q, a] for q, a in zip(questions, answers)]
    key = hashlib.sha256(json.dumps([FEATURE_MODEL, FEATURE_LAYERS, FEATURE_TEXT, pairs]).encode()).hexdigest()[:12]
    folder = os.path.join(cache, key)
    order = np.random.default_rng(0).permutation(len(pairs))
    chunks = [order[i:i + 512] for i in range(0, len(order), 512)]
    model = tokenizer = None
    hidden = None
    for c, rows in enumerate(tqdm(chunks, desc="feature pass (chunks of 512)")):
        path = os.path.join(folder, f"feat_{c:03d}.npy")
        if not os.path.exists(path):
            if model is None:
                model, tokenizer = feature_model(FEATURE_MODEL, "cpu")
            features = hidden_features(model, tokenizer, [questions[i] for i in rows], [answers[i] for i in rows],
                                       batch_size)
            write_atomic(path, lambda tmp: np.save(open(tmp, "wb"), features))
        features = np.load(path)
        if hidden is None:
            hidden = np.zeros((len(pairs),) + features.shape[1:], np.float16)
        hidden[rows] = features
    return hidden


def kept_out_of_unknown(question):
    """A fixed fifth of the questions, never seen by the unknown-question classifier: tests check on them that it
    generalises to new questions."""
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 5 == 0


def main(argv=None):
    from runfiles import run_info
    args = parse_args(argv)
    run = run_info(args)
    if argv is not None:  # called from Python (a test): record the command a user would type
        run["command"] = "python train_judge.py " + shlex.join(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = {kind: read_judge_set(path, kind) for kind, path in (("truth", args.truth_data), ("info", args.info_data))}
    pairs = sorted({(q, a) for questions, answers, _ in sets.values() for q, a in zip(questions, answers)})
    hidden_all = cached_hidden_features([q for q, _ in pairs], [a for _, a in pairs], args.cache, args.batch_size)
    row = {pair: i for i, pair in enumerate(pairs)}
    for kind, (questions, answers, p_yes) in sets.items():
        hidden = hidden_all[[row[pair] for pair in zip(questions, answers)]]
        measured = cross_validate(kind, questions, answers, p_yes, hidden, args)
        print(kind, json.dumps(measured))
        known = fit_known(questions, answers, p_yes, hidden, args)
        fit_on = np.array([not kept_out_of_unknown(q) for q in questions])
        unknown = fit_logistic(flat(hidden[fit_on]), p_yes[fit_on], args.l2)
        path = getattr(args, f"{kind}_data")
        about = {"accuracy_A": measured["A"], "accuracy_B": measured["B"], "method": METHOD,
                 "training_data": {"file": os.path.basename(path), "sha256": checksum(path), "pairs": len(p_yes)},
                 "command": run["command"], "run": run}
        out = os.path.join(args.out, f"{kind}.safetensors")
        save_judge(out, kind, known, unknown, about)
        print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
