"""iti.py - the heuristic edit: Inference-Time Intervention's vector at a set of heads, from a probe run.

For each chosen head, the edit adds alpha * sigma_h^l * u_h^l to the head's output o_h^l, where u is the head's unit
direction (mass-mean shift by default, or the probe weight vector, or a random Gaussian direction) and sigma the
std of the train+val probe activations projected on it, both from probe.py. Heads elsewhere are untouched. Random head
sets (random:K:SEED) take their vectors from the same probe statistics, as the paper does. The model is not loaded:
its geometry and weight fingerprint come from probe.json, and loading the edit (heads.load_edit) checks them.
The edit applies by ITI's convention (meta apply="iti"): in generation from the last prompt token on, in
multiple-choice scoring on the answer tokens, on CE/KL text at every token; evaluate.py follows it.

Reads:  RUN/probe/probe.json and probe.safetensors (written by probe.py).
Writes: one edit file (heads.save_edit: safetensors + provenance) per --alpha. --out names it; '{alpha}' in --out is
        replaced by each alpha (needed when there are several); by default RUN/edits/iti-{heads}[-{direction}]-a{alpha}
        .safetensors beside the probe folder, e.g. runs/smollm2/edits/iti-top16-a15.safetensors.

    python iti.py --probe runs/smollm2/probe --heads top:16 --alpha 5 10 15 20 \
        --out runs/smollm2/edits/iti-top16-a{alpha}.safetensors
"""
import argparse
import json
import os

import torch

import heads
import models
import runfiles

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--probe", required=True, help="probe run folder written by probe.py, e.g. runs/smollm2/probe")
parser.add_argument("--heads", default="top:16",
                    help="heads to edit: top:K (probe ranking), random:K:SEED, single:L.H, all, or L.H,L.H,...")
parser.add_argument("--alpha", type=float, nargs="+", default=[15.0],
                    help="edit strength(s) in units of sigma (ITI's default 15); several write one edit each")
parser.add_argument("--direction", default="mass_mean", choices=["mass_mean", "probe", "random"],
                    help="u: mass-mean shift (ITI's best), the probe's weight vector, or a random Gaussian direction")
parser.add_argument("--out", default=None,
                    help="edit file; '{alpha}' is replaced by each alpha (default: RUN/edits/iti-{heads}-a{alpha}"
                         ".safetensors beside the probe folder)")


def read_probe(folder):
    """(probe.json as a dict, probe.safetensors as a dict of tensors)."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "probe.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--probe {folder}: no probe.json there; run probe.py --out {folder} first")
    with open(path) as f:
        meta = json.load(f)
    return meta, load_file(os.path.join(folder, "probe.safetensors"))


def iti_offset(direction, sigma, head_mask, alpha):
    """ITI's edit vectors: alpha * sigma_h^l * u_h^l at the chosen heads, zero elsewhere.
    direction [L, H, D] unit vectors, sigma [L, H], head_mask [L, H] bool -> offset [L, H, D]."""
    return alpha * sigma[..., None] * direction * head_mask[..., None].to(direction.dtype)


def out_paths(args):
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


def main(argv=None):
    args = parser.parse_args(argv)
    paths = out_paths(args)
    meta, stats = read_probe(args.probe)
    geo = heads.Geometry(**meta["geometry"])
    chosen = heads.parse_heads(args.heads, geo, probe=args.probe)
    head_mask = heads.heads_to_mask(chosen, geo)  # [L, H]
    direction, sigma = stats[f"direction_{args.direction}"], stats[f"sigma_{args.direction}"]  # [L, H, D], [L, H]
    for alpha, path in zip(args.alpha, paths):
        edit = heads.Edit(geo, head_mask, offset=iti_offset(direction, sigma, head_mask, alpha), meta={
            "model": meta["model"], "fingerprint": meta["fingerprint"], "method": "iti", "head_spec": args.heads,
            "apply": "iti", "seed": meta["seed"], "alpha": alpha, "direction": args.direction, "k": len(chosen),
            "probe": os.path.abspath(args.probe), "prompt_format": meta.get("prompt_format"),
            "run": runfiles.run_info(args)})
        heads.save_edit(path, edit)
        print(f"wrote {path}: ITI at {len(chosen)} heads ({args.heads}), alpha {alpha:g}, {args.direction} direction")


if __name__ == "__main__":
    main()
