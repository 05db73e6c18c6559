"""sweep_steps.py - sweep.py's record-keeping and running: which steps are done, running a stage's command, and
evaluating many edits in one evaluate.py call.

A step is (command, the files it writes). It is done when its files exist AND RUN/sweep_done.jsonl records that the
same command made them from the same inputs (the run's files it reads: an edit, the probe; size and time), so a sweep
with other settings redoes what they change, a killed sweep resumes, and a result of an edit refit since is redone. Each
evaluation step is recorded as its own one-edit evaluate.py command, whichever batch actually ran it, so a resumed
or resharded sweep reuses every result its settings still match.
"""
import functools
import json
import os
import runpy
import shlex
import subprocess
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- Which steps are done: their files exist AND were made by the same command (same settings). A record of each
# finished step is appended to RUN/sweep_done.jsonl; a step whose files were made with other settings is redone.

def done_path(step):
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(step[1][0]))), "sweep_done.jsonl")


def read_jsonl(path):
    """The rows of a JSON-lines file; a line cut short by a kill (or otherwise unreadable) is dropped."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def made_by(step):
    """{output file: the record of the step that last made it (its command and inputs)}, from the run's record."""
    return {out: row for row in read_jsonl(done_path(step)) for out in row["outputs"]}


def inputs_of(step):
    """{path: [size, mtime_ns]} of what the step reads that other steps of the run make (its command's files and
    folders inside the run folder: an evaluation's edit file, a fit's probe folder). A refit rewrites them, so a
    result made from an older edit is known as such even when the sweep was killed before re-evaluating it."""
    cmd, outputs = step
    run = os.path.dirname(done_path(step))
    inputs = {}
    written = [os.path.abspath(p) for p in outputs]
    for arg in cmd[1:]:
        path = os.path.abspath(arg)
        if (not path.startswith(run + os.sep) or not os.path.exists(path)
                or any(p == path or p.startswith(path + os.sep) for p in written)):  # an output, or its folder
            continue
        files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
        for f in files:
            if os.path.isfile(f):
                inputs[os.path.relpath(f, run)] = [os.path.getsize(f), os.stat(f).st_mtime_ns]
    return dict(inputs, **judges_of(cmd))


JUDGES_CHANGED = "the judges changed"


def judges_of(cmd):
    """{'judge:KIND': sha256 prefix} of the judge files an evaluate.py command judges with (none with --judges none,
    or for a judge that is not a file): results judged by other judges are judged again, their other numbers kept."""
    if cmd[0] != "evaluate.py" or ("--judges" in cmd and cmd[cmd.index("--judges") + 1] == "none"):
        return {}
    import judge
    out = {}
    for kind in ("truth", "info"):
        flag = f"--{kind}-judge"
        path = cmd[cmd.index(flag) + 1] if flag in cmd else judge.DEFAULT_JUDGES[kind]
        if os.path.isfile(path):
            out[f"judge:{kind}"] = _checksum(os.path.abspath(path), os.path.getsize(path), os.stat(path).st_mtime_ns)
    return out


@functools.lru_cache(maxsize=16)
def _checksum(path, size, mtime_ns):  # read once per version of the file
    import judge
    return judge.checksum(path)[:16]


def stale(step):
    """Why a step's existing files cannot be reused (None: they can, or there are none yet)."""
    cmd, outputs = step
    if not all(os.path.isfile(p) for p in outputs):
        return None
    rows = made_by(step)
    record = {p: row["command"] for p, row in rows.items()}
    differing = [p for p in outputs if record.get(p) != cmd]
    if not differing:
        now = inputs_of(step)  # records without inputs (written before they were kept) are taken as they are
        changed = sorted(k for p in outputs if "inputs" in rows[p] for k in set(now) | set(rows[p]["inputs"])
                         if now.get(k) != rows[p]["inputs"].get(k))
        if changed and all(k.startswith("judge:") for k in changed):
            return f"{JUDGES_CHANGED} ({', '.join(k[6:] for k in changed)}): judged again, the rest kept"
        return f"{changed[0]} was remade after it (a refit)" if changed else None
    if all(p not in record for p in differing):
        if cmd[0] == "probe.py":  # a probe run by hand (as for shards): probe.py checks its own cache's settings
            return None
        return f"{os.path.basename(differing[0])} has no record of the settings that made it"
    old = next(record[p] for p in differing if p in record)
    changed = [a for a in cmd if a not in old] or [a for a in old if a not in cmd]
    return f"{os.path.basename(differing[0])} was made with other settings (now: {' '.join(changed[:6])})"


