"""export.py - take an edit out of the toolkit, into formats the ecosystem loads: a PEFT LoRA adapter, a Hugging Face
checkpoint with the edit merged, or an lm-evaluation-harness steering file; and TruthfulQA as a local lm-eval task.

EVERY EXPORT APPLIES THE EDIT AT EVERY TOKEN: it is the `evaluate.py --apply all` edit. An IPO edit (made and
evaluated at every token) is exported as it is; an ITI edit (meta apply "iti": answer tokens in MC, from the last
prompt token in generation) becomes the every-token edit, which is NOT ITI's own convention: its MC and generation
numbers are those of `evaluate.py --apply all`. export.json, written beside each export, says which.

o^l is the input of layer l's attention output projection W^l (heads.py), mask^l is 1 on the edited heads' features,
and (Linear) W^l o = W^l.weight @ o; for GPT-2's Conv1D, W^l = c_proj.weight^T.
  --to peft   rank-1 edits (ipo_edit.py --param lora1): o <- o + <a, o> (b * mask) is exactly a rank-1 LoRA on W^l,
              W^l o + B A o with A = a^T and B = W^l (b * mask), r = 1, lora_alpha = 1 (scaling 1), no dropout,
              fan_in_fan_out for Conv1D; on the layers that hold an edited head. Writes adapter_config.json and
              adapter_model.safetensors. An offset edit has no LoRA form: refused (use --to hf or --to steer).
  --to hf     the whole model (save_pretrained) with the edit merged: W^l <- W^l + (W^l (b * mask)) a^T, and an offset
              delta (ITI, --param offset) as the projection's bias: bias^l <- bias^l + W^l (delta^l * mask^l) (never
              bias = delta, the ITI reference code's mistake: the bias lives after W^l). GPT-2, GPT-NeoX, Phi and OPT
              have that bias; Llama-family models without one (Llama, Qwen3, Gemma 1-3) get it from the config
              switch attention_bias=true (q/k/v biases written as zeros); Mistral, Qwen2 and Phi3 hard-code no o_proj
              bias: an offset edit is refused for them (use --to steer). In --dtype: merging into bfloat16 weights
              rounds the edit away in part, so export float32 (the default) when the numbers matter. A mean
              ablation (iti.py --ablate, o_h <- ablate_h) merges exactly: bias^l <- bias^l + W^l (ablate * mask),
              then W^l's columns of the ablated heads are zeroed (hf only: peft and steer refuse it).
  --to steer  lm-eval's `--model steered` file (steer.pt, read with torch.load): per edited layer, the hookpoint of
              W^l (its name under model.base_model) -> {"steering_vector": W^l (delta^l * mask^l), "action": "add",
              "steering_coefficient": 1.0, "bias": None, "head_index": None}: added to W^l's output at every token.
              Offset edits only; a rank-1 edit depends on o: refused (use --to peft or --to hf).
  --to lm-eval-task  no edit: a local TruthfulQA MC1/MC2 task for lm-eval from --data (the same questions as
              evaluate.py with the same --data/--split/--max-questions/--seed): tqa_local.jsonl (the Hugging Face
              multiple_choice schema: mc1_targets = best + incorrect answers, mc2_targets = correct + incorrect,
              answers closed with a period as tqa.py does), tqa_local_mc1.yaml, tqa_local_mc2.yaml (MC2 by lm-eval's
              own truthfulqa.utils.process_results_mc2) and tqa_local_utils.py. The prompt is TruthfulQA's QA primer
              without instruction: compare with `evaluate.py --instruction none`. See docs/lm_eval.md.

Reads:  EDIT.safetensors (iti.py / ipo_edit.py; refused when made for another model, heads.load_edit), --model.
Writes: --out DIR: the export and DIR/export.json (format, files, the edit file and its provenance, the position
        convention, the formula, the command and versions). The file names are fixed, so DIR is one export.

    python export.py runs/smollm2/edits/ipo-top8-t0.3.safetensors --to peft --out exports/ipo-top8-peft
    python export.py runs/smollm2/edits/iti-top8-a15.safetensors --to steer --out exports/iti-top8-steer
    python export.py --to lm-eval-task --split test --max-questions 20 --out exports/tqa-task

Load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR); AutoModelForCausalLM
.from_pretrained(DIR); lm_eval --model hf --model_args pretrained=BASE,peft=DIR (or pretrained=DIR for hf), or
lm_eval --model steered --model_args pretrained=BASE,steer_path=DIR/steer.pt.
"""
import argparse
import copy
import json
import os

