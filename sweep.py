"""sweep.py - the paper's experiment in one command: probe -> ITI -> IPO -> evaluate -> figures -> localization report.

Runs the stage scripts, each step printed as the exact command a user could run alone:
  1. probe.py        probe every head; the claimed set is top:K by default (--claimed: any head spec)
  2. iti.py          ITI at the claimed heads and at N random K-head sets (random:K:0 ... random:K:N-1), over
                     --alphas
  3. ipo_edit.py     IPO at the claimed heads, at the first --n-random-ipo of those random sets, at M random single
                     heads (drawn once from the probe's geometry with --seed) and at all heads, over --taus
  4. evaluate.py     the unedited baseline and every edit, on the test questions
  5. iti.py --ablate mean-ablation of the claimed set and of each random set (the necessity trial), evaluated
  6. plot.py         the figures (RUN/figures)
  7. report.py       the localization test and its verdicts, with intervals (RUN/report.md, RUN/report.json)
A unit of work is one head set: its edits fitted over the grid, then evaluated. It runs stage by stage (baseline and
ITI, then IPO, then ablations): each unit's edits are fitted, then every edit of the stage is evaluated in ONE
evaluate.py call (one model and judge load, every forward running rows of all the edits: sweep_steps.batches), each
recorded as its own one-edit command. Steps whose results were made with the same commands are skipped
(RUN/sweep_done.jsonl), so a killed sweep resumes and a sweep with other settings redoes what they change;
`--shard I/N` runs every N-th unit from the I-th, so N machines share a sweep (run the probe first: every shard reads
it), and a final plain run gathers them and draws. The wall time of each fit and each evaluate call goes to
RUN/sweep_times.jsonl, from which the time left is estimated (--dry-run prints it).

Defaults (--preset): the paper's sizes when a GPU is present (K=16, N=16 random sets, M=24 single heads, tau
0.1...0.5); on a CPU the paper's statistical size for SmolLM2-135M (164 test questions, K=16, 19 random sets under ITI
and under IPO), with single heads and second grid values cut (course-full); quick: a 32-question demonstration.
Every size is also a flag.

Reads:  --data (default: the shipped data/TruthfulQA.csv), the model.
Writes: RUN/probe, RUN/edits, RUN/results, RUN/figures, RUN/report.md, RUN/report.json.

    python sweep.py --out runs/smollm2
"""
import argparse
import json
import math
import os
import shlex
import sys
import time

import heads
import models
import tqa
from sweep_steps import (HERE, JUDGES_CHANGED, batches, done, read_jsonl, record_done, remove_outputs, run_command,
                         stale)

# Presets (--preset; every size is also a flag). paper: Wang & Veitch's sizes, the default on a GPU (with ITI's
# alpha 15 in the grid). course: the default on a CPU, the paper's statistical size - every test question, K = 16,
# 19 random sets under ITI AND under IPO (so both rank p-values can reach 0.05), IPO at all heads - with what a CPU
# cannot also afford cut: single heads, a second alpha and tau (course-full puts them back), the ablation trial
# (--methods iti,ipo,ablate). IPO trains on 128 pairs, once (32 steps of 4 pairs, not the paper's ~3,300; --ipo-epochs)
# with the paper's learning rates scaled 20x (AdamW moves a weight by about lr per step) and the summed answer log-prob:
# a short run converges with it (validation loss -48%, level from step 32 of 64 at top-8), not with TRL's per-token
# mean (its target 1/(2 tau) per token is ~15-20 nats an answer; it stalls and drifts into hedges); ipo_edit.py's
# NAME.log.json logs it, the report flags unconverged runs. CE/KL on the model's own text (offline: no hub retries). quick: a
# classroom demonstration (32 questions, K = 8, one random set under IPO): its IPO verdict is inconclusive by design.
PAPER = dict(k=16, n_random=16, n_random_ipo=16, n_single=24, alphas=[5, 10, 15, 20], taus=[0.1, 0.2, 0.3, 0.4, 0.5],
             methods="iti,ipo,ablate", logp="mean", ipo_epochs=2, max_pairs=None, max_val_pairs=128, lr_scale=1.0,
             max_questions=None, n_texts=100, text="auto")
