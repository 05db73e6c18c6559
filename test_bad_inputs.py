"""Bad inputs, tried as a new user or an adversary would: each must stop at once with a sentence naming the fix
(exit != 0, no traceback), never run on silently (exit 0 with a wrong number) or end in a traceback.

    python -m pytest -q test_bad_inputs.py      # every case must be 'clear'
    python test_bad_inputs.py                   # the table of cases and what each gets now (markdown)

Each case calls a script's main(argv) in this process on a tiny random model and a small CSV. A case is 'clear' when
the script raises SystemExit with a message (a sentence) that matches what the case expects the fix to name;
'traceback' when any other exception escapes; 'silent' when the script returns as if all were well.
"""
import gzip
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
import heads
import ipo_edit
import iti
import probe
import sweep
import train_judge
from conftest import write_fixture_csv

torch.set_num_threads(1)
TINY = ["--model", "tiny-llama"]


def build_world(root):
    """The good files every case starts from: a CSV, a probe, an ITI edit, an IPO edit (seed 0), a text file."""
    os.makedirs(root, exist_ok=True)
    w = {"root": root, "csv": write_fixture_csv(os.path.join(root, "t.csv"), n=20)}
    w["probe"] = os.path.join(root, "probe")
    probe.main([*TINY, "--data", w["csv"], "--out", w["probe"], "--batch-size", "8"])
    w["iti"] = os.path.join(root, "iti.safetensors")
    iti.main(["--probe", w["probe"], "--heads", "top:2", "--alpha", "3", "--out", w["iti"]])
    w["ipo"] = os.path.join(root, "ipo.safetensors")
    ipo_edit.main([*TINY, "--data", w["csv"], "--heads", "0.1,1.2", "--tau", "0.3", "--max-pairs", "4",
                   "--max-val-pairs", "0", "--epochs", "1", "--out", w["ipo"]])
    w["file"] = os.path.join(root, "a-file")
    open(w["file"], "w").write("not a folder")
    w["binary"] = os.path.join(root, "binary.csv")
    open(w["binary"], "wb").write(bytes(range(256)) * 8)
    return w


def edited_copy(w, name, change):
    """A copy of the ITI edit with `change(tensors, meta)` applied."""
    tensors = load_file(w["iti"])
    from safetensors import safe_open
    with safe_open(w["iti"], "pt") as f:
        meta = json.loads(f.metadata()["edit"])
    change(tensors, meta)
    path = os.path.join(w["root"], name)
    save_file(tensors, path, metadata={"edit": json.dumps(meta)})
    return path


def nan_edit(w):
    def change(t, meta):
        key = "offset" if "offset" in t else next(k for k in t if t[k].is_floating_point())
        t[key].view(-1)[0] = float("nan")
    return edited_copy(w, "nan.safetensors", change)


def bad_meta_edit(w):
    path = os.path.join(w["root"], "badmeta.safetensors")
    save_file(load_file(w["iti"]), path, metadata={"edit": "{not json"})
    return path


def other_model_probe(w):
    """The probe folder, claiming to come from another model of the same geometry."""
    folder = os.path.join(w["root"], "probe-other")
    shutil.copytree(w["probe"], folder, dirs_exist_ok=True)
    meta = json.load(open(os.path.join(folder, "probe.json")))
    meta.update(model="tiny-mistral", fingerprint=[x + 1.0 for x in meta["fingerprint"]])
    json.dump(meta, open(os.path.join(folder, "probe.json"), "w"))
    return folder


def empty_folder(w):
    path = os.path.join(w["root"], "empty-model")
    os.makedirs(path, exist_ok=True)
    return path


def iti_from(w, probe_folder):
    path = os.path.join(w["root"], "iti-other.safetensors")
    iti.main(["--probe", probe_folder, "--heads", "top:2", "--alpha", "1", "--out", path])
    return path


def jsonl_without_text(w):
    path = os.path.join(w["root"], "docs.jsonl")
    open(path, "w").write(json.dumps({"body": "some text"}) + "\n")
    return path


