"""ipo_files.py - the files of an IPO run beside its training (ipo_edit.py): what they are called, what decides
whether earlier work may be reused, and the checkpoint a killed run resumes from.

  out_path, paths_of     --out (a file, a pattern with {tau}, or a folder) -> each tau's edit, NAME.log.json, NAME.ckpt
  settings_of            everything a trained edit depends on, stored in its meta (and in its checkpoint)
  reference_key          what the cached reference log-probs depend on (their file name in the cache folder)
  existing_edit          skip a tau whose edit exists with these settings; train it again (saying why) otherwise
  save_checkpoint, load_checkpoint   edit + optimizer + schedule + log; a checkpoint of other settings is ignored
  check_probe            a --probe made on another model is refused before training
"""
import hashlib
import json
import os

import torch

import heads
import runfiles
import tqa


# ---- Names: --out -> one edit file per tau, and the log and checkpoint beside it

def out_path(out, tau, head_spec, n_taus):
    if "{tau}" in out:
        return out.format(tau=tau)
    if out.endswith("/") or os.path.isdir(out):
        return os.path.join(out, f"ipo-{heads.spec_name(head_spec)}-t{tau}.safetensors")
    if n_taus > 1:
        raise SystemExit(f"--out {out} names one file but --tau has {n_taus} values: pass a folder (ending in /) or a "
                         "pattern with {tau}, e.g. RUN/edits/ipo-top16-t{tau}.safetensors")
    return out


def paths_of(path):
    """(edit, log, checkpoint) file names of one edit."""
    stem = path.removesuffix(".safetensors")
    return path, stem + ".log.json", stem + ".ckpt"


# ---- Keys: what a trained edit and the cached reference log-probs depend on

def settings_of(args, head_list, tau, lr, n_pairs, n_val_pairs):
    """Everything the trained edit depends on, saved in its meta: an edit (or checkpoint) made with other settings is
    not reused. (Validation, checkpoint and batching options change no weight, so they are not part of it.)"""
    return {"model": args.model, "dtype": args.dtype, "data": tqa.data_version(args.data),
            "seed": args.seed, "heads": heads.format_heads(head_list), "param": args.param, "tau": tau,
            "logp": args.logp, "instruction": args.instruction, "n_pairs": n_pairs, "n_val_pairs": n_val_pairs,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr, "warmup": args.warmup,
            "weight_decay": args.weight_decay}


def reference_key(args, model, pairs):
    text = json.dumps([args.model, args.dtype, heads.fingerprint(model), args.instruction, args.logp,
                       [(p["question"], p["chosen"], p["rejected"]) for p in pairs]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- Reuse and resume

def existing_edit(path, settings):
    """True when `path` holds an edit made with `settings`; False, with a line saying why, when it holds one made
    otherwise (or unreadable); None when there is none."""
    from safetensors import safe_open
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["edit"])
    except Exception:
        meta = {}
    old = meta.get("settings") or {}
    changed = [k for k in settings if old.get(k) != settings[k]]
    if changed:
        what = ("it records none" if not old else ", ".join(f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in changed
                                                             if k != "data") or "other --data")
        print(f"tau={settings['tau']}: {path} was trained with other settings ({what}): training it again")
        return False
    print(f"tau={settings['tau']}: {path} exists with these settings, skipped (delete it to retrain)")
    return True


def save_checkpoint(path, settings, step, edit, optimizer, scheduler, log):
    runfiles.write_atomic(path, lambda tmp: torch.save({
        "settings": json.dumps(settings), "step": step, "edit": edit.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "log": json.dumps(log)}, tmp))


def load_checkpoint(path, settings, edit, optimizer, scheduler):
    """(step, log) of the checkpoint at `path` made with `settings`, restored into edit, optimizer and scheduler;
    (0, None) when there is none (or it was made with other settings, or is unreadable: it is then ignored)."""
    if not os.path.exists(path):
        return 0, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: a file never runs code
    except Exception as e:
        print(f"{path} cannot be read ({type(e).__name__}): training from step 0")
        return 0, None
    if json.loads(state["settings"]) != settings:
        print(f"{path} was made with other settings: training from step 0")
        return 0, None
    edit.load_state_dict(state["edit"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    print(f"resuming tau={settings['tau']} from {path} at step {state['step']}")
    return state["step"], json.loads(state["log"])


# ---- The probe an IPO run reads (--heads top:K)

def check_probe(args, model):
    """A --probe made on another model (or other weights) would rank another model's heads: refuse it, as
    heads.load_edit refuses an edit fitted on other weights."""
    if args.probe is None or not args.heads.startswith("top:"):
        return
    path = args.probe if args.probe.endswith(".json") else os.path.join(args.probe, "probe.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--probe {args.probe}: no probe.json there; run probe.py --out {args.probe} first")
    with open(path) as f:
        made = json.load(f)
    if made.get("fingerprint") is None or not torch.allclose(
            torch.tensor(made["fingerprint"]), torch.tensor(heads.fingerprint(model)), rtol=2e-2, atol=1e-3):
        raise SystemExit(f"--probe {args.probe} was made on {made.get('model')}, whose weights differ from this "
                         f"model's ({args.model}): run probe.py --model {args.model} and pass its folder")
