"""Tests of iti.py: the edit vector by hand, the edit file's provenance, and the written edit applied to a tiny model
moves exactly the chosen heads' outputs by exactly that vector, at the positions ITI's convention says.

Run: python -m pytest -q test_iti.py
"""
import inspect
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import heads
import iti
import models

torch.set_num_threads(1)


def write_probe(folder, geo, model_name="tiny-llama", fingerprint=(0.5,) * 16, seed=0):
    """A probe folder as probe.py writes it, with seeded random statistics."""
    g = torch.Generator().manual_seed(seed)
    L, H, D = geo.n_layers, geo.n_heads, geo.head_dim
    tensors = {"accuracy": torch.rand(L, H, generator=g), "mean": torch.randn(L, H, D, generator=g)}
    for k in ("mass_mean", "probe", "random"):
        u = torch.randn(L, H, D, generator=g)
        tensors[f"direction_{k}"] = u / u.norm(dim=-1, keepdim=True)
        tensors[f"sigma_{k}"] = torch.rand(L, H, generator=g) + 0.5
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "probe.safetensors"))
    ranking = [list(divmod(int(i), H)) for i in tensors["accuracy"].flatten().argsort(descending=True, stable=True)]
    with open(os.path.join(folder, "probe.json"), "w") as f:
        json.dump({"geometry": vars(geo), "ranking": ranking, "model": model_name, "fingerprint": list(fingerprint),
                   "seed": seed, "prompt_format": "random_question"}, f)
    return tensors, ranking


def read_edit(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["edit"])


def test_vector_equals_the_hand_formula(tmp_path):
    geo = heads.Geometry(2, 3, 2)
    folder = str(tmp_path / "run" / "probe")
    write_probe(folder, geo)
    stats = {"direction_mass_mean": torch.zeros(2, 3, 2), "sigma_mass_mean": torch.ones(2, 3)}
    stats["direction_mass_mean"][0, 1] = torch.tensor([0.6, 0.8])
    stats["direction_mass_mean"][1, 2] = torch.tensor([0.0, -1.0])
    stats["sigma_mass_mean"][0, 1], stats["sigma_mass_mean"][1, 2] = 2.0, 0.5
    stats.update({f"{k}_{d}": torch.ones(2, 3, *((2,) if k == "direction" else ())) for k in ("direction", "sigma")
                  for d in ("probe", "random")})
    save_file(stats, os.path.join(folder, "probe.safetensors"))
    iti.main(["--probe", folder, "--heads", "0.1,1.2", "--alpha", "3", "10", "--out", str(tmp_path / "e-a{alpha}.st")])
    tensors, meta = read_edit(str(tmp_path / "e-a3.st"))
    expected = torch.zeros(2, 3, 2)
    expected[0, 1] = torch.tensor([3 * 2 * 0.6, 3 * 2 * 0.8])  # alpha * sigma * u
    expected[1, 2] = torch.tensor([0.0, 3 * 0.5 * -1.0])
    torch.testing.assert_close(tensors["offset"], expected)
    assert tensors["head_mask"].tolist() == [[0, 1, 0], [0, 0, 1]] and "a" not in tensors and "b" not in tensors
    torch.testing.assert_close(read_edit(str(tmp_path / "e-a10.st"))[0]["offset"], expected * 10 / 3)
    assert {k: meta[k] for k in ("model", "method", "head_spec", "apply", "seed", "alpha", "direction", "k")} == {
        "model": "tiny-llama", "method": "iti", "head_spec": "0.1,1.2", "apply": "iti", "seed": 0, "alpha": 3.0,
        "direction": "mass_mean", "k": 2}
    assert meta["heads"] == ["0.1", "1.2"] and meta["geometry"] == vars(geo) and "command" in meta["run"]


