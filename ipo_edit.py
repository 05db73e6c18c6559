"""ipo_edit.py - the optimal edit at a set of heads (method.md 2b): train a head-masked rank-1 LoRA with the IPO loss.

The edit (heads.Edit, applied at every token, in training and at evaluation):
  --param lora1   per layer, a^l and b^l in R^{H*D}:  o^l <- o^l + <a^l, o^l> (b^l * mask^l)   (b = 0, a small random)
                  = a rank-1 LoRA on the output projection W^l with its output factor B = W^l b^l.
                  --heads all is the paper's full-model IPO baseline ("ipo-all").
  --param offset  a learned constant vector per chosen head: o_h^l <- o_h^l + theta_h^l   (theta = 0 at the start)
Only the edit's parameters train; the model stays frozen. For each preference pair (x, y+, y-) of the TRAIN questions
(every correct x incorrect answer), h = [log pi(y+|x) - log pi0(y+|x)] - [log pi(y-|x) - log pi0(y-|x)] and the loss
(h - 1/(2 tau))^2 is minimised (IPO, Azar et al. 2023; TRL's loss_type="ipo"). log pi(y|x) is the mean log-prob of the
answer tokens (TRL's IPO; --logp sum for the sum). pi0 is the unedited model: its log-probs are computed once, cached
on disk, and shared by every tau. Validation loss and margin on pairs of the VAL questions are logged each epoch.

Reads:  --data TruthfulQA.csv, --model, --probe RUN/probe (for --heads top:K).
Writes: one edit file per tau (heads.save_edit; meta: method "ipo", apply "all", tau, param, lr, ...), a training log
        beside it (NAME.log.json), and the reference log-probs in a cache folder (default: cache/ in the folder of
        --out, e.g. RUN/edits/cache/). --out is a file (one tau), a pattern with {tau}, or a folder (file names ipo-{heads}-t{tau}.safetensors).
        A tau whose edit file exists is skipped, so a killed sweep resumes where it stopped.

Example:
  python ipo_edit.py --data TruthfulQA.csv --heads top:16 --probe runs/smollm2/probe --tau 0.1 0.3 0.5 \
      --max-pairs 200 --out runs/smollm2/edits/
"""
import argparse
import hashlib
import json
import math
import os
import time

import torch
from tqdm import tqdm

import heads
import models
import runfiles
import tqa


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_model_args(p)
    tqa.add_data_args(p)
    p.add_argument("--heads", default="top:16", help="heads to edit: top:K (needs --probe), random:K:SEED, single:L.H, "
                   "all, or L.H,L.H")
    p.add_argument("--probe", default=None, help="probe run folder (probe.json), for --heads top:K")
    p.add_argument("--tau", type=float, nargs="+", default=[0.3], help="IPO tau, one edit per value (paper: 0.1-0.5)")
    p.add_argument("--param", default="lora1", choices=["lora1", "offset"],
                   help="lora1: masked rank-1 LoRA o += <a,o> b*mask; offset: a learned vector per head")
    p.add_argument("--out", required=True, help="edit file, pattern with {tau}, or folder (ends with / or exists)")
    p.add_argument("--instruction", default="default", choices=list(tqa.INSTRUCTIONS),
                   help="instruction sentence before the QA primer (the prompt evaluate.py scores with)")
    p.add_argument("--logp", default="mean", choices=["mean", "sum"],
                   help="log pi(y|x): mean over answer tokens (TRL's IPO) or their sum")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training pairs (paper: 2)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step; each step runs 2x this many sequences")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default as the paper: 2e-3 for 1 head, "
                   "5e-4 for up to 16 heads, 1e-4 for more)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply the default learning rate by this (short "
                   "runs: AdamW moves each weight by about lr per step, and the paper takes ~3,300 steps; a course run "
                   "of ~60 steps needs ~20x to move as far). Ignored with --lr")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (TRL's default: 0)")
    p.add_argument("--max-pairs", type=int, default=None, help="train on a seeded subsample of this many pairs")
    p.add_argument("--max-val-pairs", type=int, default=128, help="validate on a seeded subsample (0: no validation)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="pairs per batch for reference and validation passes")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (7B on one GPU)")
    p.add_argument("--no-shared-prefix", action="store_true", help="run every row's whole prompt instead of the prompt "
                   "start common to the batch once (slower, same numbers; implied by --grad-checkpointing)")
    p.add_argument("--cache-dir", default=None, help="where the reference log-probs are cached (default: cache/ in "
                   "the folder of --out)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--bench", type=int, default=0, metavar="STEPS", help="only time STEPS training steps against the "
                   "frozen model's forward+backward on the same batches, print JSON, write nothing")
    return p


def default_lr(n_heads):
    """The paper's learning rates: 2e-3 for a single head, 5e-4 for up to 16 heads, 1e-4 for all heads."""
    return 2e-3 if n_heads == 1 else 5e-4 if n_heads <= 16 else 1e-4


def ipo_loss(logratio_chosen, logratio_rejected, tau):
    """IPO per pair: (h - 1/(2 tau))^2, h = logratio_chosen - logratio_rejected, logratio = log pi - log pi0."""
    return (logratio_chosen - logratio_rejected - 1 / (2 * tau)) ** 2


# ---- Data: token ids of each pair, and padded batches in which the answers of all rows start at the same column.

def select_pairs(questions, limit, seed):
    pairs = tqa.preference_pairs(questions)
    if limit is not None and limit < len(pairs):
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:limit]
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    return pairs


