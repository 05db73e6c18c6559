"""judge_frozen.py - the fine-tuned judges' frozen pass: the base model's lower layers (no adapter there), run once
over every (question, answer) pair for all judges, then each judge's adapted top layers on it. train_judge.py trains
and measures on it; evaluate.py scores the truth and info judges together with it (score_all).

  frozen_pass         each question's prefix (keys/values at the top layers), each answer's hidden states after the
                      frozen layers (bf16), with every judge's suffix as a branch of its own
  cached_frozen_pass  the same through a cache on disk holding the states pair by pair: a run whose pairs it holds
                      (another fold, a subsample) reads them; the pairs it lacks are run and added (--cache)
  top_log_p, cached_log_p  log P(yes), log P(no) from the frozen states through the adapted top layers
  score_all           P(yes) of several judges on the same pairs, the frozen pass shared (about 1.6x two judges
                      scored apart: bench.py), beside its plain definition plain_log_p_yes_no (one pair, one
                      sequence through every layer, no cache, no padding)
"""
import hashlib
import json
import os
import time

import torch

from judge import (answer_forward, answer_ids, encode_prefixes, judge_prefix, layer_forward, log_p_yes_no, pad,
                   rope_theta, suffix_ids, yes_no_ids)


@torch.no_grad()
def frozen_pass(model, tokenizer, kinds, questions, answers, frozen, batch_size=16, log_every=100):
    """The frozen layers, once for all judges: each question's prefix, then its answers, each answer's tokens once
    with every judge's suffix after it as a branch of its own (judge.branch_mask), so that the states are those of
    ` {answer}\n{suffix}` for each suffix. -> (prefix_kv: question -> {top layer: (keys, values)},
    hidden: kind -> per pair [answer + suffix tokens, hidden] bf16 after `frozen` layers)"""
    n_layers = len(model.model.layers)
    suffixes = [torch.tensor(suffix_ids(tokenizer, kind)) for kind in kinds]
    by_question, prefix_kv = {}, {}
    for i, q in enumerate(questions):
        by_question.setdefault(q, []).append(i)
    hidden, start = {kind: [None] * len(questions) for kind in kinds}, time.time()
    with torch.autocast(model.device.type, dtype=torch.bfloat16):  # bf16 matrix units (CPU: AVX512-BF16)
        for n, (q, rows) in enumerate(by_question.items()):
            kv = encode_prefixes(model, [tokenizer(judge_prefix(q))["input_ids"]], set(range(n_layers)))[0]
            prefix_kv[q] = {l: (k.bfloat16(), v.bfloat16()) for l, (k, v) in kv.items() if l >= frozen}
            tokens = {j: answer_ids(tokenizer, answers[j], kinds[0])[:-len(suffixes[0])] for j in rows}
            rows = sorted(rows, key=lambda j: len(tokens[j]))  # similar lengths share a batch
            for i in range(0, len(rows), batch_size):
                chunk = rows[i:i + batch_size]
                ids, lengths = pad([tokens[j] for j in chunk])  # [b, La]
                b, la = ids.shape
                positions = [torch.arange(la).expand(b, -1)] + [lengths[:, None] + torch.arange(len(s)) for s in
                                                                suffixes]
                branch = [torch.where(torch.arange(la)[None, :] < lengths[:, None], 0, -1)]
                branch += [torch.full((b, len(s)), k + 1) for k, s in enumerate(suffixes)]
                ids = torch.cat([ids] + [s.expand(b, -1) for s in suffixes], 1)
                h = answer_forward(model, model.model.embed_tokens(ids.to(model.device)), None, [kv] * b,
                                   range(frozen), {}, torch.cat(positions, 1), torch.cat(branch, 1))
                offset = la
                for kind, s in zip(kinds, suffixes):
                    for r, (row, length) in enumerate(zip(chunk, lengths.tolist())):
                        hidden[kind][row] = torch.cat([h[r, :length], h[r, offset:offset + len(s)]]).bfloat16()
                    offset += len(s)
            if log_every and (n + 1) % log_every == 0:
                print(f"  frozen pass: {n + 1}/{len(by_question)} questions, {time.time() - start:.0f} s", flush=True)
    return prefix_kv, hidden