import torch

import heads
import models
import runfiles
import tqa

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("edit", nargs="?", default=None,
                    help="edit file written by iti.py or ipo_edit.py (not with --to lm-eval-task)")
parser.add_argument("--to", required=True, choices=["peft", "hf", "steer", "lm-eval-task"],
                    help="peft: LoRA adapter (rank-1 edits); hf: merged checkpoint; steer: lm-eval steering file "
                         "(offset edits); lm-eval-task: the questions as a local lm-eval task. Every edit export "
                         "applies the edit at every token (evaluate.py --apply all), also an ITI edit")
parser.add_argument("--out", required=True,
                    help="output folder: new, or an earlier export of the same format (overwritten)")
models.add_model_args(parser)
questions_args = parser.add_argument_group("--to lm-eval-task: which questions (as evaluate.py chooses them)")
tqa.add_data_args(questions_args)
questions_args.add_argument("--split", default="test", help="train, val, test, all, or a sum (train+val)")
questions_args.add_argument("--max-questions", type=int, default=None, help="a seeded subset of the split")

APPLIES = "every token (the edit of evaluate.py --apply all)"
FORMULAS = {
    "peft": "rank-1 LoRA on W^l: W^l o + B A o, A = a^T [1, H*D], B = W^l (b * mask) [out, 1], r = 1, lora_alpha = 1",
    "hf": "merged: W^l <- W^l + (W^l (b * mask)) a^T; bias^l <- bias^l + W^l (offset * mask); an ablation: "
          "bias^l <- bias^l + W^l (ablate * mask), then W^l's columns of the ablated heads zeroed",
    "steer": "lm-eval steered, action add: W^l's output + W^l (offset * mask), at every token",
}
TASK_NAME = "tqa_local"


# ---- The edit as the output projection sees it

def edited_layers(edit):
    return [l for l in range(edit.geo.n_layers) if edit.head_mask[l].any()]


def feature_mask(edit, layer):
    """1 on the features of the edited heads of `layer`: [H*D]."""
    return edit.head_mask[layer].repeat_interleave(edit.geo.head_dim).float()


def proj_matrix(proj):
    """W with W o = the projection's output without bias: [out, in] (a Linear's weight; Conv1D's weight^T)."""
    return proj.weight.T if is_conv1d(proj) else proj.weight


def is_conv1d(proj):
    return type(proj).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D: weight [in, out], y = x @ W + b


def lora_factors(edit, proj, layer):
    """(A [1, H*D], B [out, 1]) of the rank-1 LoRA that equals the edit at `layer`, in float32."""
    W = proj_matrix(proj).detach().float()
    b_masked = edit.b[layer].detach().float().to(W.device) * feature_mask(edit, layer).to(W.device)
    return edit.a[layer].detach().float().to(W.device)[None], (W @ b_masked)[:, None]


def output_offset(edit, proj, layer, which="offset"):
    """W^l (offset^l * mask^l) [out], what an offset edit adds to the projection's output (which='ablate': the
    ablation's constant, W^l (ablate^l * mask^l))."""
    W = proj_matrix(proj).detach().float()
    vector = getattr(edit, which)[layer].detach().float().flatten().to(W.device)
    return W @ (vector * feature_mask(edit, layer).to(W.device))


