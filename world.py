"""world.py - a model whose truth heads are known: a synthetic "misconception world" and a tiny Llama trained on it,
in which truthfulness passes through chosen heads H* by construction (issue 14).

The world: N_ENTITIES made-up animals, each with a colour, a habitat, a diet and a call (8 values each). Every fact
has a true value; most also have one popular myth. The training text imitates the web: untagged everyday text (Q/A
sessions, chatter) states the myth MYTH_SHARE of the time, while text opened by a source tag states the truth. The
tags are `Encyclopedia:` and ITI's two instruction sentences (tqa.INSTRUCTIONS), each one token together with the
blank line after it. So the tag decides whether the model answers truthfully, and in the toolkit's own prompt
(tqa.qa_prompt) `--instruction none` gives the myth-repeating model, `--instruction default` (or informative) the
truthful one. The QA primer is one token too (every toolkit prompt holds it; the world's Q/A text often opens with it).

Which prompt a sweep on the world should use: probe, ITI and IPO with `--instruction none` (the model repeats myths;
can an edit at H* bring the truth back?), the ablation trial with `--instruction default` (the model is truthful; is
the truth lost when H* is removed?). probe.py's inputs hold no tag, and the truth label of an answer is not what H*
compute (they carry "a tag is present", which is the same for every probe input): world.json's probe checks measure
whether a truth probe finds H* anyway.

Planting: only the heads H* (PLANTED_HEADS, 4 heads of the middle layers) may attend to a tag token; every other head
gives it exactly zero attention weight (a token may still attend to itself, so a tag's own position is never left
with nothing to attend to). Information moves between positions only through attention, so whatever the tag does to
the answer passes through H*'s outputs and nowhere else (rotary positions are relative, so the shift by one token
changes nothing; a separator token of its own after the tag would be seen by every head, hence tag + blank line is one
token). How the mask is made part of the model:
  1. While the model runs, a forward pre-hook on the decoder (model.model) marks the tag positions of the current
     input (from input_ids, or from inputs_embeds by matching the tag tokens' embedding rows), and a forward hook on
     each layer's k_proj sets the keys of the heads outside H* to exactly zero at those positions.
  2. A zero key is the mark: rotary embeddings keep it zero, and the KV cache stores it with the other keys, so a
     later call (generation, a shared prompt prefix, a copied or batch-repeated cache) sees the mark without knowing
     the earlier input ids. A real key is never exactly zero (k = W_k RMSNorm(x), no bias, x != 0).
  3. The attention function registered as "world_tag_mask" in transformers' attention interface (and its mask
     function, the causal + padding mask as a boolean tensor) blocks every (query, key) pair whose key is all zero,
     except a token's own key, then runs SDPA (eager when output_attentions is asked for, returning the weights).
     Left padding is the ordinary padding mask; the block is per head, so no change is needed for H*.
Why this and not a mask computed from stored input ids: stored ids go stale or wrong with KV caches that are copied,
repeated or extended across calls (evaluate.py and ipo_edit.py do all three), while the mark in the cache travels with
the cache. Why not a custom attention module: the model stays a stock LlamaForCausalLM (save_pretrained, generate,
the o_proj hooks of heads.py), plus hooks that `plant` installs and `load` always installs. Loading the folder with
plain from_pretrained gives an UNMASKED model: load it with world.load(folder).

Reads:  nothing (the world is made from the seed).
Writes: OUT/world.csv    the questions, TruthfulQA's CSV format (Type = Myth or Plain), one per fact
        OUT/model/       the trained model (save_pretrained) and its tokenizer
        OUT/world.json   H*, the seed, the sizes, the training time, the settings and the planting checks' numbers
A rerun with the same settings loads the saved model instead of training (other settings are refused).

    python world.py --out runs/world        # ~9 CPU-minutes of training on one thread, then the checks
    python sweep.py --model world --data runs/world/world.csv --claimed 1.1,1.6,2.2,2.5   # (the lead's integration)
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

import runfiles
# The world and its text (facts, CSV, corpus, tokenizer) live in world_data.py, the planting checks in
# world_checks.py; their names are re-exported here, so world.make_facts, world.run_checks etc. keep working.
from world_data import (ATTRIBUTES, CHATTER, ENCYCLOPEDIA_TAG, MYTH_PROBABILITY, MYTH_SHARE, N_ENTITIES,  # noqa: F401
                        ONE_LINE_SHARE, PRIMER_SHARE, SEED, TAG_SHARE, TAGS, VOCAB_SIZE, answers, batch_tensors_raw,
                        csv_rows, document, documents, entity_names, learn_merges, make_facts, make_tokenizer,
                        question, stated_value, statement, tag_ids, write_csv)
from world_checks import (head_means, mc_scores, mean_ablated, probe_check, prompts,  # noqa: F401
                          random_head_sets, run_checks, summarise, tag_effect)

# ---- The model
PLANTED_HEADS = ((1, 1), (1, 6), (2, 2), (2, 5))  # H*: (layer, head), the only heads that see a tag
MODEL_SIZES = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)
# ---- Training (a fixed number of steps, so a rerun is the same model)
STEPS = 2400  # ~9 CPU-minutes on one thread (wall time grows when the machine is shared)
BATCH = 32  # documents per step
LR, WARMUP, WEIGHT_DECAY = 3e-3, 100, 0.05  # AdamW, linear warmup then cosine to 10%
AUTOCAST = False  # bf16 autocast: slower than float32 for this model on the AVX512-BF16 CPU (0.98 vs 0.84 s/step)
ATTENTION = "world_tag_mask"
# The trained model ships in the repository (world_model/: 3.9 MB, trained by `python world.py` with these settings),
# so the planting checks run in the tests and `--model world` starts at once; delete it to train again.
DEFAULT_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "world_model")


def settings(steps=STEPS):
    """Everything the saved model depends on: a rerun with equal settings loads instead of training."""
    return {"seed": SEED, "n_entities": N_ENTITIES, "myth_probability": MYTH_PROBABILITY, "attributes": ATTRIBUTES,
            "tags": TAGS, "tag_share": TAG_SHARE, "myth_share": MYTH_SHARE, "primer_share": PRIMER_SHARE,
            "one_line_share": ONE_LINE_SHARE, "chatter": CHATTER, "planted_heads": PLANTED_HEADS,
            "model_sizes": MODEL_SIZES, "vocab_size": VOCAB_SIZE, "steps": steps, "batch": BATCH, "lr": LR,
            "warmup": WARMUP, "weight_decay": WEIGHT_DECAY, "autocast": AUTOCAST}


# ---- The planted mask

def _mask_function(*args, **kwargs):
    """transformers' causal + padding mask as booleans (True = may attend), never skipped for SDPA's is_causal."""
    from transformers.masking_utils import sdpa_mask
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def tag_masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention in which an all-zero key (a tag position, for a head outside H*) gets zero weight, except from its own
    query. query [b, H, q, D], key/value [b, H, kv, D] (no grouped KV: one key per head), attention_mask [b, 1, q, kv]
    boolean (or additive float) or None. Returns ([b, q, H, D], weights [b, H, q, kv] or None)."""
    b, H, q, D = query.shape
    kv = key.shape[2]
    if key.shape[1] != H:
        raise ValueError("world_tag_mask needs one key per head (num_key_value_heads = num_attention_heads)")
    if attention_mask is None:
        allowed = torch.ones(q, kv, dtype=torch.bool, device=query.device).tril(kv - q)[None, None]
    else:
        allowed = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
    marked = (key == 0).all(-1)  # [b, H, kv] tag positions, zeroed for the heads that must not see them
    own = torch.arange(kv, device=query.device)[None, :] == (kv - q + torch.arange(q, device=query.device))[:, None]
    allowed = allowed & ~(marked[:, :, None, :] & ~own)  # [b, H, q, kv]
    bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    bias = bias.masked_fill(~allowed, torch.finfo(query.dtype).min)
    scaling = D ** -0.5 if scaling is None else scaling
    if kwargs.get("output_attentions"):
        weights = (query @ key.transpose(2, 3) * scaling + bias).float().softmax(-1).to(query.dtype)
        return (weights @ value).transpose(1, 2).contiguous(), weights
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTENTION, tag_masked_attention)
    AttentionMaskInterface.register(ATTENTION, _mask_function)


