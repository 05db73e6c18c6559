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
on disk, and shared by every tau. Validation loss and margin on pairs of the VAL questions are logged every
--val-every steps and at each epoch's end. --dtype mixed is the fast precision (models.bf16_linears: the matrix
products in bf16); the edit, its optimizer state, the log-softmax and the sums of log-probs stay float32.

Reads:  --data (default: the shipped data/TruthfulQA.csv), --model, --probe RUN/probe (for --heads top:K; it must be of this model).
Writes: one edit file per tau (heads.save_edit; meta: method "ipo", apply "all", tau, param, lr, settings, precision),
        a training log beside it (NAME.log.json, written first: a kill between the two loses nothing), a checkpoint
        while training (NAME.ckpt: edit + optimizer, every --checkpoint-every steps; a killed run resumes from it),
        and the reference log-probs in a cache folder (default: cache/ in the folder of --out). --out is a file (one
        tau), a pattern with {tau}, or a folder (file names ipo-{heads}-t{tau}.safetensors). A tau whose edit exists
        with the same settings is skipped; one trained with other settings is trained again, with a line saying why.
Beside it: ipo_pairs.py turns pairs into token ids and padded batches; ipo_files.py names the files, decides which
        edit or checkpoint may be reused (the settings key), saves and loads checkpoints and checks --probe.

Example:
  python ipo_edit.py --heads top:16 --probe runs/smollm2/probe --tau 0.1 0.3 0.5 \
      --max-pairs 200 --out runs/smollm2/edits/