def done(step):
    return all(os.path.isfile(path) for path in step[1]) and stale(step) is None


def record_done(step):
    with open(done_path(step), "a") as f:  # one short line per step: shards may append at once
        f.write(json.dumps({"outputs": step[1], "command": step[0], "inputs": inputs_of(step)}) + "\n")


def remove_outputs(step):
    """Delete a step's files (and a result's .jsonl rows beside it) before it is redone."""
    for path in step[1]:
        for old in (path, path[:-len(".json")] + ".jsonl" if path.endswith(".json") else None):
            if old and os.path.isfile(old):
                os.remove(old)


# ---- Many edits in one evaluate.py call: one model load, one CE/KL text, one judge load, and every forward runs
# rows of all the edits at once (heads.EditBatch). The call gives the same numbers as one call per edit (test_sweep).

def batch_key(cmd):
    """The one-edit evaluate.py command without its --edit and --out values: steps with the same key can share a
    call."""
    i, j = cmd.index("--edit") + 1, cmd.index("--out") + 1
    return tuple("EDIT" if k == i else "OUT" if k == j else a for k, a in enumerate(cmd))


def with_edits(cmd, edits, out):
    """The one-edit command `cmd` for several edits, written to the folder `out`."""
    i, j = cmd.index("--edit") + 1, cmd.index("--out") + 1
    return [b for k, a in enumerate(cmd) for b in (edits if k == i else [out] if k == j else [a])]


def batches(steps, most=64):
    """[(command, [step])]: the pending one-edit evaluation steps grouped into evaluate.py calls of at most `most`
    edits. A step whose result is not named after its edit file in the shared folder (e.g. a second baseline under
    another instruction) runs alone, as recorded."""
    groups = {}
    for step in steps:
        cmd, (out,) = step
        edit = cmd[cmd.index("--edit") + 1]
        stem = "baseline" if edit == "none" else os.path.basename(edit)[:-len(".safetensors")]
        alone = os.path.basename(out) != stem + ".json"
        groups.setdefault((batch_key(cmd), os.path.dirname(out)) if not alone else id(step), []).append(step)
    calls = []
    for group in groups.values():
        for k in range(0, len(group), most):
            part = group[k:k + most]
            if len(part) == 1:
                calls.append((part[0][0], part))
                continue
            edits = [s[0][s[0].index("--edit") + 1] for s in part]
            calls.append((with_edits(part[0][0], edits, os.path.dirname(part[0][1][0])), part))
    return calls


# ---- Running

def _die_with_parent():
    """In a stage's child process (Linux): receive SIGTERM when the sweep dies, even by kill -9."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_command(argv, in_subprocess):
    """Run `python SCRIPT ARGS` (here or in a child process); returns an exit code, 0 for success."""
    print("$ python " + shlex.join(argv), flush=True)
    script = os.path.join(HERE, argv[0])
    if in_subprocess:
        child = subprocess.Popen([sys.executable, script, *argv[1:]], preexec_fn=_die_with_parent)
        try:
            return child.wait()
        except BaseException:  # Ctrl-C or a kill of the sweep: the stage must not run on alone
            child.terminate()
            child.wait()
            raise
    saved = sys.argv
    sys.argv = [script, *argv[1:]]
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as e:  # the stage's own one-sentence error, or sys.exit(code)
        if isinstance(e.code, str):
            print(f"error: {e.code}", file=sys.stderr)
        return e.code if isinstance(e.code, int) else 1
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved
