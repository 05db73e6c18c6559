"""bench.py - our speed against the reference approaches, side by side, measured in one run on one machine.

Each row times our implementation and the plain or reference way of doing the same work (the plain definitions live
beside the fast ones, in probe.py and evaluate.py), on identical inputs, after checking that both give the same answer:
  1. edit hook overhead   edited forward vs plain forward; the reference adds ITI's vector head by head
  2. activation capture   heads.record_heads on a padded batch vs one prompt per forward keeping every position
  3. probes               probe.fit_probes (all heads, one batched problem) vs probe.fit_probe_plain head by head
  4. MC scoring           evaluate.answer_logprobs (primer once, each prompt once, answers batched on its KV cache)
                          vs evaluate.plain_answer_logprobs (one full forward per answer, TruthfulQA's MC code)
  5. IPO step             ipo_edit's step (cached reference log-probs) vs a step that recomputes the reference
                          (TRL without precomputed log-probs), and vs a plain forward+backward of the frozen model
  6-8. bf16 vs float32    the fast precision (--fast-dtype, models' 'mixed') vs float32 on the same work: the probe
                          capture (row 2), MC scoring (row 4) and an IPO step (row 5), with their agreement figures
  9. edit batch           E ITI edits scored in one pass (heads.EditBatch) vs one edit after another: the same scores
 10. judges together      the truth and info judges on one shared frozen pass (judge_frozen.score_all) vs each judge
                          on its own pass; the shipped judges on smollm2-135m, random adapters on other models
Rows 4-5 and 7-10 use the first --n-questions questions of --data (the shipped TruthfulQA CSV by default).
Row 3 uses synthetic head outputs at Alpaca-7B's geometry (--probe-shape). Ratios mean something anywhere; absolute
seconds only on the machine they were taken on. Prints a table (device, model, threads and the CPU's bf16 matrix units
in its header and in every row); --json writes it. Rows 5 and 8 (IPO) are in bench_ipo.py; the timer, the row format
(a ratio against its target) and the questions rows run on are in bench_kit.py, which both use.

    python bench.py --quick            # tiny random model, small sizes: about a minute on one CPU thread
    python bench.py --threads 2        # smollm2-135m, full sizes: 15-20 minutes on an idle 2-core CPU
"""
import argparse

import torch

import bench_ipo
import heads
import models
import runfiles
import tqa
from bench_kit import fast_row, load_questions, median_time, overhead_row, speedup_row

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="tiny random model and small sizes (under a minute on CPU)")
parser.add_argument("--model", default=None, help="model id, folder or built-in (default: tiny-llama with --quick, "
                    "else smollm2-135m)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (stated in the output)")
parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch in rows 1-2")
parser.add_argument("--n-prompts", type=int, default=None, help="prompts captured in row 2")
parser.add_argument("--k", type=int, default=16, help="edited heads in rows 1 and 5")
parser.add_argument("--probe-shape", default=None, help="row 3: HEADS,DIMS,EXAMPLES of the synthetic head outputs "
                    "(default: 1024,128,5000, Alpaca-7B's 32x32 heads of 128 dims; 64,32,600 with --quick)")
parser.add_argument("--data", default=tqa.DEFAULT_DATA, help="rows 4-5 and 7-9: a TruthfulQA CSV (default: the "
                    "shipped one)")
parser.add_argument("--n-questions", type=int, default=5, help="rows 4-5, 7-9: how many questions")
parser.add_argument("--pairs", type=int, default=4, help="row 5: preference pairs per IPO step (the paper's batch: 4)")
parser.add_argument("--n-edits", type=int, default=4, help="row 9: edits scored at once")
parser.add_argument("--fast-dtype", default="mixed", choices=["mixed", "bfloat16", "float16"], help="rows 6-8: the fast precision, a models --dtype (default: "
                    "mixed, bf16 matrix products with float32 residual stream and log-softmax)")
parser.add_argument("--stages", default="1,2,3,4,5,6,7,8,9,10", help="which rows to run, e.g. 1,2")
parser.add_argument("--json", default=None, help="also write the table to this JSON file")


def probe_shape(text):
    """'HEADS,DIMS,EXAMPLES' -> [G, D, n]."""
    shape = [int(v) for v in text.split(",") if v.strip().isdigit()]
    if len(shape) != 3 or len(text.split(",")) != 3 or min(shape) < 1 or shape[2] < 8:
        raise SystemExit(f"--probe-shape {text}: give HEADS,DIMS,EXAMPLES as three positive integers (at least 8 "
                         "examples), e.g. 64,32,600")
    return shape


