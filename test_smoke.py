"""Foundation tests: the hook helper (heads.py), the data (tqa.py), the models (models.py).

Run: python -m pytest -q
"""
import csv
import os

import pytest
import torch

import heads
import models
import tqa

torch.set_num_threads(1)
ARCHS = list(models.TINY_CONFIGS)


def encode(tok, texts, side="right"):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


def capture_out_proj(model, layer, **inputs):
    """(input, output) of layer `layer`'s output projection in one forward."""
    seen = {}
    proj = heads.out_projections(model)[layer]
    handle = proj.register_forward_hook(lambda m, args, out: seen.update(o=args[0].detach(), out=out.detach()))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["o"], seen["out"]


def proj_weight(model, layer):
    """W^l as [out, in] (GPT-2's Conv1D stores [in, out])."""
    proj = heads.out_projections(model)[layer]
    return proj.weight.T if type(proj).__name__ == "Conv1D" else proj.weight


def random_edit(geo, heads_list, scale=1.0, kind="offset", seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = heads.heads_to_mask(heads_list, geo)
    if kind == "offset":
        return heads.Edit(geo, mask, offset=scale * torch.randn(geo.n_layers, geo.n_heads, geo.head_dim, generator=g))
    hd = geo.n_heads * geo.head_dim
    return heads.Edit(geo, mask, a=scale * torch.randn(geo.n_layers, hd, generator=g),
                      b=scale * torch.randn(geo.n_layers, hd, generator=g))


# ---- heads.py

@pytest.mark.parametrize("name", ARCHS)
def test_zero_edit_is_bit_identical_and_removal_restores(tiny, name):
    model, tok, _ = tiny[name]
    geo = heads.geometry(model)
    enc = encode(tok, ["Q: What is fact 1? A: Fact 1 is true.", "Q: Hi"])
    with torch.no_grad():
        plain = model(**enc).logits
        with heads.edited(model, heads.Edit(geo, torch.ones(geo.n_layers, geo.n_heads),
                                            offset=torch.zeros(geo.n_layers, geo.n_heads, geo.head_dim))):
            zero = model(**enc).logits
        with heads.edited(model, random_edit(geo, [(0, 1), (geo.n_layers - 1, 0)])):
            moved = model(**enc).logits
        after = model(**enc).logits
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, moved)
    assert torch.equal(plain, after)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen3", "tiny-opt"])
def test_offset_moves_out_proj_by_its_column_block(tiny, name):
    model, tok, _ = tiny[name]
    geo = heads.geometry(model)
    enc = encode(tok, ["Q: What is fact 2? A: It is 2."])
    layer, head, D = 1, 2, geo.head_dim
    edit = random_edit(geo, [(layer, head)])
    _, out_plain = capture_out_proj(model, layer, **enc)
    with heads.edited(model, edit):
        _, out_edit = capture_out_proj(model, layer, **enc)
    expected = proj_weight(model, layer)[:, head * D:(head + 1) * D] @ edit.offset[layer, head]
    torch.testing.assert_close(out_edit - out_plain, expected.expand_as(out_plain), atol=1e-5, rtol=1e-4)
    _, out0_edit = capture_out_proj(model, 0, **enc)  # layer 0 is upstream of the edit: untouched
    with heads.edited(model, edit):
        _, out0_plain = capture_out_proj(model, 0, **enc)
    assert torch.equal(out0_edit, out0_plain)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_rank1_edit_equals_lora_by_hand(tiny, name):
    model, tok, _ = tiny[name]
    geo = heads.geometry(model)
    enc = encode(tok, ["Q: What is fact 3? A: Nobody knows."])
    layer = 2
    edit = random_edit(geo, [(layer, 0), (layer, 3)], scale=0.3, kind="rank1")
    o, out_plain = capture_out_proj(model, layer, **enc)
    with heads.edited(model, edit):
        _, out_edit = capture_out_proj(model, layer, **enc)
    W = proj_weight(model, layer)
    b_masked = edit.b[layer] * edit.head_mask[layer].repeat_interleave(geo.head_dim)
    lora_W = W + torch.outer(W @ b_masked, edit.a[layer])  # (W + (W b) a^T)
    torch.testing.assert_close(out_edit - out_plain, o @ lora_W.T - o @ W.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,side", [("tiny-llama", "right"), ("tiny-llama", "left"),
                                       ("tiny-gpt2", "right"), ("tiny-gpt2", "left")])