"""
import argparse
import json
import math
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

import heads
import ipo_files
import ipo_pairs
import models
import runfiles
import tqa


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_model_args(p)
    tqa.add_data_args(p)
    p.add_argument("--out", required=True, help="edit file, pattern with {tau}, or folder (ends with / or exists)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    edit = p.add_argument_group("the edit")
    edit.add_argument("--heads", default="top:16", help="heads to edit: top:K (needs --probe), random:K:SEED, "
                      "single:L.H, all, or L.H,L.H")
    edit.add_argument("--probe", default=None, help="probe run folder (probe.json), for --heads top:K")
    edit.add_argument("--param", default="lora1", choices=["lora1", "offset"],
                      help="lora1: masked rank-1 LoRA o += <a,o> b*mask; offset: a learned vector per head")
    loss = p.add_argument_group("the IPO loss and its data")
    loss.add_argument("--tau", type=float, nargs="+", default=[0.3], help="IPO tau, one edit per value (paper: 0.1-0.5)")
    loss.add_argument("--logp", default="mean", choices=["mean", "sum"],
                      help="log pi(y|x): mean over answer tokens (TRL's IPO) or their sum")
    loss.add_argument("--instruction", default="default", choices=list(tqa.INSTRUCTIONS),
                      help="instruction sentence before the QA primer (the prompt evaluate.py scores with)")
    loss.add_argument("--max-pairs", type=int, default=None, help="train on a seeded subsample of this many pairs")
    loss.add_argument("--max-val-pairs", type=int, default=128, help="validate on a seeded subsample (0: no "
                      "validation)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=2, help="passes over the training pairs (paper: 2)")
    train.add_argument("--batch-size", type=int, default=4, help="pairs per step; each step runs 2x this many rows")
    train.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default as the paper: 2e-3 for 1 "
                       "head, 5e-4 for up to 16 heads, 1e-4 for more)")
    train.add_argument("--lr-scale", type=float, default=1.0, help="multiply the default learning rate by this "
                       "(short runs: AdamW moves each weight by about lr per step, and the paper takes ~3,300 steps; a "
                       "course run of ~60 steps needs ~20x to move as far). Ignored with --lr")
    train.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps warming up the cosine schedule")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (TRL's default: 0)")
    train.add_argument("--val-every", type=int, default=16, help="validate every this many steps too (0: at each "
                       "epoch's end only); a validation costs about --max-val-pairs/8 training steps")
    train.add_argument("--checkpoint-every", type=int, default=16, help="save the edit and optimizer every this many "
                       "steps (and at each epoch's end); a killed run resumes there")
    speed = p.add_argument_group("speed")
    speed.add_argument("--eval-batch-size", type=int, default=8, help="pairs per batch for reference and validation")
    speed.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (7B on one "
                       "GPU)")
    speed.add_argument("--no-shared-prefix", action="store_true", help="run every row's whole prompt instead of the "
                       "prompt start common to the batch once (slower, same numbers; implied by --grad-checkpointing)")
    speed.add_argument("--cache-dir", default=None, help="where the reference log-probs are cached (default: cache/ in "
                       "the folder of --out)")
    return p


def no_dropout(model):
    """Dropout probability 0 everywhere, whatever the train/eval mode (in train mode, attention code reads
    `self.attention_dropout` or `attn_dropout.p` itself: GPT-2's sdpa path applies it even with its Dropout in eval)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    for name, value in list(vars(model.config).items()):
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(model.config, name, 0.0)
    return model


def default_lr(n_heads):
    """The paper's learning rates: 2e-3 for a single head, 5e-4 for up to 16 heads, 1e-4 for all heads."""
    return 2e-3 if n_heads == 1 else 5e-4 if n_heads <= 16 else 1e-4


def ipo_loss(logratio_chosen, logratio_rejected, tau):
    """IPO per pair: (h - 1/(2 tau))^2, h = logratio_chosen - logratio_rejected, logratio = log pi - log pi0."""
    return (logratio_chosen - logratio_rejected - 1 / (2 * tau)) ** 2


# ---- log pi(y|x) of a batch of pairs (ipo_pairs.collate makes the batches)

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


# ---- Reference log-probs pi0: once per (model and its dtype, data, prompt, logp), edit off, cached on disk.

@torch.no_grad()
def reference_logps(model, encoded, batcher, args, key, cache_dir, what):
    """(chosen, rejected) log pi0, each [N]; read from cache_dir/ipo-reference-KEY.safetensors when there."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(cache_dir, f"ipo-reference-{key}.safetensors")
    if os.path.isfile(path):
        ref = load_file(path)
        return ref["chosen"], ref["rejected"]
    chosen, rejected = [], []
    for idx in tqdm(list(ipo_pairs.batches(encoded, args.eval_batch_size)), desc=f"reference log-probs ({what})"):
        lp = answer_logps(model, batcher([encoded[i] for i in idx]), args.logp).cpu()
        chosen.append(lp[:len(idx)])
        rejected.append(lp[len(idx):])
    ref = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
    about = {"model": args.model, "data": str(args.data), "seed": str(args.seed), "instruction": args.instruction,
             "logp": args.logp, "n_pairs": str(len(encoded)), "what": what, "dtype": args.dtype}
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
def validate(model, edit, encoded, ref, batcher, tau, args):
    """Mean IPO loss and margin over the validation pairs."""
    losses, margins = [], []
    for idx in ipo_pairs.batches(encoded, args.eval_batch_size):
        with heads.edited(model, edit):
            loss, h = pair_losses(model, batcher([encoded[i] for i in idx]), ref[0][idx].to(batcher.device),
                                  ref[1][idx].to(batcher.device), tau, args.logp)
        losses.append(loss.float().cpu())
        margins.append(h.float().cpu())
    return float(torch.cat(losses).mean()), float(torch.cat(margins).mean())


# ---- Training one tau: checkpointed, resumable, validated every --val-every steps; the log is written before the edit

@dataclass
class PairData:
    """The encoded train and validation pairs, their reference log-probs (chosen [N], rejected [N]), the batcher."""
    train: list
    train_ref: tuple
    val: list
    val_ref: tuple
    batcher: ipo_pairs.Batcher


def validation_row(model, edit, data, tau, args, **where):
    loss, margin = validate(model, edit, data.val, data.val_ref, data.batcher, tau, args)
    return dict(where, val_loss=loss, val_margin=margin)


def train_one_tau(model, head_list, tau, data, args, path, meta):
    """Train the edit for one tau and write its log, then the edit; no file if the loss turns NaN or infinite."""
    device, settings = data.batcher.device, meta["settings"]
    edit = make_edit(heads.geometry(model), head_list, args.param, args.seed, device)
    optimizer = torch.optim.AdamW(edit.parameters(), lr=settings["lr"], weight_decay=args.weight_decay)
    from transformers import get_cosine_schedule_with_warmup
    steps_per_epoch = math.ceil(len(data.train) / args.batch_size)
    n_steps = args.epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup * n_steps), n_steps)
    edit_path, log_path, checkpoint = ipo_files.paths_of(path)
    step, log = ipo_files.load_checkpoint(checkpoint, settings, edit, optimizer, scheduler)
    if log is None:  # "val": every --val-every steps; "epochs": train means per epoch, validation at its end
        log = {"tau": tau, "steps": [], "val": [], "epochs": []}
        if data.val:
            log["val"].append(validation_row(model, edit, data, tau, args, step=0))
            log["epochs"].append(dict(log["val"][0], epoch=0))
    bar = tqdm(total=n_steps, initial=step, desc=f"IPO tau={tau}")
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for i, idx in enumerate(ipo_pairs.batches(data.train, args.batch_size, order)):
            if (epoch - 1) * steps_per_epoch + i < step:
                continue  # done before the checkpoint
            try:
                loss, margin = train_step(model, edit, data.batcher([data.train[j] for j in idx]),
                                          data.train_ref[0][idx].to(device), data.train_ref[1][idx].to(device), tau,
                                          args.logp, optimizer, scheduler)
            except FloatingPointError as e:
                raise SystemExit(f"the IPO loss became {e} at step {step + 1} (tau={tau}); no edit was written for "
                                 f"it: lower --lr (now {settings['lr']}) or use --dtype float32") from None
            step += 1
            log["steps"].append({"step": step, "epoch": epoch, "loss": loss, "margin": margin,
                                 "lr": scheduler.get_last_lr()[0]})
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", margin=f"{margin:.3f}")
            if data.val and args.val_every and step % args.val_every == 0:
                log["val"].append(validation_row(model, edit, data, tau, args, step=step))
            if step % args.checkpoint_every == 0 and step % steps_per_epoch:
                ipo_files.save_checkpoint(checkpoint, settings, step, edit, optimizer, scheduler, log)
        rows = [r for r in log["steps"] if r["epoch"] == epoch]
        row = {"epoch": epoch, "train_loss": sum(r["loss"] for r in rows) / len(rows),
               "train_margin": sum(r["margin"] for r in rows) / len(rows)}
        if data.val:
            row.update(validation_row(model, edit, data, tau, args))
            if not log["val"] or log["val"][-1]["step"] != step:
                log["val"].append({"step": step, "val_loss": row["val_loss"], "val_margin": row["val_margin"]})
        log["epochs"].append(row)
        tqdm.write(json.dumps(row))
        ipo_files.save_checkpoint(checkpoint, settings, step, edit, optimizer, scheduler, log)
    bar.close()
    edit.meta.update(meta, tau=tau, final=log["epochs"][-1])
    runfiles.write_json(log_path, dict(log, edit=edit_path, meta=edit.meta))  # first: the edit's file says "done"
    heads.save_edit(edit_path, edit)
    os.remove(checkpoint)
    return log


def check_args(args):
    if args.batch_size < 1 or args.epochs < 1 or args.eval_batch_size < 1 or args.checkpoint_every < 1:
        raise SystemExit("--batch-size, --eval-batch-size, --epochs and --checkpoint-every must be at least 1")
    bad = [t for t in args.tau if not (math.isfinite(t) and t > 0)]
    if bad:
        raise SystemExit(f"--tau {' '.join(map(str, bad))}: every tau must be a positive finite number (the paper "
                         "uses 0.1 to 0.5; the IPO target margin is 1/(2 tau))")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise SystemExit(f"--max-pairs {args.max_pairs}: must be at least 1 (leave it out to train on every pair)")
    if args.max_val_pairs < 0 or args.val_every < 0:
        raise SystemExit("--max-val-pairs and --val-every must be 0 (none) or more")
    lr = args.lr if args.lr is not None else args.lr_scale
    if not (math.isfinite(lr) and lr > 0):
        raise SystemExit(f"--lr {args.lr} / --lr-scale {args.lr_scale}: the learning rate must be a positive finite "
                         "number")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [ipo_files.out_path(args.out, tau, args.heads, len(args.tau)) for tau in args.tau]
    cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(paths[0])), "cache")
    for path in [p for path in paths for p in ipo_files.paths_of(path)] + [os.path.join(cache_dir, "reference")]:
        runfiles.check_writable(path)  # before the long part, not after it
    model, tokenizer, about = models.load_model(args.model, args.dtype, args.device)
    ipo_files.check_probe(args, model)
    geo = heads.geometry(model)
    head_list = heads.parse_heads(args.heads, geo, args.probe)
    device = heads.out_projections(model)[0].weight.device
    if args.grad_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the new name of gradient_checkpointing_enable
        if enable:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in train mode: switch every dropout off by its probability
        no_dropout(model)
    questions = tqa.load_truthfulqa(args.data)
    split = tqa.split_questions(questions, args.seed)
    train_pairs = ipo_pairs.select_pairs([questions[i] for i in split["train"]], args.max_pairs, args.seed)
    val_pairs = ipo_pairs.select_pairs([questions[i] for i in split["val"]], args.max_val_pairs, args.seed) \
        if args.max_val_pairs else []
    if not train_pairs:
        raise SystemExit(f"no training pairs: the train split of --data {args.data} has no question with answers")
    lr = args.lr or args.lr_scale * default_lr(len(head_list))
    meta = {"model": args.model, "fingerprint": heads.fingerprint(model), "method": "ipo", "head_spec": args.heads,
            "apply": "all", "seed": args.seed, "param": args.param, "lr": lr, "epochs": args.epochs,
            "batch_size": args.batch_size, "logp": args.logp, "n_pairs": len(train_pairs), "n_val_pairs": len(val_pairs),
            "instruction": args.instruction, "warmup": args.warmup,
            "precision": {"dtype": args.dtype, "note": about.get("precision", f"weights and activations in {args.dtype}")},
            "model_note": about["note"], "run": runfiles.run_info(args)}
    todo = []
    for tau, path in zip(args.tau, paths):
        settings = ipo_files.settings_of(args, head_list, tau, lr, len(train_pairs), len(val_pairs))
        if not ipo_files.existing_edit(path, settings):
            todo.append((tau, path, settings))
    if not todo:
        return
    train_enc = ipo_pairs.encode_pairs(tokenizer, train_pairs, args.instruction)
    val_enc = ipo_pairs.encode_pairs(tokenizer, val_pairs, args.instruction)
    batcher = ipo_pairs.Batcher(tokenizer.pad_token_id, device, ipo_pairs.shares_prefix(args))
    train_ref = reference_logps(model, train_enc, batcher, args, ipo_files.reference_key(args, model, train_pairs),
                                cache_dir, "train")
    val_ref = reference_logps(model, val_enc, batcher, args, ipo_files.reference_key(args, model, val_pairs),
                              cache_dir, "val") if val_enc else None
    data = PairData(train_enc, train_ref, val_enc, val_ref, batcher)
    for tau, path, settings in todo:
        train_one_tau(model, head_list, tau, data, args, path, dict(meta, settings=settings))
        print(f"tau={tau}: wrote {path}")


if __name__ == "__main__":
    main()