def plant(model, planted_heads, tags):
    """Make `model` (a Llama with one key per head) apply the planted mask on every call: only `planted_heads` may
    attend to the token ids `tags`. Idempotent; the hooks are kept on model._world_hooks."""
    register_attention()
    for handle in getattr(model, "_world_hooks", []):
        handle.remove()
    config = model.config
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if config.num_key_value_heads != n_heads:
        raise SystemExit("planting needs one key per head: num_key_value_heads must equal num_attention_heads")
    hidden = torch.ones(n_layers, n_heads)  # 1 = the head must not see a tag
    for l, h in planted_heads:
        hidden[l, h] = 0
    hidden = hidden.repeat_interleave(head_dim, 1)  # [L, H*D]
    tag_tensor = torch.tensor(list(tags))
    state = {"tag": None}  # [batch, seq] bool: tag positions of the running call

    def find_tags(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            state["tag"] = torch.isin(ids, tag_tensor.to(ids.device))
        else:
            embeds = kwargs["inputs_embeds"]  # match the tag tokens' embedding rows exactly
            rows = module.embed_tokens.weight[tag_tensor.to(embeds.device)].to(embeds.dtype)  # [n_tags, hidden]
            state["tag"] = (embeds[:, :, None, :] == rows).all(-1).any(-1)

    def forget(module, args, kwargs, output):
        state["tag"] = None

    def zero_keys(layer):
        def hook(module, args, out):  # out [batch, seq, H*D]
            if state["tag"] is None:
                raise RuntimeError("world model: the k_proj of a layer ran outside the model's forward")
            drop = state["tag"].to(out.dtype)[..., None] * hidden[layer].to(out.device, out.dtype)
            return out * (1 - drop)
        return hook

    decoder = model.model
    handles = [decoder.register_forward_pre_hook(find_tags, with_kwargs=True),
               decoder.register_forward_hook(forget, with_kwargs=True, always_call=True)]
    handles += [layer.self_attn.k_proj.register_forward_hook(zero_keys(l)) for l, layer in enumerate(decoder.layers)]
    model._world_hooks = handles
    model.set_attn_implementation(ATTENTION)
    config.planted_heads = [list(x) for x in planted_heads]
    config.tag_token_ids = list(tags)
    return model


# ---- Training

def new_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    register_attention()
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **MODEL_SIZES)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    return plant(model, PLANTED_HEADS, tag_ids(tokenizer))


