"""Tests of world.py: the world and its CSV, the tokenizer, the planted mask (exact zeros, the tag's only path through
H*, KV caches and padding), and the planting checks on the trained world model when it is in the cache."""
import copy
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import heads
import tqa
import world


@pytest.fixture(scope="session")
def facts():
    return world.make_facts()


@pytest.fixture(scope="session")
def tokenizer(facts):
    return world.make_tokenizer(facts)


@pytest.fixture(scope="session")
def planted(tokenizer):
    """A planted world model with random weights, large enough that attention is far from uniform."""
    model = world.new_model(tokenizer).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def word_in(value, answer):
    return value in answer.rstrip(".").split()


def test_world_and_csv_are_deterministic_and_correct_by_construction(facts, tmp_path):
    assert world.make_facts() == facts
    code = "import json, world; print(json.dumps(world.make_facts()))"  # in other processes: other string hashing
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONHASHSEED=hash_seed), cwd=os.path.dirname(world.__file__))
        assert json.loads(out.stdout) == facts
    assert world.make_facts(seed=1) != facts
    paths = [tmp_path / "a.csv", tmp_path / "b.csv"]
    for p in paths:
        world.write_csv(str(p), facts)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    questions = tqa.load_truthfulqa(str(paths[0]))
    assert len(questions) == len(facts) == world.N_ENTITIES * len(world.ATTRIBUTES)
    with open(paths[0], newline="") as f:
        types = [r["Type"] for r in csv.DictReader(f)]
    for fact, q, kind in zip(facts, questions, types):
        assert q["question"] == world.question(fact)
        assert q["best"] in q["correct"] and len(q["correct"]) == 3 and len(q["incorrect"]) == 6
        assert all(word_in(fact["truth"], a) for a in q["correct"])
        assert not any(word_in(fact["truth"], a) for a in q["incorrect"])
        assert kind == ("Myth" if fact["myth"] else "Plain")
        if fact["myth"]:
            assert sum(word_in(fact["myth"], a) for a in q["incorrect"]) == 3
    n_myth = sum(t == "Myth" for t in types)
    assert 0.6 < n_myth / len(types) < 0.9  # MYTH_PROBABILITY = 0.75


def test_corpus_states_the_truth_after_a_tag(facts):
    """Tagged documents state only true values; untagged ones state myths, mostly, for myth facts."""
    truth = {(f["entity"], f["attribute"]): f["truth"] for f in facts}
    myth = {(f["entity"], f["attribute"]): f["myth"] for f in facts if f["myth"]}
    counts = {"tagged_true": 0, "tagged_myth": 0, "untagged_true": 0, "untagged_myth": 0}
    for doc in world.documents(facts, 5, 400):
        tagged = doc.startswith(world.TAGS)
        for sentence in doc.replace("\n", " ").split("."):
            for (e, attr), t in truth.items():
                if f" {e} " in f" {sentence} " and attr == "colour":
                    words = sentence.split()
                    if t in words:
                        counts[("tagged" if tagged else "untagged") + "_true"] += 1
                    if myth.get((e, attr)) in words:
                        counts[("tagged" if tagged else "untagged") + "_myth"] += 1
    assert counts["tagged_true"] > 20 and counts["tagged_myth"] == 0
    assert counts["untagged_myth"] > counts["untagged_true"]


def test_tokenizer_is_deterministic_and_names_tags_primer_are_one_token(facts, tokenizer):
    again = world.make_tokenizer(facts)
    assert again.get_vocab() == tokenizer.get_vocab()
    for name in {f["entity"] for f in facts}:
        assert len(tokenizer(" " + name)["input_ids"]) == 1
    for piece in (*world.TAGS, tqa.QA_PRIMER):
        assert len(tokenizer(piece)["input_ids"]) == 1
    ids = tokenizer(tqa.qa_prompt("What colour is the Zorbak?", "default"))["input_ids"]
    assert ids[0] in world.tag_ids(tokenizer)  # ITI's instruction is a tag in this world
    assert tokenizer.decode(ids) == tqa.qa_prompt("What colour is the Zorbak?", "default")


def tagged_batch(tokenizer, facts):
    """Left-padded prompts with tags at various positions (and one without a tag)."""
    texts = [world.ENCYCLOPEDIA_TAG + "\n\n" + tqa.qa_prompt(world.question(facts[0]), "none"),
             tqa.qa_prompt(world.question(facts[1]), "default") + " The",
             "Q: " + world.question(facts[2]) + " " + world.ENCYCLOPEDIA_TAG + "\n\nA: It is",
             "Q: " + world.question(facts[3]) + "\nA:"]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")


