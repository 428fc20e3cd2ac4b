"""The commands the README and each script's --help show run as written, so a recipe cannot rot:
README.md's commands are run in order, as a reader would, in a fresh directory on the offline
testbed, with small step counts substituted (FAST); the --help examples are parsed with their
script's own options. Commands that need what a test machine lacks (the Hugging Face Hub, a
judge, hours) are listed in SKIP with the reason."""

import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from nanowso.common import parse_args

pytestmark = pytest.mark.slow  # integration: every README command as a subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SKIP = {  # a command holding this text is not run here, for this reason
    "pip install": "the installation: CI runs it",
    "pytest": "the tests themselves",
    "reproduce.py": "hours of compute: tests/test_reproduce.py runs the study on a toy plan",
    "study.answers": "reads a finished study's runs (tests/test_reproduce.py runs it on a toy study)",
    "tulu3": "needs the Hugging Face Hub (tests/test_sft.py reads a local file in its schema)",
    "--harness=gsm8k": "needs the Hugging Face Hub (tests/test_harness.py runs local files)",
    "arc_easy=arc.jsonl": "needs the reader's own copy of ARC",
    "--judge": "needs a judge model or server (tests/test_judge.py runs a stub judge)",
    "torchrun": "several processes (tests/test_train.py and test_parallel.py run them)",
    "--preset=8b": "an 8B model", "out-1b": "a 1B model", "out-8b": "an 8B model",
    "--device=cuda": "a GPU", "tools/gpu_check.py": "a GPU (tests/test_bench.py runs it on the CPU)",
    "--dataset=my_chats.jsonl": "the reader's own file", "h.jsonl": "the reader's own files",
    "docs.jsonl": "the reader's own file", "--num_tokens=10_000_000": "needs the Hugging Face Hub",
    "transformers import": "transformers is not a dependency (tests/test_export_hf.py loads the export)",
}


def fast(argv):
    """A command's arguments with small counts, so the README runs in minutes: 600 training
    steps become 24 (every step number / 25), SFT one epoch of two LRs, evaluation 16 items,
    sharpness one batch of two probes, nothing compiled."""
    script, flags = argv[0], argv[1:]
    scale = {"max_iters": 25, "keep_every": 25, "sharpness_interval": 25}
    out = []
    for flag in flags:
        key, _, value = flag.partition("=")
        if key.lstrip("-") in scale:
            flag = f"{key}={int(value) // scale[key.lstrip('-')]}"
        out.append(re.sub(r"ckpt_(\d{6})\.pt", lambda m: f"ckpt_{int(m.group(1)) // 25:06d}.pt", flag))
    given = {f.partition("=")[0] for f in out}
    if script == "train.py":
        if "--max_iters" not in given and "--init_from=resume" not in out:
            out.append("--max_iters=24")
        out += ["--compile=false", "--batch_size=8", "--seq_len=64", "--eval_tokens=2048", "--sharpness_batches=1",
                "--sharpness_samples=2"]
    elif script == "sft.py":
        out += ["--lrs=0.001,0.0018", "--epochs=1"]
    elif script == "evaluate.py" and "--compare" not in given:
        out += ["--limit=16"]
    elif script == "sharpness.py" and "--figures" not in given:
        out = [f for f in out if not f.startswith("--compile")] + ["--num_batches=1", "--num_samples=2"]
    return [script, *out]


def readme_commands():
    """README.md's commands in order: bash blocks, `\\` continuations joined, `&&` split,
    comments cut."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    commands.append(words)
    return commands


def skipped(words):
    text = " ".join(words)
    return next((why for key, why in SKIP.items() if key in text), None)


def test_every_readme_command_runs_as_written(tmp_path):
    ran, skips = [], []
    for words in readme_commands():
        if words[0] != "python" or skipped(words):
            skips.append((words, skipped(words) or "not a python command (shell setup)"))
            continue
        if words[1] == "-m":
            continue
        argv = fast(words[1:])
        done = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"$ {shlex.join(words)}\n(ran as {shlex.join(argv)})\n{done.stdout[-3000:]}" \
                                     f"\n{done.stderr[-3000:]}"
        ran.append(words)
    assert len(ran) >= 20, ran  # the recipe is mostly runnable here
    assert all(why for _, why in skips)


def help_examples():
    """(script, flags) of every `python <script> --k=v ...` example in a script's docstring."""
    for script in ["train.py", "sft.py", "evaluate.py", "sharpness.py", "sample.py", "reproduce.py",
                   "tools/merge.py", "tools/export_hf.py", "tools/bench.py", "tools/sizes.py", "tools/gpu_check.py"]:
        module = importlib.import_module(script[:-3].replace("/", "."))
        for line in module.__doc__.replace("\\\n", " ").splitlines():
            words = shlex.split(line.strip(), comments=True) if line.strip().startswith("python ") else []
            if len(words) > 1 and words[1] == script and "..." not in line:
                yield script, words[2:]


@pytest.mark.parametrize("script, flags", list(help_examples()), ids=lambda v: " ".join(v) if isinstance(v, list)
                         else v)
def test_every_help_example_is_a_valid_command(script, flags):
    """Every option the example gives exists and has a valid value (its config accepts it)."""
    if flags == ["--help"]:
        return
    module = importlib.import_module(script[:-3].replace("/", "."))
    config = re.search(r"parse_args\((\w+)", open(os.path.join(REPO, script)).read()).group(1)
    parse_args(getattr(module, config), flags)
