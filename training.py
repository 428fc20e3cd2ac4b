"""The pieces of an optimization loop that pre-training (train.py) and fine-tuning (sft.py)
share: the process's place in a distributed run, AdamW as the paper sets it (Table 6,
Table 8), one optimizer update with clipping and a finite check, the mean loss over fixed
batches, what a resume may change, and stopping cleanly on Ctrl-C or SIGTERM. Nothing here
runs on its own.
"""

import math
import os
import shlex
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
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


def setup_distributed(device="auto", dtype="auto", tf32=False, process_group=False):
    """The Runtime of this process. Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per process (LOCAL_RANK), gloo on the CPU. process_group: join one even
    as a single process (FSDP needs it; without torchrun, on this machine's loopback).
    tf32: let CUDA matmuls use TF32 (pre-training's speed; hessian.model_sharpness switches it
    off while it measures)."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if world_size > 1 or process_group:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if dist.is_initialized():
            pass
        elif "MASTER_ADDR" in os.environ:  # torchrun's environment
            dist.init_process_group(backend=backend)
        else:  # a single process started without torchrun: a group of one on the loopback
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if tf32 and device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype, autocast = autocast_context(device, dtype)
    return Runtime(rank, world_size, device, dtype, autocast)


def free_port():
    """A TCP port nothing listens on now, for a process group of one."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_device(t, device):
    """A CPU batch on `device`: to CUDA through pinned (page-locked) host memory, so the copy
    is asynchronous (non_blocking=True does nothing from pageable memory)."""
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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


def fsdp():
    """parallel.py, imported for --parallel=fsdp only: with it imported, rank 0 of a 2-process
    DDP train.py run hung at exit (torch 2.13, gloo; a minimal DDP script with the same imports
    did not)."""
    import parallel
    return parallel


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
                               "checkpoint_interval", "keep_every", "keep_optimizer", "compile", "max_iters", "sharpness_interval",
                               "sharpness_batches", "sharpness_samples"})
# Fields a resume may change although the trajectory then differs from the resumed step on: the
# remedy for a loss that went to NaN. train.py prints and records them (log.jsonl, config.json,
# the checkpoint's "changes"). learning_rate only for stage=pre: mid-training and cooldowns take
# their LR from the pre-training checkpoint.
RECORDED_CHANGES = frozenset({"learning_rate", "grad_clip"})


def refuse_config_changes(saved, cfg, may_differ, action):
    """Exit naming every field of dataclass `cfg` outside `may_differ` that differs from the
    saved config."""
    mismatched = {k: (saved[k], v) for k, v in asdict(cfg).items()
                  if k not in may_differ and k in saved and saved[k] != v}
    if mismatched:
        lines = "\n".join(f"  --{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in mismatched.items())
        raise SystemExit(f"error: cannot {action}, the config differs from the checkpoint's:\n{lines}\n"
                         f"pass the checkpoint's values (or start a new run in another --out_dir)")


def check_resume(ckpt, cfg, world_size):
    """train.py resuming checkpoint `ckpt` with TrainConfig `cfg`: refuse what would silently
    change the run, warn about a new max_iters, return the RECORDED_CHANGES it makes
    ({field: [old, new]}), printed here."""
    saved = ckpt["config"]
    recorded = RECORDED_CHANGES if cfg.stage == "pre" else RECORDED_CHANGES - {"learning_rate"}
    refuse_config_changes(saved, cfg, RESUMABLE_CHANGES | recorded, "resume")
    changed = {k: [saved[k], getattr(cfg, k)] for k in sorted(recorded) if k in saved and saved[k] != getattr(cfg, k)}
    for k, (old, new) in changed.items():
        print(f"note: --{k} changes from {old:g} to {new:g} from step {ckpt['step'] + 1} on (recorded in log.jsonl, "
              f"config.json and the checkpoint)")
    saved_world = ckpt.get("world_size", world_size)  # older checkpoints do not say
    if cfg.tokens_per_step == 0 and saved_world != world_size:
        raise SystemExit(f"error: cannot resume: the checkpoint was trained by {saved_world} processes and this run "
                         f"has {world_size}; with tokens_per_step=0 (one micro-batch per process) that changes the "
                         f"global batch. Resume with {saved_world} processes, or fix the global batch with "
                         f"--tokens_per_step in a new run")
    if cfg.stage == "cooldown":
        decay, decays_over_max_iters = "the cooldown", True
    elif cfg.stage == "mid":
        decay, decays_over_max_iters = f"Eq. 11 with alpha_mid={cfg.alpha_mid}", cfg.alpha_mid < 1
    else:
        decay, decays_over_max_iters = f"schedule={cfg.schedule}", cfg.schedule != "wso"
    if cfg.max_iters < saved["max_iters"] or (decays_over_max_iters and cfg.max_iters != saved["max_iters"]):
        print(f"warning: max_iters {saved['max_iters']} -> {cfg.max_iters} changes the LR of steps already "
              f"taken for {decay}; only a constant LR (WSO, or alpha_mid=1) extends a run exactly")
    return changed


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM, while a loop runs, ask it to stop at the next step
    boundary instead of raising mid-step: the loop asks `requested()` after each step, saves
    its checkpoint and calls `stop()`. A second signal is reported, not obeyed, so a
    checkpoint being written is never cut short (the write is atomic besides). Under torchrun
    the ranks agree (an all-reduce of the flag), so they stop at the same step."""

    def __init__(self, rt):
        self.rt, self.signum = rt, 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum:  # os.write: print() is not safe inside a handler
            os.write(2, b"\nalready stopping: finishing the step and writing the checkpoint\n")
        self.signum = self.signum or signum

    def requested(self):
        if not self.rt.distributed:
            return bool(self.signum)
        flag = torch.tensor([self.signum], device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag)
        return bool(self.signum)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def stop(self, what, resume_args):
        """Say what was saved and how to go on, then exit with 128 + the signal's number
        (130 for Ctrl-C), as a shell reports a process a signal ended, without a traceback."""
        self.restore()
        command = shlex.join([os.path.basename(sys.argv[0]) or "train.py", *resume_args])
        self.rt.log(f"stopped by {signal.Signals(self.signum).name}: {what}\nresume with: python {command}")
        raise SystemExit(128 + self.signum)


def resume_command(argv, init_from="resume"):
    """This process's arguments with --init_from=<init_from> in place of any --init_from."""
    return [a for a in argv if not a.startswith("--init_from=")] + [f"--init_from={init_from}"]