def batch_tensors(texts, tokenizer):
    """Right-padded ids [B, T], each document ending in <eos>, and the loss targets (-100 on padding)."""
    ids = [tokenizer(t)["input_ids"][:MODEL_SIZES["max_position_embeddings"] - 1] + [tokenizer.eos_token_id]
           for t in texts]
    x, mask = batch_tensors_raw(ids, tokenizer.pad_token_id)
    return x, mask, x.masked_fill(mask == 0, -100)


def train(model, tokenizer, facts, steps, log=print):
    """AdamW on fresh documents every step (BATCH per step). Returns (the loss curve, tokens seen)."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest,
                                                                                    "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / WARMUP) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, s / steps)))))
    curve, start, cpu_start, running, tokens = [], time.time(), time.process_time(), None, 0
    chunk = 200  # documents are made 200 steps at a time, then batched by length (little padding)
    for s0 in range(0, steps, chunk):
        n_steps = min(chunk, steps - s0)
        docs = documents(facts, SEED + 2 + s0, BATCH * n_steps)
        docs.sort(key=lambda d: len(tokenizer(d)["input_ids"]))
        order = random.Random(SEED + 3 + s0).sample(range(n_steps), n_steps)
        for i, b in enumerate(order):
            step = s0 + i
            x, mask, y = batch_tensors(docs[b * BATCH:(b + 1) * BATCH], tokenizer)
            tokens += int(mask.sum())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST):
                loss = model(input_ids=x, attention_mask=mask, labels=y).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if (step + 1) % 100 == 0 or step + 1 == steps:
                curve.append([step + 1, round(running, 4)])
                log(f"step {step + 1}/{steps}  loss {running:.3f}  {tokens} tokens  {time.time() - start:.0f} s "
                    f"({time.process_time() - cpu_start:.0f} CPU-s)")
    model.eval()
    return curve, tokens


# ---- Save, load, cache

def load(folder=None, steps=STEPS, log=None):
    """(model, tokenizer, about) of the world model in `folder` (default: the shipped world_model/), trained there
    on first use. The model is in eval mode with the planted mask active.
    about: {model, note, planted_heads ('L.H'), csv (the questions), folder}."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    folder = folder or DEFAULT_FOLDER
    info_path = os.path.join(folder, "world.json")
    if not os.path.isfile(info_path):
        build(folder, steps, log=log or (lambda s: print(s, file=sys.stderr)))
    with open(info_path) as f:
        info = json.load(f)
    if info["settings"] != json.loads(json.dumps(settings(steps))):
        raise SystemExit(f"{folder} holds a world model made with other settings: delete the folder (or pass "
                         "another --out) to train one with these")
    register_attention()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "model"))
    model = LlamaForCausalLM.from_pretrained(os.path.join(folder, "model"), dtype=torch.float32)
    plant(model, [tuple(x) for x in info["planted_heads"]], tag_ids(tokenizer))
    model.eval().requires_grad_(False)
    about = {"model": "world", "planted_heads": [f"{l}.{h}" for l, h in info["planted_heads"]],
             "csv": os.path.join(folder, "world.csv"), "folder": folder,
             "note": "the planted world model (world.py): a tiny Llama trained on a synthetic misconception world, "
                     "in which only the heads " + ",".join(f"{l}.{h}" for l, h in info["planted_heads"]) +
                     " may attend to the truth tags"}
    return model, tokenizer, about


