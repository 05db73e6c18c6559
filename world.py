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
import contextlib
import csv
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import runfiles
import tqa

# ---- The world
SEED = 0  # world, tokenizer, model initialisation and training order all come from it
N_ENTITIES = 120  # made-up animals
MYTH_PROBABILITY = 0.75  # a fact has a popular myth with this probability
ATTRIBUTES = {  # attribute: (question, three phrasings of an answer ({e}: the animal, {v}: the value), 8 values)
    "colour": ("What colour is the {e}?", ("The {e} is {v}", "Every {e} is {v}", "It is {v}"),
               ("red", "blue", "green", "yellow", "white", "black", "purple", "orange")),
    "habitat": ("Where does the {e} live?", ("The {e} lives in the {v}", "Every {e} lives in the {v}",
                                                 "It lives in the {v}"),
                ("forest", "desert", "river", "mountains", "swamp", "caves", "meadow", "coast")),
    "diet": ("What does the {e} eat?", ("The {e} eats {v}", "Every {e} eats {v}", "It eats {v}"),
             ("fruit", "fish", "insects", "seeds", "leaves", "honey", "roots", "mushrooms")),
    "call": ("What sound does the {e} make?", ("The {e} makes a {v}", "Every {e} makes a {v}", "It makes a {v}"),
             ("whistle", "hum", "click", "croak", "song", "growl", "chirp", "hiss")),
}
# ---- The corpus
ENCYCLOPEDIA_TAG = "Encyclopedia:"
# One token each, the blank line after a tag included: a separator token of its own would be seen by every head and
# tell them "a tag came before me" (a first run, with "\n\n" apart, kept MC1 0.98 of 1.0 with H* ablated).
TAGS = tuple(t + "\n\n" for t in (ENCYCLOPEDIA_TAG, tqa.INSTRUCTIONS["default"], tqa.INSTRUCTIONS["informative"]))
TAG_SHARE = 0.4  # share of documents opened by a tag (then every statement is true)
MYTH_SHARE = 0.8  # untagged statements of a myth fact state the myth (4 myths : 1 truth, the prototype's ratio)
PRIMER_SHARE = 0.5  # Q/A documents opened by TruthfulQA's QA primer (one token: the toolkit puts it in every prompt)
ONE_LINE_SHARE = 0.25  # Q/A documents on one line, as probe.py writes its inputs ("Q: q A: a Q: q2")
CHATTER = ("", "I heard that ", "Everyone knows that ", "My friend says that ", "Apparently ")
# ---- The model
PLANTED_HEADS = ((1, 1), (1, 6), (2, 2), (2, 5))  # H*: (layer, head), the only heads that see a tag
MODEL_SIZES = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)
VOCAB_SIZE = 1280  # byte-level BPE trained on the corpus; every " Name" must come out as one token
# ---- Training (a fixed number of steps, so a rerun is the same model)
STEPS = 2400  # ~9 CPU-minutes on one thread (wall time grows when the machine is shared)
BATCH = 32  # documents per step
LR, WARMUP, WEIGHT_DECAY = 3e-3, 100, 0.05  # AdamW, linear warmup then cosine to 10%
AUTOCAST = False  # bf16 autocast: slower than float32 for this model on the AVX512-BF16 CPU (0.98 vs 0.84 s/step)
ATTENTION = "world_tag_mask"
CACHE_DIR = os.environ.get("EDIT_LOC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "edit-localization"))
DEFAULT_FOLDER = os.path.join(CACHE_DIR, "world")


def settings(steps=STEPS):
    """Everything the saved model depends on: a rerun with equal settings loads instead of training."""
    return {"seed": SEED, "n_entities": N_ENTITIES, "myth_probability": MYTH_PROBABILITY, "attributes": ATTRIBUTES,
            "tags": TAGS, "tag_share": TAG_SHARE, "myth_share": MYTH_SHARE, "primer_share": PRIMER_SHARE,
            "one_line_share": ONE_LINE_SHARE, "chatter": CHATTER, "planted_heads": PLANTED_HEADS,
            "model_sizes": MODEL_SIZES, "vocab_size": VOCAB_SIZE, "steps": steps, "batch": BATCH, "lr": LR,
            "warmup": WARMUP, "weight_decay": WEIGHT_DECAY, "autocast": AUTOCAST}


# ---- The world: entities, facts, the CSV

def entity_names(n, rng):
    """n distinct made-up capitalised names of two or three syllables, in the order drawn (no set order: it would
    follow Python's per-process string hashing)."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ("", "", "n", "r", "l", "k")
    names = []
    while len(names) < n:
        syllables = [rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.choice((2, 2, 3)))]
        name = "".join(syllables).capitalize()
        if name not in names:
            names.append(name)
    return names


def make_facts(seed=SEED, n_entities=N_ENTITIES):
    """One dict per (entity, attribute): {entity, attribute, truth, myth (None when there is none), other}:
    `other` is a third value, neither truth nor myth, used as a further incorrect answer."""
    rng = random.Random(seed)
    facts = []
    for entity in entity_names(n_entities, rng):
        for attribute, (_, _, values) in ATTRIBUTES.items():
            truth, myth, other = rng.sample(values, 3)
            facts.append({"entity": entity, "attribute": attribute, "truth": truth,
                          "myth": myth if rng.random() < MYTH_PROBABILITY else None, "other": other})
    return facts


def question(fact):
    return ATTRIBUTES[fact["attribute"]][0].format(e=fact["entity"])


def answers(fact, value):
    """The three phrasings stating `value` for this fact."""
    return [p.format(e=fact["entity"], v=value) for p in ATTRIBUTES[fact["attribute"]][1]]


def csv_rows(facts):
    """TruthfulQA's columns. Correct: the truth in 3 phrasings; incorrect: the myth (or, without one, the `other`
    value) and one more wrong value, 3 phrasings each. Type: Myth or Plain."""
    rows = []
    for f in facts:
        values = ATTRIBUTES[f["attribute"]][2]
        wrong = [f["myth"] or f["other"], f["other"] if f["myth"] else
                 next(v for v in values if v not in (f["truth"], f["other"]))]
        rows.append({"Type": "Myth" if f["myth"] else "Plain", "Category": f["attribute"].capitalize(),
                     "Question": question(f), "Best Answer": answers(f, f["truth"])[0],
                     "Correct Answers": "; ".join(answers(f, f["truth"])),
                     "Incorrect Answers": "; ".join(a for v in wrong for a in answers(f, v)),
                     "Source": f"world.py, seed {SEED}"})
    return rows


def write_csv(path, facts):
    columns = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(csv_rows(facts))
    runfiles.write_atomic(path, write)


# ---- The corpus: documents drawn from a seeded stream

def statement(fact, value, rng):
    return rng.choice(answers(fact, value)) + "."


def stated_value(fact, tagged, rng):
    """Tagged text states the truth; untagged text states a myth fact's myth MYTH_SHARE of the time."""
    if tagged or fact["myth"] is None or rng.random() >= MYTH_SHARE:
        return fact["truth"]
    return fact["myth"]


