"""ce_kl.py - what an edit costs on text unrelated to TruthfulQA: the edited model's next-token cross-entropy (CE) and
KL(original || edited), per token, on documents from --text (method.md section 3), and where those documents come from:
a hub dataset (stas/openwebtext-10k by default), a local .txt or .jsonl, or text the unedited model samples itself from
NEUTRAL_PROMPTS (`self`, the offline fallback). evaluate.py adds the arguments (add_text_args), calls load_texts, then
ce_kl; an edit applies at every token of this text (heads.edit_start's 'text' stage).
"""
import hashlib
import json
import os
import re

import numpy as np
import torch
from tqdm import tqdm

import heads
import models
import runfiles
from scoring import edit_context, generate

HUB_TEXT = "stas/openwebtext-10k"
NEUTRAL_PROMPTS = [  # seeds for the offline `self` text: everyday topics with nothing to do with TruthfulQA
    "The history of the town begins", "To bake a simple loaf of bread,", "The weather this week", "In the garden,",
    "The meeting started at nine", "A good way to learn a language is", "The river runs", "Yesterday the team",
    "The museum opened a new exhibition", "When you set up a new computer,", "The recipe calls for",
    "Our neighbourhood has", "The train left the station", "In the first chapter of the book,", "The market was busy",
    "Most birds build their nests", "The report describes", "On the weekend we", "The old bridge", "A cup of tea",
]


def add_text_args(parser):
    """The CE/KL text arguments, as a group of `parser`."""
    text = parser.add_argument_group("CE/KL text")
    text.add_argument("--text", default="auto", help="a hub dataset id, a local .txt (documents split by blank lines) "
                      "or .jsonl ({\"text\": ...} per line), `self` (text the unedited model samples from neutral "
                      "prompts, cached per model), or auto: stas/openwebtext-10k, else `self` when the hub is "
                      "unreachable")
    text.add_argument("--n-texts", type=int, default=100, help="documents for CE/KL (seeded choice)")
    text.add_argument("--text-tokens", type=int, default=128, help="first tokens of each document used for CE/KL")
    text.add_argument("--text-batch-size", type=int, default=4, help="documents per CE/KL forward")
    text.add_argument("--cache-dir", default=models.CACHE_DIR, help="where the `self` text is cached")


# ---- CE and KL