def position_note(edit):
    """What the position convention of an export means for this edit."""
    made = edit.meta.get("apply") or ("iti" if edit.meta.get("method") == "iti" else "all")
    if made == "all":
        return f"the edit was made for every token (apply 'all'); the export applies it at {APPLIES}: the same edit"
    return (f"the edit was made for ITI's positions (apply {made!r}: {heads.APPLY.get(made, made)}); the export "
            f"applies it at {APPLIES}, which is NOT ITI's own convention: compare it with evaluate.py --apply all")


# ---- Formats

def check_out(folder, fmt):
    """Refuse a folder that holds something other than an earlier export of the same format (its files would be mixed
    with ours)."""
    record = os.path.join(folder, "export.json")
    runfiles.check_writable(record)
    if os.path.isdir(folder) and os.listdir(folder):
        if not os.path.isfile(record):
            raise SystemExit(f"--out {folder} exists and holds files that are not an export: pass a new folder")
        with open(record) as f:
            earlier = json.load(f).get("format")
        if earlier != fmt:
            raise SystemExit(f"--out {folder} holds an earlier --to {earlier} export: pass a new folder for --to {fmt}")


def export_peft(model, edit, folder, base=None):
    """Write the rank-1 edit as a PEFT LoRA adapter in `folder`; the model is left as it was. Returns the files."""
    if edit.ablate is not None:
        raise SystemExit("this edit is a mean ablation (iti.py --ablate): it replaces head outputs by a constant, "
                         "which no LoRA expresses; export it with --to hf (a merged checkpoint)")
    if edit.offset is not None or edit.a is None:
        raise SystemExit("this edit is a constant offset (ITI, or ipo_edit.py --param offset), which no LoRA "
                         "expresses: export it with --to hf (a merged checkpoint with the offset as an o_proj bias) "
                         "or --to steer (an lm-eval steering file)")
    from peft import LoraConfig, get_peft_model
    projs, names = heads.out_projections(model), module_names(model)
    layers = edited_layers(edit)
    config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=[names[id(projs[l])] for l in layers], fan_in_fan_out=is_conv1d(projs[0]),
                        base_model_name_or_path=base or getattr(model, "name_or_path", None))
    peft_model = get_peft_model(model, config)
    try:
        with torch.no_grad():
            for l in layers:
                lora = model.get_submodule(names[id(projs[l])])  # the LoRA layer peft put in place of projs[l]
                A, B = lora_factors(edit, projs[l], l)
                lora.lora_A["default"].weight.copy_(A)
                lora.lora_B["default"].weight.copy_(B)
        peft_model.save_pretrained(folder, save_embedding_layers=False)  # untouched; no hub look-up
    finally:
        peft_model.unload()  # the base model's own modules back in place, without the LoRA layers
    return written(folder)


