"""Checkpoints: written atomically with the RNG states a resume needs (save_checkpoint),
read back whole or from FSDP2 shards (load_checkpoint), their model ready to use
(load_model), and the LR schedule of the run behind one (schedule, alpha_pre, alpha_mid:
the rows of the paper's Tables 1-4). Checkpoints are train.py's, sft.py's and
tools/merge.py's ckpt.pt. Nothing here runs on its own.
"""

import json
import os
import random

import numpy as np
import torch

from model import Llama, LlamaConfig


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
    WSO checkpoint (train.py --stage=cooldown) is ("wso+cooldown", its alpha, None).
    WSO's alpha_pre is 1.0 whatever its --alpha: it never decays."""
    if "merge" in ckpt:
        return f"wso+merge {ckpt['merge']['shape']}", None, None
    pre, alpha_mid = training_config(ckpt), None
    if pre.get("stage") == "cooldown":
        return "wso+cooldown", pre.get("alpha"), None
    if pre.get("stage") == "mid":
        alpha_mid = pre.get("alpha_mid")
        path = os.path.join(os.path.dirname(pre.get("init_from", "")), "config.json")
        pre = {}
        if os.path.isfile(path):
            with open(path) as f:
                pre = json.load(f).get("train", {})
    if pre.get("stage") != "pre":
        return None, None, alpha_mid
    return pre["schedule"], 1.0 if pre["schedule"] == "wso" else pre["alpha"], alpha_mid


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
        from nanowso import parallel  # torch.distributed.checkpoint, only for sharded checkpoints
        return parallel.load_run_state(path)["step"]
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"]


def load_checkpoint(path, mmap=False):
    """A train.py checkpoint as a dict: a ckpt.pt file, or a sharded checkpoint directory
    (train.py --parallel=fsdp) gathered into the same dict (parallel.to_single_file).
    mmap: map the file instead of reading it (processes on one machine share its pages)."""
    if os.path.isdir(path):
        from nanowso import parallel  # torch.distributed.checkpoint, only for sharded checkpoints
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