@torch.no_grad()
def ce_kl(model, tokenizer, docs, targets, batch, max_tokens, batch_size):
    """Per target: mean next-token CE of the edited model and mean KL(original || edited) over the same tokens. The
    unedited log-probs are computed once per batch of documents (the baseline's own); edited rows of two targets
    share a forward. Where the edit applies: heads.edit_start's 'text' stage."""
    sums, n_tokens = np.zeros((len(targets), 2)), 0
    edited = [j for j, t in enumerate(targets) if t.edit is not None]
    tokenizer.padding_side = "right"
    for i in tqdm(range(0, len(docs), batch_size), desc="CE/KL"):
        enc = tokenizer(docs[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens).to(model.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]  # [docs, seq]
        counted = (mask[:, 1:] * mask[:, :-1]).float()  # positions that predict a real next token
        reference = model(**enc).logits[:, :-1].float().log_softmax(-1)  # [docs, seq-1, vocab]
        n_tokens += counted.sum().item()
        for g in [[j] for j in range(len(targets)) if j not in edited] + [edited[k:k + 2] for k in
                                                                           range(0, len(edited), 2)]:
            group, d = [targets[j] for j in g], len(ids)
            logprobs = reference[None]
            if group[0].edit is not None:  # [targets, docs, seq-1, vocab]
                tags, applies = [t.tag for t in group for _ in range(d)], [t.apply for t in group for _ in range(d)]
                with edit_context(model, batch, tags, heads.row_starts(applies, "text", torch.zeros(len(tags)))):
                    logits = model(input_ids=ids.repeat(len(g), 1), attention_mask=mask.repeat(len(g), 1)).logits
                logprobs = logits[:, :-1].float().log_softmax(-1).view(len(g), *reference.shape)
            ce = -(logprobs.gather(3, ids[None, :, 1:, None].expand(len(g), -1, -1, 1))[..., 0] * counted)
            kl = (reference.exp() * (reference - logprobs)).sum(-1) * counted  # [targets, docs, seq-1]
            sums[g] += torch.stack([ce.sum((1, 2)), kl.sum((1, 2))], 1).double().cpu().numpy()
    return [{"ce": ce / n_tokens, "kl": kl / n_tokens} for ce, kl in sums]


# ---- The documents

def load_texts(args, model, tokenizer, model_about):
    """(documents, about): --n-texts documents (seeded choice) and where they came from."""
    source, docs = args.text, None
    if source == "auto":
        source, docs = HUB_TEXT, hub_documents(HUB_TEXT)
        if isinstance(docs, Exception):  # offline: the documented fallback, recorded in the results
            print(f"cannot reach {HUB_TEXT} ({type(docs).__name__}): using text the model samples itself (--text self)")
            source = "self"
    elif source != "self" and os.path.isfile(source):
        docs = read_text_file(source)
    elif source != "self" and isinstance(docs := hub_documents(source), Exception):
        raise SystemExit(f"--text {source}: not a local file and not loadable from the hub ({type(docs).__name__}); "
                         "pass a local .txt/.jsonl, or --text self for text the model samples itself")
    if source == "self":
        return self_texts(args, model, tokenizer, model_about)
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise SystemExit(f"--text {source} holds no text: give a file with documents (or --text self)")
    keep = np.random.default_rng(args.seed).permutation(len(docs))[:args.n_texts]
    return [docs[i] for i in sorted(keep.tolist())], {"source": source, "n_documents": int(len(keep))}


def hub_documents(name):
    """The 'text' column of a hub dataset's train split, or the exception that stopped it (offline)."""
    if not models.hub_reachable():
        return ConnectionError("the Hugging Face hub is unreachable")
    try:
        from datasets import load_dataset
        return list(load_dataset(name, split="train")["text"])
    except Exception as e:
        return e


def read_text_file(path):
    """Documents of a local .jsonl ({"text": ...} per line) or text file (split at blank lines), or a sentence."""
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                return re.split(r"\n\s*\n", f.read())
            lines = [(i, json.loads(line)) for i, line in enumerate(f, 1) if line.strip()]
    except (UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"--text {path} is not a UTF-8 text or JSON-lines file ({type(e).__name__}): pass a .txt "
                         "(documents split by blank lines) or a .jsonl with a \"text\" key per line") from None
    bad = [i for i, row in lines if not isinstance(row, dict) or not isinstance(row.get("text"), str)]
    if bad:
        raise SystemExit(f"--text {path}: line {bad[0]} (and {len(bad) - 1} more) has no \"text\" string; each line "
                         "must be a JSON object such as {\"text\": \"...\"}")
    return [row["text"] for _, row in lines]


def self_texts(args, model, tokenizer, model_about):
    """Offline CE/KL text: documents the unedited model samples (seeded, temperature 1) from NEUTRAL_PROMPTS, cached
    per model; on the model's own text, KL(original || edited) is the per-token divergence a user of it would see."""
    key = hashlib.sha1(json.dumps([model_about["model"], heads.fingerprint(model), args.n_texts, args.text_tokens,
                                   args.seed, NEUTRAL_PROMPTS]).encode()).hexdigest()[:12]
    path = os.path.join(args.cache_dir, "texts", f"{os.path.basename(model_about['model'].rstrip('/'))}-{key}.json")
    # the note is part of the results' settings (an earlier run's results compare equal only with the same words)
    about = {"source": "self", "note": "text sampled by the unedited model from evaluate.NEUTRAL_PROMPTS "
             "(seeded, temperature 1): the hub sample was not used", "n_documents": args.n_texts, "cache": path}
    if os.path.isfile(path):
        return runfiles.read_json(path), about
    generator, docs = torch.Generator().manual_seed(args.seed), []
    prompts = [NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)] for i in range(args.n_texts)]
    for i in tqdm(range(0, len(prompts), 16), desc="sampling offline CE/KL text (once per model)"):
        batch = prompts[i:i + 16]
        docs += [p + t for p, t in zip(batch, generate(model, tokenizer, batch, args.text_tokens, generator=generator,
                                                         stop=False))]
    runfiles.write_json(path, docs)
    return docs, about
