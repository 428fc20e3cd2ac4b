"""The pieces of an optimization loop that pre-training (train.py) and fine-tuning (sft.py)
share: the process's place in a distributed run, AdamW as the paper sets it (Table 6,
Table 8), one optimizer update with clipping and a finite check, and the mean loss over
fixed batches. Nothing here runs on its own.
"""

import math
import os
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist

from common import autocast_context, resolve_device
from data.chat import IGNORE


@dataclass
class Runtime:
    """Where this process runs: its rank among world_size processes (1 without torchrun),
    its device, and the autocast context of the forward pass (bf16 on CUDA, none on CPU)."""
    rank: int
    world_size: int
    device: str
    dtype: str  # what autocast computes in: float32 or bfloat16
    autocast: ContextManager

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    def log(self, *args, **kwargs):
        """print, on the master only, flushed as it is written (a pipe or a file buffers)."""
        if self.master:
            print(*args, **kwargs, flush=True)


def setup_distributed(device="auto", dtype="auto", tf32=False):
    """The Runtime of this process. Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per process (LOCAL_RANK), gloo on the CPU. tf32: let CUDA matmuls use
    TF32 (pre-training's speed; hessian.model_sharpness switches it off while it measures)."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if world_size > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if tf32 and device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype, autocast = autocast_context(device, dtype)
    return Runtime(rank, world_size, device, dtype, autocast)


def make_optimizer(model, cfg, device):
    """AdamW with cfg's learning_rate, weight_decay, beta1, beta2, eps (Table 6). Weight decay
    on matrices only: RMSNorm gains are scales that the following normalization makes
    scale-free, and decaying them to 0 fights that (nanoGPT, OLMo and Llama recipes do the same)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def load_optimizer_state(optimizer, state):
    """Load a saved AdamW state (its moments and step counts) but keep this optimizer's own
    hyperparameters: loading param_groups would silently replace this run's --weight_decay,
    --beta1, --beta2 and --eps by the saved run's."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model, optimizer, clip, loss):
    """After backward: clip the global gradient norm to `clip` (0: no clipping), then one
    AdamW update. Returns the norm before clipping, or raises FloatingPointError (the
    weights untouched, the gradients dropped) when it or `loss` is not finite."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf")).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss={loss}, grad_norm={grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def mean_loss(model, batches, device, autocast):
    """The mean next-token loss over every target token (label != -100) of fixed batches
    [(x, y), ...]: each batch's mean weighted by its token count. The model is evaluated
    in eval mode and left in the mode it came in."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        n = int((y != IGNORE).sum())
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count


# train.py's config fields that may differ between two points of one run (a resume, the
# checkpoints merge.py merges): they change what is printed or where, not the training
# trajectory. max_iters may grow: for WSO that extends a finished run exactly.
RESUMABLE_CHANGES = frozenset({"out_dir", "init_from", "log_interval", "eval_interval", "eval_tokens",
                               "checkpoint_interval", "keep_every", "compile", "max_iters", "sharpness_interval",
                               "sharpness_batches", "sharpness_samples"})
