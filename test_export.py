"""Tests of export.py: every export, loaded by its real client (peft, transformers, lm-eval's steered model), gives
the logits of the toolkit's own edit applied at every token (heads.edited, start from heads.edit_start('all', ...)),
on tiny models of several architectures; the refusals; the provenance and position note; and lm-evaluation-harness
scoring a local TruthfulQA task as evaluate.py does (skipped when lm_eval is not installed).

Run: python -m pytest -q test_export.py
"""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import export
import heads

torch.set_num_threads(1)
TOL = 1e-4
PROMPTS = ["Q: What is fact 3?\nA: It is 3.", "The quick brown fox jumps over the lazy dog. Nothing happens."]


def fresh(tiny, name):
    """A copy of the session's tiny model (exports may change a model: never the shared one)."""
    model, tokenizer, about = tiny[name]
    return copy.deepcopy(model), tokenizer


def random_edit(model, kind, seed=1, meta=None):
    """A seeded edit at heads 0.1, 2.0 and 2.3: kind 'lora1' (a, b), 'offset' or 'ablate' (o_h replaced by a
    constant); sized so it visibly moves the logits."""
    geo = heads.geometry(model)
    g = torch.Generator().manual_seed(seed)
    mask = heads.heads_to_mask([(0, 1), (2, 0), (2, 3)], geo)
    hd = geo.n_heads * geo.head_dim
    tensors = dict(a=torch.randn(geo.n_layers, hd, generator=g), b=torch.randn(geo.n_layers, hd, generator=g)) \
        if kind == "lora1" else {kind: torch.randn(geo.n_layers, geo.n_heads, geo.head_dim, generator=g)}
    meta = dict({"model": model.name_or_path, "fingerprint": heads.fingerprint(model), "method": "ipo",
                 "apply": "all"}, **(meta or {}))
    return heads.Edit(geo, mask, **tensors, meta=meta)


def batch(tokenizer):
    tokenizer.padding_side = "right"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@torch.no_grad()
def toolkit_logits(model, edit, enc):
    """The toolkit's edit at every token: the convention every export promises (heads.edit_start 'all')."""
    start = heads.edit_start("all", "mc", torch.zeros(len(PROMPTS), dtype=torch.long))
    with heads.edited(model, edit, start):
        return model(**enc).logits


@torch.no_grad()
def logits_of(model, enc):
    return model(**enc).logits


def max_diff(x, y, enc):
    """Largest |difference| of two logits tensors over the real (unpadded) positions."""
    real = enc["attention_mask"].bool()
    return (x[real] - y[real]).abs().max().item()


