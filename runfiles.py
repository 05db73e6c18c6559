"""runfiles.py - what every output file carries and how it is written: provenance (the command, the arguments, the
versions, the data's version) and atomic writes (a killed job never leaves half a file)."""
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
