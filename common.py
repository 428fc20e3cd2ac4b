"""
Plumbing shared by every script: `--key=value` configuration, atomic checkpoints and their
RNG states, device and precision set-up, and progress lines. Nothing here is specific to
the paper; it keeps each script about its own stage. Nothing here runs on its own.
"""

import dataclasses
import inspect
import json
import os
import random
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch


# --------------------------------------------------------------------------- config

def _field_comments(cls):
    """{field: its trailing '# comment'} read from the dataclass source, for --help."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def _parse_value(text, default, name):
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text.replace("_", ""))
        if kind is float:
            return float(text)
    except ValueError:
        raise SystemExit(f"error: --{name}={text} is not a valid {kind.__name__}") from None
    return text


def parse_args(cls, argv=None, description=""):
    """Build a `cls` dataclass from `--key=value` arguments; `--help` lists every field."""
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach a pipe, `tee` or a log file as printed
        sys.stdout.reconfigure(line_buffering=True)
    defaults = cls()
    names = [f.name for f in dataclasses.fields(cls)]
    if any(a in ("-h", "--help") for a in argv):
        comments = _field_comments(cls)
        print(description.strip() + "\n\noptions (--key=value):")
        options = [f"--{n}={getattr(defaults, n)!s}" for n in names]
        width = min(max(map(len, options)), 40)
        for n, option in zip(names, options):
            print(f"  {option:<{width}}  {comments.get(n, '')}".rstrip())
        raise SystemExit(0)
    values = {}
    for arg in argv:
        m = re.fullmatch(r"--(\w+)=(.*)", arg, re.S)
        if not m:
            raise SystemExit(f"error: expected --key=value, got {arg!r} (see --help)")
        key, text = m.groups()
        if key not in names:
            close = [n for n in names if key in n or n in key]
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise SystemExit(f"error: unknown option --{key}{hint} (see --help)")
        values[key] = _parse_value(text, getattr(defaults, key), key)
    try:
        return cls(**values)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# ---------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_step(path):
    """The step a checkpoint holds, reading only those bytes (mmap: the weights stay on disk;
    a sharded one's run.pt)."""
    if os.path.isdir(path):
        import parallel  # torch.distributed.checkpoint, only for sharded checkpoints
        return parallel.load_run_state(path)["step"]
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"]


def load_checkpoint(path, mmap=False):
    """A train.py checkpoint as a dict: a ckpt.pt file, or a sharded checkpoint directory
    (train.py --parallel=fsdp) gathered into the same dict (parallel.to_single_file).
    mmap: map the file instead of reading it (processes on one machine share its pages)."""
    if os.path.isdir(path):
        import parallel  # torch.distributed.checkpoint, only for sharded checkpoints
        if parallel.is_sharded(path):
            return parallel.to_single_file(path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; train one first (python train.py --out_dir=...)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # a truncated or foreign file
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def rng_state():
    """The generators a run draws from. Not CUDA's: nothing draws from it (weights are
    initialized on the CPU, batches are a function of the seed, there is no dropout), and
    saving every visible GPU's state made a resume on a node with fewer GPUs fail."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state):
    """Restore rng_state(); a "cuda" entry of an older checkpoint is ignored (see rng_state)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, last_step):
    """Drop records after `last_step`: a resumed run rewrites the steps a crash lost."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if json.loads(line).get("step", 0) <= last_step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(kept)
    os.replace(f"{path}.tmp", path)


# --------------------------------------------------------------- device, precision

def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={device} but CUDA is not available; use --device=cpu")
    return device


def autocast_context(device, dtype):
    """bf16 autocast on CUDA (the paper trains in bfloat16); plain float32 elsewhere."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return dtype, nullcontext()
    if dtype == "bfloat16":
        return dtype, torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    raise SystemExit(f"error: --dtype={dtype} is not supported; use auto, float32 or bfloat16")


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Eta:
    """Remaining time from the recent pace (the first, compiling steps are not counted)."""

    def __init__(self, total, done=0):
        self.total, self.start_done, self.start_time = total, done, None

    def __call__(self, done):
        if self.start_time is None:
            self.start_time, self.start_done = time.perf_counter(), done
            return "?"
        rate = (done - self.start_done) / max(time.perf_counter() - self.start_time, 1e-9)
        return format_duration((self.total - done) / rate) if rate > 0 else "?"


class Pace:
    """Training tokens per second since the previous call."""

    def __init__(self, tokens_seen):
        self.time, self.tokens = time.perf_counter(), tokens_seen

    def __call__(self, tokens_seen):
        now = time.perf_counter()
        rate = (tokens_seen - self.tokens) / (now - self.time)
        self.time, self.tokens = now, tokens_seen
        return rate


def format_bytes(n):
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"