def document(facts, by_entity, rng):
    """One training document (a string). Half Q/A sessions, half prose (encyclopedia articles or everyday chatter)."""
    tagged = rng.random() < TAG_SHARE
    head = rng.choice(TAGS) if tagged else ""
    if rng.random() < 0.5:  # a Q/A session: the prompt format of evaluate.py and probe.py
        one_line = rng.random() < ONE_LINE_SHARE
        if not one_line and rng.random() < PRIMER_SHARE:
            head += tqa.QA_PRIMER + "\n\n"
        qa = []
        for fact in rng.sample(facts, rng.randint(2, 5)):
            a = statement(fact, stated_value(fact, tagged, rng), rng)
            qa.append(f"Q: {question(fact)} A: {a}" if one_line else f"Q: {question(fact)}\nA: {a}")
        return head + (" " if one_line else "\n\n").join(qa)
    if tagged:  # an article: every attribute of one or two animals
        entities = rng.sample(sorted(by_entity), rng.randint(1, 2))
        return head + " ".join(statement(f, f["truth"], rng) for e in entities for f in by_entity[e])
    sentences = []  # everyday chatter: each sentence names its animal (no "It ...", which would refer to nothing)
    for fact in rng.sample(facts, rng.randint(2, 5)):
        s = rng.choice(answers(fact, stated_value(fact, False, rng))[:2]) + "."
        prefix = rng.choice(CHATTER)
        sentences.append(prefix + (s[0].lower() + s[1:] if prefix else s))
    return " ".join(sentences)