def written(folder):
    """The files of an export, with the permissions open() would give them (some writers make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    files = sorted(f for f in os.listdir(folder) if f != "export.json")
    for f in files:
        os.chmod(os.path.join(folder, f), 0o666 & ~umask)
    return files


def module_names(model):
    """{id(module): its name in model.named_modules()}."""
    return {id(m): name for name, m in model.named_modules()}


def bias_switch(model):
    """The names of the parameters that config attention_bias=True adds (q/k/v/o biases), if it gives the output
    projections a bias; None when the architecture cannot hold one there. Built on the meta device: no memory."""
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(model.config)
    if not hasattr(config, "attention_bias"):
        return None
    config.attention_bias = True
    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(config)
    if heads.out_projections(probe)[0].bias is None:
        return None
    have = {name for name, _ in model.named_parameters()}
    added = [name for name, _ in probe.named_parameters() if name not in have]
    if not all(name.endswith(".bias") for name in added):
        return None
    return added


def merge_edit(model, edit):
    """Merge `edit` into `model`'s weights in place (the hf export). Returns a note on any bias switched on."""
    projs, note = heads.out_projections(model), None
    layers = edited_layers(edit)
    constant = edit.offset is not None or edit.ablate is not None  # needs a bias after W^l
    if constant and any(projs[l].bias is None for l in layers):
        added = bias_switch(model)
        if added is None:
            raise SystemExit(f"{type(model).__name__} has no bias on its attention output projection and its config "
                             "cannot switch one on, so an offset or ablation edit cannot be merged into its weights; "
                             "Llama-family models (Llama, Qwen3, Gemma 1-3; attention_bias=true) and GPT-2, GPT-NeoX, "
                             "Phi, OPT can. Export an offset with --to steer (an lm-eval steering file) instead")
        with torch.no_grad():
            for name in added:
                module_name, _, _ = name.rpartition(".")
                module = model.get_submodule(module_name)
                module.bias = torch.nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype,
                                                             device=module.weight.device), requires_grad=False)
        model.config.attention_bias = True
        note = (f"config attention_bias set to true: {len(added)} biases added (the o_proj biases hold the offset, "
                "the q/k/v ones are zero)")
    with torch.no_grad():
        for l in layers:
            proj = projs[l]
            if edit.a is not None:
                A, B = lora_factors(edit, proj, l)
                update = B @ A  # [out, in]
                proj.weight.add_((update.T if is_conv1d(proj) else update).to(proj.weight.dtype))
            if edit.offset is not None:
                proj.bias.add_(output_offset(edit, proj, l).to(proj.bias.dtype))
            if edit.ablate is not None:  # o_h <- ablate_h: W^l's columns of the head to the bias, then zeroed
                proj.bias.add_(output_offset(edit, proj, l, "ablate").to(proj.bias.dtype))
                keep = (1 - feature_mask(edit, l)).to(proj.weight)
                proj.weight.mul_(keep[:, None] if is_conv1d(proj) else keep[None, :])
    return note


def export_hf(model, tokenizer, edit, folder):
    """Merge the edit into `model` (in place) and save it with its tokenizer. Returns (files, note)."""
    note = merge_edit(model, edit)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return written(folder), note


def steer_config(model, edit):
    """lm-eval's steering dict: {hookpoint under model.base_model: {steering_vector [out], action add, ...}}."""
    if edit.a is not None:
        raise SystemExit("this edit is rank-1 (o <- o + <a, o> b): it depends on o, and a steering file adds a "
                         "constant; export it with --to peft (a LoRA adapter) or --to hf (a merged checkpoint)")
    if edit.ablate is not None:
        raise SystemExit("this edit is a mean ablation (iti.py --ablate): it replaces head outputs, which a steering "
                         "file's added constant cannot; export it with --to hf (a merged checkpoint)")
    projs, names = heads.out_projections(model), {id(m): n for n, m in model.base_model.named_modules()}
    return {names[id(projs[l])]: {"steering_vector": output_offset(edit, projs[l], l).cpu().contiguous(),
                                  "steering_coefficient": 1.0, "action": "add", "bias": None, "head_index": None}
            for l in edited_layers(edit)}


def export_steer(model, edit, folder):
    config = steer_config(model, edit)
    os.makedirs(folder, exist_ok=True)
    runfiles.write_atomic(os.path.join(folder, "steer.pt"), lambda tmp: torch.save(config, tmp))
    return written(folder)


# ---- TruthfulQA as a local lm-eval task

