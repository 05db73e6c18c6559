"""heads.py - find, record and edit attention-head outputs o_h^l, the input of each layer's attention output projection.

Layer l's attention output projection W^l (o_proj in Llama/Mistral/Qwen/Gemma, dense in GPT-NeoX/Phi, c_proj in GPT-2,
out_proj in OPT) reads o^l = [o_1^l, ..., o_H^l], the H head outputs of size D side by side. Every edit in this project
is a forward pre-hook on W^l that adds a function of o^l to o^l (see `edited`, the one place an edit is applied):
    o^l <- o^l + offset^l * mask^l + <a^l, o^l> (b^l * mask^l)
offset: constant per-head vectors (ITI, or a learned offset); a, b: the rank-1 reparameterised LoRA (IPO);
mask^l: 1 on the D features of each edited head of layer l. Heads are named (layer, head), 'L.H' on the command line.
"""
import json
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

OUT_PROJ_NAMES = ("o_proj", "dense", "c_proj", "out_proj")


@dataclass(frozen=True)
class Geometry:
    n_layers: int
    n_heads: int
    head_dim: int

    def __str__(self):
        return f"{self.n_layers} layers x {self.n_heads} heads x {self.head_dim} dims"


def out_projections(model):
    """Each layer's attention output projection, found by structure: in the ModuleList of decoder layers, the module
    named o_proj/dense/c_proj/out_proj whose parent is an attention block (GPT-2's MLP also has a c_proj)."""
    n_layers = model.config.get_text_config().num_hidden_layers
    for layers in model.modules():
        if isinstance(layers, nn.ModuleList) and len(layers) == n_layers:
            projs = [[m for name, m in layer.named_modules() if len(name.split(".")) >= 2
                      and name.split(".")[-1] in OUT_PROJ_NAMES and "att" in name.split(".")[-2].lower()]
                     for layer in layers]
            if all(len(p) == 1 for p in projs):
                return [p[0] for p in projs]
    raise SystemExit(f"cannot find the attention output projections of {type(model).__name__}: expected a list of "
                     f"{n_layers} layers, each with one attention module holding one of {', '.join(OUT_PROJ_NAMES)}")


def geometry(model):
    config = model.config.get_text_config()
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    proj = out_projections(model)[0]
    in_features = proj.in_features if hasattr(proj, "in_features") else proj.weight.shape[0]  # GPT-2 Conv1D: [in, out]
    if in_features != n_heads * head_dim:
        raise SystemExit(f"{type(model).__name__}: the attention output projection reads {in_features} features, "
                         f"not num_attention_heads x head_dim = {n_heads} x {head_dim}")
    return Geometry(config.num_hidden_layers, n_heads, head_dim)


def fingerprint(model):
    """A few weights of the first and last output projections: tells an edit fitted on other weights."""
    projs = out_projections(model)
    return [round(float(x), 6) for p in (projs[0], projs[-1]) for x in p.weight.detach().flatten()[:8].float()]


def last_positions(attention_mask):
    """Index of each example's last real token, for left or right padding. [batch, seq] -> [batch]"""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)


class _Stop(Exception):
    pass


@torch.no_grad()
def record_heads(model, positions, **inputs):
    """One forward pass; returns o_h^l at one position per example: [batch, layers, heads, head_dim].
    Only the chosen positions are kept, and the pass stops at the last layer's output projection."""
    geo, projs = geometry(model), out_projections(model)
    rows = torch.arange(len(positions), device=positions.device)
    outputs = []

    def hook(module, args):
        outputs.append(args[0][rows, positions].float())  # [batch, H*D]
        if len(outputs) == geo.n_layers:
            raise _Stop

    handles = [p.register_forward_pre_hook(hook) for p in projs]
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outputs, 1).view(len(positions), geo.n_layers, geo.n_heads, geo.head_dim)


class Edit(nn.Module):
    """An edit of the head outputs at the heads in `head_mask` [L, H] (bool). Parameters (any may be None):
    offset [L, H, D]: o_h += offset_h;  a, b [L, H*D]: o += <a, o> (b * mask). `meta`: provenance, saved with it."""

    def __init__(self, geo, head_mask, offset=None, a=None, b=None, meta=None):
        super().__init__()
        self.geo = geo
        self.register_buffer("head_mask", head_mask.bool())
        self.offset = None if offset is None else nn.Parameter(offset.float())
        self.a = None if a is None else nn.Parameter(a.float())
        self.b = None if b is None else nn.Parameter(b.float())
        self.meta = dict(meta or {}, geometry=vars(geo), heads=format_heads(mask_to_heads(self.head_mask)))

    def delta(self, layer, o):
        """What the edit adds to o^l [..., H*D] (broadcastable to o)."""
        mask = self.head_mask[layer].repeat_interleave(self.geo.head_dim).to(o.dtype)  # [H*D]
        delta = 0  # an offset stays a [H*D] vector, broadcast over tokens: no [batch, seq, H*D] temporary
        if self.offset is not None:
            delta = self.offset[layer].flatten().to(o.dtype) * mask
        if self.a is not None:
            delta = delta + (o @ self.a[layer].to(o.dtype)).unsqueeze(-1) * (self.b[layer].to(o.dtype) * mask)
        return delta