def out_of_range_labels(w):
    path = os.path.join(w["root"], "generations.jsonl")
    open(path, "w").write(json.dumps({"question": "Q?", "answer": "A.", "truth": 1.5, "info": 0}) + "\n")
    return path


def duplicated_csv(w):
    path = os.path.join(w["root"], "dup.csv")
    lines = open(w["csv"]).read().splitlines()
    open(path, "w").write("\n".join(lines + [lines[3]]) + "\n")
    return path


def nan_judge(w):
    from judge import DEFAULT_JUDGES
    src = DEFAULT_JUDGES["truth"]
    if not os.path.isfile(src):
        pytest.skip("no default judge file")
    tensors = load_file(src)
    from safetensors import safe_open
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    key = next(k for k in tensors if tensors[k].is_floating_point())
    tensors[key].view(-1)[0] = float("nan")
    path = os.path.join(w["root"], "nan-judge.safetensors")
    save_file(tensors, path, metadata=meta)
    return path


def tiny_judge_set(w, rows):
    path = os.path.join(w["root"], f"judge{len(rows)}.jsonl.gz")
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def nan_result_run(w):
    run = os.path.join(w["root"], "nan-run")
    os.makedirs(f"{run}/results", exist_ok=True)
    json.dump({"metrics": {"mc2": None}}, open(f"{run}/results/baseline.json", "w"))
    open(f"{run}/results/broken.json", "w").write("{\"metrics\": ")
    return run


EV = lambda w, *a: [*TINY, "--data", w["csv"], "--judges", "none", "--skip", "text", "--max-new-tokens", "3",  # noqa
                    "--out", os.path.join(w["root"], "res", "r.json"), *a]
JUDGE_SETS = ["--truth-data", "data/finetune_truth.jsonl.gz", "--info-data", "data/finetune_info.jsonl.gz"]
OUT_UNDER_FILE = lambda w: os.path.join(w["file"], "x", "out.json")  # noqa: E731