COURSE = dict(k=16, n_random=19, n_random_ipo=19, n_single=0, alphas=[15], taus=[0.3], methods="iti,ipo", logp="sum",
              ipo_epochs=1, max_pairs=128, max_val_pairs=32, lr_scale=20.0, max_questions=None, n_texts=8, text="self")
PRESETS = {"paper": PAPER, "course": COURSE, "course-full": dict(COURSE, n_single=8, alphas=[10, 15], taus=[0.1, 0.3]),
           "quick": dict(COURSE, k=8, n_random_ipo=1, n_single=1, max_questions=32)}

# The planted world (world.py): MC only (the Truth/Info judges know TruthfulQA, not the world), all 96 test
# questions, 19 random sets under ITI and IPO and 8 single heads; float32 (bf16 is slower for a model this small).
WORLD = [("--judges", "judges", "none"), ("--max-questions", "max_questions", 0), ("--n-random-ipo", "n_random_ipo", 19),
         ("--n-single", "n_single", 8), ("--dtype", "dtype", "float32"), ("--n-texts", "n_texts", 4),
         ("--methods", "methods", "iti,ipo,ablate"), ("--ipo-epochs", "ipo_epochs", 2)]


def parse_args(argv=None):
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", choices=list(PRESETS), default=None)
    d = PRESETS[preset.parse_known_args(argv)[0].preset or ("paper" if models.torch.cuda.is_available() else "course")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="the sizes below (default: paper on a GPU, "
                   "course on a CPU): course = the paper's statistical size (164 questions, K 16, 19 random sets "
                   "under ITI and IPO); course-full adds 8 single heads, a second alpha and tau; quick = a 32-question "
                   "demonstration (K 8, one random set under IPO)")
    models.add_model_args(p)
    p.set_defaults(dtype=models.fast_dtype())  # the stages' own default is float32 (exact); the sweep runs fast
    tqa.add_data_args(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/MODEL)")
    p.add_argument("--instruction", default=None, choices=list(tqa.INSTRUCTIONS),
                   help="the prompt's instruction sentence for IPO training and evaluation (default: ITI's 'default'; "
                   "--model world: none, the myth-repeating prompt)")
    p.add_argument("--ablate-instruction", default=None, choices=list(tqa.INSTRUCTIONS),
                   help="the instruction under which the ablation trial is evaluated (default: --instruction; "
                   "--model world: default, the truthful prompt: is the truth lost without the heads?)")
    heads_group = p.add_argument_group("which head sets are edited")
    heads_group.add_argument("--k", type=int, default=d["k"], help="heads per edited set (paper: 16)")
    heads_group.add_argument("--claimed", default=None, help="head set on trial (default: top:K, the probe's best K heads)")
    heads_group.add_argument("--n-random", type=int, default=d["n_random"], help="random K-head sets edited by ITI (paper: 16)")
    heads_group.add_argument("--n-random-ipo", type=int, default=None, help="how many of those sets IPO also edits "
                   f"(default: {d['n_random_ipo']}, at most --n-random; paper: all 16)")
    heads_group.add_argument("--n-single", type=int, default=d["n_single"], help="random single heads edited by IPO (paper: 24)")
    heads_group.add_argument("--no-all-heads", action="store_true", help="leave out IPO at all heads (the full-model baseline)")
    heads_group.add_argument("--methods", default=d["methods"], help="trials to run, comma-separated: iti, ipo, "
                             "ablate (mean-ablation of each set: what is lost without the heads; paper and world "
                             "default, add it on a CPU: --methods iti,ipo,ablate)")
    grid = p.add_argument_group("the edits' grids and training sizes")
    grid.add_argument("--alphas", type=float, nargs="+", default=d["alphas"], help="ITI strengths")
    grid.add_argument("--taus", type=float, nargs="+", default=d["taus"], help="IPO taus (paper: 0.1 0.2 0.3 0.4 0.5)")
    grid.add_argument("--logp", default=d["logp"], choices=["mean", "sum"], help="ipo_edit.py --logp: the answer's "
                      "log-prob as TRL's per-token mean (the paper's long runs) or the sum (short runs converge)")
    grid.add_argument("--ipo-epochs", type=int, default=d["ipo_epochs"], help="ipo_edit.py --epochs: passes over "
                      "the training pairs (paper: 2)")
    grid.add_argument("--max-pairs", type=int, default=d["max_pairs"], help="IPO training pairs, a seeded subsample "
                   "(0: all, about 6,560; the default on a GPU)")
    grid.add_argument("--max-val-pairs", type=int, default=d["max_val_pairs"], help="IPO validation pairs")
    grid.add_argument("--lr-scale", type=float, default=d["lr_scale"], help="ipo_edit.py --lr-scale: the paper's "
                   "learning rates times this (1 on a GPU; more for short CPU runs)")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--max-questions", type=int, default=d["max_questions"],
                   help="test questions evaluated (0: all 164; the default on a GPU)")
    ev.add_argument("--n-texts", type=int, default=d["n_texts"], help="documents for CE/KL (ITI: 100)")
    ev.add_argument("--text", default=d["text"], help="CE/KL text for evaluate.py: auto (OpenWebText from the hub, "
                   "else self), self (text the model samples: offline, no hub retries), or a local .txt/.jsonl")
    ev.add_argument("--judges", default=None, help="evaluate.py --judges (e.g. none: no Truth/Info, MC figures only)")
    stages = p.add_argument_group("running")
    for stage in ("probe", "iti", "ipo", "eval"):
        stages.add_argument(f"--{stage}-args", default="", help=f"more arguments for the {stage} stage, quoted, "
                       f"e.g. --{stage}-args '--batch-size 8'")
    stages.add_argument("--shard", default="0/1", help="I/N: run only the units i with i %% N == I (SLURM array jobs)")
    stages.add_argument("--subprocess", action="store_true", help="run each stage in its own Python process (default: "
                   "in this one, saving the import time; the commands are the same)")
    stages.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    args = p.parse_args(argv)
    if args.model == "world":  # the planted ground truth: its questions, its planted heads on trial, its prompts
        import world
        if args.data == tqa.DEFAULT_DATA:
            args.data = os.path.join(world.DEFAULT_FOLDER, "world.csv")
            if not os.path.isfile(args.data):
                world.write_csv(args.data, world.make_facts())
        if not args.claimed:
            args.claimed, args.k = ",".join(f"{l}.{h}" for l, h in world.PLANTED_HEADS), len(world.PLANTED_HEADS)
        args.instruction = args.instruction or "none"
        args.ablate_instruction = args.ablate_instruction or "default"
        given = set(argv if argv is not None else sys.argv[1:])
        for flag, name, value in WORLD:  # a 1M-parameter model: every test question, 19 random sets under IPO too
            if flag not in given:
                setattr(args, name, value)
    args.instruction = args.instruction or "default"
    args.ablate_instruction = args.ablate_instruction or args.instruction
    args.out = args.out or os.path.join("runs", os.path.basename(args.model.rstrip("/")))
    try:
        args.shard_index, args.n_shards = map(int, args.shard.split("/"))
        assert 0 <= args.shard_index < args.n_shards
    except (ValueError, AssertionError):
        raise SystemExit(f"--shard {args.shard}: give I/N with 0 <= I < N, e.g. --shard 0/4") from None
    args.methods = args.methods.split(",")
    if not args.methods or not set(args.methods) <= {"iti", "ipo", "ablate"}:
        raise SystemExit(f"--methods {','.join(args.methods)}: choose from iti, ipo, ablate (comma-separated)")
    if args.n_random_ipo is None:
        args.n_random_ipo = min(d["n_random_ipo"], args.n_random)
    for name in ("max_pairs", "max_val_pairs", "max_questions", "n_texts"):
        if (getattr(args, name) or 0) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: give 0 (all) or a positive count")
    if not all(math.isfinite(a) for a in args.alphas) or not all(math.isfinite(t) and t > 0 for t in args.taus):
        raise SystemExit("--alphas must be finite numbers and --taus finite and positive (paper: 0.1 ... 0.5)")
    if not (math.isfinite(args.lr_scale) and args.lr_scale > 0):
        raise SystemExit(f"--lr-scale {args.lr_scale}: give a positive factor (1 = the paper's learning rates)")
    if args.ipo_epochs < 1:
        raise SystemExit(f"--ipo-epochs {args.ipo_epochs}: give at least 1 pass over the training pairs (paper: 2)")
    if args.k < 1 or min(args.n_random, args.n_random_ipo, args.n_single) < 0 or args.n_random_ipo > args.n_random:
        raise SystemExit("--k must be at least 1, the counts at least 0, and --n-random-ipo at most --n-random")
    return args


