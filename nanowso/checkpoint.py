"""Checkpoints: written atomically with the RNG states a resume needs (save_checkpoint),
read back whole or from FSDP2 shards (load_checkpoint), their model ready to use
(load_model), and the LR schedule of the run behind one (schedule, alpha_pre, alpha_mid:
the rows of the paper's Tables 1-4). Checkpoints are train.py's, sft.py's and
tools/merge.py's ckpt.pt. Nothing here runs on its own.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from model import Llama, LlamaConfig
from schedules import wsd_t_stable


def load_model(ckpt, device="cpu"):
    """The checkpoint's Llama with its weights, on `device`, in float32 (a state saved in
    bf16 is converted, and said so)."""
    model = Llama(LlamaConfig.from_dict(ckpt["model_config"]))
    low = sorted({str(t.dtype) for t in ckpt["model"].values() if t.is_floating_point() and t.dtype != torch.float32})
    if low:
        print(f"note: the checkpoint holds {', '.join(low)} weights; using them converted to float32")
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def training_config(ckpt):
    """The pre- or mid-training config behind a checkpoint (for sft.py's, the one it fine-tuned)."""
    config = ckpt.get("config", {})
    return ckpt.get("init_config", {}) if config.get("stage") == "sft" else config


def schedule_of(ckpt):
    """(schedule, alpha_pre, alpha_mid) of the run behind a checkpoint. A mid-training
    run's schedule and alpha_pre are those of the pre-training run it continued, read from
    the config.json that train.py wrote beside that run's checkpoint (None if it is gone).
    A merge (tools/merge.py) is ("wso+merge <shape>", None, None); a cooldown branched from a
    WSO checkpoint (train.py --stage=cooldown) is ("wso+cooldown", its alpha, None), except one
    that is a WSD run (is_wsd_branch), which is ("wsd", its alpha, None).
    WSO's alpha_pre is 1.0 whatever its --alpha: it never decays."""
    if "merge" in ckpt:
        return f"wso+merge {ckpt['merge']['shape']}", None, None
    pre, alpha_mid = training_config(ckpt), None
    if pre.get("stage") == "cooldown":
        return "wsd" if is_wsd_branch(pre, ckpt.get("branch")) else "wso+cooldown", pre.get("alpha"), None
    if pre.get("stage") == "mid":
        alpha_mid = pre.get("alpha_mid")
        path = os.path.join(os.path.dirname(pre.get("init_from", "")), "config.json")
        pre = {}
        if os.path.isfile(path):
            with open(path) as f:
                pre = json.load(f).get("train", {})
        if pre.get("stage") == "cooldown":  # a WSD run made as a branch of the WSO run (is_wsd_branch)
            kept = pre.get("init_from", "")
            wsd = os.path.isfile(kept) and is_wsd_branch(pre, {"pretrain_iters": checkpoint_step(kept)})
            return ("wsd", pre.get("alpha"), alpha_mid) if wsd else (None, None, alpha_mid)
    if pre.get("stage") != "pre":
        return None, None, alpha_mid
    return pre["schedule"], 1.0 if pre["schedule"] == "wso" else pre["alpha"], alpha_mid


def is_wsd_branch(config, branch):
    """Whether a cooldown (its config, and the checkpoint's branch: {pretrain_iters: n, ...})
    is exactly the WSD run of its total length n + M: branched at that run's T_stable (its
    warmup and stable_ratio, inherited from the WSO run) and decaying in WSD's shape. Such a
    branch takes the same updates on the same data as the WSD run from scratch
    (tests/test_train.py), so a study trains WSD's first T_stable steps once, in the WSO run."""
    if not branch or config.get("stage") != "cooldown":
        return False
    n = branch["pretrain_iters"]
    return n == wsd_t_stable(warmup_iters=config["warmup_iters"], max_iters=n + config["max_iters"],
                             stable_ratio=config["stable_ratio"])


# ---------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact. A failed
    write (disk full, no permission) removes its temporary file and exits saying why."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(write_error(path, e, kept=os.path.isfile(path))) from None


def write_error(path, error, kept=False):
    """The message for a file the operating system would not let us write: the cause, the
    free space where it counts, and whether the previous version is intact."""
    directory = os.path.dirname(os.path.abspath(path))
    cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    try:
        free = shutil.disk_usage(directory).free
        where = f"; {free / 1e6:,.0f} MB free on its disk" if free < 1e9 else ""
    except OSError:
        where = ""
    return (f"error: the operating system would not let us write {path} ({cause}{where}); "
            + (f"the previous {os.path.basename(path)} is intact. " if kept else "")
            + "Free some space or choose a writable --out_dir, then rerun")


def checkpoint_step(path):
    """The step a checkpoint holds, reading only those bytes (mmap: the weights stay on disk;
    a sharded one's run.pt)."""
    return _run_state(path)["step"]


def checkpoint_config(path):
    """The training config a checkpoint was written with, read as checkpoint_step reads ({} if
    the file is not a readable checkpoint: load_checkpoint says why)."""
    try:
        state = _run_state(path)
    except Exception:
        return {}
    return state.get("config", {}) if isinstance(state, dict) else {}


def _run_state(path):
    if os.path.isdir(path):
        from nanowso import parallel  # torch.distributed.checkpoint, only for sharded checkpoints
        return parallel.load_run_state(path)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def load_checkpoint(path, mmap=False):
    """A train.py checkpoint as a dict: a ckpt.pt file, or a sharded checkpoint directory
    (train.py --parallel=fsdp) gathered into the same dict (parallel.to_single_file).
    mmap: map the file instead of reading it (processes on one machine share its pages)."""
    if os.path.isdir(path):
        from nanowso import parallel  # torch.distributed.checkpoint, only for sharded checkpoints
        if parallel.is_sharded(path):
            return parallel.to_single_file(path)
        inside = os.path.join(path, "ckpt.pt")
        hint = f"pass {inside}" if os.path.isfile(inside) else "pass the checkpoint file in it (ckpt.pt)"
        raise SystemExit(f"error: {path} is a directory, not a checkpoint; {hint}")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; train one first (python train.py --out_dir=...)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # a truncated or foreign file
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in ("model", "model_config") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        what = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} is a torch file but not a checkpoint of this project ({what}, without "
                         f"{' and '.join(map(repr, missing))}); pass a ckpt.pt written by train.py, sft.py or "
                         f"tools/merge.py")
    return ckpt


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