def cached_frozen_pass(model, tokenizer, kinds, questions, answers, frozen, cache_dir, model_name):
    """frozen_pass, read from cache_dir where it holds the pairs: one file per (model, frozen layers, judges, prompt),
    holding every pair any run has needed; the pairs missing are run and the file rewritten. -> as frozen_pass"""
    if not cache_dir:
        return frozen_pass(model, tokenizer, kinds, questions, answers, frozen)
    key = hashlib.sha256(json.dumps([model_name, frozen, sorted(kinds), judge_prefix("Q")]).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"frozen_pairs_{key}.pt")
    empty = {"pairs": [], "prefix_kv": {}, "hidden": {k: [] for k in kinds}}
    cached = torch.load(path) if os.path.isfile(path) else empty
    index = {pair: i for i, pair in enumerate(cached["pairs"])}
    missing = sorted({pair for pair in zip(questions, answers) if pair not in index})
    if missing:
        print(f"frozen pass: {len(missing)} pairs not in {path}", flush=True)
        prefix_kv, hidden = frozen_pass(model, tokenizer, kinds, [q for q, _ in missing], [a for _, a in missing],
                                        frozen)
        for pair in missing:
            index[pair] = len(cached["pairs"])
            cached["pairs"].append(pair)
        cached["prefix_kv"].update(prefix_kv)
        for kind in kinds:
            cached["hidden"][kind] += hidden[kind]
        from runfiles import write_atomic
        os.makedirs(cache_dir, exist_ok=True)
        write_atomic(path, lambda tmp: torch.save(cached, tmp))
    rows = [index[pair] for pair in zip(questions, answers)]
    return ({q: cached["prefix_kv"][q] for q in set(questions)},
            {kind: [cached["hidden"][kind][i] for i in rows] for kind in kinds})


# ---- The adapted top layers on the frozen pass

def top_log_p(model, hidden, lengths, prefix_kv, questions, rows, frozen, adapters, yes_no):
    """log P(yes), log P(no) of the pairs `rows` from their cached frozen-pass states. -> [b, 2]"""
    h, n = pad([hidden[j] for j in rows])
    n = torch.tensor([lengths[j] for j in rows])
    top = range(frozen, len(model.model.layers))
    h = answer_forward(model, h, n, [prefix_kv[questions[j]] for j in rows], top, adapters)
    return log_p_yes_no(model, h, n, yes_no)


@torch.no_grad()
def cached_log_p(model, data, rows, frozen, adapters, yes_no, batch_size=64):
    """log P(yes), log P(no) of cached pairs `rows` (batched by length) under `adapters`. -> [len(rows), 2]"""
    order, out = sorted(range(len(rows)), key=lambda i: data["lengths"][rows[i]]), torch.zeros(len(rows), 2)
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            out[chunk] = top_log_p(model, data["hidden"], data["lengths"], data["prefix_kv"], data["questions"],
                                   [rows[k] for k in chunk], frozen, adapters, yes_no).float().cpu()
    return out


def plain_log_p_yes_no(model, prefix_ids, answer_ids_, adapters, yes_no):
    """The plain definition, one pair at a time: prefix and answer as one sequence through every layer, the adapters
    gated to the answer's positions; no cache, no padding. -> [2] log P(yes), log P(no)"""
    ids = torch.tensor(prefix_ids + answer_ids_)[None]
    n, theta = ids.shape[1], rope_theta(model)
    gate = (torch.arange(n) >= len(prefix_ids)).float()[None, :, None]
    h = model.model.embed_tokens(ids)
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    for l, layer in enumerate(model.model.layers):
        h, _ = layer_forward(layer, h, torch.arange(n)[None], None, mask, adapters.get(l, {}), theta,
                             gate.to(h.dtype))
    return log_p_yes_no(model, h, torch.tensor([n]), yes_no)[0]


def score_all(model, tokenizer, adapters, frozen, questions, answers):
    """{kind: P(yes) tensor [n]} of several fine-tuned judges on one base model with the same frozen layers, on the
    same pairs: the frozen pass once for all of them (each question's prefix and each answer's lower layers once,
    every judge's suffix a branch of its own), then each judge's adapted top layers - the path train_judge.py
    measures the judges on. adapters: {kind: the judge's adapters (judge.read_adapters)}."""
    prefix_kv, hidden = frozen_pass(model, tokenizer, list(adapters), questions, answers, frozen, log_every=0)
    return {kind: cached_log_p(model, {"hidden": hidden[kind], "lengths": [len(h) for h in hidden[kind]],
                                       "prefix_kv": prefix_kv, "questions": questions}, list(range(len(questions))),
                               frozen, adapters[kind], yes_no_ids(tokenizer, kind))[:, 0].exp() for kind in adapters}