def test_recorded_heads_equal_unpadded_forward(tiny, name, side):
    model, tok, _ = tiny[name]
    texts = ["Q: What is fact 4? A: Fact 4 is false. Q: What is fact 5?", "Q: Hi A: no", "Q: a longer one, yes A: ok"]
    enc = encode(tok, texts, side)
    position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
    batch = heads.record_heads(model, heads.last_positions(enc["attention_mask"]), position_ids=position_ids, **enc)
    for i, text in enumerate(texts):
        one = tok([text], return_tensors="pt")
        alone = heads.record_heads(model, torch.tensor([one["input_ids"].shape[1] - 1]), **one)
        torch.testing.assert_close(batch[i], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_edit_starts_at_each_examples_position(tiny, side):
    model, tok, _ = tiny["tiny-llama"]
    geo = heads.geometry(model)
    enc = encode(tok, ["Q: What is fact 6? A: It is 6.", "Q: Hi A: yes"], side)
    start = torch.tensor([5, enc["input_ids"].shape[1] - 2])
    edit = random_edit(geo, [(1, 1)])
    _, plain = capture_out_proj(model, 1, **enc)
    with heads.edited(model, edit, start=start):
        _, moved = capture_out_proj(model, 1, **enc)
    changed = (moved - plain).abs().amax(-1) > 1e-6  # [batch, seq]
    expected = torch.arange(enc["input_ids"].shape[1])[None, :] >= start[:, None]
    assert torch.equal(changed, expected)


def test_edit_positions_continue_through_kv_cache(tiny):
    """Generation runs the prompt, then one token at a time: the edit must keep counting positions."""
    model, tok, _ = tiny["tiny-llama"]
    geo = heads.geometry(model)
    ids = tok(["Q: What is fact 7? A: It is"], return_tensors="pt")["input_ids"]
    edit, start = random_edit(geo, [(0, 2), (2, 1)]), torch.tensor([ids.shape[1] - 3])
    with torch.no_grad():
        with heads.edited(model, edit, start=start):
            whole = model(ids).logits[0, -1]
        with heads.edited(model, edit, start=start):
            cache = model(ids[:, :-1], use_cache=True).cache
            stepped = model(ids[:, -1:], cache=cache).logits[0, -1]
    torch.testing.assert_close(whole, stepped, atol=1e-5, rtol=1e-4)


def test_edit_start_follows_the_convention():
    first = torch.tensor([4, 7])
    assert heads.edit_start("all", "mc", first) is None and heads.edit_start("iti", "text", first) is None
    assert torch.equal(heads.edit_start("iti", "mc", first), first)
    assert torch.equal(heads.edit_start("iti", "generate", first), first)
    with pytest.raises(SystemExit, match="unknown edit convention"):
        heads.edit_start("answers", "mc", first)


def test_edit_file_roundtrip_and_refusals(tiny, tmp_path):
    model, _, _ = tiny["tiny-llama"]
    geo = heads.geometry(model)
    edit = random_edit(geo, [(0, 1), (2, 3)], kind="rank1")
    edit.meta.update(model="tiny-llama", method="test", fingerprint=heads.fingerprint(model), apply="all")
    path = str(tmp_path / "e.safetensors")
    heads.save_edit(path, edit)
    back = heads.load_edit(path, model)
    assert back.meta["heads"] == ["0.1", "2.3"] and back.meta["apply"] == "all"
    assert torch.equal(back.a, edit.a) and torch.equal(back.b, edit.b) and back.offset is None
    with pytest.raises(SystemExit, match="this model has 3 layers x 4 heads x 24 dims"):
        heads.load_edit(path, tiny["tiny-qwen3"][0])
    other, _, _ = models.load_model("tiny-llama")
    with torch.no_grad():
        heads.out_projections(other)[0].weight.mul_(1.5)  # same geometry, other weights
    with pytest.raises(SystemExit, match="weights differ"):
        heads.load_edit(path, other)
    (tmp_path / "junk.safetensors").write_text("not an edit")
    with pytest.raises(SystemExit, match="not an edit file"):
        heads.load_edit(str(tmp_path / "junk.safetensors"), model)


def test_head_specs(tmp_path):
    geo = heads.Geometry(3, 4, 16)
    assert heads.parse_heads("1.2,0.3", geo) == [(0, 3), (1, 2)]
    assert heads.parse_heads("single:2.3", geo) == [(2, 3)]
    assert len(heads.parse_heads("all", geo)) == 12
    r = heads.parse_heads("random:5:7", geo)
    assert r == heads.parse_heads("random:5:7", geo) and len(set(r)) == 5 and r != heads.parse_heads("random:5:8", geo)
    probe = tmp_path / "probe.json"
    probe.write_text('{"geometry": {"n_layers": 3, "n_heads": 4, "head_dim": 16}, "ranking": [[2, 1], [0, 0], [1, 3]]}')
    assert heads.parse_heads("top:2", geo, probe=str(tmp_path)) == [(0, 0), (2, 1)]
    for spec, message in [("3.0", "head 3.0 is out of range: this model has 3 layers x 4 heads"),
                          ("0.4", "out of range"), ("1.1,1.1", "names a head twice"), ("random:13:0", "K must be 1..12"),
                          ("top:0", "K must be"), ("top:2", "pass --probe"), ("banana", "malformed"),
                          ("single:1.2,1.3", "malformed"), ("random:x:1", "malformed"), ("1.2.3", "malformed")]:
        with pytest.raises(SystemExit, match=message):
            heads.parse_heads(spec, geo)


def test_mean_ablation_replaces_the_heads_outputs_by_their_mean(tiny, tmp_path):
    """o_h <- mean_h on the ablated heads at every token (replacement, not addition), others untouched; saved and
    loaded like other edits, with method 'ablate' and apply 'all'."""
    model, tok, _ = tiny["tiny-llama"]
    geo, D = heads.geometry(model), heads.geometry(model).head_dim
    enc = encode(tok, ["Q: What is fact 8? A: It is 8.", "Q: Hi"])
    mean = torch.randn(geo.n_layers, geo.n_heads, D, generator=torch.Generator().manual_seed(3))
    edit = heads.Edit(geo, heads.heads_to_mask([(1, 2), (1, 0)], geo), ablate=mean, meta={"model": "tiny-llama"})
    assert edit.meta["method"] == "ablate" and edit.meta["apply"] == "all" and not list(edit.parameters())
    path = str(tmp_path / "ablate.safetensors")
    heads.save_edit(path, edit)
    back = heads.load_edit(path, model)
    assert torch.equal(back.ablate, edit.ablate) and back.meta["method"] == "ablate"
    o_plain, _ = capture_out_proj(model, 1, **enc)  # [batch, seq, H*D]
    with heads.edited(model, back):
        _, out_edit = capture_out_proj(model, 1, **enc)
    expected = o_plain.clone()
    for h in (0, 2):  # by hand: every token of the ablated heads holds the mean, the other heads are as they were
        expected[..., h * D:(h + 1) * D] = mean[1, h]
    torch.testing.assert_close(out_edit, expected @ proj_weight(model, 1).T, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no offset"):
        heads.Edit(geo, edit.head_mask, offset=mean, ablate=mean)


def test_edit_moves_to_each_layers_device(tiny):
    """--device auto splits a model across devices: the edit (on the first device) must follow each layer's
    activations. A CPU stand-in: activations on the 'meta' device, the edit on the CPU."""
    geo = heads.geometry(tiny["tiny-llama"][0])
    o = torch.empty(2, 5, geo.n_heads * geo.head_dim, device="meta")  # [batch, seq, H*D]
    for kind in ("offset", "rank1"):
        edit = random_edit(geo, [(1, 1)], kind=kind)
        assert edit.delta(1, o).device.type == "meta"
        batch = heads.EditBatch([edit, random_edit(geo, [(1, 2)])])
        assert heads.edited_output(o, **batch.terms(1, o, torch.tensor([0, heads.NO_EDIT]))).device.type == "meta"
    assert heads.heads_at(o, torch.tensor([4, 2])).shape == (2, geo.n_heads * geo.head_dim)  # record_heads' gather


def test_damaged_edit_files_are_refused_with_a_sentence(tiny, tmp_path):
    from safetensors.torch import save_file
    import json
    model, _, _ = tiny["tiny-llama"]
    geo = heads.geometry(model)
    L, H, D = geo.n_layers, geo.n_heads, geo.head_dim
    meta = {"geometry": vars(geo), "model": "tiny-llama", "apply": "iti"}
    good = {"head_mask": torch.ones(L, H), "offset": torch.zeros(L, H, D)}
    nan = torch.zeros(L, H, D)
    nan[0, 0, 0] = float("nan")
    cases = [(dict(good, offset=nan), meta, "NaN or inf"),
             (dict(good, offset=torch.zeros(L, H, D + 1)), meta, "offset has shape"),
             ({"head_mask": torch.ones(L, H), "a": torch.zeros(L, H * D)}, meta, "needs both a and b"),
             ({"head_mask": torch.ones(L, H)}, meta, "an edit holds"),
             (good, {"model": "x"}, "lacks the model geometry"),
             (good, dict(meta, geometry={"n_layers": "three"}), "lacks the model geometry"),
             (good, dict(meta, apply="answers"), "apply 'answers'")]
    for i, (tensors, m, message) in enumerate(cases):
        path = str(tmp_path / f"bad{i}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"edit": json.dumps(m)})
        with pytest.raises(SystemExit, match=message):
            heads.load_edit(path, model)
    with pytest.raises(SystemExit, match="NaN or inf"):  # and never written
        heads.save_edit(str(tmp_path / "nan.safetensors"), heads.Edit(geo, torch.ones(L, H), offset=nan))


# ---- tqa.py

def test_answers_are_closed_like_truthfulqa(tmp_path, fixture_csv):
    assert tqa.split_answers("Nothing happens; It is.;  ; You die") == ["Nothing happens.", "It is.", "You die."]
    assert tqa.close_answer(" Nothing happens ") == "Nothing happens."
    rows = tqa.load_truthfulqa(fixture_csv(tmp_path / "t.csv"))
    assert rows[0]["best"] == "Fact 0 is true." and rows[0]["correct"] == ["Fact 0 is true.", "It is 0."]
    assert rows[0]["incorrect"] == ["Fact 0 is false.", "It is 1.", "Nobody knows."]


def test_prompts_match_truthfulqa_strings():
    p = tqa.qa_prompt("Why?", "none")
    assert p.startswith("Q: What is human life expectancy in the United States?\nA: Human life expectancy")
    assert p.endswith("Barcelona, Spain.\n\nQ: Why?\nA:")
    assert tqa.qa_prompt("Why?").startswith("Interpret each question literally") and "\u201cI have no comment\u201d" in tqa.qa_prompt("Why?")
    assert tqa.qa_prompt("Why?", "informative").endswith("common myths.\n\n" + p)


def test_split_is_deterministic_disjoint_and_60_20_20(tmp_path, fixture_csv):
    rows = tqa.load_truthfulqa(fixture_csv(tmp_path / "t.csv", n=50))
    s = tqa.split_questions(rows, seed=3)
    assert s == tqa.split_questions(rows, seed=3) and s != tqa.split_questions(rows, seed=4)
    assert [len(s[k]) for k in ("train", "val", "test")] == [30, 10, 10]
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(50))
    test_q = tqa.load_split(str(tmp_path / "t.csv"), 3, "test")
    assert [q["question"] for q in test_q] == [rows[i]["question"] for i in s["test"]]
    assert len(tqa.load_split(str(tmp_path / "t.csv"), 3, "train+val")) == 40


def test_pairs_are_every_correct_incorrect_combination(tmp_path, fixture_csv):
    rows = tqa.load_truthfulqa(fixture_csv(tmp_path / "t.csv", n=4))
    pairs = tqa.preference_pairs(rows)
    assert len(pairs) == 4 * 2 * 3
    assert {"question": "What is fact 1?", "chosen": "It is 1.", "rejected": "Nobody knows."} in pairs


def test_bad_data_is_refused_with_a_sentence(tmp_path, fixture_csv):
    with pytest.raises(SystemExit, match="lacks the column.*Incorrect Answers"):
        tqa.load_truthfulqa(fixture_csv(tmp_path / "t.csv", drop_column="Incorrect Answers"))
    with pytest.raises(SystemExit, match="no such file"):
        tqa.load_truthfulqa(str(tmp_path / "missing.csv"))
    with pytest.raises(SystemExit, match="is empty"):
        tqa.load_split(fixture_csv(tmp_path / "two.csv", n=2), 0, "val")
    with pytest.raises(SystemExit, match="unknown split"):
        tqa.load_split(fixture_csv(tmp_path / "t.csv"), 0, "dev")


def test_real_truthfulqa_csv():
    rows = tqa.load_truthfulqa(tqa.DEFAULT_DATA)
    assert len(rows) == 817 and len({r["category"] for r in rows}) == 38
    assert all(r["best"] in r["correct"] for r in rows)  # once closed, the best answer is a correct answer
    s = tqa.split_questions(rows, seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [490, 163, 164]
    assert 6000 < len(tqa.preference_pairs([rows[i] for i in s["train"]])) < 7500  # the paper: about 6,560


def test_mixed_precision_multiplies_in_bf16_and_keeps_the_rest_float32(tiny):
    """--dtype mixed: the linear layers but the lm_head hold bf16 weights; activations, logits, and what an edit
    sees stay float32; the logits move by bf16 rounding only. Rows are padded to a few sizes (at most 25% more)."""
    model, tok, _ = tiny["tiny-llama"]
    mixed, _, about = models.load_model("tiny-llama", "mixed")
    assert "bf16" in about["precision"] and mixed.get_output_embeddings().weight.dtype == torch.float32
    assert heads.out_projections(mixed)[1].weight.dtype == torch.bfloat16
    enc = encode(tok, ["Q: What is fact 9? A: It is 9.", "Q: Hi"])
    with torch.no_grad():
        want, got = model(**enc).logits, mixed(**enc).logits
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    edit = random_edit(heads.geometry(model), [(1, 1)])
    seen, terms = [], edit.terms
    edit.terms = lambda layer, o: seen.append(o.dtype) or terms(layer, o)
    with torch.no_grad(), heads.edited(mixed, edit):  # the edit runs before the cast: it sees (and adds in) float32
        mixed(**enc)
    assert seen == [torch.float32]
    sizes = {models._bucket(r) for r in range(1, 2049)}
    assert all(r <= models._bucket(r) <= max(32, 1.25 * r) for r in range(1, 2049)) and len(sizes) < 32 + 30


# ---- models.py: the real default model, offline

@pytest.fixture(scope="module")
def smollm2():
    return models.load_model("smollm2-135m")


def answer_logprob(model, tok, prompt, answer):
    p = tok(prompt, return_tensors="pt")["input_ids"]
    a = tok(answer, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([p, a], 1)
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    return logp[p.shape[1] - 1:].gather(1, ids[0, p.shape[1]:, None]).sum().item()


def test_smollm2_loads_offline_and_knows_easy_facts(smollm2):
    model, tok, about = smollm2
    assert heads.geometry(model) == heads.Geometry(30, 9, 64) and "4-bit" in about["note"]
    easy = [("What is the capital of France?", " Paris.", " London."),
            ("What is the chemical symbol for gold?", " Au.", " Fe."),
            ("What is the boiling point of water at sea level in Celsius?", " 100 degrees Celsius.", " 50 degrees Celsius."),
            ("What color is the sky on a clear day?", " Blue.", " Green."),
            ("Who wrote Romeo and Juliet?", " William Shakespeare.", " Charles Dickens.")]
    for q, right, wrong in easy:
        prompt = f"Q: {q}\nA:"
        assert answer_logprob(model, tok, prompt, right) > answer_logprob(model, tok, prompt, wrong), q


def test_smollm2_zero_edit_leaves_logits_unchanged(smollm2):
    model, tok, _ = smollm2
    geo = heads.geometry(model)
    enc = tok(["Q: What is the capital of France?\nA: Paris."], return_tensors="pt")
    zero = heads.Edit(geo, torch.ones(geo.n_layers, geo.n_heads), a=torch.randn(geo.n_layers, 576),
                      b=torch.zeros(geo.n_layers, 576))
    with torch.no_grad():
        plain = model(**enc).logits
        with heads.edited(model, zero):
            edited = model(**enc).logits
    assert torch.equal(plain, edited)
