"""probe.py - find the "truthful heads" the ITI way: a logistic-regression probe on every head's output.

For every (question, answer) of the train and validation questions, one probe input
`Q: {question} A: {answer} Q: {random other question}` (the paper's (x, y, x_random); --prompt-format plain gives
ITI's own `Q: {question} A: {answer}`), labelled 1 for a correct answer and 0 for an incorrect one. One forward pass
per padded batch records every head's output o_h^l at the input's last token (probe_cache.py: collected once, in
resumable parts, and reused by a re-run with the same arguments). Then an L2 logistic-regression probe
per head (scikit-learn's LogisticRegression(C=1.0), all L*H heads solved at once by preconditioned conjugate gradients)
is fit on train questions and scored on validation questions; heads are ranked by validation accuracy, ties by index.
Per head it also computes three unit directions on the train+val activations (mass-mean shift mean(true)-mean(false),
the probe weight vector, a seeded random Gaussian) and sigma = std(o . u) for each (never on test questions).

The random other question is drawn uniformly from the other train+val questions in use (never a test question), one
draw per probe input, by numpy's default_rng(--seed) after the (optional) --max-questions subsample.

Reads:  --data (default: the shipped data/TruthfulQA.csv), the model.
Writes: OUT/activations.safetensors  head outputs [N, L, H, D] (float16), labels, question ids, split; a cache:
                                     re-running with the same arguments reuses it, other arguments are refused
        OUT/probe.safetensors        accuracy [L,H], direction_{mass_mean,probe,random} [L,H,D], sigma_* [L,H],
                                     train_accuracy [L,H], probe_weight [L,H,D], probe_intercept [L,H],
                                     mean [L,H,D] (each head's mean output over train+val: iti.py --ablate)
        OUT/probe.json               ranking (best first), geometry, model, fingerprint, seed, split sizes, run info

    python probe.py --model smollm2-135m --seed 0 --out runs/smollm2/probe
"""
import argparse
import os
import warnings

import numpy as np
import torch

import heads
import models
import probe_cache
import runfiles
import tqa

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
models.add_model_args(parser)
tqa.add_data_args(parser)
parser.add_argument("--out", required=True, help="run folder for the probe, e.g. runs/smollm2/probe")
parser.add_argument("--prompt-format", default="random_question", choices=["random_question", "plain"],
                    help="random_question: 'Q: q A: a Q: other q' (the paper); plain: 'Q: q A: a' (ITI's probe input)")
parser.add_argument("--batch-size", type=int, default=32, help="probe inputs per forward pass")
parser.add_argument("--max-questions", type=int, default=None,
                    help="use a seeded subsample of this many train+val questions (3:1 train:val), for quick runs")
parser.add_argument("--top", type=int, default=16, help="how many top heads to print")

C = 1.0  # inverse L2 strength of scikit-learn's LogisticRegression default, which ITI used
CHUNK_BYTES = 64 * 2 ** 20  # heads are fit in chunks of about this many bytes of float32 features


# ---- The batched probe fit: L*H logistic regressions, by preconditioned conjugate gradients, a chunk of heads at once

FIT_CHUNK_BYTES = 8 * 2 ** 20  # on a CPU, heads are fit a few at a time, in about this many bytes of float32
# features: the chunk stays in cache over its iterations (each a pass or two over it); a GPU fits 16 * CHUNK_BYTES


