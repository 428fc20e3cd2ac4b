"""
AdamW as the paper sets it (Table 6 for pre-training, Table 8 for SFT), one update with
gradient clipping and a finite check, and loading a saved state without losing this run's
settings. train.py and sft.py share it; nothing here runs on its own.
"""


import math
from contextlib import contextmanager

import torch


def make_optimizer(model, cfg, device):
    """AdamW with cfg's learning_rate, weight_decay, beta1, beta2, eps (Table 6). Weight decay
    on matrices only: RMSNorm gains are scales that the following normalization makes
    scale-free, and decaying them to 0 fights that (nanoGPT, OLMo and Llama recipes do the same)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


@contextmanager
def own_settings(optimizer):
    """Inside, a saved AdamW state may be loaded (its moments and step counts); on exit this
    optimizer's own hyperparameters are back: loading param_groups would silently replace this
    run's --weight_decay, --beta1, --beta2 and --eps by the saved run's."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)


def load_optimizer_state(optimizer, state):
    """A saved AdamW state into `optimizer`, keeping its own settings (own_settings)."""
    with own_settings(optimizer):
        optimizer.load_state_dict(state)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model, optimizer, clip, loss):
    """After backward: clip the global gradient norm to `clip` (0: no clipping), then one
    AdamW update. Returns the norm before clipping, or raises FloatingPointError (the
    weights untouched, the gradients dropped) when it or `loss` is not finite."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: a DTensor
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss={loss}, grad_norm={grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
