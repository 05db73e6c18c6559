"""iti.py - the heuristic edit: Inference-Time Intervention's vector at a set of heads, from a probe run.

For each chosen head, the edit adds alpha * sigma_h^l * u_h^l to the head's output o_h^l, where u is the head's unit
direction (mass-mean shift by default, or the probe weight vector, or a random Gaussian direction) and sigma the
std of the train+val probe activations projected on it, both from probe.py. Heads elsewhere are untouched. Random head
sets (random:K:SEED) take their vectors from the same probe statistics, as the paper does. The model is not loaded:
its geometry and weight fingerprint come from probe.json, and loading the edit (heads.load_edit) checks them.
The edit applies by ITI's convention (meta apply="iti"): in generation from the last prompt token on, in
multiple-choice scoring on the answer tokens, on CE/KL text at every token; evaluate.py follows it.
--ablate writes the necessity trial's edit instead (method.md section 5): the chosen heads' outputs replaced by their
mean over the probe's train+val inputs, o_h^l <- mean_h^l (probe.safetensors 'mean'), at every token (apply "all").

Reads:  RUN/probe/probe.json and probe.safetensors (written by probe.py).
Writes: one edit file (heads.save_edit: safetensors + provenance) per --alpha. --out names it; '{alpha}' in --out is
        replaced by each alpha (needed when there are several); by default RUN/edits/iti-{heads}[-{direction}]-a{alpha}
        .safetensors beside the probe folder, e.g. runs/smollm2/edits/iti-top16-a15.safetensors; with --ablate one
        file, by default RUN/edits/ablate-{heads}.safetensors.

    python iti.py --probe runs/smollm2/probe --heads top:16 --alpha 5 10 15 20 \
        --out runs/smollm2/edits/iti-top16-a{alpha}.safetensors
    python iti.py --probe runs/smollm2/probe --heads top:16 --ablate
"""
import argparse
import json
import math
import os

import torch

import heads
import models
import runfiles

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--probe", required=True, help="probe run folder written by probe.py, e.g. runs/smollm2/probe")
parser.add_argument("--heads", default="top:16",
                    help="heads to edit: top:K (probe ranking), random:K:SEED, single:L.H, all, or L.H,L.H,...")
parser.add_argument("--alpha", type=float, nargs="+", default=None,
                    help="edit strength(s) in units of sigma (default: ITI's 15); several write one edit each")
parser.add_argument("--direction", default="mass_mean", choices=["mass_mean", "probe", "random"],
                    help="u: mass-mean shift (ITI's best), the probe's weight vector, or a random Gaussian direction")
parser.add_argument("--out", default=None,
                    help="edit file; '{alpha}' is replaced by each alpha (default: RUN/edits/iti-{heads}-a{alpha}"
                         ".safetensors beside the probe folder)")
parser.add_argument("--ablate", action="store_true",
                    help="write a mean-ablation edit instead: the chosen heads' outputs replaced by their mean over the "
                         "probe's train+val inputs, at every token (the necessity trial); takes no --alpha")


