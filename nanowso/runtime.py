"""
The process a loop runs in: its device and precision, its place in a torchrun job
(Runtime, setup_distributed), FSDP2 on demand (fsdp), and stopping cleanly on Ctrl-C or
SIGTERM (Interrupts). train.py and sft.py share it; nothing here runs on its own.
"""


import os
import shlex
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist

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
    tf32: let CUDA matmuls use TF32 (pre-training's speed; sharpness.py's full_fp32 switches it
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


def fsdp():
    """nanowso/parallel.py, imported for --parallel=fsdp only: importing it made 2-process DDP
    runs hang at exit (torch 2.13, gloo; docs/LOG.md)."""
    from nanowso import parallel
    return parallel


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