def save_base(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def from_pretrained(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ---- peft

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-mistral", "tiny-neox", "tiny-gemma2"])
def test_peft_adapter_reproduces_the_edit(tiny, tmp_path, name):
    from peft import PeftModel
    model, tokenizer = fresh(tiny, name)
    edit, enc = random_edit(model, "lora1"), batch(tokenizer)
    base, expected = logits_of(model, enc), toolkit_logits(model, edit, enc)
    assert max_diff(base, expected, enc) > 0.1  # the edit moves the logits: the comparison below means something
    base_dir = save_base(model, tokenizer, tmp_path / "base")
    files = export.export_peft(model, edit, str(tmp_path / "adapter"))
    assert max_diff(logits_of(model, enc), base, enc) == 0  # the exporting model is left as it was
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (1, 1, name == "tiny-gpt2")
    assert len(config["target_modules"]) == 2  # layers 0 and 2 hold edited heads, layer 1 none
    assert "adapter_model.safetensors" in files
    peft_model = PeftModel.from_pretrained(from_pretrained(base_dir), str(tmp_path / "adapter")).eval()
    assert max_diff(logits_of(peft_model, enc), expected, enc) <= TOL


def test_peft_factors_are_a_and_W_times_masked_b(tiny, tmp_path):
    """The adapter's tensors against the formula by hand: A = a^T, B = W (b * mask), W = c_proj.weight^T for Conv1D."""
    model, tokenizer = fresh(tiny, "tiny-gpt2")
    edit = random_edit(model, "lora1")
    export.export_peft(model, edit, str(tmp_path / "adapter"))
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    A = weights["base_model.model.transformer.h.2.attn.c_proj.lora_A.weight"]
    B = weights["base_model.model.transformer.h.2.attn.c_proj.lora_B.weight"]
    W = model.transformer.h[2].attn.c_proj.weight.double().T  # Conv1D weight [in, out]: W o = o @ weight
    mask = torch.zeros(64, dtype=torch.float64)
    mask[0:16], mask[48:64] = 1, 1  # heads 0 and 3 of 4, 16 features each
    torch.testing.assert_close(A.double(), edit.a[2].double()[None])
    torch.testing.assert_close(B.double(), (W @ (edit.b[2].double() * mask))[:, None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,fix", [("offset", "--to hf .*--to steer"), ("ablate", "--to hf")])
def test_peft_refuses_an_offset_or_ablation(tiny, tmp_path, kind, fix):
    model, _ = fresh(tiny, "tiny-llama")
    with pytest.raises(SystemExit, match=fix):
        export.export_peft(model, random_edit(model, kind), str(tmp_path / "adapter"))
    assert not os.path.exists(tmp_path / "adapter")


# ---- merged Hugging Face checkpoint

@pytest.mark.parametrize("name,kind", [("tiny-llama", "lora1"), ("tiny-gpt2", "lora1"), ("tiny-qwen2", "lora1"),
                                       ("tiny-mistral", "lora1"), ("tiny-llama", "offset"), ("tiny-gemma2", "offset"),
                                       ("tiny-gpt2", "offset"), ("tiny-neox", "offset"), ("tiny-opt", "offset"),
                                       ("tiny-llama", "ablate"), ("tiny-gpt2", "ablate"), ("tiny-phi", "ablate")])
def test_hf_checkpoint_reproduces_the_edit(tiny, tmp_path, name, kind):
    model, tokenizer = fresh(tiny, name)
    edit, enc = random_edit(model, kind), batch(tokenizer)
    base, expected = logits_of(model, enc), toolkit_logits(model, edit, enc)
    assert max_diff(base, expected, enc) > 0.1
    export.export_hf(model, tokenizer, edit, str(tmp_path / "merged"))
    loaded = from_pretrained(str(tmp_path / "merged"))
    assert max_diff(logits_of(loaded, enc), expected, enc) <= TOL


def test_hf_offset_is_W_delta_in_the_o_proj_bias(tiny, tmp_path):
    """Llama without biases: attention_bias switched on, o_proj bias = W (delta * mask) by hand, q/k/v biases zero;
    the ITI reference code's bias = delta would not reproduce the edit."""
    model, tokenizer = fresh(tiny, "tiny-llama")
    edit, enc = random_edit(model, "offset"), batch(tokenizer)
    expected = toolkit_logits(model, edit, enc)
    W = model.model.layers[2].self_attn.o_proj.weight.double().clone()
    export.export_hf(model, tokenizer, edit, str(tmp_path / "merged"))
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert json.load(open(tmp_path / "merged" / "config.json"))["attention_bias"] is True
    delta = torch.zeros(4, 16, dtype=torch.float64)
    delta[[0, 3]] = edit.offset[2, [0, 3]].double()
    torch.testing.assert_close(weights["model.layers.2.self_attn.o_proj.bias"].double(), W @ delta.flatten(),
                               rtol=1e-5, atol=1e-6)
    assert weights["model.layers.1.self_attn.o_proj.bias"].abs().max() == 0  # layer 1 holds no edited head
    assert all(weights[f"model.layers.{l}.self_attn.{p}_proj.bias"].abs().max() == 0 for l in range(3) for p in "qkv")
    wrong = dict(weights, **{f"model.layers.{l}.self_attn.o_proj.bias": (edit.offset[l] * edit.head_mask[l, :, None])
                             .flatten() for l in (0, 2)})  # bias = delta
    loaded = from_pretrained(str(tmp_path / "merged"))
    loaded.load_state_dict(wrong, strict=False)
    assert max_diff(logits_of(loaded, enc), expected, enc) > 0.01


@pytest.mark.parametrize("name,kind", [("tiny-mistral", "offset"), ("tiny-qwen2", "offset"), ("tiny-qwen2", "ablate")])
def test_hf_refuses_a_constant_where_no_o_proj_bias_exists(tiny, tmp_path, name, kind):
    model, tokenizer = fresh(tiny, name)
    with pytest.raises(SystemExit, match="Llama-family.*--to steer"):
        export.export_hf(model, tokenizer, random_edit(model, kind), str(tmp_path / "merged"))
    assert not os.path.exists(tmp_path / "merged")


# ---- lm-eval steering file

def test_steer_file_holds_W_delta_at_each_edited_projection(tiny, tmp_path):
    """Without lm-eval: the file's vectors, added to the named modules' outputs as lm-eval's steered model adds them
    (a forward hook on model.base_model's module), reproduce the edit."""
    model, tokenizer = fresh(tiny, "tiny-mistral")  # no o_proj bias: steer is its offset export
    edit, enc = random_edit(model, "offset"), batch(tokenizer)
    expected = toolkit_logits(model, edit, enc)
    export.export_steer(model, edit, str(tmp_path / "steer"))
    config = torch.load(str(tmp_path / "steer" / "steer.pt"), weights_only=False)
    assert sorted(config) == ["layers.0.self_attn.o_proj", "layers.2.self_attn.o_proj"]
    assert all(v["action"] == "add" and v["steering_coefficient"] == 1.0 for v in config.values())
    modules = dict(model.base_model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, i, out, v=v: out + v["steering_vector"])
               for name, v in config.items()]
    try:
        assert max_diff(logits_of(model, enc), expected, enc) <= TOL
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kind,fix", [("lora1", "--to peft .*--to hf"), ("ablate", "--to hf")])
def test_steer_refuses_a_rank1_edit_or_an_ablation(tiny, tmp_path, kind, fix):
    model, _ = fresh(tiny, "tiny-llama")
    with pytest.raises(SystemExit, match=fix):
        export.export_steer(model, random_edit(model, kind), str(tmp_path / "steer"))
    assert not os.path.exists(tmp_path / "steer")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_lm_eval_steered_model_reproduces_the_edit(tiny, tmp_path, name):
    pytest.importorskip("lm_eval")
    from lm_eval.models.hf_steered import SteeredModel
    model, tokenizer = fresh(tiny, name)
    edit, enc = random_edit(model, "offset"), batch(tokenizer)
    expected = toolkit_logits(model, edit, enc)
    base_dir = save_base(model, tokenizer, tmp_path / "base")
    export.export_steer(model, edit, str(tmp_path / "steer"))
    lm = SteeredModel(pretrained=base_dir, steer_path=str(tmp_path / "steer" / "steer.pt"), device="cpu",
                      dtype="float32", batch_size=1)
    with torch.no_grad():
        got = torch.cat([lm._model_call(enc["input_ids"][i:i + 1, :int(n)]) for i, n in
                         enumerate(enc["attention_mask"].sum(1))], 1)[0]  # the real tokens of each prompt
    want = torch.cat([expected[i, :int(n)] for i, n in enumerate(enc["attention_mask"].sum(1))])
    assert (got - want).abs().max().item() <= TOL


# ---- the command line: provenance, position note, refusals

def test_cli_records_provenance_and_says_an_iti_edit_now_applies_everywhere(tiny, tmp_path):
    model, _ = fresh(tiny, "tiny-llama")
    edit = random_edit(model, "offset", meta={"method": "iti", "apply": "iti", "alpha": 15.0})
    heads.save_edit(str(tmp_path / "iti.safetensors"), edit)
    out = tmp_path / "steer"
    export.main([str(tmp_path / "iti.safetensors"), "--to", "steer", "--out", str(out), "--model", "tiny-llama"])
    record = json.load(open(out / "export.json"))
    assert record["format"] == "steer" and record["files"] == ["steer.pt"]
    assert record["edit"]["alpha"] == 15.0 and record["edit"]["method"] == "iti"  # the edit's provenance
    assert record["edit_file"] == str(tmp_path / "iti.safetensors")
    assert record["applies"].startswith("every token")
    assert "NOT ITI's own convention" in record["position_note"] and "--apply all" in record["position_note"]
    assert "every token" in " ".join(export.parser.format_help().split())


@pytest.mark.parametrize("other,why", [("tiny-qwen2", "refit the edit on this model"),  # same geometry
                                       ("tiny-qwen3", "this model has 3 layers x 4 heads x 24 dims")])
def test_cli_refuses_an_edit_made_for_another_model(tiny, tmp_path, other, why):
    model, _ = fresh(tiny, "tiny-llama")
    heads.save_edit(str(tmp_path / "e.safetensors"), random_edit(model, "lora1"))
    with pytest.raises(SystemExit, match=why):
        export.main([str(tmp_path / "e.safetensors"), "--to", "peft", "--out", str(tmp_path / "a"),
                     "--model", other])
    assert not os.path.exists(tmp_path / "a")


def test_cli_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an export: pass a new folder"):
        export.main(["x.safetensors", "--to", "peft", "--out", str(tmp_path)])
    (tmp_path / "export.json").write_text('{"format": "hf"}')
    with pytest.raises(SystemExit, match="earlier --to hf export: pass a new folder"):
        export.main(["x.safetensors", "--to", "peft", "--out", str(tmp_path)])


def test_lm_eval_task_holds_the_split_questions_answers_and_prompt(tmp_path, fixture_csv):
    """Without lm-eval: the task's rows by hand for the fixture's questions (best 'Fact i is true.', correct + 'It is
    i.', incorrect 'Fact i is false.', 'It is i+1.', 'Nobody knows.'), on the questions evaluate.py would score."""
    import evaluate
    import tqa
    data = fixture_csv(tmp_path / "q.csv", n=20)
    export.main(["--to", "lm-eval-task", "--out", str(tmp_path / "task"), "--data", data, "--split", "test",
                 "--max-questions", "3"])
    rows = [json.loads(line) for line in open(tmp_path / "task" / "tqa_local.jsonl")]
    chosen = evaluate.select_questions(evaluate.parser.parse_args(["--data", data, "--split", "test",
                                                                   "--max-questions", "3", "--out", "x"]))
    assert [r["question"] for r in rows] == [q["question"] for q in chosen] and len(rows) == 3
    for r in rows:
        i = int(r["question"].split()[-1].rstrip("?"))
        wrong = [f"Fact {i} is false.", f"It is {i + 1}.", "Nobody knows."]
        assert r["mc1_targets"] == {"choices": [f"Fact {i} is true."] + wrong, "labels": [1, 0, 0, 0]}
        assert r["mc2_targets"] == {"choices": [f"Fact {i} is true.", f"It is {i}."] + wrong, "labels": [1, 1, 0, 0, 0]}
        assert r["prompt"] == tqa.QA_PRIMER + f"\n\nQ: What is fact {i}?\nA:"
    mc1 = (tmp_path / "task" / "tqa_local_mc1.yaml").read_text()
    assert json.dumps(str(tmp_path / "task" / "tqa_local.jsonl")) in mc1
    record = json.load(open(tmp_path / "task" / "export.json"))
    assert record["questions"]["questions"] == 3 and record["run"]["data"]["data"] == data


# ---- lm-evaluation-harness scores TruthfulQA MC as evaluate.py does

def lm_eval_scores(model_args, task_dir):
    """{question: (mc1, mc2)} from lm-eval's own scoring of the local task."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    result = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=["tqa_local_mc1", "tqa_local_mc2"],
                                     task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                     device="cpu", batch_size=8, log_samples=True)
    scores = {}
    for task, index in (("tqa_local_mc1", 0), ("tqa_local_mc2", 1)):
        for sample in result["samples"][task]:
            scores.setdefault(sample["doc"]["question"], [None, None])[index] = float(sample["acc"])
    return scores


def evaluate_scores(folder, name):
    with open(os.path.join(folder, f"{name}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["question"]: (r["mc1"], r["mc2"], r["scores_true"], r["scores_false"]) for r in rows}


def test_lm_eval_scores_mc1_mc2_as_evaluate_does(tiny, tmp_path, fixture_csv, monkeypatch):
    """Unedited and with an exported adapter (peft=...): lm-eval's MC1/MC2 on a local task equal evaluate.py's with
    --instruction none --apply all. MC1 may differ only on an exact tie (lm-eval counts it correct, we do not)."""
    pytest.importorskip("lm_eval")
    import jinja2
    import evaluate
    import tqa
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = fresh(tiny, "tiny-llama")
    edit = random_edit(model, "lora1", meta={"model": str(tmp_path / "base")})
    base_dir = save_base(model, tokenizer, tmp_path / "base")
    heads.save_edit(str(tmp_path / "ipo.safetensors"), edit)
    export.export_peft(model, edit, str(tmp_path / "adapter"))
    data = fixture_csv(tmp_path / "q.csv", n=20)  # its test split: 4 questions
    export.main(["--to", "lm-eval-task", "--out", str(tmp_path / "task"), "--data", data, "--split", "test"])
    # our prompt is lm-eval's own truthfulqa_mc1 prompt, rendered from its yaml
    import yaml
    import lm_eval.tasks
    with open(os.path.join(os.path.dirname(lm_eval.tasks.__file__), "truthfulqa", "truthfulqa_mc1.yaml")) as f:
        stock = yaml.safe_load(f)
    question = tqa.load_truthfulqa(data)[0]["question"]
    assert jinja2.Template(stock["doc_to_text"]).render(question=question) == tqa.qa_prompt(question, "none")

    evaluate.main(["--model", base_dir, "--data", data, "--split", "test", "--edit", "none",
                   str(tmp_path / "ipo.safetensors"), "--instruction", "none", "--apply", "all",
                   "--skip", "generation,text", "--judges", "none", "--out", str(tmp_path / "results")])
    ours = {"baseline": evaluate_scores(tmp_path / "results", "baseline"),
            "adapter": evaluate_scores(tmp_path / "results", "ipo")}
    theirs = {"baseline": lm_eval_scores(f"pretrained={base_dir},dtype=float32", tmp_path / "task"),
              "adapter": lm_eval_scores(f"pretrained={base_dir},peft={tmp_path / 'adapter'},dtype=float32",
                                        tmp_path / "task")}
    assert sorted(ours["baseline"]) == sorted(theirs["baseline"]) and len(theirs["baseline"]) == 4
    best = {q["question"]: q["correct"].index(q["best"]) for q in tqa.load_truthfulqa(data)}  # best is among them
    for which in ours:
        for q, (mc1, mc2, scores_true, scores_false) in ours[which].items():
            assert abs(theirs[which][q][1] - mc2) <= TOL
            tie = abs(scores_true[best[q]] - max(scores_false)) < 1e-6
            assert theirs[which][q][0] == mc1 or tie
    assert any(abs(ours["adapter"][q][1] - ours["baseline"][q][1]) > 0.01 for q in ours["baseline"])


def test_cli_refuses_mixed_precision(tmp_path):
    with pytest.raises(SystemExit, match="export float32"):
        export.main(["x.safetensors", "--to", "hf", "--out", str(tmp_path / "m"), "--dtype", "mixed"])