def probe_like_prompts(n):
    """Probe inputs `Q: {q} A: {a} Q: {other q}` built from the QA primer's six examples (no data file needed)."""
    pairs = [block.split("\nA: ") for block in tqa.QA_PRIMER.replace("Q: ", "").split("\n\n")]
    return [tqa.PROBE_TEMPLATE.format(question=pairs[i % 6][0], answer=pairs[(i // 6) % 6][1],
                                      random_question=pairs[(i + 1 + i // 36) % 6][0]) for i in range(n)]


def iti_edit(geo, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen = heads.parse_heads(f"random:{k}:{seed}", geo)
    return heads.Edit(geo, heads.heads_to_mask(chosen, geo), offset=torch.randn(geo.n_layers, geo.n_heads, geo.head_dim,
                                                                                 generator=g)), chosen


def per_head_reference_hooks(model, edit, chosen):
    """The reference way: one hook per edited head, each adding its vector to its slice of a copy of o^l."""
    D, projs = edit.geo.head_dim, heads.out_projections(model)

    def make(layer, head):
        def hook(module, args):
            o = args[0].clone()
            o[..., head * D:(head + 1) * D] += edit.offset[layer, head].to(o.dtype)
            return (o,) + tuple(args[1:])
        return hook
    return [projs[l].register_forward_pre_hook(make(l, h)) for l, h in chosen]


def row_hook_overhead(model, tok, args, device):
    geo = heads.geometry(model)
    edit, chosen = iti_edit(geo, min(args.k, geo.n_layers * geo.n_heads))
    edit = edit.to(device)
    tok.padding_side = "right"
    enc = tok(probe_like_prompts(args.batch_size), return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        def plain():
            return model(**enc).logits

        def ours():
            with heads.edited(model, edit):
                return model(**enc).logits

        def reference():
            handles = per_head_reference_hooks(model, edit, chosen)
            try:
                return model(**enc).logits
            finally:
                for h in handles:
                    h.remove()
        match = torch.allclose(ours(), reference(), atol=1e-4, rtol=1e-4)
        t_plain, t_ours, t_ref = (median_time(f, args.repeats, device)[0] for f in (plain, ours, reference))
    pyvene = "installed, not compared" if _has("pyvene") else "not installed"
    return overhead_row("1 edit hook overhead", t_ours, t_ref, t_plain, "edited/plain", 1.03, match,
                        f"{len(chosen)} heads, batch {args.batch_size}; reference per-head hooks "
                        f"{t_ref / t_plain:.3f}x plain; pyvene {pyvene}")


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def capture_one_by_one(model, tok, prompts, device):
    """The reference way: one prompt per forward, every layer's whole o^l kept, then the last token taken."""
    geo, projs = heads.geometry(model), heads.out_projections(model)
    rows = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt").to(device)
        kept = []
        handles = [p.register_forward_pre_hook(lambda m, a: kept.append(a[0].detach().float())) for p in projs]
        try:
            model(**enc)
        finally:
            for h in handles:
                h.remove()
        rows.append(torch.stack([o[0, -1] for o in kept]).view(geo.n_layers, geo.n_heads, geo.head_dim))
    return torch.stack(rows)  # [n, L, H, D]


def capture_batched(model, tok, prompts, batch_size, device):
    tok.padding_side = "right"
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
        out.append(heads.record_heads(model, heads.last_positions(enc["attention_mask"]), **enc))
    return torch.cat(out)


def row_capture(model, tok, args, device):
    prompts = probe_like_prompts(args.n_prompts)
    with torch.no_grad():
        ours = capture_batched(model, tok, prompts, args.batch_size, device)
        ref = capture_one_by_one(model, tok, prompts, device)
        match = torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
        t_ours = median_time(lambda: capture_batched(model, tok, prompts, args.batch_size, device), args.repeats,
                             device)[0]
        t_ref = median_time(lambda: capture_one_by_one(model, tok, prompts, device), args.repeats, device)[0]
    return speedup_row("2 activation capture", t_ours, t_ref, "reference/ours", 5, match,
                       f"{len(prompts)} prompts, batch {args.batch_size}, max |diff| {(ours - ref).abs().max():.1e}")


# ---- 3. probes: one batched problem vs scikit-learn, one head at a time (ITI's train_probes)

def synthetic_head_outputs(n, G, D, k, seed=0):
    """(head outputs [n, G, D] float16, labels [n], planted heads [k]). Each head's features spread 10^0 to 10^-1.2
    around a random mean 1.7x the spread's norm away (as smollm2's head outputs on TruthfulQA probe inputs: top and
    bottom singular values ~19 apart, mean/spread 1.7; the spread sets how many steps lbfgs takes); k evenly spaced
    heads also carry a label shift of 0.6 to 1.5 on their first feature (Bayes accuracy 0.73-0.93), so the top k
    are the planted heads and both fits must find them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)  # [n]
    spread = torch.logspace(0, -1.2, D)  # [D]
    x = torch.empty(n, G, D, dtype=torch.float16)
    for g0 in range(0, G, 64):  # 64 heads at a time: a float32 draw of all 1,024 heads would take 2.6 GB
        mean = 1.7 * spread.norm() * torch.nn.functional.normalize(torch.randn(min(64, G - g0), D, generator=g), dim=-1)
        x[:, g0:g0 + 64] = (torch.randn(n, len(mean), D, generator=g) * spread + mean).half()
    planted = torch.linspace(0, G - 1, k).round().long()  # [k]
    x[:, planted, 0] += ((2 * labels - 1)[:, None] * torch.linspace(0.6, 1.5, k)).half()
    return x, labels, planted


def plain_probes(train_x, train_y, val_x, val_y):
    """The plain way: probe.fit_probe_plain (Newton's method) head by head. Returns validation accuracy [G]."""
    import probe
    return torch.tensor([probe.fit_probe_plain(train_x[:, h], train_y, val_x[:, h], val_y)[0]
                         for h in range(train_x.shape[1])])


def row_probes(model, tok, args, device):
    import probe
    G, D, n = args.probe_shape
    k = max(1, min(16, G // 4))  # planted heads: the top-k both fits must find
    x, y, planted = synthetic_head_outputs(n, G, D, k)
    n_train = 3 * n // 4  # ITI's 60/20 train/validation split
    train_x, train_y, val_x, val_y = x[:n_train], y[:n_train], x[n_train:], y[n_train:]

    def top(accuracy):  # the k best heads, ties broken by index (probe.rank_heads)
        return {h for _, h in probe.rank_heads(accuracy[None])[:k]}
    repeats = min(args.repeats, 3)  # at full size one pass takes about a minute per method on one CPU thread
    t_ours, (ours, _) = median_time(lambda: probe.fit_probes(train_x, train_y, val_x, val_y, device=device), repeats,
                                    device, warmup=False)  # ours: validation accuracy [G]
    t_ref, ref = median_time(lambda: plain_probes(train_x, train_y, val_x, val_y), repeats, device, warmup=False)
    overlap, differ = len(top(ours) & top(ref)), int((ours - ref).abs().gt(1e-6).sum())
    target = 100 if device.startswith("cuda") else 3
    return speedup_row("3 probes", t_ours, t_ref, "plain/ours", target, overlap == k and differ == 0,
                       f"{G} heads x {D} dims, {n_train} train / {n - n_train} val; top-{k} overlap {overlap}/{k} "
                       f"(planted found {len(top(ours) & set(planted.tolist()))}/{k}); validation accuracies differ "
                       f"at {differ} heads; {repeats} repeats", top_k_overlap=overlap)


# ---- 4. MC scoring: the prompt once, the answers as one batch vs one full forward per answer (TruthfulQA's MC loop)

def mc_scores(model, tok, questions, targets=None, batch=None):
    """As evaluate.score_questions: the prompts' common start (instruction + QA primer) run once, then each question's
    prompt rest once and its answers as one batch on that KV cache; [targets][answers of every question] scores."""
    import evaluate
    targets = targets or [evaluate.Target()]
    encoded = [evaluate.encode_question(tok, q, "default") for q in questions]  # (prompt ids, answer ids, ...)
    primer_ids = encoded[0][0][:tqa.shared_prefix_length([prompt_ids for prompt_ids, *_ in encoded])]
    primer = evaluate.make_primer(model, primer_ids, targets, batch, "mc")
    per_question = [evaluate.answer_logprobs(model, p, a, targets, batch, primer) for p, a, *_ in encoded]
    return [[s for scores in per_question for s in scores[t]] for t in range(len(targets))]


def plain_mc_scores(model, tok, questions):
    import evaluate
    return [s for q in questions for s in evaluate.plain_answer_logprobs(model, *evaluate.encode_question(
        tok, q, "default")[:2])]


def row_mc_scoring(model, tok, args, device):
    with torch.no_grad():
        questions = load_questions(args)
        repeats = min(args.repeats, 3)  # one reference pass over 5 questions takes a minute on one CPU thread
        t_ours, got = median_time(lambda: mc_scores(model, tok, questions)[0], repeats, device, warmup=False)
        t_ref, want = median_time(lambda: plain_mc_scores(model, tok, questions), repeats, device, warmup=False)
        diff = max(abs(a - b) for a, b in zip(got, want)) if len(got) == len(want) else float("inf")
    return speedup_row("4 MC scoring", t_ours, t_ref, "plain/ours", 5, diff <= 1e-4,
                       f"{len(questions)} questions, {len(got)} answers, "
                       f"ITI's instruction + QA primer; max |score diff| {diff:.1e}; {repeats} repeats")


# ---- 5. IPO step: in bench_ipo.py, with row 8 (the IPO step at the fast precision)


# ---- 6-7. The fast precision vs float32 on the same work (8: bench_ipo.py); 9. E edits in one pass vs one by one

def row_fast_capture(model, tok, args, device):
    prompts = probe_like_prompts(args.n_prompts)
    with torch.no_grad():
        t_fast, fast = median_time(lambda: capture_batched(args.fast_model, tok, prompts, args.batch_size, device),
                                   args.repeats, device)
        t_f32, f32 = median_time(lambda: capture_batched(model, tok, prompts, args.batch_size, device), args.repeats,
                                 device)
    error = float((fast - f32).norm() / f32.norm())  # [n, L, H, D] head outputs
    cosine = torch.nn.functional.cosine_similarity(fast.flatten(2), f32.flatten(2), dim=-1).min().item()
    return fast_row("6 capture, fast", t_fast, t_f32, error <= 0.05, "relative error <= 0.05",
                    f"{args.fast_dtype}; {len(prompts)} prompts; head outputs' relative error {error:.4f}, min "
                    f"cosine per layer {cosine:.4f}")


def row_fast_mc(model, tok, args, device):
    import evaluate
    with torch.no_grad():
        questions = load_questions(args)
        t_fast, fast = median_time(lambda: mc_scores(args.fast_model, tok, questions)[0], args.repeats, device)
        t_f32, f32 = median_time(lambda: mc_scores(model, tok, questions)[0], args.repeats, device)
    per_question, i = [], 0
    for q in questions:
        _, answers, n_correct, best = evaluate.encode_question(tok, q, "default")
        per_question.append([evaluate.mc_metrics(s[i:i + n_correct], s[i + n_correct:i + len(answers)], best)
                             for s in (fast, f32)])
        i += len(answers)
    mc1 = sum(a["mc1"] == b["mc1"] for a, b in per_question) / len(per_question)
    mc2 = sum(abs(a["mc2"] - b["mc2"]) for a, b in per_question) / len(per_question)
    return fast_row("7 MC scoring, fast", t_fast, t_f32, mc1 >= 0.97 and mc2 <= 0.005,
                    "MC1 agreement >= 0.97, mean |MC2 diff| <= 0.005",
                    f"{args.fast_dtype}; {len(questions)} questions: MC1 agreement {mc1:.3f}, mean |MC2 diff| {mc2:.4f}, "
                    f"max |score diff| {max(abs(a - b) for a, b in zip(fast, f32)):.3f}")


def row_edit_batch(model, tok, args, device):
    import evaluate
    geo = heads.geometry(model)
    edits = [iti_edit(geo, min(args.k, geo.n_layers * geo.n_heads), seed=e)[0].to(device) for e in range(args.n_edits)]
    together = [evaluate.Target(name=f"edit{e}", edit=edit, apply="iti") for e, edit in enumerate(edits)]
    apart = [evaluate.Target(name=f"edit{e}", edit=edit, apply="iti") for e, edit in enumerate(edits)]
    batch, batches = evaluate.edit_batch(together), [evaluate.edit_batch([t]) for t in apart]
    with torch.no_grad():
        questions = load_questions(args)
        t_once, at_once = median_time(lambda: mc_scores(model, tok, questions, together, batch), args.repeats, device)
        t_apart, one_by_one = median_time(lambda: [mc_scores(model, tok, questions, [t], b)[0] for t, b in
                                                   zip(apart, batches)], args.repeats, device)
    diff = max(abs(a - b) for x, y in zip(at_once, one_by_one) for a, b in zip(x, y))
    return speedup_row("9 edit batch", t_once, t_apart, "apart/at once", 1.5, diff <= 1e-5,
                       f"{args.n_edits} ITI edits of {min(args.k, geo.n_layers * geo.n_heads)} heads, MC scoring of "
                       f"{len(questions)} questions; max |score diff| {diff:.1e}")


def row_judges(model, tok, args, device):
    import judge
    import judge_frozen
    import train_judge
    n_layers = len(model.model.layers)
    if args.model == "smollm2-135m":  # the shipped judges' adapters (their base is this model)
        kinds = {k: judge.FineTunedJudge(judge.DEFAULT_JUDGES[k], k, device) for k in ("truth", "info")}
        adapters, frozen = {k: j.adapters for k, j in kinds.items()}, kinds["truth"].meta["frozen_layers"]
    else:
        frozen = max(1, 2 * n_layers // 3)
        adapters = {k: train_judge.init_adapters(model, range(frozen, n_layers), 4, 8, seed) for seed, k in
                    enumerate(("truth", "info"))}
    pairs = [(q["question"], a) for q in load_questions(args) for a in q["correct"] + q["incorrect"]]
    questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
    with torch.no_grad():
        t_once, once = median_time(lambda: judge_frozen.score_all(model, tok, adapters, frozen, questions, answers),
                                   args.repeats, device)
        t_apart, apart = median_time(lambda: {k: judge_frozen.score_all(model, tok, {k: a}, frozen, questions,
                                                                        answers)[k] for k, a in adapters.items()},
                                     args.repeats, device)
    diff = max(float((once[k] - apart[k]).abs().max()) for k in adapters)
    # bf16 states: another batch shape moves P(yes) by up to ~0.02 (the shipped judges), either way
    return speedup_row("10 judges together", t_once, t_apart, "apart/together", 1.5, diff <= 0.02,
                       f"truth + info judges (frozen layers 0-{frozen - 1}) on {len(pairs)} answers to "
                       f"{len(set(questions))} questions; max |P(yes) diff| {diff:.1e}")


def print_table(rows, header):
    print(header)
    print(f"{'stage':<24}{'ours s':>10}{'ref s':>10}{'ratio':>9}  {'target':<8}{'met':<5}{'same':<5} note")
    for r in rows:
        print(f"{r['stage']:<24}{r['ours_s']:>10.4f}{r['reference_s']:>10.4f}{r['ratio']:>8.2f}x  {r['target']:<8}"
              f"{'yes' if r['met'] else 'NO':<5}{'yes' if r['match'] else 'NO':<5} {r['ratio_label']}; {r['note']}")


ROWS = {"1": row_hook_overhead, "2": row_capture, "3": row_probes, "4": row_mc_scoring, "5": bench_ipo.row_ipo_step,
        "6": row_fast_capture, "7": row_fast_mc, "8": bench_ipo.row_fast_ipo, "9": row_edit_batch,
        "10": row_judges}


def main(argv=None):
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if not stages or set(stages) - set(ROWS):
        raise SystemExit(f"--stages {args.stages}: choose rows from {','.join(ROWS)}, comma-separated (e.g. 1,3)")
    args.probe_shape = probe_shape(args.probe_shape or ("64,32,600" if args.quick else "1024,128,5000"))
    torch.set_num_threads(args.threads)
    args.model = args.model or ("tiny-llama" if args.quick else models.DEFAULT_MODEL)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    args.n_prompts = args.n_prompts or (32 if args.quick else 64)
    if min(args.threads, args.repeats, args.batch_size, args.n_prompts, args.n_questions, args.pairs, args.k,
           args.n_edits) < 1:
        raise SystemExit("--threads, --repeats, --batch-size, --n-prompts, --n-questions, --pairs, --k and --n-edits "
                         "must be at least 1")
    model, tok, about = models.load_model(args.model, device=args.device)
    if {"6", "7", "8"} & set(stages):
        args.fast_model = models.load_model(args.model, args.fast_dtype, args.device)[0]
    units = models.matrix_units()
    header = (f"bench.py: model {args.model} ({about['note']}), device {args.device}, {args.threads} CPU thread(s), "
              f"CPU bf16 matrix units: {units}, median of {args.repeats}")
    rows = [dict(row, threads=args.threads, matrix_units=units) for row in
            (ROWS[s](model, tok, args, args.device) for s in stages) if row is not None]
    print_table(rows, header)
    if args.json:
        settings = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "fast_model"})
        runfiles.write_json(args.json, {"header": header, "rows": rows, "run": runfiles.run_info(settings)})
    return rows


if __name__ == "__main__":
    main()
