"""Tests of probe.py: the batched probe fit against scikit-learn and the optimality condition, a planted signal,
the mass-mean direction and sigma by hand, probe inputs, the activation cache (probe_cache.py: reuse, refusal, resume),
end to end.

Run: python -m pytest -q test_probe.py
"""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import heads
import models
import probe
import probe_cache
import tqa

torch.set_num_threads(1)


def synthetic_heads(n, G, D, signal, seed=0):
    """head outputs [n, G, D] with labels [n]: head g carries a label-dependent shift of size signal[g]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    shift = torch.randn(G, D, generator=g)
    shift = shift / shift.norm(dim=-1, keepdim=True) * torch.as_tensor(signal, dtype=torch.float)[:, None]
    x = 2 * torch.randn(n, G, D, generator=g) + 0.5 + (2 * y - 1)[:, None, None] * shift
    return x, y


def test_fit_probes_agrees_with_sklearn_and_the_plain_fit_at_every_head():
    """The batched fit, the plain per-head fit (probe.fit_probe_plain) and scikit-learn (run to a tight tolerance,
    the independent check) find the same probe at every head: the same validation accuracy, to the last example."""
    from sklearn.linear_model import LogisticRegression
    G, D, n_train = 12, 8, 300
    x, y = synthetic_heads(400, G, D, torch.linspace(0, 2, G))
    accuracy, weights = probe.fit_probes(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    for h in range(G):
        clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x[:n_train, h].double().numpy(),
                                                                        y[:n_train].numpy())
        sk_weights = torch.tensor(np.concatenate([clf.coef_[0], clf.intercept_])).float()
        plain_accuracy, plain_weights = probe.fit_probe_plain(x[:n_train, h], y[:n_train], x[n_train:, h], y[n_train:])
        val_logits = x[n_train:, h] @ plain_weights[:D] + plain_weights[D]
        assert val_logits.abs().min() > 1e-4  # no validation example on the boundary: equal accuracies mean something
        n_right = [round(100 * a) for a in (accuracy[h].item(), plain_accuracy,
                                            clf.score(x[n_train:, h].numpy(), y[n_train:].numpy()))]
        assert n_right[0] == n_right[1] == n_right[2], (h, n_right)  # of the 100 validation examples
        torch.testing.assert_close(weights[h], plain_weights, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(plain_weights, sk_weights, atol=1e-4, rtol=1e-4)


def test_a_probe_off_by_one_example_is_told_apart():
    """The check above is exact: moving one validation example across the boundary changes the accuracy."""
    x, y = synthetic_heads(400, 1, 8, [1.0])
    accuracy, weights = probe.fit_probes(x[:300], y[:300], x[300:], y[300:])
    val_x = x[300:].clone()
    w = weights[0]
    i = int((val_x[:, 0] @ w[:8] + w[8]).abs().argmin())  # the validation example nearest the boundary
    val_x[i, 0] -= 2 * (val_x[i, 0] @ w[:8] + w[8]) * w[:8] / (w[:8] @ w[:8])  # mirrored across it
    moved, _ = probe.fit_probes(x[:300], y[:300], val_x, y[300:])
    assert abs(moved.item() - accuracy.item()) == pytest.approx(1 / 100)


def test_fit_reaches_the_penalised_optimum():
    """Independent check of the objective: at the optimum C X^T (p - y) + [w, 0] = 0 (the intercept unpenalised)."""
    x, y = synthetic_heads(200, 3, 5, [0.0, 1.0, 3.0], seed=1)
    x = x * torch.tensor([1.0, 10.0, 0.1])[None, :, None]  # raw features of very different scales
    _, weights = probe.fit_probes(x, y, x, y, C=0.5)
    for h in range(3):
        xa = torch.cat([x[:, h].double(), torch.ones(200, 1, dtype=torch.float64)], 1)
        w = weights[h].double()
        penalty = torch.cat([w[:-1], torch.zeros(1, dtype=torch.float64)])
        grad = 0.5 * xa.T @ (torch.sigmoid(xa @ w) - y.double()) + penalty
        assert grad.abs().max() < 1e-3, (h, grad)


def test_fit_in_chunks_and_the_iteration_guard(monkeypatch):
    """Chunks of heads (the last one ragged) give the same probes as one batch; a fit stopped by max_iter says so."""
    x, y = synthetic_heads(300, 12, 8, torch.linspace(0, 3, 12), seed=3)
    accuracy, weights = probe.fit_probes(x[:200], y[:200], x[200:], y[200:])
    monkeypatch.setattr(probe, "FIT_CHUNK_BYTES", 5 * 200 * 9 * 4)  # 5 heads of 200 examples x (8 + 1) features
    chunked, chunked_weights = probe.fit_probes(x[:200], y[:200], x[200:], y[200:])
    assert torch.equal(chunked, accuracy)
    torch.testing.assert_close(chunked_weights, weights, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="12 of 12 probes did not converge within max_iter=1 iterations"):
        probe.fit_probes(x[:200], y[:200], x[200:], y[200:], max_iter=1)


def test_planted_signal_heads_rank_first():
    G, D = 20, 6
    signal = torch.zeros(G)
    signal[[3, 11, 17]] = torch.tensor([1.5, 2.0, 2.5])
    x, y = synthetic_heads(600, G, D, signal, seed=2)
    accuracy, _ = probe.fit_probes(x[:400], y[:400], x[400:], y[400:])
    ranking = probe.rank_heads(accuracy.view(4, 5))
    assert sorted(l * 5 + h for l, h in ranking[:3]) == [3, 11, 17]
    assert ranking[0] == [3, 2]  # the strongest signal (head 17 = layer 3, head 2) is first


def test_rank_heads_breaks_ties_by_index():
    accuracy = torch.tensor([[0.5, 0.7], [0.7, 0.6]])
    assert probe.rank_heads(accuracy) == [[0, 1], [1, 0], [1, 1], [0, 0]]


def test_mass_mean_direction_and_sigma_by_hand():
    # one head, D = 2: true examples (1,0), (3,0); false examples (0,1), (0,3)
    x = torch.tensor([[1.0, 0], [3, 0], [0, 1], [0, 3]])[:, None, :]  # [N=4, G=1, D=2]
    labels = torch.tensor([1, 1, 0, 0])
    directions, sigmas, mean = probe.head_statistics(x.half(), labels, torch.tensor([[0.0, 2.0]]), seed=0)
    torch.testing.assert_close(mean, torch.tensor([[1.0, 1.0]]))  # (1+3+0+0)/4, (0+0+1+3)/4
    # mean(true) - mean(false) = (2, -2) -> u = (1, -1)/sqrt 2; projections +-1/sqrt2, +-3/sqrt2: std = sqrt(2.5)
    torch.testing.assert_close(directions["mass_mean"], torch.tensor([[1.0, -1.0]]) / math.sqrt(2))
    assert sigmas["mass_mean"].item() == pytest.approx(math.sqrt(2.5), rel=1e-5)
    torch.testing.assert_close(directions["probe"], torch.tensor([[0.0, 1.0]]))  # the weight vector, normalised
    assert sigmas["probe"].item() == pytest.approx(math.sqrt(1.5), rel=1e-5)  # projections 0,0,1,3: mean 1, var 6/4
    assert directions["random"].norm().item() == pytest.approx(1.0)
    again, _, _ = probe.head_statistics(x.half(), labels, torch.tensor([[0.0, 2.0]]), seed=0)
    assert torch.equal(again["random"], directions["random"])


def test_probe_examples(tmp_path, fixture_csv):
    questions = tqa.load_truthfulqa(fixture_csv(tmp_path / "t.csv", n=10))
    examples, sizes = probe.probe_examples(questions, 0, "random_question")
    split = tqa.split_questions(questions, 0)
    assert sizes == {"n_train_questions": 6, "n_val_questions": 2, "n_train_examples": 30, "n_val_examples": 10}
    assert {e["question_id"] for e in examples} == set(split["train"] + split["val"])
    first = examples[0]
    q = questions[first["question_id"]]
    assert first["text"].startswith(f"Q: {q['question']} A: {q['correct'][0]} Q: ") and first["label"] == 1
    pool = {questions[i]["question"] for i in split["train"] + split["val"]}
    for e in examples:  # the random question is another train+val question, never a test question or itself
        other = e["text"].rsplit(" Q: ", 1)[1]
        assert other in pool and other != questions[e["question_id"]]["question"]
    assert examples == probe.probe_examples(questions, 0, "random_question")[0]
    plain, _ = probe.probe_examples(questions, 0, "plain")
    assert plain[0]["text"] == f"Q: {q['question']} A: {q['correct'][0]}"
    assert sum(e["label"] for e in plain) == 8 * 2
    small, sizes = probe.probe_examples(questions, 0, "plain", max_questions=4)
    assert (sizes["n_train_questions"], sizes["n_val_questions"]) == (3, 1)


def test_one_class_and_empty_splits_are_refused(tmp_path, fixture_csv):
    questions = tqa.load_truthfulqa(fixture_csv(tmp_path / "t.csv", n=10))
    examples, _ = probe.probe_examples(questions, 0, "plain")
    for e in examples:
        if e["split"] == "val":
            e["label"] = 1
    with pytest.raises(SystemExit, match="every val answer is correct \\(questions"):
        probe.check_labels(examples, questions)
    with pytest.raises(SystemExit, match="val split of 2 questions is empty"):
        probe.main(["--model", "tiny-llama", "--data", fixture_csv(tmp_path / "two.csv", n=2),
                    "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit, match="no such file"):
        probe.main(["--model", "tiny-llama", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit, match="at least 2 questions"):
        probe.main(["--model", "tiny-llama", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "p"),
                    "--max-questions", "1"])


def test_end_to_end_tiny_llama_cache_reuse_refusal_and_resume(tmp_path, monkeypatch, fixture_csv):
    data = fixture_csv(tmp_path / "t.csv", n=10)
    out = str(tmp_path / "run" / "probe")
    probe.main(["--model", "tiny-llama", "--data", data, "--out", out, "--batch-size", "4"])
    model, tok, _ = models.load_model("tiny-llama")
    geo = heads.geometry(model)
    meta = json.load(open(f"{out}/probe.json"))
    tensors = load_file(f"{out}/probe.safetensors")
    assert meta["geometry"] == vars(geo) and meta["model"] == "tiny-llama" and meta["seed"] == 0
    assert meta["fingerprint"] == heads.fingerprint(model) and meta["prompt_format"] == "random_question"
    assert meta["precision"]["dtype"] == "float32"
    assert sorted(map(tuple, meta["ranking"])) == heads.parse_heads("all", geo)
    assert heads.parse_heads("top:3", geo, probe=out) == sorted(map(tuple, meta["ranking"][:3]))
    L, H, D = geo.n_layers, geo.n_heads, geo.head_dim
    for k in ("accuracy", "sigma_mass_mean", "sigma_probe", "sigma_random", "train_accuracy", "probe_intercept"):
        assert tensors[k].shape == (L, H) and torch.isfinite(tensors[k]).all(), k
    for k in ("direction_mass_mean", "direction_probe", "direction_random"):
        torch.testing.assert_close(tensors[k].norm(dim=-1), torch.ones(L, H))
    assert probe.rank_heads(tensors["accuracy"]) == meta["ranking"]
    cached = load_file(f"{out}/activations.safetensors")["head_outputs"].float()  # [N, L, H, D], train+val inputs
    torch.testing.assert_close(tensors["mean"], cached.mean(0))

    # the cache holds each input's last-token head outputs, in example order
    cache = load_file(f"{out}/activations.safetensors")
    examples, _ = probe.probe_examples(tqa.load_truthfulqa(data), 0, "random_question")
    assert cache["head_outputs"].shape == (40, L, H, D) and cache["labels"].tolist() == [e["label"] for e in examples]
    for i in (0, 17, 39):
        one = tok([examples[i]["text"]], return_tensors="pt")
        alone = heads.record_heads(model, torch.tensor([one["input_ids"].shape[1] - 1]), **one)[0]
        torch.testing.assert_close(cache["head_outputs"][i].float(), alone, atol=2e-3, rtol=2e-3)

    # same arguments: reuse without loading the model; other arguments: refused with the fix named
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the cache should have been reused"))
    probe.main(["--model", "tiny-llama", "--data", data, "--out", out])
    assert load_file(f"{out}/probe.safetensors")["accuracy"].equal(tensors["accuracy"])
    with pytest.raises(SystemExit, match="prompt_format='plain'.*pass another --out, or delete"):
        probe.main(["--model", "tiny-llama", "--data", data, "--out", out, "--prompt-format", "plain"])
    monkeypatch.undo()

    # a run killed after its first part resumes from it, and computes the same activations
    monkeypatch.setattr(probe_cache, "PART_SIZE", 8)
    calls, record = [], heads.record_heads

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return record(*args, **kwargs)

    monkeypatch.setattr(heads, "record_heads", dying)
    resumed = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        probe.main(["--model", "tiny-llama", "--data", data, "--out", resumed, "--batch-size", "4"])
    calls.clear()
    monkeypatch.setattr(heads, "record_heads", lambda *a, **k: calls.append(1) or record(*a, **k))
    probe.main(["--model", "tiny-llama", "--data", data, "--out", resumed, "--batch-size", "4"])
    assert len(calls) == (40 - 8) // 4
    assert load_file(f"{resumed}/activations.safetensors")["head_outputs"].equal(cache["head_outputs"])