@contextmanager
def edited(model, edit, start=None):
    """Inside the block, the model runs with `edit` applied. start: None for every token, or a [batch] tensor of the
    first position to edit in each example (padded index). Positions are counted across forward calls, so in
    KV-cached generation every generated token is edited too. Leaving the block removes the hooks: the model is
    exactly the original again."""
    projs = out_projections(model)
    seen = [0] * len(projs)  # tokens each layer has seen since the block began

    def make_hook(layer):
        def hook(module, args):
            o = args[0]  # [batch, seq, H*D]
            delta = edit.delta(layer, o)
            if start is not None:
                position = seen[layer] + torch.arange(o.shape[1], device=o.device)
                seen[layer] += o.shape[1]
                delta = delta * (position[None, :] >= start[:, None].to(o.device)).unsqueeze(-1).to(o.dtype)
            return (o + delta,) + tuple(args[1:])
        return hook

    layers = [l for l in range(len(projs)) if edit.head_mask[l].any()]
    handles = [projs[l].register_forward_pre_hook(make_hook(l)) for l in layers]
    try:
        yield edit
    finally:
        for h in handles:
            h.remove()


APPLY = {"iti": "ITI's convention: MC answer tokens; generation from the last prompt token on; every token of CE/KL text",
         "all": "every token (the LoRA-equivalent edit, as IPO trains it)"}


def edit_start(apply, stage, first_position):
    """The `start` for `edited` under a convention (edit.meta['apply'], or a user override) in one stage of evaluation.
    stage: 'mc' (first_position = first answer token), 'generate' (= last prompt token) or 'text' (CE/KL).
    Returns None (every token) or the [batch] first positions to edit."""
    if apply not in APPLY:
        raise SystemExit(f"unknown edit convention {apply!r}: choose {' or '.join(APPLY)}")
    return None if apply == "all" or stage == "text" else first_position


def save_edit(path, edit):
    from safetensors.torch import save_file
    from runfiles import write_atomic
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in
               [("head_mask", edit.head_mask.to(torch.uint8)), ("offset", edit.offset), ("a", edit.a), ("b", edit.b)]
               if v is not None}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"edit": json.dumps(edit.meta)}))


def load_edit(path, model):
    """Read an edit file; refuses one fitted on a model of another geometry or with other weights."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["edit"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # missing file, not safetensors (SafetensorError), no edit metadata
        raise SystemExit(f"{path} is not an edit file written by iti.py or ipo_edit.py ({e})") from None
    geo, saved = geometry(model), Geometry(**meta["geometry"])
    if saved != geo:
        raise SystemExit(f"{path} was fitted on {meta.get('model', 'another model')} ({saved}); this model has {geo}")
    if meta.get("fingerprint") and not torch.allclose(torch.tensor(meta["fingerprint"]), torch.tensor(fingerprint(model)),
                                                      rtol=2e-2, atol=1e-3):
        raise SystemExit(f"{path} was fitted on {meta.get('model')}, whose weights differ from this model's: "
                         "refit the edit on this model")
    device = out_projections(model)[0].weight.device
    return Edit(geo, tensors.pop("head_mask").bool(), **tensors, meta=meta).to(device)


# ---- Head specs: top:K, random:K:SEED, single:L.H, all, or L.H,L.H,...

def spec_name(spec):
    """The one file-name form of a head spec, used by every script: top:16 -> top16, random:16:3 -> random16-3,
    single:12.7 -> single12.7, all -> all, 12.7,3.1 -> 12.7_3.1."""
    kind, _, rest = spec.partition(":")
    return kind + rest.replace(":", "-") if rest else spec.replace(",", "_")


def format_heads(heads):
    return [f"{l}.{h}" for l, h in heads]


def mask_to_heads(head_mask):
    return [tuple(x) for x in head_mask.nonzero().tolist()]


def heads_to_mask(heads, geo):
    mask = torch.zeros(geo.n_layers, geo.n_heads, dtype=torch.bool)
    for l, h in heads:
        mask[l, h] = True
    return mask


def parse_heads(spec, geo, probe=None):
    """Sorted list of (layer, head). `probe`: a probe folder or probe.json, needed by top:K."""
    kind, _, rest = spec.partition(":")
    n_total = geo.n_layers * geo.n_heads
    bad = f"head spec {spec!r} is malformed: use top:K, random:K:SEED, single:L.H, all, or a list L.H,L.H"
    try:
        if kind == "all" and not rest:
            return [(l, h) for l in range(geo.n_layers) for h in range(geo.n_heads)]
        if kind in ("top", "random"):
            k, _, seed = rest.partition(":")
            k = int(k)
            if not 1 <= k <= n_total:
                raise SystemExit(f"head spec {spec!r}: K must be 1..{n_total} (this model has {geo})")
            if kind == "random":
                order = torch.randperm(n_total, generator=torch.Generator().manual_seed(int(seed)))
                return sorted(divmod(int(i), geo.n_heads) for i in order[:k])
            if probe is None:
                raise SystemExit(f"head spec {spec!r} ranks heads by a probe: pass --probe RUN/probe")
            path = probe if probe.endswith(".json") else f"{probe.rstrip('/')}/probe.json"
            with open(path) as f:
                ranked = json.load(f)
            if Geometry(**ranked["geometry"]) != geo:
                raise SystemExit(f"{path} was made on a model with {Geometry(**ranked['geometry'])}; this one has {geo}")
            return sorted(tuple(x) for x in ranked["ranking"][:k])
        heads = [tuple(int(x) for x in item.split(".")) for item in (rest if kind == "single" else spec).split(",")]
    except (ValueError, TypeError):
        raise SystemExit(bad) from None
    if kind == "single" and len(heads) != 1 or any(len(x) != 2 for x in heads):
        raise SystemExit(bad)
    for l, h in heads:
        if not (0 <= l < geo.n_layers and 0 <= h < geo.n_heads):
            raise SystemExit(f"head {l}.{h} is out of range: this model has {geo}")
    if len(set(heads)) != len(heads):
        raise SystemExit(f"head spec {spec!r} names a head twice")
    return sorted(heads)