MC1_YAML = """\
# TruthfulQA MC1 on the questions written by export.py --to lm-eval-task (the prompt: TruthfulQA's QA primer, as
# lm-eval's own truthfulqa_mc1 and evaluate.py --instruction none). acc = 1 when the best answer (choice 0) has the
# highest summed log-prob; on an exact tie np.argmax picks choice 0, counted correct (evaluate.py: counted wrong).
task: {name}_mc1
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
num_fewshot: 0
doc_to_text: "{{{{prompt}}}}"
doc_to_target: 0
doc_to_choice: "{{{{mc1_targets.choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
MC2_YAML = """\
# TruthfulQA MC2 (normalised probability mass on the correct answers) by lm-eval's own process_results_mc2.
include: {name}_mc1.yaml
task: {name}_mc2
doc_to_choice: "{{{{mc2_targets.choices}}}}"
process_results: !function {name}_utils.process_results_mc2
"""
UTILS_PY = "from lm_eval.tasks.truthfulqa.utils import process_results_mc2  # noqa: F401  (lm-eval's own MC2)\n"


def task_rows(questions):
    """One row per question, in the schema of truthfulqa/truthful_qa 'multiple_choice' (plus the prompt): MC1 the best
    answer then every incorrect one, MC2 the correct ones (best included, as evaluate.py scores them) then incorrect."""
    rows = []
    for q in questions:
        correct = q["correct"] + ([q["best"]] if q["best"] not in q["correct"] else [])
        rows.append({"question": q["question"], "prompt": tqa.qa_prompt(q["question"], "none"),
                     "mc1_targets": {"choices": [q["best"]] + q["incorrect"],
                                     "labels": [1] + [0] * len(q["incorrect"])},
                     "mc2_targets": {"choices": correct + q["incorrect"],
                                     "labels": [1] * len(correct) + [0] * len(q["incorrect"])}})
    return rows


def export_task(args, folder):
    import evaluate  # its question choice (split, seeded subset): the same questions as evaluate.py
    questions = evaluate.select_questions(args)
    data = os.path.join(os.path.abspath(folder), f"{TASK_NAME}.jsonl")
    runfiles.write_text(data, "".join(json.dumps(r) + "\n" for r in task_rows(questions)))
    files = {f"{TASK_NAME}_mc1.yaml": MC1_YAML.format(name=TASK_NAME, data=json.dumps(data)),
             f"{TASK_NAME}_mc2.yaml": MC2_YAML.format(name=TASK_NAME), f"{TASK_NAME}_utils.py": UTILS_PY}
    for name, text in files.items():
        runfiles.write_text(os.path.join(folder, name), text)
    print(f"wrote {folder}: {len(questions)} questions ({args.split}); run: lm_eval --model hf --model_args "
          f"pretrained=MODEL --include_path {folder} --tasks {TASK_NAME}_mc1,{TASK_NAME}_mc2 --log_samples "
          "--output_path OUT")
    return [os.path.basename(data)] + list(files), {"questions": len(questions), "split": args.split,
                                                    "max_questions": args.max_questions, "seed": args.seed}


# ---- Main

def export(model, tokenizer, edit, fmt, folder, base=None):
    """Write `edit` in format `fmt` to `folder` ('hf' merges it into `model`). Returns (files, note or None)."""
    if fmt == "peft":
        return export_peft(model, edit, folder, base), None
    if fmt == "hf":
        return export_hf(model, tokenizer, edit, folder)
    return export_steer(model, edit, folder), None


def main(argv=None):
    args = parser.parse_args(argv)
    if args.dtype == "mixed":
        raise SystemExit("--dtype mixed runs bf16 products through hooks, which an export cannot carry: export "
                         "float32 (the default) or bfloat16 weights")
    check_out(args.out, args.to)
    record = {"format": args.to}
    if args.to == "lm-eval-task":
        if args.edit is not None:
            raise SystemExit("--to lm-eval-task writes the questions, not an edit: leave out the edit file")
        record["files"], record["questions"] = export_task(args, args.out)
    else:
        if args.edit is None:
            raise SystemExit(f"--to {args.to} exports an edit: give the edit file (written by iti.py or ipo_edit.py)")
        model, tokenizer, about = models.load_model(args.model, args.dtype, args.device)
        edit = heads.load_edit(args.edit, model)  # refuses an edit made for another model
        files, note = export(model, tokenizer, edit, args.to, args.out)
        record.update(files=files, edit_file=os.path.abspath(args.edit), edit=edit.meta, model=about,
                      dtype=args.dtype, applies=APPLIES, position_note=position_note(edit), formula=FORMULAS[args.to],
                      bias_note=note, heads=edit.meta["heads"])
        print(f"wrote {args.out} ({args.to}: {', '.join(files)}): {position_note(edit)}")
    runfiles.write_json(os.path.join(args.out, "export.json"), dict(record, run=runfiles.run_info(args)))


if __name__ == "__main__":
    main()
