"""What a checkpoint holds and where it came from: its model, ready to use, and the LR
schedule of the run behind it (schedule, alpha_pre, alpha_mid: the rows of the paper's
Tables 1-4). Checkpoints are train.py's, sft.py's and merge.py's ckpt.pt (common.py
writes them). Nothing here runs on its own.
"""

import json
import os

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
    A merge (merge.py) is ("wso+merge <shape>", None, None); a cooldown branched from a
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