def encode_pairs(tokenizer, pairs, instruction):
    """[(prompt_ids, chosen_ids, rejected_ids)]: answers tokenized alone (no special tokens) and appended to the
    prompt, so the log-probs cover exactly the answer tokens."""
    prompts, answers = {}, {}
    def prompt_ids(q):
        if q not in prompts:
            prompts[q] = tokenizer(tqa.qa_prompt(q, instruction))["input_ids"]
        return prompts[q]
    def answer_ids(a):
        if a not in answers:
            answers[a] = tokenizer(tqa.ANSWER_TEMPLATE.format(answer=a), add_special_tokens=False)["input_ids"]
        return answers[a]
    return [(prompt_ids(p["question"]), answer_ids(p["chosen"]), answer_ids(p["rejected"])) for p in pairs]


def collate(encoded, pad_id, device, share_prefix=True):
    """2B rows (the B chosen answers, then the B rejected ones) as [shared prefix | prompt rest | answer]: the prefix
    common to all prompts once (batch 1, its KV cache reused by every row), the rest of each prompt left-padded to P,
    the answer right-padded to A, so every answer starts at column P and the loss needs only the last A+1 logits.
    share_prefix=False: no prefix, every row holds its whole prompt (needed with gradient checkpointing)."""
    S = tqa.shared_prefix_length([p for p, _, _ in encoded]) if share_prefix else 0
    rows = [(p[S:], c) for p, c, _ in encoded] + [(p[S:], r) for p, _, r in encoded]
    P, A = max(len(p) for p, _ in rows), max(len(y) for _, y in rows)
    ids = torch.full((len(rows), P + A), pad_id, dtype=torch.long)  # [2B, P+A]
    mask = torch.zeros_like(ids)
    for i, (p, y) in enumerate(rows):
        ids[i, P - len(p):P + len(y)] = torch.tensor(p + y)
        mask[i, P - len(p):P + len(y)] = 1
    position_ids = S + (mask.cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
    if S:
        mask = torch.cat([torch.ones(len(rows), S, dtype=mask.dtype), mask], 1)  # [2B, S+P+A]: the prefix is seen
    return {"prefix": torch.tensor([encoded[0][0][:S]], device=device) if S else None,  # [1, S]
            "input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device),
            "targets": ids[:, P:].to(device), "answer_mask": mask[:, S + P:].to(device)}  # targets: [2B, A]


def answer_logps(model, batch, logp):
    """log pi(y|x) of every row [2B]: sum or mean of the answer tokens' log-probs. The shared prefix runs once and
    its KV cache, expanded to the 2B rows, stays in the graph: the edit acts on it and the gradient flows through it."""
    A, cache = batch["targets"].shape[1], None
    if batch["prefix"] is not None:
        cache = model(input_ids=batch["prefix"], use_cache=True, logits_to_keep=1).cache
        cache.batch_repeat_interleave(batch["input_ids"].shape[0])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], cache=cache, use_cache=cache is not None,
                   logits_to_keep=A + 1).logits[:, :A]  # [2B, A, V]
    token_logps = logits.float().log_softmax(-1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)  # [2B, A]
    total = (token_logps * batch["answer_mask"]).sum(1)
    return total if logp == "sum" else total / batch["answer_mask"].sum(1)


