"""Tests of ipo_edit.py (and its ipo_pairs.py and ipo_files.py): the IPO loss by hand, step 0, learning, head
masking, the LoRA equivalence, refusals.

Run: python -m pytest -q test_ipo_edit.py
"""
import json
import os

import pytest
import torch
from safetensors import safe_open

import heads
import ipo_edit
import ipo_files
import ipo_pairs
import models
import tqa

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama():
    return models.load_model("tiny-llama")


def pairs_batch(tok, n=3, instruction="none"):
    questions = [{"question": f"What is fact {i}?", "correct": [f"Fact {i} is true.", "It is."],
                  "incorrect": [f"It is {i + 1} and more.", "No."]} for i in range(n)]
    pairs = tqa.preference_pairs(questions)[:n]
    return pairs, ipo_pairs.encode_pairs(tok, pairs, instruction)


# ---- The loss

def test_ipo_loss_by_hand():
    # pi(y+) = -1.0, pi0(y+) = -1.5, pi(y-) = -2.0, pi0(y-) = -1.8: logratios 0.5 and -0.2, h = 0.7
    # tau = 0.5: 1/(2 tau) = 1, loss = (0.7 - 1)^2 = 0.09; tau = 0.25: (0.7 - 2)^2 = 1.69; tau = 1: (0.7 - 0.5)^2 = 0.04
    lr_c, lr_r = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([-0.2, -0.2, -0.2])
    torch.testing.assert_close(ipo_edit.ipo_loss(lr_c, lr_r, torch.tensor([0.5, 0.25, 1.0])),
                               torch.tensor([0.09, 1.69, 0.04]))
    # TRL's form: logits = (pi_c - pi_r) - (ref_c - ref_r); loss = (logits - 1/(2 beta))^2 (beta plays tau)
    trl = ((-1.0 - -2.0) - (-1.5 - -1.8) - 1 / (2 * 0.5)) ** 2
    assert ipo_edit.ipo_loss(torch.tensor(-1.0 + 1.5), torch.tensor(-2.0 + 1.8), 0.5).item() == pytest.approx(trl)


def test_ipo_loss_has_zero_gradient_at_its_target_margin():
    tau = 0.3
    lr_c = torch.tensor(0.2 + 1 / (2 * tau), requires_grad=True)
    lr_r = torch.tensor(0.2, requires_grad=True)
    loss = ipo_edit.ipo_loss(lr_c, lr_r, tau)
    loss.backward()
    assert loss.item() == pytest.approx(0, abs=1e-12) and lr_c.grad.item() == pytest.approx(0, abs=1e-6)
    assert lr_r.grad.item() == pytest.approx(0, abs=1e-6)


def test_default_learning_rates_follow_the_paper():
    assert [ipo_edit.default_lr(k) for k in (1, 2, 16, 17, 270)] == [2e-3, 5e-4, 5e-4, 1e-4, 1e-4]


def test_lr_scale_multiplies_the_papers_rate_and_lr_overrides_it(tmp_path, fixture_csv):
    data = fixture_csv(tmp_path / "t.csv", n=10)
    common = ["--heads", "single:2.1", "--param", "offset", "--max-pairs", "4", "--max-val-pairs", "0", "--epochs", "1"]
    out = run(tmp_path, data, *common, "--tau", "0.2", "--lr-scale", "3")
    out = run(tmp_path, data, *common, "--tau", "0.3", "--lr-scale", "3", "--lr", "0.01")
    lrs = [json.load(open(f"{out}ipo-single2.1-t{tau}.log.json"))["meta"]["lr"] for tau in (0.2, 0.3)]
    assert lrs == [pytest.approx(3 * 2e-3), 0.01]


# ---- Log-probs of the answers, in one padded batch