def fit_probes(train_x, train_y, val_x, val_y, C=C, tol=1e-7, max_iter=1000, device="cpu"):
    """L2 logistic regression per head, as scikit-learn's LogisticRegression(C=C) on raw features:
    minimise C * sum_i logloss_i + 0.5 * ||w||^2 with an unpenalised intercept, by nonlinear conjugate gradients
    preconditioned with the bound C X^T X / 4 + I of the logistic Hessian (_fit_chunk), all heads of a chunk at once;
    a head leaves the batch when its gradient (divided by C * n_train, scikit-learn's scaling) is below `tol` in every
    coordinate, and a warning names the heads still above it after `max_iter` iterations.
    train_x [n_train, G, D], val_x [n_val, G, D] (any float dtype), train_y [n_train], val_y [n_val] in {0, 1}.
    device: where the chunks are fit. Returns, on the CPU, (val_accuracy [G], weights [G, D+1]: the D weights then the
    intercept)."""
    n, G, D = train_x.shape
    y = train_y.to(device, torch.float64)  # [n_train]
    val_y = val_y.to(device).float()  # [n_val]
    reg = torch.ones(D + 1, dtype=torch.float64, device=device)
    reg[-1] = 0  # the intercept is not penalised
    chunk_bytes = FIT_CHUNK_BYTES if torch.device(device).type == "cpu" else 16 * CHUNK_BYTES
    chunk = max(1, chunk_bytes // (n * (D + 1) * 4))
    weights, accuracy, unconverged = torch.zeros(G, D + 1), torch.zeros(G), []
    for g0 in range(0, G, chunk):
        w, late = _fit_chunk(_with_ones(train_x[:, g0:g0 + chunk], device), y, reg, C, tol, max_iter)  # [g, D+1]
        unconverged += (g0 + late).tolist()
        val_logits = torch.bmm(w[:, None], _with_ones(val_x[:, g0:g0 + chunk], device).transpose(1, 2))[:, 0]
        # predict 1 when the logit is > 0, as scikit-learn does
        accuracy[g0:g0 + chunk] = ((val_logits > 0).float() == val_y).float().mean(1).cpu()
        weights[g0:g0 + chunk] = w.cpu()
    if unconverged:
        listed = ", ".join(map(str, unconverged[:10])) + (" ..." if len(unconverged) > 10 else "")
        warnings.warn(f"{len(unconverged)} of {G} probes did not converge within max_iter={max_iter} iterations "
                      f"(flat head indices {listed}): their gradient is still above tol={tol}; their weights and "
                      "accuracies may be slightly off")
    return accuracy, weights


def _with_ones(x, device):
    """[n, g, D] head outputs -> [g, n, D+1] float32 on `device`, with a constant feature for the intercept. This
    layout keeps both products of an iteration (X d and X^T r, as row vector times matrix) on fast BLAS paths."""
    n, g, D = x.shape
    out = torch.empty(g, n, D + 1, device=device)
    out[:, :, :D] = x.to(device).transpose(0, 1)
    out[:, :, D] = 1
    return out


def _fit_chunk(x, y, reg, C, tol, max_iter):
    """Polak-Ribiere conjugate gradients with an exact line search, preconditioned by B = C X^T X / 4 + diag(reg).
    B bounds the Hessian C X^T diag(p(1-p)) X + diag(reg) (p(1-p) <= 1/4) and equals it at w = 0, so the first step
    is Newton's; near a probe's optimum most p are not far from 1/2 and B stays close to the Hessian, so a head takes
    a handful of iterations. B is formed and factored once (n D^2 per head, one Newton Hessian); an iteration then
    costs two passes over the features (X d, X^T r: 2 n D) where Newton's costs n D^2.
    x [g, n, D+1] float32, y [n]. Returns (weights [g, D+1] float32, the chunk's unconverged heads [k])."""
    g, n, _ = x.shape
    f64 = {"dtype": torch.float64, "device": x.device}
    bound = C / 4 * torch.bmm(x.transpose(1, 2), x).double() + torch.diag(reg)  # [g, D+1, D+1]
    chol = torch.linalg.cholesky(bound)  # positive definite: the weights' block >= I, the intercept's C n / 4 > 0
    found = torch.zeros(g, x.shape[2], **f64)  # [g, D+1] the weights of the heads that left the batch
    w, z = torch.zeros_like(found), torch.zeros(g, n, **f64)  # weights, logits X w  [g, n]

    def gradient(x, z, w):  # C X^T (p - y) + reg * w  [g, D+1]
        return C * torch.bmm((torch.sigmoid(z) - y).float()[:, None], x)[:, 0].double() + reg * w

    def loss(z, w):
        return C * (torch.nn.functional.softplus(z) - y * z).sum(1) + 0.5 * (reg * w * w).sum(1)

    grad, active, it = gradient(x, z, w), torch.arange(g, device=x.device), 0
    direction = precond_old = None
    while True:
        done = grad.abs().amax(1) <= tol * C * n
        if done.any():
            found[active[done]] = w[done]
            keep = ~done
            active, x, chol, w, z, grad = active[keep], x[keep], chol[keep], w[keep], z[keep], grad[keep]
            if direction is not None:
                direction, precond_old, grad_precond_old = direction[keep], precond_old[keep], grad_precond_old[keep]
        if len(active) == 0 or it == max_iter:
            break
        it += 1
        precond = torch.cholesky_solve(grad[:, :, None], chol)[:, :, 0]  # B^-1 grad  [k, D+1]
        if direction is None:
            direction = -precond
        else:  # Polak-Ribiere+, restarting along -B^-1 grad when that is not a descent direction
            beta = ((grad * (precond - precond_old)).sum(1) / grad_precond_old).clamp_min(0)
            direction = -precond + beta[:, None] * direction
            direction = torch.where(((grad * direction).sum(1) >= 0)[:, None], -precond, direction)
        precond_old, grad_precond_old = precond, (grad * precond).sum(1)
        dz = torch.bmm(direction.float()[:, None], x.transpose(1, 2))[:, 0].double()  # X direction  [k, n]
        # Along the line, the loss of w + t d needs only z + t dz: three 1-D Newton steps on t cost no pass over X.
        slope, wd, dd = (grad * direction).sum(1), (reg * w * direction).sum(1), (reg * direction ** 2).sum(1)
        t = torch.zeros(len(active), **f64)
        for _ in range(3):
            p = torch.sigmoid(z + t[:, None] * dz)
            t = t - (C * ((p - y) * dz).sum(1) + wd + t * dd) / (C * (p * (1 - p) * dz * dz).sum(1) + dd)
        # Safeguard: where that did not lower the loss (up to float64 round-off), the bound's step, which always does.
        before, after = loss(z, w), loss(z + t[:, None] * dz, w + t[:, None] * direction)
        ok = torch.isfinite(after) & (t > 0) & (after <= before + 1e-12 * before.abs())
        t = torch.where(ok, t, -slope / (C / 4 * (dz * dz).sum(1) + dd))
        w, z = w + t[:, None] * direction, z + t[:, None] * dz
        grad = gradient(x, z, w)
    found[active] = w
    return found.float(), active


def fit_probe_plain(train_x, train_y, val_x, val_y, C=C, tol=1e-7, max_iter=100):
    """The plain definition, one head at a time (what fit_probes batches): Newton's method in float64 on
    C * sum_i logloss_i + 0.5 * ||w||^2, the intercept (last weight) unpenalised; stops when every coordinate of the
    gradient divided by C * n_train is below `tol`, as fit_probes does. train_x [n_train, D], val_x [n_val, D],
    labels in {0, 1}. Returns (validation accuracy, weights [D+1]: the D weights then the intercept)."""
    x = torch.cat([train_x.double(), torch.ones(len(train_x), 1, dtype=torch.float64)], 1)  # [n_train, D+1]
    y = train_y.double()
    reg = torch.ones(x.shape[1], dtype=torch.float64)
    reg[-1] = 0
    w = torch.zeros(x.shape[1], dtype=torch.float64)

    def loss(w):
        z = x @ w
        return C * (torch.nn.functional.softplus(z) - y * z).sum() + 0.5 * (reg * w * w).sum()
    for _ in range(max_iter):
        p = torch.sigmoid(x @ w)  # [n_train]
        grad = C * x.T @ (p - y) + reg * w  # [D+1]
        if grad.abs().max() <= tol * C * len(x):
            break
        hessian = C * (x.T * (p * (1 - p))) @ x + torch.diag(reg)  # [D+1, D+1]
        step = torch.linalg.solve(hessian, grad)
        t = 1.0
        while loss(w - t * step) > loss(w) and t > 1e-8:  # halve the Newton step until the loss does not rise
            t /= 2
        w = w - t * step
    val_logits = torch.cat([val_x.double(), torch.ones(len(val_x), 1, dtype=torch.float64)], 1) @ w  # [n_val]
    return float(((val_logits > 0).float() == val_y.float()).float().mean()), w.float()


def rank_heads(accuracy):
    """[(layer, head), ...] best validation accuracy first, ties broken by index. accuracy [L, H]."""
    order = sorted(range(accuracy.numel()), key=lambda i: (-float(accuracy.flatten()[i]), i))
    return [list(divmod(i, accuracy.shape[1])) for i in order]


# ---- Directions and their scale, on train+val activations

def head_statistics(head_outputs, labels, probe_weight, seed):
    """Unit directions [G, D] per head, sigma [G] = std(o . u) (population std, as ITI's np.std), and each head's mean
    output [G, D] (what a mean-ablation puts in place of the head's output).
    head_outputs [N, G, D] (train+val only), labels [N], probe_weight [G, D]."""
    N, G, D = head_outputs.shape
    directions = {"mass_mean": torch.zeros(G, D), "probe": probe_weight.float(),
                  "random": torch.randn(G, D, generator=torch.Generator().manual_seed(seed))}
    true, false = labels.bool(), ~labels.bool()
    chunk = max(1, CHUNK_BYTES // (N * D * 4))
    mean = torch.zeros(G, D)
    for g0 in range(0, G, chunk):
        x = head_outputs[:, g0:g0 + chunk].float()  # [N, g, D]
        directions["mass_mean"][g0:g0 + chunk] = x[true].mean(0) - x[false].mean(0)
        mean[g0:g0 + chunk] = x.mean(0)
    directions = {k: u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12) for k, u in directions.items()}
    sigmas = {k: torch.zeros(G) for k in directions}
    for g0 in range(0, G, chunk):
        x = head_outputs[:, g0:g0 + chunk].float()
        for k, u in directions.items():
            sigmas[k][g0:g0 + chunk] = torch.einsum("ngd,gd->ng", x, u[g0:g0 + chunk]).std(0, unbiased=False)
    return directions, sigmas, mean


# ---- Probe inputs (their head outputs are collected and cached by probe_cache.py)

def probe_examples(questions, seed, prompt_format, max_questions=None):
    """(examples, sizes): one dict {text, label, question_id, split} per (train+val question, answer)."""
    split = tqa.split_questions(questions, seed)
    rng = np.random.default_rng(seed)
    if max_questions is not None:
        if max_questions < 2:
            raise SystemExit(f"--max-questions {max_questions}: the probe needs at least 2 questions (1 train, 1 val)")
        n_train = min(len(split["train"]), max(1, round(0.75 * max_questions)))
        n_val = min(len(split["val"]), max(1, max_questions - n_train))
        split = {"train": sorted(rng.permutation(split["train"])[:n_train].tolist()),
                 "val": sorted(rng.permutation(split["val"])[:n_val].tolist())}
    for name in ("train", "val"):
        if not split[name]:
            raise SystemExit(f"the {name} split of {len(questions)} questions is empty: pass a --data file with more "
                             "questions (a 60/20/20 split needs at least 5)")
    pool = split["train"] + split["val"]  # the random other question comes from here, never from the test split
    examples = []
    for name in ("train", "val"):
        for qi in split[name]:
            q = questions[qi]
            for answer, label in [(a, 1) for a in q["correct"]] + [(a, 0) for a in q["incorrect"]]:
                other = questions[pool[(pool.index(qi) + 1 + rng.integers(len(pool) - 1)) % len(pool)]]["question"]
                text = (tqa.PROBE_TEMPLATE.format(question=q["question"], answer=answer, random_question=other)
                        if prompt_format == "random_question" else
                        tqa.PROBE_TEMPLATE_PLAIN.format(question=q["question"], answer=answer))
                examples.append({"text": text, "label": label, "question_id": qi, "split": name})
    sizes = {f"n_{name}_questions": len(split[name]) for name in ("train", "val")}
    sizes.update({f"n_{name}_examples": sum(e["split"] == name for e in examples) for name in ("train", "val")})
    return examples, sizes


def check_labels(examples, questions):
    """Refuse a split whose examples all carry one label: a probe cannot be fit (or scored) on one class."""
    for name in ("train", "val"):
        rows = [e for e in examples if e["split"] == name]
        for label, kind in ((1, "correct"), (0, "incorrect")):
            if all(e["label"] == label for e in rows):
                ids = sorted({e["question_id"] for e in rows})
                raise SystemExit(f"every {name} answer is {kind} (questions {', '.join(map(str, ids[:10]))}"
                                 f"{' ...' if len(ids) > 10 else ''}): each question needs correct and incorrect "
                                 "answers; use a TruthfulQA CSV or more --max-questions")


# ---- Report

def print_summary(accuracy, ranking, top):
    flat = accuracy.flatten()
    print(f"validation accuracy over {flat.numel()} heads: best {flat.max():.3f}, median {flat.median():.3f}, "
          f"mean {flat.mean():.3f}")
    print(f"top {top} heads (layer.head: validation accuracy):")
    print("  " + "  ".join(f"{l}.{h}:{accuracy[l, h]:.3f}" for l, h in ranking[:top]))
    counts = np.bincount([l for l, _ in ranking[:top]], minlength=accuracy.shape[0])
    print(f"layers of the top {top} heads:")
    for layer, n in enumerate(counts):
        if n:
            print(f"  layer {layer:3d} {'#' * n} {n}")


def main(argv=None):
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size {args.batch_size}: must be at least 1")
    runfiles.check_writable(os.path.join(args.out, "probe.json"))  # before the long activation pass
    questions = tqa.load_truthfulqa(args.data)
    examples, sizes = probe_examples(questions, args.seed, args.prompt_format, args.max_questions)
    check_labels(examples, questions)
    key = probe_cache.cache_key(args, examples)
    cached = probe_cache.read_cache(args.out, key)
    if cached is not None:
        print(f"reusing the head outputs cached in {os.path.join(args.out, probe_cache.CACHE)}")
        head_outputs, fingerprint = cached
    else:
        model, tokenizer, _ = models.load_model(args.model, args.dtype, args.device)
        device = heads.out_projections(model)[0].weight.device
        head_outputs = probe_cache.collect_head_outputs(model, tokenizer, [e["text"] for e in examples], args.out,
                                                        key, args.batch_size, device)
        fingerprint = heads.fingerprint(model)
        probe_cache.write_cache(args.out, key, head_outputs, examples, fingerprint)
    N, L, H, D = head_outputs.shape
    geo = heads.Geometry(L, H, D)
    x = head_outputs.view(N, L * H, D)  # [N, G, D]
    labels = torch.tensor([e["label"] for e in examples])  # [N]
    is_val = torch.tensor([e["split"] == "val" for e in examples])  # [N]
    print(f"fitting {L * H} probes ({geo}) on {sizes['n_train_examples']} train inputs "
          f"({sizes['n_train_questions']} questions), scoring on {sizes['n_val_examples']} validation inputs")
    fit_device = "cuda" if args.device == "auto" else args.device
    accuracy, weights = fit_probes(x[~is_val], labels[~is_val], x[is_val], labels[is_val], device=fit_device)
    train_logits = torch.einsum("ngd,gd->gn", x[~is_val].float(), weights[:, :D]) + weights[:, D:]  # [G, n_train]
    train_accuracy = ((train_logits > 0).float() == labels[~is_val].float()).float().mean(1)
    directions, sigmas, mean = head_statistics(x, labels, weights[:, :D], args.seed)
    accuracy = accuracy.view(L, H)
    ranking = rank_heads(accuracy)

    tensors = {"accuracy": accuracy, "train_accuracy": train_accuracy.view(L, H),
               "probe_weight": weights[:, :D].reshape(L, H, D).contiguous(),
               "probe_intercept": weights[:, D].reshape(L, H).contiguous(),
               "mean": mean.view(L, H, D)}  # each head's mean output over train+val inputs: iti.py --ablate
    tensors.update({f"direction_{k}": u.view(L, H, D) for k, u in directions.items()})
    tensors.update({f"sigma_{k}": s.view(L, H) for k, s in sigmas.items()})
    from safetensors.torch import save_file
    runfiles.write_atomic(os.path.join(args.out, "probe.safetensors"), lambda tmp: save_file(tensors, tmp))
    runfiles.write_json(os.path.join(args.out, "probe.json"), {
        "geometry": vars(geo), "ranking": ranking, "model": args.model, "fingerprint": fingerprint,
        "seed": args.seed, "prompt_format": args.prompt_format, **sizes,
        "precision": {"dtype": args.dtype, "note": models.MIXED_NOTE if args.dtype == "mixed" else
                      f"weights and activations in {args.dtype}", "probe_fit": "float32 features, float64 solve"},
        "best_accuracy": float(accuracy.max()), "median_accuracy": float(accuracy.median()),
        "probe": f"LogisticRegression(C={C}) per head (batched, preconditioned CG), fit on train, accuracy on val",
        "sigma": "population std of o . u over train+val probe inputs", "run": runfiles.run_info(args)})
    print_summary(accuracy, ranking, args.top)
    print(f"wrote {os.path.join(args.out, 'probe.json')} and probe.safetensors")


if __name__ == "__main__":
    main()
