"""heads.py - find, record and edit attention-head outputs o_h^l, the input of each layer's attention output projection.

Layer l's attention output projection W^l (o_proj in Llama/Mistral/Qwen/Gemma, dense in GPT-NeoX/Phi, c_proj in GPT-2,
out_proj in OPT) reads o^l = [o_1^l, ..., o_H^l], the H head outputs of size D side by side. Every edit in this project
is a forward pre-hook on W^l that rewrites o^l (`edited_output` is the formula, `edited` the one place it is hooked):
    o^l <- o^l + offset^l * mask^l + <a^l, o^l> (b^l * mask^l),   then o_h^l <- ablate_h^l on ablated heads
offset: constant per-head vectors (ITI, or a learned offset); a, b: the rank-1 reparameterised LoRA (IPO); ablate: the
heads' mean outputs (mean ablation, the necessity trial); mask^l: 1 on the D features of each edited head of layer l.
An EditBatch stacks E edits so that one forward runs each row of a batch under its own edit. Where an edit applies in
each stage of evaluation is decided by `edit_start` alone. Heads are named (layer, head), 'L.H' on the command line.
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


def _on(tensor, o):
    """`tensor` on o's device and in o's dtype: under --device auto each layer may sit on its own device."""
    return tensor.to(device=o.device, dtype=o.dtype)


def heads_at(o, positions):
    """o [batch, seq, H*D] at one position per example -> [batch, H*D] (positions: [batch], any device)."""
    rows = torch.arange(o.shape[0], device=o.device)
    return o[rows, positions.to(o.device)]


class _Stop(Exception):  # ends record_heads' forward after the last layer it needs
    pass


@torch.no_grad()
def record_heads(model, positions, **inputs):
    """One forward pass; returns o_h^l at one position per example: [batch, layers, heads, head_dim] on positions'
    device. Only the chosen positions are kept, and the pass stops at the last layer's output projection."""
    geo, projs = geometry(model), out_projections(model)
    outputs = []

    def hook(module, args):
        outputs.append(heads_at(args[0], positions).float().to(positions.device))  # [batch, H*D]
        if len(outputs) == geo.n_layers:
            raise _Stop

    handles = [p.register_forward_pre_hook(hook, prepend=True) for p in projs]
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outputs, 1).view(len(positions), geo.n_layers, geo.n_heads, geo.head_dim)


def edited_output(o, mask, offset=None, a=None, b=None, ablate_mask=None, ablate=None):
    """The edit's formula, for one edit (terms [H*D]) or a batch of edits (terms [batch, 1, H*D], row by row):
        o <- o + offset * mask + <a, o> (b * mask), then o_h <- ablate_h on the heads of ablate_mask.
    o: [batch, seq, H*D]; masks hold 1 on the features of the edited heads. Absent terms are None."""
    new = o
    if offset is not None:
        new = new + offset * mask
    if a is not None:
        read = o @ a if a.dim() == 1 else o @ a.transpose(1, 2)  # <a, o>: [batch, seq] or [batch, seq, 1]
        new = new + (read.unsqueeze(-1) if a.dim() == 1 else read) * (b * mask)
    if ablate is not None:
        new = torch.where(ablate_mask.bool(), ablate, new)  # replaced, not added: exactly the mean
    return new


class Edit(nn.Module):
    """An edit of the head outputs at the heads in `head_mask` [L, H] (bool). Parameters (any may be None):
    offset [L, H, D]: o_h += offset_h;  a, b [L, H*D]: o += <a, o> (b * mask);  ablate [L, H, D]: o_h <- ablate_h
    (mean ablation: the head's output replaced by its mean; meta method 'ablate', applied at every token).
    `meta`: provenance, saved with it."""

    def __init__(self, geo, head_mask, offset=None, a=None, b=None, ablate=None, meta=None):
        super().__init__()
        if ablate is not None and (offset is not None or a is not None):
            raise ValueError("an ablation replaces the head outputs: it takes no offset or rank-1 terms")
        if (a is None) != (b is None):
            raise ValueError("a rank-1 edit needs both a and b")
        self.geo = geo
        self.register_buffer("head_mask", head_mask.bool())
        self.offset = None if offset is None else nn.Parameter(offset.float())
        self.a = None if a is None else nn.Parameter(a.float())
        self.b = None if b is None else nn.Parameter(b.float())
        self.register_buffer("ablate", None if ablate is None else ablate.float())  # a statistic, never trained
        self.meta = {"method": "ablate", "apply": "all"} if ablate is not None else {}
        self.meta.update(meta or {}, geometry=vars(geo), heads=format_heads(mask_to_heads(self.head_mask)))

    def terms(self, layer, o):
        """This layer's terms of edited_output, on o's device and in its dtype."""
        mask = _on(self.head_mask[layer].repeat_interleave(self.geo.head_dim), o)  # [H*D]
        flat = lambda t: None if t is None else _on(t[layer].flatten(), o)  # noqa: E731  [H*D]
        return dict(mask=mask, offset=flat(self.offset), a=flat(self.a), b=flat(self.b), ablate=flat(self.ablate),
                    ablate_mask=None if self.ablate is None else mask)

    def delta(self, layer, o):
        """What the edit adds to o^l [..., H*D]."""
        return edited_output(o, **self.terms(layer, o)) - o