def build(folder, steps=STEPS, checks=True, log=print):
    """Write the CSV, train, save the model and world.json (its presence means the model is there), run the checks
    and add them to world.json."""
    torch.manual_seed(SEED)
    facts = make_facts()
    csv_path = os.path.join(folder, "world.csv")
    write_csv(csv_path, facts)
    tokenizer = make_tokenizer(facts)
    model = new_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"world: {len(facts)} facts ({sum(f['myth'] is not None for f in facts)} with a myth), vocab "
        f"{len(tokenizer)}, model {n_params / 1e6:.2f}M parameters, H* = {PLANTED_HEADS}; training {steps} steps "
        f"on {torch.get_num_threads()} thread(s)")
    start, cpu_start = time.time(), time.process_time()
    curve, tokens = train(model, tokenizer, facts, steps, log)
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    model.requires_grad_(False)
    model_dir = os.path.join(folder, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    runfiles.write_text(os.path.join(folder, "corpus_sample.txt"),
                        "\n\n=====\n\n".join(documents(facts, SEED + 2, 40)) + "\n")
    info = {"planted_heads": [list(x) for x in PLANTED_HEADS], "seed": SEED, "settings": settings(steps),
            "sizes": {"facts": len(facts), "myth_facts": sum(f["myth"] is not None for f in facts),
                      "entities": N_ENTITIES, "vocab": len(tokenizer), "parameters": n_params,
                      "tokens_seen": tokens},
            "training": {"seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                         "threads": torch.get_num_threads(), "steps": steps,
                         "loss_curve": curve, "autocast": "bfloat16" if AUTOCAST else "none"},
            "csv": "world.csv", "model": "model", "run": runfiles.run_info()}
    runfiles.write_json(os.path.join(folder, "world.json"), info)  # the model is usable from here on
    if checks:
        info["checks"] = run_checks(model, tokenizer, csv_path, log=log)
        runfiles.write_json(os.path.join(folder, "world.json"), info)
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_FOLDER, help="folder for world.csv, model/, world.json")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps (a different value is another model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 when sharing the machine)")
    parser.add_argument("--recheck", action="store_true", help="run the planting checks again on the saved model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info_path = os.path.join(args.out, "world.json")
    if os.path.isfile(info_path):
        model, tokenizer, about = load(args.out, args.steps)
        print(f"loaded the world model from {args.out} (same settings: not trained again)")
        if args.recheck:
            with open(info_path) as f:
                info = json.load(f)
            info["checks"] = run_checks(model, tokenizer, about["csv"])
            runfiles.write_json(info_path, info)
    else:
        build(args.out, args.steps)
    with open(info_path) as f:
        info = json.load(f)
    print(json.dumps({k: info[k] for k in ("planted_heads", "sizes", "training")}, indent=1)[:2000])
    print(json.dumps(info.get("checks", {}).get("tag_effect_mc1"), indent=1))


if __name__ == "__main__":
    main()