"""probe_cache.py - probe.py's head outputs on disk: every head's output o_h^l at each probe input's last token,
collected once (one forward pass per padded batch), saved in resumable parts, then kept as one file that a re-run with
the same arguments reuses and a run with other arguments refuses.

  OUT/activations.partial/   key.json (what the activations depend on) and part-NNNNNNN.safetensors, PART_SIZE inputs
                             each: a killed run resumes at the first missing part
  OUT/activations.safetensors  head_outputs [N, L, H, D] float16, labels, question_ids, is_val; metadata: the key and
                             the model's weight fingerprint (the parts are deleted once it is written)

  cache_key             the model, its dtype, the seed, the prompt format and a hash of every probe input
  read_cache            the cached head outputs and fingerprint, or None; refuses a cache made with another key
  collect_head_outputs  the forward passes (heads.record_heads at the last token), part by part
  write_cache           the one file, then the parts go
"""
import hashlib
import json
import os
import shutil

import torch
from tqdm import tqdm

import heads
import runfiles

CACHE, PARTS = "activations.safetensors", "activations.partial"
PART_SIZE = 256  # probe inputs per resumable part of the activation cache


def cache_key(args, examples):
    """What the cached activations depend on: the model and every probe input (hashed)."""
    digest = hashlib.sha256(json.dumps([(e["text"], e["label"]) for e in examples]).encode()).hexdigest()
    return {"model": args.model, "dtype": args.dtype, "seed": args.seed, "prompt_format": args.prompt_format,
            "max_questions": args.max_questions, "examples_sha256": digest}


def check_key(found, wanted, where, out):
    diff = [k for k in wanted if found.get(k) != wanted[k]]
    if diff:
        was = ", ".join(f"{k}={found.get(k)!r}" for k in diff if k != "examples_sha256")
        now = ", ".join(f"{k}={wanted[k]!r}" for k in diff if k != "examples_sha256")
        raise SystemExit(f"{where} holds activations made with other arguments ({was or 'other --data'}; this run: "
                         f"{now or 'this --data'}): pass another --out, or delete {where} to recompute")


def read_cache(out, key):
    """The cached (head_outputs [N, L, H, D] float16, fingerprint), or None when there is no complete cache."""
    from safetensors import safe_open
    path = os.path.join(out, CACHE)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(out, PARTS, "key.json")):
            with open(os.path.join(out, PARTS, "key.json")) as f:
                check_key(json.load(f), key, os.path.join(out, PARTS), out)
        return None
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        check_key(json.loads(meta["key"]), key, path, out)
        return f.get_tensor("head_outputs"), json.loads(meta["fingerprint"])


def collect_head_outputs(model, tokenizer, texts, out, key, batch_size, device):
    """o_h^l at each text's last token: [N, L, H, D] float16. Longest texts first (least padding, and an
    out-of-memory batch shows at once); every PART_SIZE texts are saved, so a killed run resumes where it was."""
    from safetensors.torch import load_file, save_file
    parts = os.path.join(out, PARTS)
    os.makedirs(parts, exist_ok=True)
    runfiles.write_json(os.path.join(parts, "key.json"), key)
    tokenizer.padding_side = "right"
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    sorted_outputs = []
    progress = tqdm(total=len(texts), desc="head outputs", unit="input")
    for start in range(0, len(texts), PART_SIZE):
        path = os.path.join(parts, f"part-{start:07d}.safetensors")
        if not os.path.exists(path):
            batches = []
            for b in range(start, min(start + PART_SIZE, len(texts)), batch_size):
                idx = order[b:min(b + batch_size, start + PART_SIZE)]
                enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True).to(device)
                positions = heads.last_positions(enc["attention_mask"])
                batches.append(heads.record_heads(model, positions, **enc).half().cpu())  # [batch, L, H, D]
                progress.update(len(idx))
            part = torch.cat(batches)
            runfiles.write_atomic(path, lambda tmp: save_file({"head_outputs": part}, tmp))
        else:
            part = load_file(path)["head_outputs"]
            progress.update(len(part))
        sorted_outputs.append(part)
    progress.close()
    head_outputs = torch.empty_like(torch.cat(sorted_outputs))
    head_outputs[torch.tensor(order)] = torch.cat(sorted_outputs)
    return head_outputs


def write_cache(out, key, head_outputs, examples, fingerprint):
    from safetensors.torch import save_file
    tensors = {"head_outputs": head_outputs.contiguous(),  # [N, L, H, D] float16
               "labels": torch.tensor([e["label"] for e in examples]),  # [N] 1 correct, 0 incorrect
               "question_ids": torch.tensor([e["question_id"] for e in examples]),  # [N] row in the question list
               "is_val": torch.tensor([e["split"] == "val" for e in examples], dtype=torch.uint8)}  # [N]
    meta = {"key": json.dumps(key), "fingerprint": json.dumps(fingerprint)}
    runfiles.write_atomic(os.path.join(out, CACHE), lambda tmp: save_file(tensors, tmp, metadata=meta))
    shutil.rmtree(os.path.join(out, PARTS), ignore_errors=True)