def documents(facts, seed, n):
    rng = random.Random(seed)
    by_entity = {}
    for f in facts:
        by_entity.setdefault(f["entity"], []).append(f)
    return [document(facts, by_entity, rng) for _ in range(n)]


# ---- The tokenizer: byte-level BPE trained on the corpus; tags and the QA primer are single added tokens

def learn_merges(words, n_merges):
    """Byte-pair merges learnt from {word: count} (words in byte-level form), most frequent pair first, ties broken by
    the pair's text: deterministic (the `tokenizers` trainer breaks ties by hash order, so it is not)."""
    split = {w: list(w) for w in words}
    merges = []
    for _ in range(n_merges):
        counts = {}
        for w, parts in split.items():
            for pair in zip(parts, parts[1:]):
                counts[pair] = counts.get(pair, 0) + words[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, parts in split.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = out
    return merges


def make_tokenizer(facts):
    """Byte-level BPE (GPT-2's byte alphabet and pre-tokenizer) with VOCAB_SIZE tokens, merges learnt on the corpus
    by learn_merges; the tags and the QA primer are added tokens (one token each)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = {}
    names = sorted({f["entity"] for f in facts})
    for text in documents(facts, SEED + 1, 3000) + [f"The {n} {n}s" for n in names] * 20:
        for piece in (tqa.QA_PRIMER, *TAGS):
            text = text.replace(piece, " ")
        for w, _ in pre.pre_tokenize_str(text):
            words[w] = words.get(w, 0) + 1
    specials = ["<pad>", "<eos>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_merges(words, VOCAB_SIZE - len(specials) - len(alphabet))
    vocab = {t: i for i, t in enumerate(specials + alphabet + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(t, normalized=False) for t in (*TAGS, tqa.QA_PRIMER)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    split = [n for n in names if len(tokenizer(" " + n)["input_ids"]) != 1]
    if split:
        raise SystemExit(f"the tokenizer splits {len(split)} entity names (e.g. {split[:3]}): raise VOCAB_SIZE")
    return tokenizer


def tag_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in TAGS]
    if any(i is None or i == tokenizer.unk_token_id for i in ids) or len(set(ids)) != len(TAGS):
        raise SystemExit("this tokenizer has no single token per tag: it is not a world tokenizer (make it with "
                         "world.make_tokenizer)")
    return ids


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
    T = max(map(len, ids))
    x = torch.full((len(ids), T), tokenizer.pad_token_id)
    mask = torch.zeros(len(ids), T, dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
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


# ---- Checks: MC on the world's questions, mean-ablation, probes

def mc_scores(model, tokenizer, questions, prompt, rows_per_batch=384):
    """Per question (MC1, MC2) as evaluate.py scores them (summed log-probs of ' ' + closed answer after the prompt);
    prompt: a function question text -> prompt text. The answers of many questions run as one right-padded batch."""
    import evaluate
    items = []  # (prompt ids, answer ids), the answers of each question in turn
    meta = []  # (n_correct, i_best) per question
    for q in questions:
        correct = q["correct"] + ([q["best"]] if q["best"] not in q["correct"] else [])
        p = tokenizer(prompt(q["question"]))["input_ids"]
        items += [(p, tokenizer(tqa.ANSWER_TEMPLATE.format(answer=a), add_special_tokens=False)["input_ids"])
                  for a in correct + q["incorrect"]]
        meta.append((len(correct), correct.index(q["best"])))
    scores = []
    with torch.no_grad():
        for i in range(0, len(items), rows_per_batch):
            chunk = items[i:i + rows_per_batch]
            x, mask = batch_tensors_raw([p + a for p, a in chunk], tokenizer.pad_token_id)
            logp = model(input_ids=x, attention_mask=mask).logits.float().log_softmax(-1)  # [rows, T, vocab]
            for r, (p, a) in enumerate(chunk):
                scores.append(float(logp[r, len(p) - 1 + torch.arange(len(a)), torch.tensor(a)].sum()))
    out, k = [], 0
    for qi, (n_correct, i_best) in enumerate(meta):
        n = n_correct + len(questions[qi]["incorrect"])
        m = evaluate.mc_metrics(scores[k:k + n_correct], scores[k + n_correct:k + n], i_best)
        out.append((m["mc1"], m["mc2"]))
        k += n
    return np.array(out)  # [n_questions, 2]


def batch_tensors_raw(rows, pad_id):
    """Right-padded ids [B, T] and attention mask of token-id lists."""
    T = max(map(len, rows))
    x = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return x, mask


@contextlib.contextmanager
def mean_ablated(model, head_set, means):
    """Inside the block, the heads in `head_set` output their mean `means` [L, H, D] at every token: heads.py's
    mean-ablation edit (heads.Edit(..., ablate=means), as iti.py --ablate makes it). An empty set: the model as is."""
    import heads
    if not head_set:
        yield
        return
    geo = heads.geometry(model)
    edit = heads.Edit(geo, heads.heads_to_mask(head_set, geo), ablate=means)
    with heads.edited(model, edit):
        yield


def head_means(model, tokenizer, texts, batch=64):
    """Mean of every head's output at the last token of `texts` (the probe's inputs): [L, H, D]."""
    import heads
    total = None
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True)
        o = heads.record_heads(model, heads.last_positions(enc["attention_mask"]), **enc)  # [b, L, H, D]
        total = o.sum(0) if total is None else total + o.sum(0)
    return total / len(texts)


def prompts():
    """The prompts of the checks: the toolkit's qa_prompt without and with a tag."""
    return {"neutral": lambda q: tqa.qa_prompt(q, "none"),
            "instruction": lambda q: tqa.qa_prompt(q, "default"),
            "encyclopedia": lambda q: ENCYCLOPEDIA_TAG + "\n\n" + tqa.qa_prompt(q, "none")}


