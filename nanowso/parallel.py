"""
Past one GPU's memory: FSDP2 sharding and sharded checkpoints for train.py --parallel=fsdp,
built on torch's own engine (torch.distributed.fsdp.fully_shard, torch.distributed.checkpoint).

DDP keeps a whole replica per GPU: weights, gradients and AdamW's two moments are 16 bytes per
parameter, ~128 GB at 8B before activations. FSDP2 shards all four over the N processes
(16/N bytes per parameter) and gathers one transformer block's weights at a time for its
forward and backward (torchtitan's layout: each block a unit, the embeddings, final norm and
output layer the root's).

    torchrun --nproc_per_node=8 train.py --preset=8b --parallel=fsdp --dataset=fineweb_edu ...
    python tools/convert_checkpoint.py out/ckpt_sharded out/ckpt.pt   # for evaluate.py, sharpness.py, ...

The model is built on the meta device (no memory), sharded, then materialized on each rank's
device. Its initial weights are the single-process ones: rank 0 makes them on the CPU (the
weights alone, 4 bytes per parameter, not a replica per rank) and set_model_state_dict
broadcasts them shard by shard, so an FSDP run starts where `python train.py` would and the
study's seeds keep their meaning. Initializing each shard with a sharded RNG would not give
the single-process weights on a CPU (DTensor's offset RNG tracker is CUDA-only).

A sharded checkpoint is a directory: torch.distributed.checkpoint's shards of the model and
AdamW (each rank writes its own) and run.pt with everything else train.py's ckpt.pt holds
(config, step, data position, RNG). It is written into a temporary directory renamed into
place, so a kill mid-write leaves the previous one. DCP reshards on load: a run saved by 2
processes resumes on 1 or 4.
"""

import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model import Llama

RUN_STATE = "run.pt"  # inside it: what is not sharded
FULL = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def is_sharded(path):
    """Whether `path` is a sharded checkpoint directory (DCP writes .metadata)."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def holds_optimizer(path):
    """Whether the sharded checkpoint `path` holds AdamW's state (kept checkpoints may not),
    read from DCP's metadata: the flattened keys of what save_sharded wrote."""
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return any(key.startswith("optimizer.") for key in keys)


def shard_model(model_config, device, bf16):
    """A Llama built on the meta device, each block and then the root sharded with
    fully_shard over all processes, materialized (uninitialized) on `device`. bf16: compute
    in bfloat16 with fp32 master weights and fp32 gradient reduction (MixedPrecisionPolicy,
    torchtitan's default); otherwise float32 throughout."""
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    with torch.device("meta"):
        model = Llama(model_config)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    model.init_rope()  # buffers, not parameters: to_empty left them uninitialized
    return model


def load_full_state(model, optimizer, model_state, optimizer_state):
    """Full (unsharded) state dicts into the sharded model and AdamW: rank 0's are broadcast
    and sliced into each rank's shards; the other ranks' are not read (pass them
    memory-mapped, or None: `optimizer_state is None` must agree across ranks).
    optimizer_state is the single-process form, optimizer.state_dict() keyed by index."""
    master = dist.get_rank() == 0
    reshard(model)
    # set_*_state_dict(broadcast_from_rank0) puts DTensors into the dicts it is given, in place:
    # copies, so the caller's state loads again (the SFT sweep loads the same weights for every LR)
    set_model_state_dict(model, dict(model_state) if master else {}, options=FULL)
    if optimizer_state is not None:
        named = by_name(optimizer_state, model, optimizer) if master else {}
        set_optimizer_state_dict(model, optimizer, named, options=FULL)


def reshard(model):
    """Back to shards: a forward without a backward (scoring in eval mode) leaves the root
    module's weights gathered, as plain tensors; an optimizer built then, or a state loaded,
    would hold those instead of the shards that train."""
    if not all(isinstance(p, DTensor) for p in model.parameters()):
        model.reshard()


def by_name(optimizer_state, model, optimizer):
    """optimizer.state_dict() (parameters numbered in the order of the optimizer's groups)
    keyed by parameter name instead, the form set_optimizer_state_dict reads."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    state = {order[i]: dict(s) for i, s in optimizer_state["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_sharded(path, model, optimizer, run_state):
    """Write the sharded checkpoint `path` (a directory) atomically: every rank writes its
    shards into path.tmp, rank 0 adds run.pt and renames it into place; all ranks return
    once it is there. optimizer=None keeps the weights only (train.py's kept checkpoints)."""
    tmp = f"{path}.tmp"
    if dist.get_rank() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a kill mid-write
    dist.barrier()
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=tmp)
    if dist.get_rank() == 0:
        torch.save(run_state, os.path.join(tmp, RUN_STATE))
        old = f"{path}.old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_run_state(path):
    """run.pt of a sharded checkpoint: train.py's ckpt.pt without "model" and "optimizer"."""
    return torch.load(os.path.join(path, RUN_STATE), map_location="cpu", weights_only=False)


def load_sharded(path, model, optimizer=None):
    """The sharded checkpoint `path` into the sharded model (and AdamW), whatever the number
    of processes that wrote it: DCP reads each rank's slices from the saved shards."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def to_single_file(path):
    """A sharded checkpoint as the dict of one train.py ckpt.pt (weights, and AdamW's state
    keyed as a single-process run saves it), read without a process group (DCP's
    format_utils.dcp_to_torch_save, through a temporary file)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "full.pt"))
        sharded = torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=False)
    full = {**load_run_state(path), "model": sharded["model"]}
    if "optimizer" in sharded:
        full["optimizer"] = by_index(sharded["optimizer"])
    return full


def by_index(named):
    """The inverse of by_name: parameters numbered in the order of the saved groups."""
    order = [n for g in named["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    return {"state": {index[n]: s for n, s in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}