class EditBatch(nn.Module):
    """E edits stacked ([E, ...] parameters), so that one forward runs every row of a batch under its own edit: the
    rows are tagged with their edit's index (heads.NO_EDIT: unedited). Row by row the same formula as Edit."""

    def __init__(self, edits):
        super().__init__()
        geo = edits[0].geo
        if any(e.geo != geo for e in edits):
            raise ValueError("an edit batch needs edits of one geometry")
        self.geo, self.n_edits = geo, len(edits)
        L, H, D = geo.n_layers, geo.n_heads, geo.head_dim
        zero = {"offset": (L, H, D), "a": (L, H * D), "b": (L, H * D), "ablate": (L, H, D)}

        def stack(name):  # [E + 1, ...]: the last row is the unedited one (heads.NO_EDIT)
            if all(getattr(e, name) is None for e in edits):
                return None
            return torch.stack([getattr(e, name).detach() if getattr(e, name) is not None else torch.zeros(zero[name])
                                for e in edits] + [torch.zeros(zero[name])])

        self.register_buffer("head_mask", torch.stack([e.head_mask for e in edits] + [edits[0].head_mask & False]))
        self.register_buffer("ablate_mask", torch.stack([e.head_mask & (e.ablate is not None) for e in edits]
                                                        + [edits[0].head_mask & False]))
        for name in zero:
            self.register_buffer(name, stack(name))
        self.meta = [e.meta for e in edits]

    def terms(self, layer, o, rows):
        """This layer's terms of edited_output for the rows of a batch, [batch, 1, H*D] each; rows: [batch] edit
        indices (NO_EDIT = -1 for unedited rows)."""
        rows = rows.to(o.device) % (self.n_edits + 1)  # NO_EDIT (-1) -> the zero row
        D = self.geo.head_dim
        pick = lambda t: None if t is None else _on(t[:, layer].flatten(1), o)[rows, None]  # noqa: E731
        mask = _on(self.head_mask[:, layer].repeat_interleave(D, -1), o)[rows, None]  # [batch, 1, H*D]
        ablate_mask = None
        if self.ablate is not None:
            ablate_mask = _on(self.ablate_mask[:, layer].repeat_interleave(D, -1), o)[rows, None]
        return dict(mask=mask, offset=pick(self.offset), a=pick(self.a), b=pick(self.b), ablate=pick(self.ablate),
                    ablate_mask=ablate_mask)


NO_EDIT = -1  # the tag of an unedited row in an edit batch


class _Placement:
    """An `edited` block's rows: their edit tags and first positions; keep() follows rows leaving the batch."""

    def __init__(self, start, rows):
        self.start, self.rows = start, rows

    def keep(self, indices):
        """Keep only these rows of the running batch (indices into its current rows)."""
        indices = indices.cpu()
        if self.start is not None and len(self.start) > 1:
            self.start = self.start[indices]
        if self.rows is not None:
            self.rows = self.rows[indices]


@contextmanager
def edited(model, edit, start=None, rows=None):
    """Inside the block, the model runs with `edit` applied (an Edit, or an EditBatch with `rows`: [batch] edit
    indices, one per row). start: None for every token, or a [batch] (or [1]) tensor of the first position to edit in
    each example (padded index; heads.edit_start says which). Positions are counted across forward calls, so in
    KV-cached generation every generated token is edited too. Yields a placement whose keep(indices) follows rows
    leaving the batch. Leaving the block removes the hooks: the model is exactly the original again."""
    if isinstance(edit, EditBatch) != (rows is not None):
        raise ValueError("edited: an EditBatch needs rows (one edit index per row), a single Edit takes none")
    projs = out_projections(model)
    seen = [0] * len(projs)  # tokens each layer has seen since the block began
    placement = _Placement(start, None if rows is None else torch.as_tensor(rows).long())

    def make_hook(layer):
        def hook(module, args):
            o = args[0]  # [batch, seq, H*D]
            terms = edit.terms(layer, o) if rows is None else edit.terms(layer, o, placement.rows)
            new = edited_output(o, **terms)
            if placement.start is not None:
                position = seen[layer] + torch.arange(o.shape[1], device=o.device)
                seen[layer] += o.shape[1]
                reached = position[None, :] >= placement.start[:, None].to(o.device)  # [batch, seq]
                new = torch.where(reached.unsqueeze(-1), new, o)
            return (new,) + tuple(args[1:])
        return hook

    layers = [l for l in range(len(projs)) if edit.head_mask[..., l, :].any()]
    # prepend: the edit sees o^l as the model computes it, before any precision hook casts it for W^l
    handles = [projs[l].register_forward_pre_hook(make_hook(l), prepend=True) for l in layers]
    try:
        yield placement
    finally:
        for h in handles:
            h.remove()