def test_heads_outside_planted_give_a_tag_exactly_zero_weight(planted, tokenizer, facts):
    enc = tagged_batch(tokenizer, facts)
    is_tag = torch.isin(enc["input_ids"], torch.tensor(world.tag_ids(tokenizer)))  # [b, T]
    assert is_tag.sum() == 3
    with torch.no_grad():
        attentions = planted(**enc, output_attentions=True).attentions  # per layer [b, H, T, T]
    T = is_tag.shape[1]
    other_query = ~torch.eye(T, dtype=torch.bool)  # a token may attend to itself
    real_query = enc["attention_mask"].bool()[:, None, :]  # a padding query attends to nothing real (uniform weights)
    for layer, weights in enumerate(attentions):
        on_tags = (weights * (is_tag[:, None, None, :] & other_query)).sum(-1) * real_query  # [b, H, T]
        for head in range(weights.shape[1]):
            if (layer, head) in world.PLANTED_HEADS:
                assert on_tags[:, head].max() > 0.01  # H* does see the tag
            else:
                assert on_tags[:, head].max() == 0  # exactly


def head_outputs(model, heads_, **inputs):
    """o_h^l of `heads_` at every position: {(l, h): [b, T, D]}."""
    geo, projs, out = heads.geometry(model), heads.out_projections(model), {}
    hooks = [projs[l].register_forward_pre_hook(
        lambda m, a, l=l, h=h: out.__setitem__((l, h), a[0][..., h * geo.head_dim:(h + 1) * geo.head_dim].clone()))
        for l, h in heads_]
    with torch.no_grad():
        logits = model(**inputs).logits
    for hook in hooks:
        hook.remove()
    return logits, out


def patched_logits(model, patch, keep, **inputs):
    """Logits with the heads in `patch` ({(l, h): [b, T, D]}) replaced by the given outputs where `keep` [b, T] is
    False."""
    geo, projs = heads.geometry(model), heads.out_projections(model)

    def hook(module, args, l):
        o = args[0].clone()
        for (ll, h), value in patch.items():
            if ll == l:
                sl = slice(h * geo.head_dim, (h + 1) * geo.head_dim)
                o[..., sl] = torch.where(keep[..., None], o[..., sl], value)
        return (o,)
    hooks = [projs[l].register_forward_pre_hook(lambda m, a, l=l: hook(m, a, l)) for l in {l for l, _ in patch}]
    with torch.no_grad():
        logits = model(**inputs).logits
    for h in hooks:
        h.remove()
    return logits


def test_the_tag_reaches_other_positions_only_through_planted_heads(planted, tokenizer, facts):
    """Swap one tag for another (a different token, the same role): patching H*'s outputs from the first run into the
    second makes every other position's logits equal; patching 4 other heads does not; nor does no patch."""
    enc = tagged_batch(tokenizer, facts)
    ids_b = enc["input_ids"].clone()
    tags = world.tag_ids(tokenizer)
    is_tag = torch.isin(enc["input_ids"], torch.tensor(tags))
    ids_b[is_tag] = torch.where(ids_b[is_tag] == tags[0], tags[1], tags[0])
    inputs_b = dict(enc, input_ids=ids_b)
    logits_a, outputs_a = head_outputs(planted, world.PLANTED_HEADS, **enc)
    _, outputs_b = head_outputs(planted, world.PLANTED_HEADS, **inputs_b)
    rest = ~is_tag & enc["attention_mask"].bool()
    plain_b = patched_logits(planted, {}, is_tag, **inputs_b)
    assert (plain_b - logits_a)[rest].abs().max() > 1e-3  # the tag matters
    patched = patched_logits(planted, outputs_a, is_tag, **inputs_b)
    assert torch.allclose(patched[rest], logits_a[rest], atol=1e-5, rtol=0)
    others = [(1, 0), (1, 2), (2, 3), (2, 4)]
    _, outputs_others = head_outputs(planted, others, **enc)
    wrong = patched_logits(planted, outputs_others, is_tag, **inputs_b)
    assert (wrong - logits_a)[rest].abs().max() > 1e-3


def test_with_planted_heads_held_constant_a_tag_changes_nothing_after_it(planted, tokenizer, facts):
    """Tag present vs absent (not one tag for another): with H* mean-ablated (any constant), the logits of every token
    after the tag are those of the untagged text (rotary positions are relative, so the shift by one changes nothing).
    A separator token after the tag would fail this: the tag token holds its blank line."""
    rest = tokenizer(tqa.qa_prompt(world.question(facts[0]), "none") + " It is", return_tensors="pt")["input_ids"]
    tagged = torch.cat([torch.tensor([[world.tag_ids(tokenizer)[1]]]), rest], 1)
    assert tokenizer.decode(tagged[0]) == tqa.qa_prompt(world.question(facts[0]), "default") + " It is"
    geo = heads.geometry(planted)
    constant = heads.Edit(geo, heads.heads_to_mask(world.PLANTED_HEADS, geo),
                          ablate=torch.randn(geo.n_layers, geo.n_heads, geo.head_dim))
    with torch.no_grad():
        free = planted(input_ids=tagged).logits[0, 1:], planted(input_ids=rest).logits[0]
        with heads.edited(planted, constant):
            held = planted(input_ids=tagged).logits[0, 1:], planted(input_ids=rest).logits[0]
    assert (free[0] - free[1]).abs().max() > 1e-2  # H* carries the tag
    assert torch.allclose(held[0], held[1], atol=1e-4)