def read_probe(folder):
    """(probe.json as a dict, probe.safetensors as a dict of tensors), checked: the model and weight fingerprint
    named (heads.load_edit checks them against the model the edit is used with), shapes as its geometry, every
    number finite."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "probe.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--probe {folder}: no probe.json there; run probe.py --out {folder} first")
    with open(path) as f:
        meta = json.load(f)
    if not meta.get("model") or not meta.get("fingerprint") or "geometry" not in meta:
        raise SystemExit(f"{path} does not name its model, weight fingerprint and geometry: it was not written by "
                         f"probe.py; run probe.py --out {folder}")
    stats = load_file(os.path.join(folder, "probe.safetensors"))
    geo = heads.Geometry(**meta["geometry"])
    for name, tensor in stats.items():
        if tuple(tensor.shape[:2]) != (geo.n_layers, geo.n_heads) or not torch.isfinite(tensor).all():
            raise SystemExit(f"{folder}/probe.safetensors: {name} has shape {list(tensor.shape)} or non-finite "
                             f"values, where probe.json says {geo}: run probe.py --out {folder} again")
    return meta, stats


def iti_offset(direction, sigma, head_mask, alpha):
    """ITI's edit vectors: alpha * sigma_h^l * u_h^l at the chosen heads, zero elsewhere.
    direction [L, H, D] unit vectors, sigma [L, H], head_mask [L, H] bool -> offset [L, H, D]."""
    return alpha * sigma[..., None] * direction * head_mask[..., None].to(direction.dtype)


def out_paths(args):
    if args.ablate:
        return [args.out or os.path.join(os.path.dirname(os.path.abspath(args.probe.rstrip("/"))), "edits",
                                         f"ablate-{heads.spec_name(args.heads)}.safetensors")]
    template = args.out or os.path.join(os.path.dirname(os.path.abspath(args.probe.rstrip("/"))), "edits",
                                        f"iti-{heads.spec_name(args.heads)}"
                                        f"{'' if args.direction == 'mass_mean' else '-' + args.direction}"
                                        "-a{alpha}.safetensors")
    if len(args.alpha) > 1 and "{alpha}" not in template:
        raise SystemExit(f"--out {template} names one file for {len(args.alpha)} alphas: put '{{alpha}}' in it, "
                         "e.g. --out RUN/edits/iti-top16-a{alpha}.safetensors")
    paths = [template.replace("{alpha}", f"{alpha:g}") for alpha in args.alpha]
    if len(set(paths)) != len(paths):
        raise SystemExit(f"--alpha {' '.join(f'{a:g}' for a in args.alpha)} repeats a value")
    return paths


def check_args(args):
    if args.ablate and args.alpha is not None:
        raise SystemExit("--ablate replaces the heads' outputs by their mean: it takes no --alpha (drop it, or drop "
                         "--ablate for ITI's edit)")
    args.alpha = args.alpha or [15.0]
    bad = [a for a in args.alpha if not math.isfinite(a)]
    if bad:
        raise SystemExit(f"--alpha {' '.join(map(str, bad))}: every alpha must be a finite number (ITI: 15; the "
                         "paper sweeps about 0-20)")


def provenance(args, meta, chosen):
    return {"model": meta["model"], "fingerprint": meta["fingerprint"], "head_spec": args.heads, "seed": meta["seed"],
            "k": len(chosen), "probe": os.path.abspath(args.probe), "prompt_format": meta.get("prompt_format"),
            "run": runfiles.run_info(args)}


def write_ablation(args, meta, stats, chosen, head_mask, path):
    """The necessity trial's edit: o_h^l <- mean_h^l at the chosen heads, every token (heads.Edit's ablate)."""
    if "mean" not in stats:
        raise SystemExit(f"{args.probe}/probe.safetensors has no 'mean' (it predates mean-ablation): run probe.py "
                         f"--out {args.probe} again (its cached activations are reused)")
    mean = stats["mean"] * head_mask[..., None].to(stats["mean"].dtype)  # [L, H, D], zero at heads not ablated
    edit = heads.Edit(heads.Geometry(**meta["geometry"]), head_mask, ablate=mean,
                      meta=dict(provenance(args, meta, chosen), method="ablate", apply="all"))
    heads.save_edit(path, edit)
    print(f"wrote {path}: mean-ablation of {len(chosen)} heads ({args.heads}), at every token")


def main(argv=None):
    args = parser.parse_args(argv)
    check_args(args)
    paths = out_paths(args)
    for path in paths:
        runfiles.check_writable(path)
    meta, stats = read_probe(args.probe)
    geo = heads.Geometry(**meta["geometry"])
    chosen = heads.parse_heads(args.heads, geo, probe=args.probe)
    head_mask = heads.heads_to_mask(chosen, geo)  # [L, H]
    if args.ablate:
        return write_ablation(args, meta, stats, chosen, head_mask, paths[0])
    direction, sigma = stats[f"direction_{args.direction}"], stats[f"sigma_{args.direction}"]  # [L, H, D], [L, H]
    for alpha, path in zip(args.alpha, paths):
        edit = heads.Edit(geo, head_mask, offset=iti_offset(direction, sigma, head_mask, alpha), meta=dict(
            provenance(args, meta, chosen), method="iti", apply="iti", alpha=alpha, direction=args.direction))
        heads.save_edit(path, edit)
        print(f"wrote {path}: ITI at {len(chosen)} heads ({args.heads}), alpha {alpha:g}, {args.direction} direction")


if __name__ == "__main__":
    main()