# ---- The plan: units of work, each a list of (command, the files it writes)

def model_data_args(args):
    return ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--seed", str(args.seed)] + (
        ["--data", args.data] if args.data != tqa.DEFAULT_DATA else [])


def evaluate_command(args, edits, instruction=None, out=None):
    extra = ["--judges", args.judges] if args.judges else []
    instruction = instruction or args.instruction
    extra += ["--instruction", instruction] if instruction != "default" else []
    return ["evaluate.py", *model_data_args(args), "--edit", *edits, "--split", "test", "--out", out or f"{args.out}/results",
            "--n-texts", str(args.n_texts), "--text", args.text, *extra, *(["--max-questions", str(args.max_questions)]
                                                       if args.max_questions else []), *shlex.split(args.eval_args)]


def evaluations(args, edits, instruction=None):
    """One evaluation step per edit file, each recorded as its own one-edit evaluate.py command (the sweep runs a
    stage's steps together: sweep_steps.batches)."""
    results = [f"{args.out}/results/{os.path.basename(e)[:-len('.safetensors')]}.json" for e in edits]
    return [(evaluate_command(args, [e], instruction, r), [r]) for e, r in zip(edits, results)]


def edit_unit(args, method, spec):
    """Fit the edits of one head set over the grid (its first step), then evaluate each (one step per edit)."""
    probe = f"{args.out}/probe"
    if method == "ablate":  # one edit, no grid: the heads' outputs replaced by their mean (the necessity trial)
        edits = [f"{args.out}/edits/ablate-{heads.spec_name(spec)}.safetensors"]
        fit = ["iti.py", "--probe", probe, "--heads", spec, "--ablate", "--out", edits[0]]
        return {"name": f"{method} {spec}", "kind": method, "points": 1, "fits": 1,
                "steps": [(fit, edits), *evaluations(args, edits, args.ablate_instruction)]}
    grid, letter = (args.alphas, "a") if method == "iti" else (args.taus, "t")
    pattern = f"{args.out}/edits/{method}-{heads.spec_name(spec)}-{letter}{{{'alpha' if method == 'iti' else 'tau'}}}.safetensors"
    value = (lambda g: f"{g:g}") if method == "iti" else (lambda g: str(float(g)))  # as each script names its files
    edits = [pattern.format(alpha=value(g), tau=value(g)) for g in grid]
    if method == "iti":
        fit = ["iti.py", "--probe", probe, "--heads", spec, "--alpha", *map(value, grid),
               "--direction", "mass_mean", "--out", pattern, *shlex.split(args.iti_args)]
    else:
        # IPO trains at the sweep's precision: under mixed its reference log-probs are cached at that precision too,
        # so the loss starts exactly on its target (2.7778 at tau 0.3); the edit and AdamW's state stay float32
        fit = ["ipo_edit.py", *model_data_args(args), "--heads", spec, "--probe", probe, "--logp", args.logp, "--tau",
               *map(value, grid), "--out", pattern, *(["--max-pairs", str(args.max_pairs)] if args.max_pairs else []),
               "--max-val-pairs", str(args.max_val_pairs), "--lr-scale", f"{args.lr_scale:g}",
               "--epochs", str(args.ipo_epochs),
               *(["--instruction", args.instruction] if args.instruction != "default" else []),
               *shlex.split(args.ipo_args)]
    return {"name": f"{method} {spec}", "kind": method, "points": len(grid), "fits": 1,
            "steps": [(fit, edits), *evaluations(args, edits)]}