def shares_prefix(args):
    return not (args.no_shared_prefix or args.grad_checkpointing)  # transformers turns the cache off when checkpointing


def batches(encoded, batch_size, order=None):
    order = range(len(encoded)) if order is None else order.tolist()
    order = list(order)
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


# ---- Reference log-probs pi0: once per (model, data, prompt, logp), edit off, cached in memory and on disk.

def reference_key(args, model, pairs):
    text = json.dumps([args.model, args.dtype, heads.fingerprint(model), args.instruction, args.logp,
                       [(p["question"], p["chosen"], p["rejected"]) for p in pairs]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def reference_logps(model, encoded, pad_id, args, key, cache_dir, what):
    """(chosen, rejected) log pi0, each [N]; read from cache_dir/ipo-reference-KEY.safetensors when there."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(cache_dir, f"ipo-reference-{key}.safetensors")
    if os.path.isfile(path):
        ref = load_file(path)
        return ref["chosen"], ref["rejected"]
    device = heads.out_projections(model)[0].weight.device
    chosen, rejected = [], []
    for idx in tqdm(list(batches(encoded, args.eval_batch_size)), desc=f"reference log-probs ({what})"):
        lp = answer_logps(model, collate([encoded[i] for i in idx], pad_id, device, shares_prefix(args)), args.logp).cpu()
        chosen.append(lp[:len(idx)])
        rejected.append(lp[len(idx):])
    ref = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
    about = {"model": args.model, "data": str(args.data), "seed": str(args.seed), "instruction": args.instruction,
             "logp": args.logp, "n_pairs": str(len(encoded)), "what": what}
    runfiles.write_atomic(path, lambda tmp: save_file(ref, tmp, metadata=about))
    return ref["chosen"], ref["rejected"]


# ---- The edit, one training step, validation.

def make_edit(geo, head_list, param, seed, device):
    """b = 0 (or offset = 0): the edited model starts equal to the reference. a: peft's LoRA-A init, seeded."""
    mask = heads.heads_to_mask(head_list, geo)
    hd = geo.n_heads * geo.head_dim
    if param == "offset":
        edit = heads.Edit(geo, mask, offset=torch.zeros(geo.n_layers, geo.n_heads, geo.head_dim))
    else:
        bound = 1 / math.sqrt(hd)  # kaiming_uniform(a=sqrt(5)) on a [1, H*D] LoRA A
        a = (torch.rand(geo.n_layers, hd, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * bound  # [L, H*D]
        edit = heads.Edit(geo, mask, a=a, b=torch.zeros(geo.n_layers, hd))
    return edit.to(device)


def pair_losses(model, batch, ref_chosen, ref_rejected, tau, logp):
    """IPO loss and margin h of each pair [B] (one forward over the 2B rows), under whatever edit is on."""
    policy = answer_logps(model, batch, logp)  # [2B]
    B = len(ref_chosen)
    h = (policy[:B] - ref_chosen) - (policy[B:] - ref_rejected)
    return ipo_loss(policy[:B] - ref_chosen, policy[B:] - ref_rejected, tau), h


def train_step(model, edit, batch, ref_chosen, ref_rejected, tau, logp, optimizer, scheduler):
    """One IPO step: one forward+backward of the 2B-row batch; returns (loss, mean margin) as floats.
    The backward runs inside the edit too: gradient checkpointing recomputes the forward there."""
    with heads.edited(model, edit):
        loss, h = pair_losses(model, batch, ref_chosen, ref_rejected, tau, logp)
        loss = loss.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item(), h.mean().item()


@torch.no_grad()
def validate(model, edit, encoded, ref, pad_id, tau, args, device):
    """Mean IPO loss and margin over the validation pairs."""
    losses, margins = [], []
    for idx in batches(encoded, args.eval_batch_size):
        with heads.edited(model, edit):
            loss, h = pair_losses(model, collate([encoded[i] for i in idx], pad_id, device, shares_prefix(args)),
                                  ref[0][idx].to(device), ref[1][idx].to(device), tau, args.logp)
        losses.append(loss.cpu())
        margins.append(h.cpu())
    return float(torch.cat(losses).mean()), float(torch.cat(margins).mean())


def out_path(out, tau, head_spec, n_taus):
    if "{tau}" in out:
        return out.format(tau=tau)
    if out.endswith("/") or os.path.isdir(out):
        return os.path.join(out, f"ipo-{heads.spec_name(head_spec)}-t{tau}.safetensors")
    if n_taus > 1:
        raise SystemExit(f"--out {out} names one file but --tau has {n_taus} values: pass a folder (ending in /) or a "
                         "pattern with {tau}, e.g. RUN/edits/ipo-top16-t{tau}.safetensors")
    return out


def train_one_tau(model, head_list, tau, data, args, path, meta):
    """Train the edit for one tau and write it (and its log); no file if the loss turns NaN or infinite."""
    train_enc, train_ref, val_enc, val_ref, pad_id = data
    device = heads.out_projections(model)[0].weight.device
    edit = make_edit(heads.geometry(model), head_list, args.param, args.seed, device)
    optimizer = torch.optim.AdamW(edit.parameters(), lr=meta["lr"], weight_decay=args.weight_decay)
    from transformers import get_cosine_schedule_with_warmup
    n_steps = args.epochs * math.ceil(len(train_enc) / args.batch_size)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup * n_steps), n_steps)
    log = {"tau": tau, "steps": [], "epochs": []}
    if val_enc:
        log["epochs"].append(dict(zip(("epoch", "val_loss", "val_margin"), (0, *validate(
            model, edit, val_enc, val_ref, pad_id, tau, args, device)))))
    bar = tqdm(total=n_steps, desc=f"IPO tau={tau}")
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_enc), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        losses, margins = [], []
        for idx in batches(train_enc, args.batch_size, order):
            batch = collate([train_enc[i] for i in idx], pad_id, device, shares_prefix(args))
            try:
                loss, margin = train_step(model, edit, batch, train_ref[0][idx].to(device), train_ref[1][idx].to(device),
                                          tau, args.logp, optimizer, scheduler)
            except FloatingPointError as e:
                raise SystemExit(f"the IPO loss became {e} at step {len(log['steps']) + 1} (tau={tau}); no edit was "
                                 f"written for it: lower --lr (now {meta['lr']}) or use --dtype float32") from None
            losses.append(loss)
            margins.append(margin)
            log["steps"].append({"loss": loss, "margin": margin, "lr": scheduler.get_last_lr()[0]})
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", margin=f"{margin:.3f}")
        row = {"epoch": epoch, "train_loss": sum(losses) / len(losses), "train_margin": sum(margins) / len(margins)}
        if val_enc:
            row["val_loss"], row["val_margin"] = validate(model, edit, val_enc, val_ref, pad_id, tau, args, device)
        log["epochs"].append(row)
        tqdm.write(json.dumps(row))
    bar.close()
    edit.meta.update(meta, tau=tau, final=log["epochs"][-1])
    heads.save_edit(path, edit)
    runfiles.write_json(path.removesuffix(".safetensors") + ".log.json", dict(log, edit=path, meta=edit.meta))
    return log


def bench(model, edit, train_enc, pad_id, args, device):
    """Median seconds per training step (shared prefix, and whole prompts) vs one forward+backward of the frozen model
    on the same whole-prompt batch (the gradient reaching the input embeddings: a full backward, no weight grads)."""
    optimizer = torch.optim.AdamW(edit.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    groups = [[train_enc[i] for i in idx] for idx in list(batches(train_enc, args.batch_size))[:args.bench + 1]]
    zeros = torch.zeros(args.batch_size, device=device)

    def frozen(pairs):
        batch = collate(pairs, pad_id, device, share_prefix=False)
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
        A = batch["targets"].shape[1]
        logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                       logits_to_keep=A + 1, use_cache=False).logits[:, :A]
        logits.float().log_softmax(-1).gather(-1, batch["targets"].unsqueeze(-1)).sum().backward()

    def step(share):
        def run(pairs):
            batch = collate(pairs, pad_id, device, share)
            train_step(model, edit, batch, zeros[:len(pairs)], zeros[:len(pairs)], 0.3, args.logp, optimizer, scheduler)
        return run

    def timed(fn, pairs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(pairs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    runs = {"frozen_fwd_bwd": frozen, "ipo_step_whole_prompts": step(False), "ipo_step_shared_prefix": step(True)}
    times = {name: [] for name in runs}
    for i, pairs in enumerate(groups):  # interleaved, so a busy machine slows all three alike; the first is warm-up
        for name, fn in runs.items():
            t = timed(fn, pairs)
            if i:
                times[name].append(t)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {"seconds_per_step": median, "ratio_whole_prompts": median["ipo_step_whole_prompts"] / median["frozen_fwd_bwd"],
            "ratio_shared_prefix": median["ipo_step_shared_prefix"] / median["frozen_fwd_bwd"], "steps": len(groups) - 1,
            "threads": torch.get_num_threads(), "device": str(device), "batch_size": args.batch_size,
            "heads": args.heads, "param": args.param, "model": args.model}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.epochs < 1 or args.eval_batch_size < 1:
        raise SystemExit("--batch-size, --eval-batch-size and --epochs must be at least 1")
    if any(t <= 0 for t in args.tau):
        raise SystemExit(f"--tau {args.tau}: every tau must be positive (the paper uses 0.1 to 0.5)")
    paths = [out_path(args.out, tau, args.heads, len(args.tau)) for tau in args.tau]
    todo = [(tau, p) for tau, p in zip(args.tau, paths) if not os.path.exists(p)]
    for tau, p in zip(args.tau, paths):
        if os.path.exists(p) and not args.bench:
            print(f"tau={tau}: {p} exists, skipped (delete it to retrain)")
    if not todo and not args.bench:
        return
    model, tokenizer, about = models.load_model(args.model, args.dtype, args.device)
    geo = heads.geometry(model)
    head_list = heads.parse_heads(args.heads, geo, args.probe)
    device = heads.out_projections(model)[0].weight.device
    if args.grad_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the new name of gradient_checkpointing_enable
        if enable:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in train mode; dropout stays off, as for the reference
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    questions = tqa.load_truthfulqa(args.data)
    split = tqa.split_questions(questions, args.seed)
    train_pairs = select_pairs([questions[i] for i in split["train"]], args.max_pairs, args.seed)
    val_pairs = select_pairs([questions[i] for i in split["val"]], args.max_val_pairs, args.seed) \
        if args.max_val_pairs else []
    if not train_pairs:
        raise SystemExit(f"no training pairs: the train split of --data {args.data} has no question with answers")
    train_enc = encode_pairs(tokenizer, train_pairs, args.instruction)
    val_enc = encode_pairs(tokenizer, val_pairs, args.instruction)
    pad_id = tokenizer.pad_token_id
    if args.bench:
        edit = make_edit(geo, head_list, args.param, args.seed, device)
        print(json.dumps(bench(model, edit, train_enc, pad_id, args, device)))
        return
    cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(paths[0])), "cache")
    train_ref = reference_logps(model, train_enc, pad_id, args, reference_key(args, model, train_pairs), cache_dir,
                                "train")
    val_ref = reference_logps(model, val_enc, pad_id, args, reference_key(args, model, val_pairs), cache_dir, "val") \
        if val_enc else None
    meta = {"model": args.model, "fingerprint": heads.fingerprint(model), "method": "ipo", "head_spec": args.heads,
            "apply": "all", "seed": args.seed, "param": args.param,
            "lr": args.lr or args.lr_scale * default_lr(len(head_list)), "epochs": args.epochs,
            "batch_size": args.batch_size, "logp": args.logp, "n_pairs": len(train_pairs), "n_val_pairs": len(val_pairs),
            "instruction": args.instruction, "warmup": args.warmup, "model_note": about["note"],
            "run": runfiles.run_info(args)}
    for tau, path in todo:
        train_one_tau(model, head_list, tau, (train_enc, train_ref, val_enc, val_ref, pad_id), args, path, meta)
        print(f"tau={tau}: wrote {path}")


if __name__ == "__main__":
    main()
