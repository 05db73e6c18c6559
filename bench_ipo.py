"""bench_ipo.py - bench.py's IPO rows: one training step of ipo_edit.py against the reference ways of doing it.

  5. IPO step        ipo_edit's step (reference log-probs pi0 cached once) vs a step that recomputes pi0 (TRL without
                     precomputed log-probs), and vs a plain forward+backward of the frozen model (the floor)
  8. IPO step, fast  the same step at the fast precision (--fast-dtype) vs float32: time and gradient agreement
Run them with bench.py (--stages 5,8); the timer and the row format are bench_kit.py's.
"""
import tempfile

import torch

import heads
import ipo_edit
import ipo_files
import ipo_pairs
from bench_kit import fast_row, load_questions, median_time, overhead_row


# ---- 5. IPO step: cached pi0 (ipo_edit) vs pi0 recomputed every step (TRL without precomputed reference log-probs)

def ipo_work(model, tok, args, device, folder):
    """A training batch of --pairs pairs and a moved edit (b = 0 would make the edited model the reference):
    (ipo_edit's arguments, the pairs, their token ids, the edit, its head spec, the batch of the first --pairs)."""
    geo = heads.geometry(model)
    spec = f"random:{min(args.k, geo.n_layers * geo.n_heads)}:0"
    questions = load_questions(args)
    ipo_args = ipo_edit.build_parser().parse_args([  # ipo_edit's defaults: tau 0.3, mean log-prob, lora1
        "--model", args.model, "--data", args.data, "--device", device, "--heads", spec, "--batch-size", str(args.pairs),
        "--out", folder])
    pairs = ipo_pairs.select_pairs(questions, 2 * args.pairs, ipo_args.seed)  # a seeded subsample, then shuffled
    pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1))]
    if len(pairs) < args.pairs:
        raise SystemExit(f"the IPO rows need --pairs {args.pairs} preference pairs; {args.n_questions} questions give "
                         f"{len(pairs)}: pass more --n-questions")
    encoded = ipo_pairs.encode_pairs(tok, pairs, ipo_args.instruction)
    edit = ipo_edit.make_edit(geo, heads.parse_heads(spec, geo), ipo_args.param, ipo_args.seed, device)
    with torch.no_grad():
        edit.b.copy_(0.1 * torch.randn(edit.b.shape, generator=torch.Generator().manual_seed(2)))
    batch = ipo_pairs.collate(encoded[:args.pairs], tok.pad_token_id, device, ipo_pairs.shares_prefix(ipo_args))
    return ipo_args, pairs, encoded, edit, spec, batch


def ipo_loss_and_grads(model, edit, batch, chosen, rejected, args):
    """[B + 2*L*H*D]: the IPO loss of each pair, then the gradients of a and b."""
    edit.zero_grad()
    with heads.edited(model, edit):
        loss = ipo_edit.pair_losses(model, batch, chosen, rejected, args.tau[0], args.logp)[0]  # [B]
        loss.mean().backward()
    return torch.cat([loss.detach(), edit.a.grad.flatten(), edit.b.grad.flatten()])


def ipo_stepper(model, edit, batch, args, reference):
    """One training step of ipo_edit on `batch`, its reference log-probs from reference() ([B], [B])."""
    optimizer = torch.optim.AdamW(edit.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return lambda: ipo_edit.train_step(model, edit, batch, *reference(), args.tau[0], args.logp, optimizer, scheduler)


def row_ipo_step(model, tok, args, device):
    with tempfile.TemporaryDirectory() as folder:
        ipo_args, pairs, encoded, edit, spec, batch = ipo_work(model, tok, args, device, folder)
        # the cache, made the way ipo_edit makes it: eval batches of 8 pairs, not the training batch of --pairs
        cached = ipo_edit.reference_logps(model, encoded, ipo_pairs.Batcher(tok.pad_token_id, device), ipo_args,
                                          ipo_files.reference_key(ipo_args, model, pairs), folder, "bench")
    B, logp = args.pairs, ipo_args.logp
    ref_chosen, ref_rejected = cached[0][:B].to(device), cached[1][:B].to(device)  # [B] each

    def recomputed_reference():
        with torch.no_grad():  # the edit is off outside heads.edited
            lp = ipo_edit.answer_logps(model, batch, logp)  # [2B]
        return lp[:B], lp[B:]

    def frozen():  # the same forward+backward without the edit: the gradient reaches the input embeddings
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
        try:
            ipo_edit.answer_logps(model, batch, logp).sum().backward()
        finally:
            hook.remove()

    got = ipo_loss_and_grads(model, edit, batch, ref_chosen, ref_rejected, ipo_args)
    want = ipo_loss_and_grads(model, edit, batch, *recomputed_reference(), ipo_args)
    match = torch.allclose(got, want, rtol=1e-3, atol=1e-6)
    ours = ipo_stepper(model, edit, batch, ipo_args, lambda: (ref_chosen, ref_rejected))
    trl_style = ipo_stepper(model, edit, batch, ipo_args, recomputed_reference)
    t_ours, t_trl, t_frozen = (median_time(f, args.repeats, device)[0] for f in (ours, trl_style, frozen))
    return overhead_row("5 IPO step", t_ours, t_trl, t_frozen, "ours/frozen fwd+bwd", 1.1, match,
                        f"frozen fwd+bwd {t_frozen:.4f} s; reference (pi0 recomputed) {t_trl / t_ours:.2f}x ours; "
                        f"{B} pairs, {spec} heads, shared prefix {ipo_pairs.shares_prefix(ipo_args)}; max |diff| of "
                        f"loss and grads {(got - want).abs().max():.1e}")


# ---- 8. The same step at the fast precision vs float32

def row_fast_ipo(model, tok, args, device):
    with tempfile.TemporaryDirectory() as folder:
        ipo_args, pairs, encoded, edit, spec, batch = ipo_work(model, tok, args, device, folder)
    B = args.pairs
    results, times = [], []
    for m in (args.fast_model, model):
        with torch.no_grad():
            ref = ipo_edit.answer_logps(m, batch, ipo_args.logp)  # [2B]: pi0 at this precision
        results.append(ipo_loss_and_grads(m, edit, batch, ref[:B], ref[B:], ipo_args))
        step = ipo_stepper(m, ipo_edit.make_edit(heads.geometry(m), heads.mask_to_heads(edit.head_mask), "lora1", 0,
                                                 device), batch, ipo_args, lambda: (ref[:B], ref[B:]))
        times.append(median_time(step, args.repeats, device)[0])
    (fast, f32), n = results, B
    cosine = torch.nn.functional.cosine_similarity(fast[n:], f32[n:], dim=0).item()
    loss_diff = (fast[:n] - f32[:n]).abs().max().item()
    return fast_row("8 IPO step, fast", times[0], times[1], cosine >= 0.99, "gradient cosine >= 0.99",
                    f"{args.fast_dtype}; {B} pairs, {spec} heads: gradient cosine {cosine:.4f}, max |loss diff| "
                    f"{loss_diff:.2e}")