def probe_unit(args):
    cmd = ["probe.py", *model_data_args(args), "--out", f"{args.out}/probe", *shlex.split(args.probe_args)]
    return {"name": "probe", "kind": "probe", "points": 1, "fits": 1,
            "steps": [(cmd, [f"{args.out}/probe/probe.json", f"{args.out}/probe/probe.safetensors"])]}


def plan(args):
    """[unit] after the probe: the baseline, then one unit per (method, head set). The single heads are drawn from
    the probe's geometry (random:M:SEED: M distinct heads), so they are planned once the probe exists."""
    units = [{"name": "baseline", "kind": "evaluate", "points": 1, "fits": 0,
              "steps": [(evaluate_command(args, ["none"]), [f"{args.out}/results/baseline.json"])]}]
    if "ablate" in args.methods and args.ablate_instruction != args.instruction:  # the ablation trial's own baseline
        out = f"{args.out}/results/baseline-{args.ablate_instruction}.json"
        units.append({"name": "baseline for ablation", "kind": "evaluate", "points": 1, "fits": 0,
                      "steps": [(evaluate_command(args, ["none"], args.ablate_instruction, out), [out])]})
    claimed = args.claimed or f"top:{args.k}"
    probe_json = f"{args.out}/probe/probe.json"
    geo = None
    if os.path.isfile(probe_json):
        with open(probe_json) as f:
            geo = heads.Geometry(**json.load(f)["geometry"])
    if args.claimed and geo is not None:  # the random sets must match the claimed set's size
        size = len(heads.parse_heads(args.claimed, geo, probe_json))
        if size != args.k:
            print(f"--claimed {args.claimed} has {size} heads: random sets of {size} heads (not --k {args.k})")
        args.k = size
    elif args.claimed:
        print(f"(the size of --claimed {args.claimed} is checked once the probe has run)")
    randoms = [f"random:{args.k}:{i}" for i in range(args.n_random)]
    units += [edit_unit(args, "iti", spec) for spec in [claimed] + randoms if "iti" in args.methods]
    singles = []
    if args.n_single and geo is not None:
        singles = [f"single:{l}.{h}" for l, h in heads.parse_heads(f"random:{args.n_single}:{args.seed}", geo)]
    elif args.n_single:
        print(f"(the {args.n_single} single heads are planned once the probe has run: they need the model's geometry)")
    ipo_specs = [claimed] + randoms[:args.n_random_ipo] + singles + ([] if args.no_all_heads else ["all"])
    units += [edit_unit(args, "ipo", spec) for spec in ipo_specs if "ipo" in args.methods]
    return units + [edit_unit(args, "ablate", spec) for spec in [claimed] + randoms if "ablate" in args.methods]


# ---- Running: stage by stage (the baseline and ITI, then IPO, then the ablations). Each unit's edits are fitted,
# then every pending evaluation of the stage runs in one evaluate.py call (sweep_steps.batches).

def estimate(units, times_path):
    """Seconds left for `units`, from the measured seconds per grid point of each kind of fit and per evaluated edit;
    None for kinds not yet measured."""
    rates = {}
    for row in read_jsonl(times_path):
        if {"kind", "seconds", "points"} <= set(row) and row["points"]:
            rates.setdefault(row["kind"], []).append(row["seconds"] / row["points"])
    rate = {kind: sum(r) / len(r) for kind, r in rates.items()}
    seconds, unmeasured = 0.0, set()
    for unit in units:
        n_fit = unit["fits"]
        for kind, points in ((unit["kind"], unit["points"] if not all(map(done, unit["steps"][:n_fit])) else 0),
                             ("evaluate", sum(not done(s) for s in unit["steps"][n_fit:]))):
            if points and kind in rate:
                seconds += rate[kind] * points
            elif points:
                unmeasured.add(kind)
    return seconds, sorted(unmeasured)


def log_time(times_path, name, kind, points, start):
    with open(times_path, "a") as f:  # one short line per fit or evaluate call: shards may append at once
        f.write(json.dumps({"unit": name, "kind": kind, "points": points,
                            "seconds": round(time.time() - start, 2)}) + "\n")


def fit_unit(unit, args, times_path):
    """Fit the unit's edits unless done; returns (the failed command or None, whether they were (re)made)."""
    start, made = time.time(), False
    for step in unit["steps"][:unit["fits"]]:
        why = stale(step)
        if why:
            print(f"redoing {unit['name']} ({why})", flush=True)
            remove_outputs(step)
        if not done(step):
            made = True
            if run_command(step[0], args.subprocess):
                return f"{unit['name']}: python {shlex.join(step[0])}", made
            record_done(step)
    if made:
        log_time(times_path, unit["name"], unit["kind"], unit["points"], start)
    return None, made


