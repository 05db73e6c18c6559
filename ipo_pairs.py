"""ipo_pairs.py - the data of an IPO run (ipo_edit.py): preference pairs as token ids, and padded batches in which
the answers of all rows start at the same column.

  select_pairs   every (correct, incorrect) answer pair of the questions (tqa.preference_pairs), or a seeded subsample
  encode_pairs   [(prompt_ids, chosen_ids, rejected_ids)]: each answer tokenized alone and appended to its prompt
  collate        2B rows [shared prefix | prompt rest | answer]: the prompt start common to the batch runs once
                 (ipo_edit.answer_logps reuses its KV cache for every row); Batcher holds collate's settings for a run
  batches        the indices of each batch, in order or in a given (shuffled) order
"""
from dataclasses import dataclass

import torch

import tqa


def select_pairs(questions, limit, seed):
    pairs = tqa.preference_pairs(questions)
    if limit is not None and limit < len(pairs):
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:limit]
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    return pairs


def encode_pairs(tokenizer, pairs, instruction):
    """[(prompt_ids, chosen_ids, rejected_ids)]: answers tokenized alone (no special tokens) and appended to the
    prompt, so the log-probs cover exactly the answer tokens."""
    prompts, answers = {}, {}
    def prompt_ids(q):
        if q not in prompts:
            prompts[q] = tokenizer(tqa.qa_prompt(q, instruction))["input_ids"]
        return prompts[q]
    def answer_ids(a):
        if a not in answers:
            answers[a] = tokenizer(tqa.ANSWER_TEMPLATE.format(answer=a), add_special_tokens=False)["input_ids"]
        return answers[a]
    return [(prompt_ids(p["question"]), answer_ids(p["chosen"]), answer_ids(p["rejected"])) for p in pairs]


def collate(encoded, pad_id, device, share_prefix=True):
    """2B rows (the B chosen answers, then the B rejected ones) as [shared prefix | prompt rest | answer]: the prefix
    common to all prompts once (batch 1, its KV cache reused by every row), the rest of each prompt left-padded to P,
    the answer right-padded to A, so every answer starts at column P and the loss needs only the last A+1 logits.
    share_prefix=False: no prefix, every row holds its whole prompt (needed with gradient checkpointing)."""
    S = tqa.shared_prefix_length([p for p, _, _ in encoded]) if share_prefix else 0
    rows = [(p[S:], c) for p, c, _ in encoded] + [(p[S:], r) for p, _, r in encoded]
    P, A = max(len(p) for p, _ in rows), max(len(y) for _, y in rows)
    ids = torch.full((len(rows), P + A), pad_id, dtype=torch.long)  # [2B, P+A]
    mask = torch.zeros_like(ids)
    for i, (p, y) in enumerate(rows):
        ids[i, P - len(p):P + len(y)] = torch.tensor(p + y)
        mask[i, P - len(p):P + len(y)] = 1
    position_ids = S + (mask.cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
    if S:
        mask = torch.cat([torch.ones(len(rows), S, dtype=mask.dtype), mask], 1)  # [2B, S+P+A]: the prefix is seen
    return {"prefix": torch.tensor([encoded[0][0][:S]], device=device) if S else None,  # [1, S]
            "input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device),
            "targets": ids[:, P:].to(device), "answer_mask": mask[:, S + P:].to(device)}  # targets: [2B, A]


def shares_prefix(args):
    return not (args.no_shared_prefix or args.grad_checkpointing)  # transformers turns the cache off when checkpointing


@dataclass
class Batcher:
    """How pairs become batches in this run (collate's settings)."""
    pad_id: int
    device: torch.device
    share_prefix: bool = True

    def __call__(self, encoded):
        return collate(encoded, self.pad_id, self.device, self.share_prefix)


def batches(encoded, batch_size, order=None):
    order = range(len(encoded)) if order is None else order.tolist()
    order = list(order)
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]
