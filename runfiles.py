"""runfiles.py - what every output file carries and how it is written: provenance (the command, the arguments, the
versions, the data's version), atomic writes (a killed job never leaves half a file), JSON-lines rows appended as work
completes and read back on resume (a line cut off by a kill is dropped), and one lock per output (one run writes it)."""
import contextlib
import json
import math
import os
import sys
import tempfile
import time


def run_info(args=None):
    """What made an output: the command, the arguments, the library versions, the data file's version, the time."""
    import torch
    import transformers
    info = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "args": {k: v for k, v in vars(args).items()} if args is not None else None,
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args is not None and hasattr(args, "data"):
        import tqa
        info["data"] = tqa.data_version(args.data)
    return info


def write_atomic(path, write):
    """Call write(tmp_path), then rename onto `path`: readers see the old file or the whole new one."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder) or _file_above(folder):
        raise SystemExit(f"cannot write {path}: {_file_above(folder) or folder} is a file, not a folder; "
                         "pass an --out under a folder")
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the permissions open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _file_above(folder):
    """The first existing path at or above `folder` that is a regular file (None if there is none)."""
    while folder and folder != os.path.dirname(folder):
        if os.path.isfile(folder):
            return folder
        if os.path.isdir(folder):
            return None
        folder = os.path.dirname(folder)
    return None


def check_writable(path):
    """Fail now, naming the fix, if `path` (a file to be written later) cannot be written: before the long work."""
    folder = os.path.dirname(os.path.abspath(path))
    above = _file_above(folder)
    if above:
        raise SystemExit(f"cannot write {path}: {above} is a file, not a folder; pass an --out under a folder")
    existing = folder
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise SystemExit(f"cannot write {path}: {existing} is not writable; pass an --out you can write to")


def finite_or_none(value):
    """A metric for JSON: a finite float, or None (a NaN or inf is never written as if it were a number)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def write_json(path, obj):
    """Strict JSON (allow_nan=False): a NaN or inf in `obj` is a bug to fix, not a value to write."""
    write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def json_lines(rows):
    """Rows as JSON lines, strict (allow_nan=False), one per line."""
    return "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)


def read_rows(path, key):
    """{question: row} of an earlier run; drops a line cut off by a kill; refuses rows made with other settings."""
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows, good = {}, 0
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if row["key"] != key:
            raise SystemExit(f"{path} holds rows made with other settings or another edit: delete it, or choose "
                             "another --out")
        rows[row["question"]] = row
        good += len(line) + 1
    if good < sum(len(line) + 1 for line in lines) - 1:  # a partial last line (a kill mid-write): cut it
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def append_rows(path, rows):
    """Append rows to a JSON-lines file, on disk before this returns (a kill after it loses none of them)."""
    with open(path, "a") as f:
        f.write(json_lines(rows))
        f.flush()
        os.fsync(f.fileno())


def _holder(lock):
    """The process id in a lock file, when that process is still alive; else None (a stale lock)."""
    try:
        with open(lock) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def locked(paths, program):
    """One run per output: a PATH.lock (holding the process id) beside each output path, made with O_EXCL; refused
    while another live run holds it; a stale lock (its process is gone) is taken over. program: named in the refusal."""
    held = []
    try:
        for path in paths:
            lock = path + ".lock"
            os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
            if os.path.exists(lock) and _holder(lock) is None:
                os.remove(lock)  # stale: its run was killed
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise SystemExit(f"{path} is being written by another {program} run (process {_holder(lock)}, "
                                 f"{lock}): wait for it to finish, or choose another --out") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            held.append(lock)
        yield
    finally:
        for lock in held:
            if os.path.exists(lock):
                os.remove(lock)