# ---------------------------------------------------------------------- output directories

# What a run leaves in its directory: train.py's checkpoints and logs, sft.py's sweep, the
# results evaluate.py and sharpness.py write beside a checkpoint. --overwrite=true removes
# exactly these; anything else in the directory is left (and named).
RUN_FILE = re.compile(r"(ckpt(_\d{6})?(\.pt|_sharded)|log\.jsonl|config\.json|summary\.json|eval\.json|"
                      r"sft_eval\.json|sharpness(_train)?\.json|lr_[0-9.e+-]+)(\.\d+)?(\.tmp)?$")
RUN_MARK = re.compile(r"ckpt(_\d{6})?(\.pt|_sharded)$|summary\.json$|lr_[0-9.e+-]+$")  # a run, not a stray log


def prepare_out_dir(out_dir, overwrite=False, what="a run", way_on="", new=True):
    """Make `out_dir` ready for a new run (train.py, sft.py) or a new merge: refuse one that
    holds a run (RUN_MARK) unless `overwrite`, which removes that run's files (RUN_FILE) so a
    directory never mixes two runs; refuse a file or a directory the OS will not let us write.
    `what` names the run ("a training run"), `way_on` how to continue it instead; new=False
    (a resume) only checks that the directory can be written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: {out_dir} is a file, not a directory: pass another --out_dir")
    names = sorted(os.listdir(out_dir)) if new and os.path.isdir(out_dir) else []
    held = [n for n in names if RUN_MARK.match(n)]
    if held and not overwrite:
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise SystemExit(f"error: {out_dir} already holds {what} ({listed}); {way_on + ', ' if way_on else ''}"
                         f"pass another --out_dir, or --overwrite=true to delete its files and start over")
    if held:
        removed = [n for n in names if RUN_FILE.match(n)]
        for name in removed:
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        left = [n for n in names if n not in removed]
        print(f"--overwrite=true: removed {len(removed)} files of the earlier run from {out_dir}"
              + (f" (left: {', '.join(left)})" if left else ""))
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: the operating system would not let us write in {out_dir} ({e.strerror}); "
                         f"choose a writable --out_dir") from None