def run_stage(units, args, times_path):
    """Fit each unit's edits, then evaluate every pending edit of the stage together; returns the failed commands."""
    failed, pending = [], []
    for unit in units:
        if unit["fits"]:
            print(f"\n[fit] {unit['name']}", flush=True)
        error, made = fit_unit(unit, args, times_path)
        failed += [error] if error else []
        for step in unit["steps"][unit["fits"]:] if not error else ():
            why = "its edits were redone" if made else stale(step)
            if why and any(os.path.isfile(p) for p in step[1]):
                if not made:  # (a refit has said so already)
                    print(f"redoing {unit['name']} ({os.path.basename(step[1][0])}: {why})", flush=True)
                if not why.startswith(JUDGES_CHANGED):  # evaluate.py keeps the rows and only judges them again
                    remove_outputs(step)
            pending += [step] if not done(step) else []
    for cmd, part in batches(pending):
        print(f"\n[evaluate] {len(part)} edit{'s' * (len(part) > 1)} in one call", flush=True)
        start = time.time()
        if run_command(cmd, args.subprocess):
            failed.append(f"evaluate: python {shlex.join(cmd)}")
            continue
        for step in part:
            record_done(step)
        log_time(times_path, f"evaluate {len(part)} edits", "evaluate", len(part), start)
    return failed


def main(argv=None):
    args = parse_args(argv)
    tiny = args.model in models.TINY_CONFIGS
    if tiny:
        print(f"NOTE: {args.model} is {models.TINY_NOTE}.")
    os.makedirs(args.out, exist_ok=True)
    times_path, probe = f"{args.out}/sweep_times.jsonl", probe_unit(args)
    if not done(probe["steps"][0]):
        if args.n_shards > 1:
            raise SystemExit("--shard: every shard reads the probe, so run it once first: python "
                             + shlex.join(probe["steps"][0][0]))
        if args.dry_run:
            print("probe:\n  python " + shlex.join(probe["steps"][0][0]))
        elif fit_unit(probe, args, times_path)[0]:
            raise SystemExit("the probe failed: every other stage needs it (see its message above)")
    units = plan(args)
    left = [u for u in units if not all(map(done, u["steps"]))]
    mine = [u for u in units[args.shard_index::args.n_shards] if u in left]  # stable slices of the whole plan
    seconds, unmeasured = estimate(mine, times_path)
    print(f"{len(units)} units after the probe: {len(units) - len(left)} done, {len(left)} left, {len(mine)} in this "
          f"shard ({args.shard}); time left: {seconds / 60:.1f} min" + (
              f" plus the units of kinds not yet timed ({', '.join(unmeasured)}: known after one of each has run)"
              if unmeasured else ""), flush=True)
    stages = [[u for u in mine if u["kind"] in kinds] for kinds in (("evaluate", "iti"), ("ipo",), ("ablate",))]
    if args.dry_run:
        for stage in stages:
            for unit in stage:
                print(f"{unit['name']}:\n" + "".join(f"  python {shlex.join(cmd)}\n" for cmd, out in
                                                       unit["steps"][:unit["fits"]] if not done((cmd, out))))
            evals = [s for u in stage for s in u["steps"][u["fits"]:] if not done(s)]
            for cmd, part in batches(evals):
                print(f"evaluate ({len(part)} edits in one call):\n  python {shlex.join(cmd)}")
        return
    failed = []
    for stage in stages:
        failed += run_stage(stage, args, times_path)
    if all(all(map(done, u["steps"])) for u in units):
        claimed = args.claimed or f"top:{args.k}"
        for stage in (["plot.py", "--runs", args.out, "--claimed", claimed],
                      ["report.py", "--runs", args.out, "--claimed", claimed]):
            if run_command(stage, args.subprocess):
                failed.append(f"{stage[0][:-3]}: python {shlex.join(stage)}")
    else:
        print("\nsome units are not done (other shards, or failures): when they are, run again without --shard to draw")
    if tiny:
        print(f"NOTE: {args.model} is {models.TINY_NOTE}.")
    if failed:
        raise SystemExit("these steps failed (fix them and rerun the sweep: finished units are kept):\n  "
                         + "\n  ".join(failed))


if __name__ == "__main__":
    main()