def test_head_specs_out_names_and_refusals(tmp_path):
    geo = heads.Geometry(3, 4, 4)
    folder = str(tmp_path / "run" / "probe")
    tensors, ranking = write_probe(folder, geo)
    iti.main(["--probe", folder, "--heads", "top:2", "--direction", "probe"])
    offset, meta = read_edit(str(tmp_path / "run" / "edits" / "iti-top2-probe-a15.safetensors"))
    assert meta["heads"] == heads.format_heads(sorted(map(tuple, ranking[:2])))
    l, h = ranking[0]
    expected = 15 * tensors["sigma_probe"][l, h] * tensors["direction_probe"][l, h]  # alpha * sigma * u
    torch.testing.assert_close(offset["offset"][l, h], expected)
    iti.main(["--probe", folder, "--heads", "random:3:7", "--alpha", "0.5"])
    _, meta = read_edit(str(tmp_path / "run" / "edits" / "iti-random3-7-a0.5.safetensors"))
    assert meta["heads"] == heads.format_heads(heads.parse_heads("random:3:7", geo)) and meta["k"] == 3
    with pytest.raises(SystemExit, match="put '\\{alpha\\}' in it"):
        iti.main(["--probe", folder, "--alpha", "1", "2", "--out", str(tmp_path / "one.safetensors")])
    with pytest.raises(SystemExit, match="no probe.json there; run probe.py --out"):
        iti.main(["--probe", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="out of range"):
        iti.main(["--probe", folder, "--heads", "3.0"])


def test_non_finite_alpha_and_broken_probes_are_refused(tmp_path):
    geo = heads.Geometry(3, 4, 4)
    folder = str(tmp_path / "run" / "probe")
    tensors, _ = write_probe(folder, geo)
    for bad in ("nan", "inf"):
        with pytest.raises(SystemExit, match="every alpha must be a finite number"):
            iti.main(["--probe", folder, "--alpha", "5", bad])
    with pytest.raises(SystemExit, match="takes no --alpha"):
        iti.main(["--probe", folder, "--ablate", "--alpha", "5"])
    assert not os.path.exists(tmp_path / "run" / "edits")
    tensors["sigma_mass_mean"][1, 2] = float("nan")
    save_file(tensors, os.path.join(folder, "probe.safetensors"))
    with pytest.raises(SystemExit, match="sigma_mass_mean has shape \\[3, 4\\] or non-finite values"):
        iti.main(["--probe", folder])
    write_probe(folder, geo, fingerprint=())  # a probe.json that does not say which weights it was made on
    with pytest.raises(SystemExit, match="does not name its model, weight fingerprint"):
        iti.main(["--probe", folder])


def test_ablate_writes_the_heads_mean_output_at_every_token(tmp_path):
    if "ablate" not in inspect.signature(heads.Edit).parameters:
        pytest.skip("heads.Edit has no ablate= yet (mean-ablation lands in heads.py)")
    model, tok, _ = models.load_model("tiny-llama")
    geo = heads.geometry(model)
    folder = str(tmp_path / "run" / "probe")
    tensors, _ = write_probe(folder, geo, fingerprint=heads.fingerprint(model))
    iti.main(["--probe", folder, "--heads", "0.3,2.1", "--ablate"])
    path = str(tmp_path / "run" / "edits" / "ablate-0.3_2.1.safetensors")
    edit = heads.load_edit(path, model)
    assert {k: edit.meta[k] for k in ("method", "apply", "head_spec", "k")} == {
        "method": "ablate", "apply": "all", "head_spec": "0.3,2.1", "k": 2}
    seen = {}
    projs = heads.out_projections(model)
    handles = [p.register_forward_hook(lambda m, a, out, l=l: seen.__setitem__(l, a[0].clone()))
               for l, p in enumerate(projs)]
    enc = tok(["Q: What is fact 1?\nA: It is 1."], return_tensors="pt")
    try:
        with torch.no_grad():
            model(**enc)
            plain = {l: o.view(*o.shape[:2], geo.n_heads, geo.head_dim) for l, o in seen.items()}
            with heads.edited(model, edit):
                model(**enc)
    finally:
        for handle in handles:
            handle.remove()
    o0, o2 = (seen[l].view(*seen[l].shape[:2], geo.n_heads, geo.head_dim) for l in (0, 2))  # [1, seq, H, D]
    torch.testing.assert_close(o0[0, :, 3], tensors["mean"][0, 3].expand_as(o0[0, :, 3]))  # every token: the mean
    torch.testing.assert_close(o2[0, :, 1], tensors["mean"][2, 1].expand_as(o2[0, :, 1]))
    torch.testing.assert_close(o0[0, :, :3], plain[0][0, :, :3])  # the other heads of layer 0 untouched


def test_ablate_needs_a_probe_with_mean_outputs(tmp_path):
    geo = heads.Geometry(3, 4, 4)
    folder = str(tmp_path / "run" / "probe")
    tensors, _ = write_probe(folder, geo)
    del tensors["mean"]
    save_file(tensors, os.path.join(folder, "probe.safetensors"))
    with pytest.raises(SystemExit, match="has no 'mean'.*run probe.py --out"):
        iti.main(["--probe", folder, "--heads", "top:2", "--ablate"])


def record_edit_deltas(model, calls, edit, start):
    """Run each of `calls` (functions of the cache so far) inside edited(model, edit, start); returns, per layer, the
    o_proj input after minus before the edit, position by position: {layer: [batch, seq, H*D]}."""
    projs = heads.out_projections(model)
    seen = {l: [] for l in range(len(projs))}
    before = {}
    cache, handles = None, []
    try:
        with torch.no_grad(), heads.edited(model, edit, start=start):
            # prepended once the edit's hooks are on: sees o^l before the edit, whichever end the edit hooks in at
            handles += [p.register_forward_pre_hook(lambda m, a, l=l: before.__setitem__(l, a[0].clone()),
                                                    prepend=True) for l, p in enumerate(projs)]
            handles += [p.register_forward_hook(lambda m, a, out, l=l: seen[l].append(a[0] - before[l]))
                        for l, p in enumerate(projs)]  # sees o^l as the projection reads it, after the edit
            for call in calls:
                cache = call(cache)
    finally:
        for handle in handles:
            handle.remove()
    return {l: torch.cat(d, 1) for l, d in seen.items()}


def expected_deltas(edit, geo, batch, seq, where):
    """What ITI's edit should add: offset[l, h] at the heads' slices, at positions where[batch, seq], zero elsewhere."""
    vector = (edit.offset * edit.head_mask[..., None]).flatten(1)  # [L, H*D]
    return {l: where[..., None].float() * vector[l] for l in range(geo.n_layers)}


@pytest.fixture(scope="module")
def tiny_edit(tmp_path_factory):
    model, tok, _ = models.load_model("tiny-llama")
    geo = heads.geometry(model)
    folder = str(tmp_path_factory.mktemp("run") / "probe")
    write_probe(folder, geo, fingerprint=heads.fingerprint(model))
    path = str(tmp_path_factory.mktemp("edits") / "iti.safetensors")
    iti.main(["--probe", folder, "--heads", "0.3,1.2,2.0", "--alpha", "4", "--out", path])
    edit = heads.load_edit(path, model)
    assert edit.meta["apply"] == "iti"
    return model, tok, geo, edit


def test_mc_scoring_moves_answer_tokens_only(tiny_edit):
    model, tok, geo, edit = tiny_edit
    prompts, answers = ["Q: What is fact 1?\nA:", "Q: Hi?\nA:"], [" It is 1.", " Nobody knows at all."]
    tok.padding_side = "right"
    enc = tok([p + a for p, a in zip(prompts, answers)], return_tensors="pt", padding=True)
    first_answer = torch.tensor([len(tok(p)["input_ids"]) for p in prompts])  # first answer token of each example
    start = heads.edit_start(edit.meta["apply"], "mc", first_answer)
    deltas = record_edit_deltas(model, [lambda _: model(**enc)], edit, start)
    where = torch.arange(enc["input_ids"].shape[1])[None, :] >= first_answer[:, None]  # [batch, seq]
    for layer, expected in expected_deltas(edit, geo, *where.shape, where).items():
        torch.testing.assert_close(deltas[layer], expected, atol=1e-5, rtol=1e-5)
    assert deltas[1].abs().amax((0, 2)).gt(0).sum() > 0 and deltas[1][:, :first_answer.min()].abs().max() == 0


def test_generation_moves_last_prompt_token_and_every_generated_token(tiny_edit):
    model, tok, geo, edit = tiny_edit
    ids = tok(["Q: What is fact 2?\nA: It is"], return_tensors="pt")["input_ids"]
    prompt, generated = ids[:, :-2], ids[:, -2:]  # two "generated" tokens fed one at a time through the KV cache
    start = heads.edit_start(edit.meta["apply"], "generate", torch.tensor([prompt.shape[1] - 1]))
    calls = [lambda _: model(prompt, use_cache=True).cache,
             lambda cache: model(generated[:, :1], cache=cache, use_cache=True).cache,
             lambda cache: model(generated[:, 1:], cache=cache, use_cache=True).cache]
    deltas = record_edit_deltas(model, calls, edit, start)
    where = torch.arange(ids.shape[1])[None, :] >= prompt.shape[1] - 1
    for layer, expected in expected_deltas(edit, geo, 1, ids.shape[1], where).items():
        assert deltas[layer].shape == expected.shape
        torch.testing.assert_close(deltas[layer], expected, atol=1e-5, rtol=1e-5)


def test_text_moves_every_token(tiny_edit):
    model, tok, geo, edit = tiny_edit
    enc = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    start = heads.edit_start(edit.meta["apply"], "text", torch.tensor([3]))
    assert start is None
    deltas = record_edit_deltas(model, [lambda _: model(**enc)], edit, start)
    where = torch.ones(1, enc["input_ids"].shape[1], dtype=torch.bool)
    for layer, expected in expected_deltas(edit, geo, 1, where.shape[1], where).items():
        torch.testing.assert_close(deltas[layer], expected, atol=1e-5, rtol=1e-5)
    assert deltas[0][..., 3 * geo.head_dim:].abs().min() > 0  # head 0.3 moved at every token ...
    assert deltas[0][..., :3 * geo.head_dim].abs().max() == 0  # ... and the other heads of layer 0 did not