# (case, script main, argv builder, what the message must name)
CASES = [
    ("probe: --out under a regular file", probe.main,
     lambda w: [*TINY, "--data", w["csv"], "--out", os.path.join(w["file"], "p")], "is a file"),
    ("probe: a binary --data", probe.main, lambda w: [*TINY, "--data", w["binary"], "--out", w["root"] + "/p2"],
     "CSV"),
    ("probe: a missing --data", probe.main, lambda w: [*TINY, "--data", w["root"] + "/none.csv",
                                                       "--out", w["root"] + "/p2"], "no such file"),
    ("probe: a CSV that repeats a question", probe.main,
     lambda w: [*TINY, "--data", duplicated_csv(w), "--out", w["root"] + "/p3"], "more than once"),
    ("probe: a misspelt built-in model", probe.main,
     lambda w: ["--model", "tiny-lama", "--data", w["csv"], "--out", w["root"] + "/p4"], "did you mean tiny-llama"),
    ("probe: an empty --model folder", probe.main,
     lambda w: ["--model", empty_folder(w), "--data", w["csv"], "--out", w["root"] + "/p5"], "config.json"),
    ("probe: --device cuda on a CPU-only torch", probe.main,
     lambda w: [*TINY, "--device", "cuda", "--data", w["csv"], "--out", w["root"] + "/p6"], "CUDA"),
    ("probe: --device gpu0", probe.main,
     lambda w: [*TINY, "--device", "gpu0", "--data", w["csv"], "--out", w["root"] + "/p7"], "device"),
    ("iti: --alpha nan", iti.main, lambda w: ["--probe", w["probe"], "--heads", "top:2", "--alpha", "nan",
                                              "--out", w["root"] + "/e.safetensors"], "finite"),
    ("iti: --alpha inf", iti.main, lambda w: ["--probe", w["probe"], "--heads", "top:2", "--alpha", "inf",
                                              "--out", w["root"] + "/e.safetensors"], "finite"),
    ("iti: a malformed --heads", iti.main, lambda w: ["--probe", w["probe"], "--heads", "1.x", "--alpha", "1",
                                                      "--out", w["root"] + "/e.safetensors"], "malformed"),
    ("iti: --out under a regular file", iti.main, lambda w: ["--probe", w["probe"], "--heads", "top:2", "--alpha",
                                                             "1", "--out", OUT_UNDER_FILE(w)], "is a file"),
    ("ipo_edit: --tau inf", ipo_edit.main,
     lambda w: [*TINY, "--data", w["csv"], "--heads", "0.1", "--tau", "inf", "--out", w["root"] + "/i.safetensors"],
     "tau"),
    ("ipo_edit: --tau nan (not blamed on the learning rate)", ipo_edit.main,
     lambda w: [*TINY, "--data", w["csv"], "--heads", "0.1", "--tau", "nan", "--out", w["root"] + "/i.safetensors"],
     "tau"),
    ("ipo_edit: --max-pairs -1", ipo_edit.main,
     lambda w: [*TINY, "--data", w["csv"], "--heads", "0.1", "--max-pairs", "-1",
                "--out", w["root"] + "/i.safetensors"], "max-pairs"),
    ("ipo_edit: --max-pairs 0 (not blamed on the data)", ipo_edit.main,
     lambda w: [*TINY, "--data", w["csv"], "--heads", "0.1", "--max-pairs", "0",
                "--out", w["root"] + "/i.safetensors"], "max-pairs"),
    ("ipo_edit: --out under a regular file, before training", ipo_edit.main,
     lambda w: [*TINY, "--data", w["csv"], "--heads", "0.1", "--max-pairs", "4", "--out", OUT_UNDER_FILE(w)],
     "is a file"),
    ("ipo_edit: --probe from another model", ipo_edit.main,
     lambda w: [*TINY, "--data", w["csv"], "--heads", "top:2", "--probe", other_model_probe(w), "--max-pairs", "4",
                "--out", w["root"] + "/i.safetensors"], "tiny-mistral|another model|other model"),
    ("evaluate: an ITI edit made from another model's probe", evaluate.main,
     lambda w: EV(w, "--edit", iti_from(w, other_model_probe(w))), "tiny-mistral|another model|other model"),
    ("evaluate: an edit with a NaN inside", evaluate.main, lambda w: EV(w, "--edit", nan_edit(w)), "finite|NaN"),
    ("evaluate: an edit with unreadable metadata", evaluate.main, lambda w: EV(w, "--edit", bad_meta_edit(w)),
     "metadata|edit file"),
    ("evaluate: an edit trained on seed 0 scored on seed 1's split", evaluate.main,
     lambda w: EV(w, "--edit", w["ipo"], "--seed", "1"), "seed"),
    ("evaluate: a .jsonl --text without a 'text' key", evaluate.main,
     lambda w: [*TINY, "--data", w["csv"], "--judges", "none", "--skip", "mc,generation", "--text",
                jsonl_without_text(w), "--out", w["root"] + "/res/t.json"], "text"),
    ("evaluate: --out under a regular file", evaluate.main,
     lambda w: [*TINY, "--data", w["csv"], "--judges", "none", "--out", OUT_UNDER_FILE(w)], "is a file"),
    ("evaluate: a binary --data", evaluate.main,
     lambda w: [*TINY, "--data", w["binary"], "--judges", "none", "--out", w["root"] + "/res/b.json"], "CSV"),
    ("evaluate: a judge file with NaN weights", evaluate.main,
     lambda w: [*TINY, "--data", w["csv"], "--skip", "mc,text", "--max-new-tokens", "2", "--truth-judge",
                nan_judge(w), "--out", w["root"] + "/res/j.json"], "finite|NaN"),
    ("evaluate: a missing judge, before any scoring", evaluate.main,
     lambda w: [*TINY, "--data", w["csv"], "--skip", "mc,text", "--truth-judge", w["root"] + "/none.safetensors",
                "--out", w["root"] + "/res/j2.json"], "judge"),
    ("train_judge: --holdout 0 (nothing to measure on)", train_judge.main,
     lambda w: ["--holdout", "0", *JUDGE_SETS, "--out", w["root"] + "/judges"], "holdout"),
    ("train_judge: --holdout 1", train_judge.main,
     lambda w: ["--holdout", "1", *JUDGE_SETS, "--out", w["root"] + "/judges"], "holdout"),
    ("train_judge: --epochs 0", train_judge.main,
     lambda w: ["--epochs", "0", *JUDGE_SETS, "--out", w["root"] + "/judges"], "epochs"),
    ("train_judge: an empty judge set", train_judge.main,
     lambda w: ["--truth-data", tiny_judge_set(w, []), "--info-data", tiny_judge_set(w, []),
                "--out", w["root"] + "/judges"], "empty|no "),
    ("train_judge: --fold past the last fold", train_judge.main,
     lambda w: ["--fold", "7", *JUDGE_SETS, "--out", w["root"] + "/judges"], "folds are 0 to 5"),
    ("train_judge: --measure-only without judge files", train_judge.main,
     lambda w: ["--measure-only", *JUDGE_SETS, "--out", w["root"] + "/no-judges"], "train it first"),
    ("train_judge: --train-labels with a label of 1.5", train_judge.main,
     lambda w: ["--train-labels", out_of_range_labels(w), *JUDGE_SETS, "--out", w["root"] + "/judges"], "from 0 to 1"),
    ("train_judge: --train-labels-repeat 0", train_judge.main,
     lambda w: ["--train-labels-repeat", "0", *JUDGE_SETS, "--out", w["root"] + "/judges"], "repeat 1 or more"),
    ("sweep: a malformed --claimed", sweep.main,
     lambda w: [*TINY, "--data", w["csv"], "--out", w["root"], "--claimed", "1.x", "--dry-run"], "malformed"),
    ("sweep: --max-pairs -1", sweep.main, lambda w: [*TINY, "--out", w["root"], "--max-pairs", "-1"], "max-pairs"),
]