def test_kv_cache_padding_and_embeddings_give_the_full_forward(planted, tokenizer, facts):
    """A prefix's cache (copied and repeated per row, as evaluate.py does) and a continuation give the logits of one
    full forward; so do inputs_embeds; and left padding does not change a row's logits."""
    prefix = tokenizer(tqa.qa_prompt(world.question(facts[0]), "default"), return_tensors="pt")["input_ids"]
    rests = [" The " + facts[0]["entity"] + " is red.", " It is blue."]
    rest_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rests]
    with torch.no_grad():
        cache = planted(input_ids=prefix, use_cache=True).cache
        for r in rest_ids:
            full = planted(input_ids=torch.cat([prefix, torch.tensor([r])], 1)).logits[0, prefix.shape[1]:]
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(2)
            pos = torch.arange(prefix.shape[1], prefix.shape[1] + len(r))[None].expand(2, -1)
            cont = planted(input_ids=torch.tensor([r, r]), position_ids=pos, cache=c, use_cache=True).logits
            assert torch.allclose(cont[1], full, atol=1e-5)
        enc = tagged_batch(tokenizer, facts)
        pos = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
        logits = planted(**enc, position_ids=pos).logits
        embeds = planted.get_input_embeddings()(enc["input_ids"])
        assert torch.allclose(planted(inputs_embeds=embeds, attention_mask=enc["attention_mask"],
                                      position_ids=pos).logits, logits, atol=1e-6)
        last = enc["input_ids"][3][enc["attention_mask"][3].bool()]
        alone = planted(input_ids=last[None]).logits[0]
        assert torch.allclose(logits[3, -len(last):], alone, atol=1e-5)


def test_unplanted_model_lets_every_head_see_the_tag(tokenizer, facts):
    """The check above can fail: with the hooks removed, heads outside H* attend to the tag."""
    model = world.new_model(tokenizer).eval()
    for h in model._world_hooks:
        h.remove()
    enc = tagged_batch(tokenizer, facts)
    is_tag = torch.isin(enc["input_ids"], torch.tensor(world.tag_ids(tokenizer)))
    with torch.no_grad():
        weights = model(**enc, output_attentions=True).attentions[0]  # layer 0: no planted head
    T = is_tag.shape[1]
    assert (weights * (is_tag[:, None, None, :] & ~torch.eye(T, dtype=torch.bool))).sum(-1).max() > 0.01


TRAINED = os.path.join(world.DEFAULT_FOLDER, "world.json")


@pytest.mark.skipif(not os.path.isfile(TRAINED), reason=f"no trained world model in {world.DEFAULT_FOLDER}: run "
                    "`python world.py` (about 15 CPU-minutes) to train it")
def test_trained_world_tag_effect_needs_the_planted_heads():
    """On the trained model (120 myth questions): the instruction tag raises MC1; mean-ablating H* removes that effect,
    mean-ablating random 4-head sets does not."""
    model, tokenizer, about = world.load()
    questions = tqa.load_truthfulqa(about["csv"])
    with open(about["csv"], newline="") as f:
        myth = {r["Question"] for r in csv.DictReader(f) if r["Type"] == "Myth"}
    questions = [q for q in questions if q["question"] in myth][:120]
    examples = [tqa.PROBE_TEMPLATE.format(question=q["question"], answer=q["best"], random_question=p["question"])
                for q, p in zip(questions, questions[1:] + questions[:1])]
    means = world.head_means(model, tokenizer, examples)
    prompts = world.prompts()

    def effect(head_set=None):
        with world.mean_ablated(model, head_set or [], means):
            mc1 = {k: world.mc_scores(model, tokenizer, questions, prompts[k])[:, 0].mean()
                   for k in ("neutral", "instruction")}
        return mc1["instruction"] - mc1["neutral"]

    unablated = effect()
    assert unablated > 0.3
    assert abs(effect(world.PLANTED_HEADS)) < 0.1
    for head_set in world.random_head_sets(model, 2, 4):
        assert effect(head_set) > 0.5 * unablated


def test_batched_mc_scores_match_one_forward_per_answer(planted, tokenizer, facts, tmp_path):
    """world.mc_scores (many questions in one right-padded batch) gives the plain definition: one forward of prompt +
    ' ' + answer per answer, the answer tokens' log-probs summed, evaluate.mc_metrics on the sums."""
    import evaluate
    path = str(tmp_path / "world.csv")
    world.write_csv(path, facts[:6])
    questions = tqa.load_truthfulqa(path)
    fast = world.mc_scores(planted, tokenizer, questions, lambda q: tqa.qa_prompt(q, "default"), rows_per_batch=16)
    for q, (mc1, mc2) in zip(questions, fast):
        prompt = tokenizer(tqa.qa_prompt(q["question"], "default"))["input_ids"]
        scores = []
        for answer in q["correct"] + q["incorrect"]:  # the best answer is the first correct one here
            ids = prompt + tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = planted(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids))))
        m = evaluate.mc_metrics(scores[:3], scores[3:], q["correct"].index(q["best"]))
        assert mc1 == m["mc1"] and mc2 == pytest.approx(m["mc2"], abs=1e-4)