@pytest.mark.parametrize("share", [True, False])
def test_batched_answer_logps_equal_each_pair_alone(llama, share):
    model, tok, _ = llama
    _, encoded = pairs_batch(tok, n=3)
    batch = ipo_pairs.collate(encoded, tok.pad_token_id, "cpu", share_prefix=share)
    assert batch["input_ids"].shape[0] == 6  # chosen and rejected of 3 pairs: one batch
    with torch.no_grad():
        summed = ipo_edit.answer_logps(model, batch, "sum")
        mean = ipo_edit.answer_logps(model, batch, "mean")
    rows = [(p, c) for p, c, _ in encoded] + [(p, r) for p, _, r in encoded]
    for i, (p, y) in enumerate(rows):
        ids = torch.tensor([p + y])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)  # unpadded, every position
        alone = logp[len(p) - 1:].gather(1, ids[0, len(p):, None]).sum()
        torch.testing.assert_close(summed[i], alone, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(mean[i], alone / len(y), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma3"])
def test_shared_prefix_gives_the_same_logps_and_gradient(name):
    """The prompt start common to the batch runs once, its KV cache in the graph: same numbers as whole prompts."""
    model, tok, _ = models.load_model(name)
    geo = heads.geometry(model)
    _, encoded = pairs_batch(tok, n=3, instruction="default")
    edit = ipo_edit.make_edit(geo, [(0, 1), (1, 2), (2, 0)], "lora1", 0, "cpu")
    with torch.no_grad():
        edit.b.normal_(generator=torch.Generator().manual_seed(3))
    results = []
    for share in (True, False):
        batch = ipo_pairs.collate(encoded, tok.pad_token_id, "cpu", share_prefix=share)
        assert (batch["prefix"] is not None) == share
        edit.zero_grad()
        with heads.edited(model, edit):
            logps = ipo_edit.answer_logps(model, batch, "sum")
            logps.sum().backward()
        results.append((logps.detach(), edit.a.grad.clone(), edit.b.grad.clone()))
    shared_len = len(ipo_pairs.collate(encoded, tok.pad_token_id, "cpu")["prefix"][0])
    assert shared_len > len(tok(tqa.INSTRUCTIONS["default"])["input_ids"])  # the instruction and the primer
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_shared_prefix_keeps_a_token_of_every_prompt():
    assert tqa.shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert tqa.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # same question: the last prompt token stays
    assert tqa.shared_prefix_length([[7, 2], [1, 2]]) == 0


def test_answers_are_tokenized_apart_and_appended(llama):
    _, tok, _ = llama
    pairs, encoded = pairs_batch(tok, n=1, instruction="default")
    prompt, chosen, rejected = encoded[0]
    assert prompt == tok(tqa.qa_prompt(pairs[0]["question"], "default"))["input_ids"]
    assert chosen == tok(" " + pairs[0]["chosen"], add_special_tokens=False)["input_ids"]
    assert rejected == tok(" " + pairs[0]["rejected"], add_special_tokens=False)["input_ids"]


# ---- The edit and the step

@pytest.mark.parametrize("param,tau", [("lora1", 0.3), ("offset", 0.1)])
def test_step_zero_loss_is_exactly_the_ipo_target(llama, param, tau):
    model, tok, _ = llama
    geo = heads.geometry(model)
    _, encoded = pairs_batch(tok)
    batch = ipo_pairs.collate(encoded, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ref = ipo_edit.answer_logps(model, batch, "mean")
    edit = ipo_edit.make_edit(geo, [(0, 1), (2, 3)], param, 0, "cpu")
    with heads.edited(model, edit):
        loss, h = ipo_edit.pair_losses(model, batch, ref[:3], ref[3:], tau, "mean")
    assert torch.equal(h, torch.zeros(3))
    assert torch.equal(loss, torch.full((3,), (1 / (2 * tau)) ** 2))


def test_single_head_gradient_reaches_no_other_head_and_no_base_weight(llama):
    model, tok, _ = llama
    geo = heads.geometry(model)
    _, encoded = pairs_batch(tok)
    batch = ipo_pairs.collate(encoded, tok.pad_token_id, "cpu")
    edit = ipo_edit.make_edit(geo, [(1, 2)], "lora1", 0, "cpu")
    optimizer = torch.optim.AdamW(edit.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    zeros = torch.zeros(3)
    ipo_edit.train_step(model, edit, batch, zeros, zeros - 1.0, 0.3, "mean", optimizer, scheduler)
    grad = edit.b.grad.view(geo.n_layers, geo.n_heads, geo.head_dim)  # [L, H, D]
    assert grad[1, 2].abs().sum() > 0
    others = torch.ones(geo.n_layers, geo.n_heads, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(grad[others], torch.zeros_like(grad[others]))
    assert torch.equal(edit.a.grad[[0, 2]], torch.zeros_like(edit.a.grad[[0, 2]]))  # unedited layers: no hook at all
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(edit.a), id(edit.b)} and not optimized & {id(p) for p in model.parameters()}


def test_masked_rank1_edit_equals_a_rank1_lora_on_o_proj(llama):
    """o <- o + <a,o> (b*mask) before W  ==  W o + (W b_masked) (a^T o): a LoRA with A = a^T, B = W b_masked."""
    model, tok, _ = llama
    geo = heads.geometry(model)
    g = torch.Generator().manual_seed(1)
    hd = geo.n_heads * geo.head_dim
    edit = heads.Edit(geo, heads.heads_to_mask([(0, 3), (2, 0), (2, 1)], geo),
                      a=torch.randn(geo.n_layers, hd, generator=g), b=0.3 * torch.randn(geo.n_layers, hd, generator=g))
    ids = tok(["Q: What is fact 1?\nA: It is."], return_tensors="pt")["input_ids"]
    handles = []
    for layer, proj in enumerate(heads.out_projections(model)):
        b_masked = edit.b[layer] * edit.head_mask[layer].repeat_interleave(geo.head_dim)
        if b_masked.any():
            lora_B, lora_A = (proj.weight @ b_masked).detach(), edit.a[layer].detach()  # [hidden], [H*D]
            handles.append(proj.register_forward_hook(
                lambda m, args, out, A=lora_A, B=lora_B: out + (args[0] @ A).unsqueeze(-1) * B))
    with torch.no_grad():
        lora_logits = model(ids).logits
        for h in handles:
            h.remove()
        with heads.edited(model, edit):
            edit_logits = model(ids).logits
        plain = model(ids).logits
    assert not torch.allclose(plain, edit_logits, atol=1e-3)
    torch.testing.assert_close(edit_logits, lora_logits, atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_gives_the_same_gradient(llama):
    _, tok, _ = llama
    _, encoded = pairs_batch(tok)
    grads = []
    for checkpointing in (False, True):
        batch = ipo_pairs.collate(encoded, tok.pad_token_id, "cpu", share_prefix=not checkpointing)
        model, _, _ = models.load_model("tiny-llama")
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            model.train()
        geo = heads.geometry(model)
        edit = ipo_edit.make_edit(geo, [(0, 0), (1, 2)], "lora1", 0, "cpu")
        with torch.no_grad():
            edit.b.normal_(generator=torch.Generator().manual_seed(2))
        optimizer = torch.optim.SGD(edit.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        ipo_edit.train_step(model, edit, batch, torch.zeros(3), torch.zeros(3), 0.3, "mean", optimizer, scheduler)
        grads.append(torch.cat([edit.a.grad.flatten(), edit.b.grad.flatten()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ---- The script end to end

def run(tmp_path, data, *extra):
    out = str(tmp_path / "run" / "edits") + "/"
    ipo_edit.main(["--model", "tiny-llama", "--data", data, "--out", out, "--threads", "1", *extra])
    return out


@pytest.mark.parametrize("source", ["shared", "fixture"])
def test_training_lowers_the_train_loss_and_raises_the_margin(llama, tmp_path, source, fixture_csv):
    data = tqa.DEFAULT_DATA if source == "shared" else fixture_csv(tmp_path / "t.csv", n=30)
    tau = 0.5
    out = run(tmp_path, data, "--heads", "0.1,1.2,2.3", "--tau", str(tau), "--max-pairs", "24", "--max-val-pairs", "8",
              "--lr", "0.05", "--epochs", "3", "--logp", "sum")  # a random model's mean log-probs barely move
    path = out + f"ipo-0.1_1.2_2.3-t{tau}.safetensors"
    model, tok, _ = llama
    edit = heads.load_edit(path, model)
    questions = tqa.load_truthfulqa(data)
    train = [questions[i] for i in tqa.split_questions(questions, 0)["train"]]
    pairs = ipo_pairs.select_pairs(train, 24, 0)
    encoded = ipo_pairs.encode_pairs(tok, pairs, "default")
    args = ipo_edit.build_parser().parse_args(["--out", "x", "--model", "tiny-llama", "--logp", "sum"])
    batcher = ipo_pairs.Batcher(tok.pad_token_id, torch.device("cpu"))
    ref = ipo_edit.reference_logps(model, encoded, batcher, args, "test", str(tmp_path / "c"), "train")
    zero = ipo_edit.make_edit(heads.geometry(model), heads.mask_to_heads(edit.head_mask), "lora1", 0, "cpu")
    loss0, margin0 = ipo_edit.validate(model, zero, encoded, ref, batcher, tau, args)
    loss1, margin1 = ipo_edit.validate(model, edit, encoded, ref, batcher, tau, args)
    assert loss0 == pytest.approx(1.0, abs=1e-4) and margin0 == pytest.approx(0, abs=1e-4)
    assert loss1 < 0.8 * loss0 and margin1 > 0.1
    log = json.load(open(path.replace(".safetensors", ".log.json")))
    assert log["steps"][0]["loss"] == pytest.approx(1.0, abs=1e-4)
    assert log["epochs"][0]["epoch"] == 0 and log["epochs"][-1]["train_loss"] < 1.0
    meta = edit.meta
    for key, value in {"method": "ipo", "apply": "all", "tau": tau, "param": "lora1", "lr": 0.05, "epochs": 3,
                       "batch_size": 4, "logp": "sum", "n_pairs": 24, "instruction": "default",
                       "head_spec": "0.1,1.2,2.3", "seed": 0, "model": "tiny-llama"}.items():
        assert meta[key] == value, key
    assert meta["fingerprint"] == heads.fingerprint(model) and "command" in meta["run"]
    assert len(os.listdir(tmp_path / "run" / "edits" / "cache")) == 2  # train and val reference log-probs


def test_tau_list_reuses_the_reference_cache_and_resumes(tmp_path, monkeypatch, fixture_csv):
    data = fixture_csv(tmp_path / "t.csv", n=10)
    common = ["--heads", "single:2.1", "--param", "offset", "--max-pairs", "8", "--max-val-pairs", "4", "--epochs", "1"]
    out = run(tmp_path, data, *common, "--tau", "0.2")
    cache = sorted(os.listdir(tmp_path / "run" / "edits" / "cache"))
    calls = []
    real = ipo_edit.answer_logps
    monkeypatch.setattr(ipo_edit, "answer_logps", lambda m, batch, logp: calls.append(1) or real(m, batch, logp))
    run(tmp_path, data, *common, "--tau", "0.2", "0.4")  # 0.2 is done: skipped; 0.4 trains on the cached reference
    assert sorted(os.listdir(out)) == ["cache", "ipo-single2.1-t0.2.log.json", "ipo-single2.1-t0.2.safetensors",
                                       "ipo-single2.1-t0.4.log.json", "ipo-single2.1-t0.4.safetensors"]
    assert sorted(os.listdir(tmp_path / "run" / "edits" / "cache")) == cache
    assert len(calls) == 2 + 2  # 2 training steps, validation before and after: no reference pass
    run(tmp_path, data, *common, "--tau", "0.2", "--logp", "sum", "--out", out + "s.safetensors")
    assert len(os.listdir(tmp_path / "run" / "edits" / "cache")) == 4  # another log-prob: other reference values


def test_nan_loss_stops_and_writes_no_edit(tmp_path, monkeypatch, fixture_csv):
    data = fixture_csv(tmp_path / "t.csv", n=10)
    monkeypatch.setattr(ipo_edit, "ipo_loss", lambda c, r, tau: (c - r) * float("nan"))
    with pytest.raises(SystemExit, match="IPO loss became nan at step 1.*no edit was written"):
        run(tmp_path, data, "--heads", "single:0.0", "--tau", "0.3", "--max-pairs", "8", "--max-val-pairs", "0")
    assert os.listdir(tmp_path / "run" / "edits") == ["cache"]


def test_output_names_and_refusals(tmp_path, fixture_csv):
    want = os.path.join("r/edits", "ipo-random16-3-t0.3.safetensors")
    assert ipo_files.out_path("r/edits/", 0.3, "random:16:3", 2) == want
    assert ipo_files.out_path("r/e-{tau}.safetensors", 0.1, "all", 2) == "r/e-0.1.safetensors"
    assert ipo_files.out_path("r/e.safetensors", 0.1, "all", 1) == "r/e.safetensors"
    with pytest.raises(SystemExit, match="pattern with \\{tau\\}"):
        ipo_files.out_path("r/e.safetensors", 0.1, "all", 2)
    data = fixture_csv(tmp_path / "t.csv", n=10)
    for tau in ("0", "inf", "nan"):
        with pytest.raises(SystemExit, match=f"--tau {float(tau)}: every tau must be a positive finite number"):
            run(tmp_path, data, "--tau", "0.3", tau)
    for n in ("-1", "0"):
        with pytest.raises(SystemExit, match=f"--max-pairs {n}: must be at least 1 \\(leave it out"):
            run(tmp_path, data, "--max-pairs", n)
    with pytest.raises(SystemExit, match="pass --probe"):
        run(tmp_path, data, "--heads", "top:4")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        ipo_edit.main(["--model", "tiny-llama", "--data", data, "--out", str(tmp_path / "file" / "edits") + "/"])


def test_a_probe_of_another_model_is_refused(tmp_path, fixture_csv):
    """Same geometry, other weights: its ranking names another model's heads."""
    data = fixture_csv(tmp_path / "t.csv", n=10)
    folder = tmp_path / "probe"
    folder.mkdir()
    model, _, _ = models.load_model("tiny-llama")
    ranking = [[l, h] for l in range(3) for h in range(4)]
    made = {"geometry": vars(heads.geometry(model)), "ranking": ranking, "model": "tiny-llama", "seed": 0}
    for fingerprint, refused in ([x + 0.5 for x in heads.fingerprint(model)], True), (heads.fingerprint(model), False):
        (folder / "probe.json").write_text(json.dumps(dict(made, fingerprint=fingerprint)))
        args = ["--heads", "top:2", "--probe", str(folder), "--max-pairs", "4", "--max-val-pairs", "0", "--epochs", "1"]
        if refused:
            with pytest.raises(SystemExit, match="whose weights differ from this model's.*run probe.py --model"):
                run(tmp_path, data, *args)
        else:
            run(tmp_path, data, *args)


def edit_tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_edit(tmp_path, monkeypatch, fixture_csv):
    data = fixture_csv(tmp_path / "t.csv", n=10)
    common = ["--heads", "0.1,2.3", "--max-pairs", "20", "--max-val-pairs", "4", "--epochs", "2", "--batch-size", "2",
              "--lr", "0.05", "--tau", "0.3", "--checkpoint-every", "3", "--val-every", "4"]
    whole = run(tmp_path / "whole", data, *common) + "ipo-0.1_2.3-t0.3"
    steps, real = [], ipo_edit.train_step

    def killed_at_step_14(*args, **kwargs):
        steps.append(1)
        if len(steps) == 14:
            raise KeyboardInterrupt  # as a kill: nothing after it runs
        return real(*args, **kwargs)
    monkeypatch.setattr(ipo_edit, "train_step", killed_at_step_14)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", data, *common)
    out = str(tmp_path / "killed" / "run" / "edits" / "ipo-0.1_2.3-t0.3")
    assert os.path.exists(out + ".ckpt") and not os.path.exists(out + ".safetensors")
    steps.clear()
    run(tmp_path / "killed", data, *common)
    assert len(steps) == 20 - 12  # resumed at step 12: the last checkpoint (every 3 steps) before the kill
    assert not os.path.exists(out + ".ckpt")
    for k, v in edit_tensors(whole + ".safetensors").items():
        assert torch.equal(edit_tensors(out + ".safetensors")[k], v), k
    logs = [json.load(open(p + ".log.json")) for p in (whole, out)]
    assert logs[0]["steps"] == logs[1]["steps"] and logs[0]["val"] == logs[1]["val"]
    assert [r["step"] for r in logs[0]["val"]] == [0, 4, 8, 10, 12, 16, 20]  # every 4 steps and each epoch's end
    assert [r["step"] for r in logs[0]["steps"]] == list(range(1, 21))


def test_an_edit_with_other_settings_is_trained_again_and_a_lost_log_is_not_lost(tmp_path, monkeypatch, fixture_csv,
                                                                                 capsys):
    data = fixture_csv(tmp_path / "t.csv", n=10)
    common = ["--heads", "single:2.1", "--param", "offset", "--max-val-pairs", "0", "--epochs", "1", "--tau", "0.3"]
    out = run(tmp_path, data, *common, "--max-pairs", "4") + "ipo-single2.1-t0.3"
    first = edit_tensors(out + ".safetensors")
    run(tmp_path, data, *common, "--max-pairs", "4")
    assert "exists with these settings, skipped" in capsys.readouterr().out
    run(tmp_path, data, *common, "--max-pairs", "6")
    assert "trained with other settings (n_pairs 4 -> 6): training it again" in capsys.readouterr().out
    with safe_open(out + ".safetensors", "pt") as f:
        assert json.loads(f.metadata()["edit"])["n_pairs"] == 6
    assert not torch.equal(edit_tensors(out + ".safetensors")["offset"], first["offset"])
    # a kill between the log and the edit: the log is written first, so the rerun finds it and redoes the edit
    monkeypatch.setattr(heads, "save_edit", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, data, *common, "--max-pairs", "8")
    assert json.load(open(out + ".log.json"))["meta"]["n_pairs"] == 8
    monkeypatch.undo()
    run(tmp_path, data, *common, "--max-pairs", "8")
    assert "resuming tau=0.3" in capsys.readouterr().out  # from the checkpoint at the last step: no step again
    assert json.load(open(out + ".log.json"))["meta"]["n_pairs"] == 8


def test_the_fast_precision_trains_from_its_own_reference_and_says_so(tmp_path, fixture_csv):
    """--dtype mixed (bf16 linears): pi0 is computed at the same precision, so step 0 sits exactly at h = 0 (loss
    1/(2 tau)^2); the edit and its log record the precision; float32 and mixed references are cached apart."""
    data = fixture_csv(tmp_path / "t.csv", n=10)
    common = ["--heads", "0.1,2.3", "--max-pairs", "4", "--max-val-pairs", "4", "--epochs", "1", "--tau", "0.5"]
    out = run(tmp_path, data, *common, "--dtype", "mixed") + "ipo-0.1_2.3-t0.5"
    log = json.load(open(out + ".log.json"))
    assert log["steps"][0]["loss"] == pytest.approx(1.0, abs=1e-6) and log["val"][0]["val_margin"] == 0
    assert log["meta"]["precision"]["dtype"] == "mixed" and "bf16" in log["meta"]["precision"]["note"]
    with safe_open(out + ".safetensors", "pt") as f:
        edit_meta = json.loads(f.metadata()["edit"])
    assert edit_meta["settings"]["dtype"] == "mixed" and edit_meta["precision"]["dtype"] == "mixed"
    run(tmp_path, data, *common, "--out", str(tmp_path / "run" / "edits" / "f32.safetensors"))
    assert len(os.listdir(tmp_path / "run" / "edits" / "cache")) == 4  # train and val, at each precision


def test_grad_checkpointing_trains_without_dropout():
    """--grad-checkpointing puts the model in train mode: GPT-2's attention reads its dropout probability itself
    (sdpa), so switching the Dropout modules to eval is not enough; no_dropout zeroes every probability."""
    model, tok, _ = models.load_model("tiny-gpt2")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1  # a model trained with dropout, as GPT-2 was
    model.config.attn_pdrop = 0.1
    model.train()
    ids = tok(["Q: What is fact 1? A: Fact 1 is true."], return_tensors="pt")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()  # the old way
    torch.manual_seed(0)
    assert not torch.equal(model(**ids).logits, model(**ids).logits)  # dropout still on
    ipo_edit.no_dropout(model)
    assert torch.equal(model(**ids).logits, model(**ids).logits)
    model.eval()
    assert torch.allclose(model(**ids).logits, ipo_edit.no_dropout(model)(**ids).logits)