def try_case(main, argv):
    """('clear' | 'traceback' | 'silent', message)."""
    import contextlib
    import io
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main(argv)
    except SystemExit as e:
        if isinstance(e.code, str) and len(e.code) > 15:
            return "clear", e.code
        said = [line for line in err.getvalue().splitlines() if "error:" in line]
        if e.code == 2 and said:  # argparse's own refusal: usage and a sentence
            return "clear", said[-1].split("error:", 1)[1].strip()
        return ("silent" if e.code in (0, None) else "traceback"), f"exit {e.code} without a sentence"
    except pytest.skip.Exception:
        raise
    except Exception as e:  # noqa: BLE001 - what a user would see as a traceback
        return "traceback", f"{type(e).__name__}: {str(e)[:150]}"
    return "silent", "exit 0"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(str(tmp_path_factory.mktemp("bad")))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_sentence(world, case):
    import re
    name, main, argv, expect = case
    verdict, message = try_case(main, argv(world))
    assert verdict == "clear", f"{name}: {verdict} ({message})"
    assert re.search(expect, message, re.IGNORECASE), f"{name}: the message does not name {expect!r}: {message}"


if __name__ == "__main__":
    import re
    import tempfile
    w = build_world(tempfile.mkdtemp())
    print("| bad input | verdict | message |\n|---|---|---|")
    counts = {}
    for name, main, argv, expect in CASES:
        try:
            verdict, message = try_case(main, argv(w))
        except pytest.skip.Exception as e:
            verdict, message = "skipped", str(e)
        if verdict == "clear" and not re.search(expect, message, re.IGNORECASE):
            verdict = "misleading"
        counts[verdict] = counts.get(verdict, 0) + 1
        print(f"| {name} | {verdict} | {message.splitlines()[0][:160].replace('|', '/')} |", flush=True)
    print("\n" + ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())), file=sys.stderr)
