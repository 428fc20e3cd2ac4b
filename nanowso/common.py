"""
Plumbing every script shares: `--key=value` configuration from a dataclass (parse_args),
log.jsonl appends, and progress lines (Eta, Pace). Nothing here is specific to the paper;
nothing here runs on its own.
"""


import dataclasses
import inspect
import json
import os
import re
import sys
import time

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
        options = [f"--{f.name}={f.default!s}" for f in dataclasses.fields(cls)]  # as declared, before __post_init__
        width = min(max(map(len, options)), 40)
        for n, option in zip(names, options):
            print(f"  {option:<{width}}  {comments.get(n, '')}".rstrip())
        raise SystemExit(0)
    values = {}
    for arg in argv:
        if re.fullmatch(r"--\w+", arg) and isinstance(getattr(defaults, arg[2:], None), bool):
            arg += "=true"  # a bare boolean flag: --compile is --compile=true
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
        config = cls(**values)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    config.given = frozenset(values)  # what the command said: a resume takes the rest from its checkpoint
    return config


def append_jsonl(path, record):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise SystemExit(f"error: the operating system would not let us write {path} ({e.strerror}); free some "
                         f"space or choose a writable --out_dir, then rerun (a resume rewrites the log)") from None


def truncate_log(path, last_step):
    """Drop records after `last_step`: a resumed run rewrites the steps a crash lost. A line
    cut short (a full disk, a kill mid-write) is dropped too."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if (record := _record(line)) is not None and record.get("step", 0) <= last_step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(kept)
    os.replace(f"{path}.tmp", path)


def _record(line):
    """A log line's record, or None for a line cut short (it does not parse or end)."""
    try:
        return json.loads(line) if line.endswith("\n") else None
    except ValueError:
        return None


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