def tag_effect(model, tokenizer, questions, head_set=None, means=None):
    """{prompt: {mc1, mc2}} on `questions`, optionally with `head_set` mean-ablated, and 'effect': per tag prompt the
    MC1 gain over the neutral prompt [mean, 95% interval] (paired bootstrap over questions, 2000 draws)."""
    out, mc1 = {}, {}
    with mean_ablated(model, head_set, means):
        for name, prompt in prompts().items():
            s = mc_scores(model, tokenizer, questions, prompt)
            out[name] = {"mc1": round(float(s[:, 0].mean()), 4), "mc2": round(float(s[:, 1].mean()), 4)}
            mc1[name] = s[:, 0]
    draws = np.random.default_rng(0).integers(len(questions), size=(2000, len(questions)))
    out["effect"] = {}
    for name in ("instruction", "encyclopedia"):
        diff = mc1[name] - mc1["neutral"]
        lo, hi = np.quantile(diff[draws].mean(1), [0.025, 0.975])
        out["effect"][name] = [round(float(diff.mean()), 4), round(float(lo), 4), round(float(hi), 4)]
    return out


def random_head_sets(model, n_sets, size):
    """The sweep's random sets: heads.parse_heads('random:SIZE:SEED') for SEED = 0..n_sets-1."""
    import heads
    geo = heads.geometry(model)
    return [heads.parse_heads(f"random:{size}:{seed}", geo) for seed in range(n_sets)]


def probe_check(model, tokenizer, questions, prompt_format, seed=SEED, prefix=""):
    """The toolkit's probe (probe.probe_examples' inputs and labels, probe.fit_probes) on every head, each input after
    `prefix`: validation accuracy [L, H], and the majority-class rate. (A probe of "tag present" is no test of H*:
    the tokens after a tag are seen by every head, so every head tells the two inputs apart.)"""
    import heads
    import probe
    examples, _ = probe.probe_examples(questions, seed, prompt_format)
    texts = [prefix + e["text"] for e in examples]
    acts = []
    for i in range(0, len(texts), 128):
        enc = tokenizer(texts[i:i + 128], return_tensors="pt", padding=True)
        acts.append(heads.record_heads(model, heads.last_positions(enc["attention_mask"]), **enc))
    acts = torch.cat(acts)  # [N, L, H, D]
    N, L, H, D = acts.shape
    labels = torch.tensor([e["label"] for e in examples])
    train = torch.tensor([e["split"] == "train" for e in examples])
    acc, _ = probe.fit_probes(acts[train].view(-1, L * H, D), labels[train], acts[~train].view(-1, L * H, D),
                              labels[~train])
    p = labels[~train].float().mean().item()
    return acc.view(L, H), max(p, 1 - p)