APPLY = {"iti": "ITI's convention: MC answer tokens; generation from the last prompt token on; every token of CE/KL text",
         "all": "every token (the LoRA-equivalent edit, as IPO trains it; mean ablation)"}
STAGES = ("mc", "generate", "text")


def edit_start(apply, stage, first_position):
    """The one place that decides where an edit applies: the `start` for `edited` under a convention
    (edit.meta['apply'], or a user override) in one stage of evaluation. stage: 'mc' (first_position = first answer
    token), 'generate' (= last prompt token) or 'text' (CE/KL). Returns None (every token, the prompt included) or the
    [batch] first positions to edit."""
    if apply not in APPLY:
        raise SystemExit(f"unknown edit convention {apply!r}: choose {' or '.join(APPLY)}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    return None if apply == "all" or stage == "text" else first_position


def reaches_prompt(apply, stage):
    """True when, under this convention, the edit reaches the prompt's tokens in this stage (edit_start says every
    token): then the edited model's prompt cache cannot be the unedited one."""
    return edit_start(apply, stage, torch.zeros(1, dtype=torch.long)) is None


def row_starts(applies, stage, first_position):
    """edit_start for a batch whose rows follow different conventions: [batch] first positions (0 where the edit
    reaches every token of the block). applies: one convention per row (None: an unedited row);
    first_position: [batch]."""
    starts = first_position.clone()
    for i, apply in enumerate(applies):
        if apply is not None and edit_start(apply, stage, first_position[i:i + 1]) is None:
            starts[i] = 0
    return starts


EDIT_TENSORS = ("head_mask", "offset", "a", "b", "ablate")


def check_edit_tensors(tensors, geo, where):
    """Refuses an edit whose tensors have the wrong names, shapes or non-finite values, with a sentence."""
    L, H, D = geo.n_layers, geo.n_heads, geo.head_dim
    shapes = {"head_mask": (L, H), "offset": (L, H, D), "a": (L, H * D), "b": (L, H * D), "ablate": (L, H, D)}
    unknown = set(tensors) - set(shapes)
    if unknown or "head_mask" not in tensors or not set(tensors) & {"offset", "a", "ablate"}:
        raise SystemExit(f"{where} holds the tensors {sorted(tensors)}; an edit holds head_mask and offset, a and b, "
                         "or ablate: rewrite it with iti.py or ipo_edit.py")
    for name, t in tensors.items():
        if tuple(t.shape) != shapes[name]:
            raise SystemExit(f"{where}: {name} has shape {list(t.shape)}, expected {list(shapes[name])} for this "
                             f"model ({geo}): the file is damaged or was made for another model")
        if not torch.isfinite(t.float()).all():
            raise SystemExit(f"{where}: {name} holds NaN or inf values; an edit must be finite: refit it "
                             "(e.g. a finite --alpha for iti.py, a finite --tau for ipo_edit.py)")
    if ("a" in tensors) != ("b" in tensors):
        raise SystemExit(f"{where}: a rank-1 edit needs both a and b: the file is damaged, rewrite it")


def save_edit(path, edit):
    from safetensors.torch import save_file
    from runfiles import write_atomic
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in
               [("head_mask", edit.head_mask.to(torch.uint8)), ("offset", edit.offset), ("a", edit.a), ("b", edit.b),
                ("ablate", edit.ablate)] if v is not None}
    check_edit_tensors(tensors, edit.geo, f"the edit for {path}")  # never write an edit that cannot be read back
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"edit": json.dumps(edit.meta)}))


def load_edit(path, model):
    """Read an edit file; refuses one fitted on a model of another geometry or with other weights, and one whose
    metadata, tensor shapes or values are damaged."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["edit"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # missing file, not safetensors (SafetensorError), no edit metadata
        raise SystemExit(f"{path} is not an edit file written by iti.py or ipo_edit.py ({e})") from None
    try:
        saved = Geometry(**{k: int(meta["geometry"][k]) for k in ("n_layers", "n_heads", "head_dim")})
    except (KeyError, TypeError, ValueError):
        raise SystemExit(f"{path}: its metadata lacks the model geometry (n_layers, n_heads, head_dim): the file is "
                         "damaged or not written by iti.py / ipo_edit.py; rewrite it") from None
    geo = geometry(model)
    if saved != geo:
        raise SystemExit(f"{path} was fitted on {meta.get('model', 'another model')} ({saved}); this model has {geo}")
    if meta.get("apply") is not None and meta["apply"] not in APPLY:
        raise SystemExit(f"{path}: its metadata says apply {meta['apply']!r}; an edit applies {' or '.join(APPLY)}")
    if meta.get("fingerprint") and not torch.allclose(torch.tensor(meta["fingerprint"]), torch.tensor(fingerprint(model)),
                                                      rtol=2e-2, atol=1e-3):
        raise SystemExit(f"{path} was fitted on {meta.get('model')}, whose weights differ from this model's: "
                         "refit the edit on this model")
    check_edit_tensors(tensors, geo, path)
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