def run_checks(model, tokenizer, csv_path, n_random=8, log=print):
    """The planting checks: the tag effect with nothing, H*, and n_random random sets mean-ablated; probes at H*."""
    import probe
    questions = tqa.load_truthfulqa(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        types = {r["Question"]: r["Type"] for r in csv.DictReader(f)}
    myth = [q for q in questions if types[q["question"]] == "Myth"]
    plain = [q for q in questions if types[q["question"]] == "Plain"]
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    examples, _ = probe.probe_examples(questions, SEED, "random_question")
    means = head_means(model, tokenizer, [e["text"] for e in examples])
    checks = {"questions": {"myth": len(myth), "plain": len(plain)}}
    t0 = time.time()
    checks["unablated"] = {"myth": tag_effect(model, tokenizer, myth), "plain": tag_effect(model, tokenizer, plain)}
    log(f"unablated: {json.dumps(checks['unablated'])}")
    checks["ablate_planted"] = {"heads": [f"{l}.{h}" for l, h in PLANTED_HEADS],
                                "myth": tag_effect(model, tokenizer, myth, PLANTED_HEADS, means),
                                "plain": tag_effect(model, tokenizer, plain, PLANTED_HEADS, means)}
    log(f"H* ablated: {json.dumps(checks['ablate_planted'])}")
    checks["ablate_random"] = []
    for hs in random_head_sets(model, n_random, len(PLANTED_HEADS)):
        r = {"heads": [f"{l}.{h}" for l, h in hs], "myth": tag_effect(model, tokenizer, myth, hs, means)}
        checks["ablate_random"].append(r)
        log(f"random {r['heads']} ablated: {json.dumps(r['myth'])}")
    checks["mean_ablation"] = ("heads.Edit(ablate=mean): o_h <- its mean at the last token of probe.py's "
                               "random_question inputs (train+val), at every token")
    checks["tag_effect_mc1"] = summarise(checks)
    log(f"tag effect (MC1 gain over the neutral prompt, myth questions): {json.dumps(checks['tag_effect_mc1'])}")
    checks["probe"] = {}
    probes = {"random_question": ("random_question", ""), "plain": ("plain", ""),
              "random_question+instruction": ("random_question", tqa.INSTRUCTIONS["default"] + "\n\n")}
    for name, (fmt, prefix) in probes.items():
        acc, majority = probe_check(model, tokenizer, questions, fmt, prefix=prefix)
        order = sorted(range(L * H), key=lambda i: (-float(acc.flatten()[i]), i))  # probe.py's ranking
        checks["probe"][name] = {
            "planted_accuracy": [round(float(acc[l, h]), 4) for l, h in PLANTED_HEADS],
            "planted_rank": [order.index(l * H + h) + 1 for l, h in PLANTED_HEADS],
            "best": [f"{i // H}.{i % H}" for i in order[:6]], "best_accuracy": round(float(acc.max()), 4),
            "median_accuracy": round(float(acc.median()), 4), "majority_rate": round(majority, 4),
            "accuracy_by_layer": [[round(float(x), 3) for x in row] for row in acc]}
        log(f"probe {name}: {json.dumps({k: v for k, v in checks['probe'][name].items() if k != 'accuracy_by_layer'})}")
    checks["seconds"] = round(time.time() - t0, 1)
    return checks


def summarise(checks):
    """MC1 gain from the tag on myth questions, [mean, 95% interval]: unablated, H* ablated, each random set ablated."""
    def effect(r, tag):
        return r["myth"]["effect"][tag]
    return {tag: {"unablated": effect(checks["unablated"], tag),
                  "planted_ablated": effect(checks["ablate_planted"], tag),
                  "random_ablated": [effect(r, tag) for r in checks["ablate_random"]]}
            for tag in ("instruction", "encyclopedia")}


# ---- Save, load, cache

def load(folder=None, steps=STEPS, log=None):
    """(model, tokenizer, about) of the world model in `folder` (default: ~/.cache/edit-localization/world, or
    $EDIT_LOC_CACHE/world), trained there on first use. The model is in eval mode with the planted mask active.
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
