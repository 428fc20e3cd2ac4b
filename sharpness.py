"""
Loss-landscape sharpness: the trace of the Hessian by Hutchinson's estimator
(Section 6, Definition 6.1; Appendix H, Eq. 12 and Table 23).

    Sharpness(theta_t) = Tr(H(theta_t)),   H = d^2 L(theta_t; D) / d theta^2      (6)
    Tr(H) ~ (1/N) sum_i z_i^T H z_i,       z_i Rademacher (+-1 entries)        (12)

E[z z^T] = I makes each z^T H z an unbiased sample of Tr(H); its variance is
2 (||H||_F^2 - sum_i H_ii^2), so we report the mean with its standard error.
H z is a Hessian-vector product (HVP): the vector-Jacobian product of the gradient,
torch.func.vjp(torch.func.grad(L)), built once per batch; every probe back-propagates
through it.

    python sharpness.py --ckpt=out/ckpt.pt                 # pretrain val + SFT held-out
    python sharpness.py --ckpt=out/ckpt.pt --datasets=sft --num_batches=64
    python sharpness.py --ckpt=out/ckpt.pt --pretrain_split=train   # on the training text itself
    python sharpness.py --ckpt=out/ckpt.pt --compile=true   # long measurements: compiles once
    python sharpness.py --ckpt=out/ckpt.pt --preconditioned=true   # and Tr(D^-1 H), D from AdamW
    torchrun --nproc_per_node=8 sharpness.py --ckpt=...      # the batches split over 8 processes
    python sharpness.py --figures=out-wso,out-wsd,out-cos     # Figures 3-4 from runs of
                                                            # train.py --sharpness_interval=N
    python train.py --sharpness_interval=50                 # during training (Figure 3)

The paper's settings (Table 23): seq_len 1024, batch size 1, 50 probes, up to 4096
batches per data set, measured every 4000 steps:
    python sharpness.py --ckpt=... --seq_len=1024 --batch_size=1 --num_samples=50 --num_batches=4096 --compile=true
The defaults here suit the testbed. Writes sharpness.json beside the checkpoint (--out):
{ckpt, step, settings, results: {pretrain | sft: model_sharpness's numbers, data, and with
--preconditioned preconditioned: {trace, stderr, per_batch} of Tr(D^-1 H) on the same batches}}.

Reading order: hutchinson (Eq. 12 as it reads: a probe, an HVP, z^T H z, the mean and its
standard error); hutchinson_trace (the same estimate, fast: bit-packed probes, vmapped
HVPs, torch.compile; tested equal to hutchinson on the same probes); model_sharpness (a
model's loss over fixed batches: common random numbers, float32); main (the command).

Measurement (Appendix H, model_sharpness): t_b = Tr of the Hessian of batch b's mean loss
over its target tokens, from probes seeded seed + b, so every checkpoint sees the same batches
and probes (common random numbers: differences between schedules are tighter than either
number); the estimate is mean_b t_b +- std_b(t_b) / sqrt(B), in true float32 (TF32 off)
wherever it runs, so a measurement inside train.py equals one by sharpness.py.
"""

import functools
import inspect
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call, grad, vjp, vmap

from data.formats import Tokenizer, load_meta, write_atomic
from data.loaders import pretrain_batches, resolve_dataset, sft_batches, testbed_of
from model import IGNORE_INDEX, hessian_attention
from nanowso.checkpoint import load_checkpoint, load_model
from nanowso.common import Eta, format_duration, parse_args
from nanowso.runtime import setup_distributed
from study.figures import draw_figures

LOSS_NORMALIZATION = ("per batch: mean next-token cross-entropy over the batch's target tokens with "
                      f"label != {IGNORE_INDEX}; the estimate averages the per-batch traces with equal weight")


def hessian_vector_product(loss_fn, params):
    """v -> H v at `params` (dicts name -> tensor). Reverse-over-reverse: the gradient and
    its graph are computed once; each call back-propagates v through that graph (H is
    symmetric, so the vector-Jacobian product v^T H is H v)."""
    _, vjp_fn = vjp(grad(loss_fn), params)
    # create_graph=False: we need H v itself, not a graph for third derivatives
    return lambda v: vjp_fn(v, create_graph=False)[0]

# ------------------------------------------------------------ the estimator, as Eq. 12 reads

def rademacher(params, generator=None):
    """One probe z: a tensor of +-1 entries, each sign with probability 1/2, per parameter."""
    return {n: torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
            for n, p in params.items()}


def hutchinson(loss_fn, params, num_samples, generator=None, probe=rademacher):
    """Eq. 12: (trace, stderr) of the Hessian of loss_fn(params) from num_samples probes
    z = probe(params, generator): the mean of z^T H z and its standard error (sample std /
    sqrt(N); nan for one probe). The plain loop; hutchinson_trace is the fast one."""
    samples = []
    with hessian_attention():  # fused attention kernels have no double backward
        hvp = hessian_vector_product(loss_fn, params)
        for _ in range(num_samples):
            z = probe(params, generator)
            hz = hvp(z)
            samples.append(sum((z[n].double() * hz[n].double()).sum() for n in z).item())
    samples = np.array(samples)
    stderr = samples.std(ddof=1) / math.sqrt(num_samples) if num_samples > 1 else float("nan")
    return float(samples.mean()), float(stderr)


# ------------------------------------------------------------ the fast paths: bit-packed probes, vmap, compile

PROBE_WORDS = 2**16  # random words drawn at a time: 2^20 probe entries, 4 MiB of bits


def rademacher_like(params, generator=None, out=None):
    """One probe z: entries +-1 with equal probability, a tensor per parameter (written into
    `out`, a dict of tensors shaped like params, when given). Each random draw gives 16
    entries (its 16 low bits): drawing the entries one by one costs a tenth of an HVP of the
    testbed model on CPU. The parameters form one stream of entries, word w giving entries
    16w..16w+15, drawn PROBE_WORDS words at a time, so the bits in memory stay a few MiB
    whatever the model's size; on CPU the stream is the same however it is cut (torch's CPU
    generator draws serially), on CUDA the cut changes it (Philox counts offsets per call)."""
    first = next(iter(params.values()))
    device = generator.device if generator is not None else first.device
    out = {name: torch.empty_like(p) for name, p in params.items()} if out is None else out
    targets = [t.view(-1) for t in out.values()]  # flat views, filled in order
    total, shifts = sum(t.numel() for t in targets), torch.arange(16, device=device, dtype=torch.int32)
    tensor, offset = 0, 0  # where the next entry goes
    for first_word in range(0, (total + 15) // 16, PROBE_WORDS):
        n_words = min(PROBE_WORDS, (total + 15) // 16 - first_word)
        words = torch.randint(0, 2**16, (n_words, 1), generator=generator, device=device, dtype=torch.int32)
        bits = (words >> shifts).bitwise_and_(1).view(-1)[:total - 16 * first_word]  # (entries,)
        while bits.numel():
            target = targets[tensor]
            take = min(bits.numel(), target.numel() - offset)
            target[offset:offset + take] = bits[:take].to(target.device)
            target[offset:offset + take].mul_(2).sub_(1)
            bits, offset = bits[take:], offset + take
            if offset == target.numel():
                tensor, offset = tensor + 1, 0
    return out


def quadratic_forms(z, hz):
    """z_i^T (H z_i) of every probe i of a stack (name -> (probes, *shape)), in float64."""
    return sum((z[n].double() * hz[n].double()).flatten(1).sum(1) for n in z)


def probe_chunk(loss_fn, params, z):
    """z_i^T H z_i for a stack of probes z: the gradient's graph is built once and the HVP
    vmapped over the probes, in one function torch.compile traces whole (it traces
    torch.func transforms, not torch.autograd.grad)."""
    return quadratic_forms(z, vmap(hessian_vector_product(loss_fn, params))(z))


@functools.cache
def compiled_probe_chunk():
    """torch.compile(probe_chunk), made on first use (importing the compiler takes seconds);
    it compiles on its first call, and again for each new input shape."""
    return torch.compile(probe_chunk)


def hutchinson_trace(loss_fn, params, num_samples, generator=None, probes_per_call=1, compile=False):
    """Eq. 12: (trace, stderr) of the Hessian of loss_fn(params) from num_samples
    Rademacher probes drawn from `generator` (a torch.Generator; None draws from torch's
    global generator, as torch.randint does). z^T H z is accumulated in float64; stderr
    is the sample standard deviation / sqrt(num_samples), nan for a single probe (a
    spread cannot be estimated from one sample). The same generator state gives the
    same result bit for bit.

    probes_per_call > 1 stacks that many probes and torch.func.vmap's the HVP over
    them: one batched backward pass instead of several (the last chunk takes what is
    left). The probes are drawn one by one in the same order either way, so the
    estimate agrees with probes_per_call=1 to rounding.

    compile=True runs each chunk through torch.compile(probe_chunk): the gradient is
    recomputed per chunk, but fused kernels make the whole faster on long sequences
    (tools/bench_hvp.py). It compiles once per input shape (a minute or more), so the chunks
    are made equal: probes_per_call is then the widest, and the last chunk is padded
    with zero probes (H 0 = 0, dropped)."""
    if num_samples < 1 or probes_per_call < 1:
        raise ValueError(f"num_samples={num_samples} and probes_per_call={probes_per_call} must be >= 1")
    if compile:  # chunks of equal width: one compiled shape, and fewer zero probes than chunks
        probes_per_call = math.ceil(num_samples / math.ceil(num_samples / probes_per_call))
    samples = []
    # Fused SDPA kernels have neither double backward nor forward-mode AD: model.hessian_attention
    with hessian_attention():
        hvp = None if compile else hessian_vector_product(loss_fn, params)
        for start in range(0, num_samples, probes_per_call):
            k = min(probes_per_call, num_samples - start)
            with torch.no_grad():
                # (width, *shape) per parameter, the probes drawn into it; compiled, the rows past
                # k are zero probes up to the compiled width, and their z^T H z = 0 is dropped
                width = probes_per_call if compile else k
                z = {n: p.new_zeros(width, *p.shape) for n, p in params.items()}
                for i in range(k):
                    rademacher_like(params, generator, out={n: t[i] for n, t in z.items()})
                if compile:
                    zhz = compiled_probe_chunk()(loss_fn, params, z)[:k]
                elif k > 1:
                    zhz = quadratic_forms(z, vmap(hvp)(z))
                else:  # one probe: no vmap, just a leading dimension of 1
                    zhz = quadratic_forms(z, {n: t.unsqueeze(0) for n, t in hvp({n: t[0] for n, t in z.items()}).items()})
            samples.extend(zhz.tolist())
    samples = np.array(samples)
    stderr = samples.std(ddof=1) / math.sqrt(num_samples) if num_samples > 1 else float("nan")
    return float(samples.mean()), float(stderr)


def auto_probes_per_call(tokens, compile=False):
    """How many probes to vmap together for a batch of `tokens` positions (padding
    included). tools/bench_hvp.py, tiny preset on CPU, per probe as a multiple of a
    forward+backward: eager, 4 vmapped probes cost 2.1x against 2.35x one at a time at
    256 tokens with 2 threads (a tie with 1 thread), and 8-10x against 3.8x at 1024
    tokens: so 4 up to 256 tokens, else 1. Compiled, the gradient is recomputed per call
    and wider is better while memory lasts: at 256 tokens 16 probes cost 1.3x, 2 cost
    1.7x; at 1024 tokens 8 cost 3.2x, 2 cost 3.8x: so 8192 // tokens, from 1 to 16."""
    if compile:
        return min(16, max(1, 8192 // tokens))
    return 4 if tokens <= 256 else 1


# ---------------------------------------------------------------- model sharpness

def check_deterministic(model):
    """A Hessian needs one loss function: refuse active dropout (a new mask per call)."""
    if model.training:
        active = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
        if active:
            raise ValueError(f"model is in training mode with dropout active ({', '.join(active)}); "
                             f"call model.eval() before measuring the Hessian")


def check_fp32(params):
    """Refuse bf16/fp16 weights: the curvature of a low-precision loss is mostly rounding."""
    low = sorted({str(p.dtype) for p in params.values() if p.dtype not in (torch.float32, torch.float64)})
    if low:
        raise ValueError(f"sharpness needs float32 (or float64) weights, the model holds {', '.join(low)}; "
                         f"convert it with model.float() (a bf16-trained run keeps fp32 master weights)")


def batch_loss_fn(model, x, y):
    """params -> the model's mean loss on (x, y), parameters passed functionally.
    tie_weights=True: a tied matrix is one entry of `params` (named_parameters() lists a
    shared Parameter once) and functional_call feeds it to every place it is used."""
    check_deterministic(model)
    # model.Llama's chunked loss has a hand-written backward, which torch.func cannot
    # differentiate twice: loss_chunk=0 is the plain cross-entropy (model.cross_entropy)
    kwargs = {"loss_chunk": 0} if "loss_chunk" in inspect.signature(model.forward).parameters else {}
    return lambda params: functional_call(model, params, (x, y), kwargs, tie_weights=True)[1]


def model_sharpness(model, batches, num_samples, seed=0, progress=None, probes_per_call=0, compile=False,
                    rank=0, world_size=1):
    """Tr(H) of the model's loss averaged over `batches` [(x, y), ...] (Appendix H).
    probes_per_call: probes vmapped together (hutchinson_trace); 0 picks
    auto_probes_per_call(x.numel(), compile) per batch. compile: torch.compile the HVP,
    with every batch padded to the longest (pad_batches) so it compiles once. Both
    change the speed, not the probes.
    The model is measured in eval mode and left in the mode it came in; its weights,
    .grad fields and torch's global RNG are not touched. It runs in true float32 (no autocast,
    TF32 off: full_fp32) whatever the caller set. progress(done, total, record) is called
    after each batch this process measures. Under torchrun (rank, world_size of the process
    group) each process measures batches b = rank, rank + world_size, ... with the same seeds,
    and the per-batch records are gathered: the numbers of one process, in a world_size-th of
    the time, and no process waits long in a collective (NCCL's watchdog stops a job after 10
    minutes by default). Returns a dict of every number (see LOSS_NORMALIZATION)."""
    if not batches:
        raise ValueError("no batches to measure sharpness on")
    params = {name: p.detach() for name, p in model.named_parameters()}
    check_fp32(params)
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()
    start, records = time.perf_counter(), []
    if compile:
        batches = pad_batches(batches, max(x.shape[1] for x, _ in batches))
    with full_fp32(device.type):
        try:
            mine = [(b, batch) for b, batch in enumerate(batches) if b % world_size == rank]
            for done, (b, (x, y)) in enumerate(mine, 1):
                x, y = x.to(device), y.to(device)
                loss_fn = batch_loss_fn(model, x, y)
                generator = torch.Generator(device).manual_seed(seed + b)
                width = probes_per_call or auto_probes_per_call(x.numel(), compile)
                trace, stderr = hutchinson_trace(loss_fn, params, num_samples, generator, width, compile)
                with torch.no_grad():
                    loss = loss_fn(params).item()
                records.append({"batch": b, "trace": trace, "stderr": stderr, "loss": loss,
                                "tokens": int((y != IGNORE_INDEX).sum())})
                if progress is not None:
                    progress(done, len(mine), records[-1])
        finally:
            model.train(was_training)
    if world_size > 1:  # every process's records, in batch order
        parts = [None] * world_size
        dist.all_gather_object(parts, records)
        records = sorted((r for part in parts for r in part), key=lambda r: r["batch"])
    traces = np.array([r["trace"] for r in records])
    stderr = traces.std(ddof=1) / math.sqrt(len(traces)) if len(traces) > 1 else records[0]["stderr"]
    return {"trace": float(traces.mean()), "stderr": float(stderr),
            "stderr_over": "batches" if len(traces) > 1 else "probes",
            "loss": float(np.mean([r["loss"] for r in records])), "num_batches": len(records),
            "num_samples": num_samples, "seed": seed, "num_params": sum(p.numel() for p in params.values()),
            "tokens": sum(r["tokens"] for r in records), "loss_normalization": LOSS_NORMALIZATION,
            "seconds": time.perf_counter() - start, "per_batch": records}


@contextmanager
def full_fp32(device_type):
    """Inside, float32 is float32: no autocast, and CUDA matmuls and convolutions in IEEE
    float32 with TF32 off; the settings are restored on exit. train.py turns TF32 on for
    speed, and a Hessian measured in TF32 (10-bit mantissas) or under bf16 autocast would
    not be comparable with one that sharpness.py measures."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pad_batches(batches, length):
    """Every (x, y) right-padded to `length` positions, x with token 0 and y with IGNORE_INDEX.
    The loss and its Hessian do not change: causal attention keeps a position from seeing
    later ones, and a position without a label adds nothing to the mean."""
    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)
    return [(pad(x, 0), pad(y, IGNORE_INDEX)) for x, y in batches]


def sharpness_during_training(raw_model, batches, num_samples, seed=0, rank=0, world_size=1):
    """For train.py's --sharpness_interval: {"sharpness", "sharpness_stderr"} of the
    uncompiled, unwrapped model on fixed batches (data.loaders.pretrain_batches and
    sft_batches, made once). Training is not disturbed: probes come from a private
    generator (no draw from the global RNG), the model returns to train mode, weights and
    .grad are untouched. Call it outside autocast: it measures in float32. Under DDP every
    process calls it and measures its share of the batches (model_sharpness). On a GPU it
    needs memory for the gradient's graph."""
    result = model_sharpness(raw_model, batches, num_samples, seed, rank=rank, world_size=world_size)
    return {"sharpness": result["trace"], "sharpness_stderr": result["stderr"]}


# ------------------------------------------------ a sharpness that does not shrink with confidence

def adam_denominators(model, optimizer_state):
    """{name: sqrt(v_hat) + eps}: the divisor AdamW applies to each gradient entry, from the
    state_dict of nanowso.optim.make_optimizer's AdamW (its groups: matrices, then vectors),
    v_hat = exp_avg_sq / (1 - beta2^step)."""
    named = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    named += [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    groups = [(g, i) for g in optimizer_state["param_groups"] for i in g["params"]]
    if len(groups) != len(named):
        raise ValueError(f"the optimizer state holds {len(groups)} tensors, the model {len(named)}")
    out = {}
    for (name, p), (group, i) in zip(named, groups):
        state = optimizer_state["state"].get(i, {})
        if state.get("exp_avg_sq") is None or state["exp_avg_sq"].shape != p.shape:
            raise ValueError(f"the optimizer state has no second moment shaped like {name} {tuple(p.shape)}: "
                             f"not this model's AdamW (nanowso.optim.make_optimizer), or never stepped")
        v_hat = state["exp_avg_sq"].to(p.device, torch.float64) / (1 - group["betas"][1] ** float(state["step"]))
        out[name] = (v_hat.sqrt() + group["eps"]).to(p.dtype)
    return out


def preconditioned_probe(denominators, probe=rademacher):
    """Probes z / sqrt(d): E[z^T D^-1/2 H D^-1/2 z] = Tr(D^-1 H), the Hessian as AdamW's steps see it
    (Cohen et al. 2022, arXiv 2207.14484: its top eigenvalue settles near 38 / lr). It does not fall
    just because the gradients, and with them AdamW's denominators, shrink as the model grows sure."""
    return lambda params, generator: {n: z / denominators[n].sqrt() for n, z in probe(params, generator).items()}


def preconditioned_sharpness(model, denominators, batches, num_samples, seed=0):
    """Tr(D^-1 H) of the model's loss, mean +- standard error over `batches` (nan for one), by the
    plain loop with torch.randint probes seeded seed + b (not model_sharpness's bit-packed ones);
    in eval mode and true float32."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    check_fp32(params)
    device, was_training, traces = next(iter(params.values())).device, model.training, []
    model.eval()
    try:
        with full_fp32(device.type):
            for b, (x, y) in enumerate(batches):
                x, y, generator = x.to(device), y.to(device), torch.Generator(device).manual_seed(seed + b)
                loss_fn = batch_loss_fn(model, x, y)
                trace, _ = hutchinson(loss_fn, params, num_samples, generator, preconditioned_probe(denominators))
                traces.append(trace)
    finally:
        model.train(was_training)
    traces = np.array(traces)
    stderr = traces.std(ddof=1) / math.sqrt(len(traces)) if len(traces) > 1 else float("nan")
    return {"trace": float(traces.mean()), "stderr": float(stderr), "per_batch": traces.tolist()}


# ------------------------------------------------------------------ the command

@dataclass
class SharpnessConfig:
    ckpt: str = "out/ckpt.pt"  # checkpoint written by train.py
    datasets: str = "pretrain,sft"  # comma list: pretrain (val split) and/or sft (held-out conversations)
    pretrain_data: str = ""  # prepared data dir; empty: the checkpoint's training data set
    pretrain_split: str = "val"  # val: held-out text (the paper) | train: the training text itself
    sft_data: str = ""  # jsonl of {"messages": [...]}; empty: the testbed's sft_select.jsonl (held-out people)
    seq_len: int = 0  # tokens per sequence; 0: the checkpoint's training seq_len (the paper: 1024)
    batch_size: int = 1  # sequences per batch (the paper: 1)
    num_batches: int = 8  # batches per data set (the paper: up to 4096)
    num_samples: int = 50  # Hutchinson probes per batch (the paper: 50)
    seed: int = 0  # batch b uses probe seed seed + b
    probes_per_call: int = 0  # probes vmapped per HVP call; 0: auto (auto_probes_per_call)
    compile: bool = False  # torch.compile the HVP: faster per probe, after a compile of a minute or more
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str = ""  # JSON path; empty: sharpness.json next to the checkpoint
    preconditioned: bool = False  # also Tr(D^-1 H), D AdamW's denominators from the checkpoint (train.py's ckpt.pt)
    figures: str = ""  # comma list of train.py run dirs: draw Figures 3-4 from them instead of measuring
    figures_dir: str = "."  # where the figures go

    def __post_init__(self):
        if self.probes_per_call < 0:
            raise ValueError(f"probes_per_call={self.probes_per_call} must be >= 0 (0: auto)")
        if self.pretrain_split not in ("val", "train"):
            raise ValueError(f"pretrain_split={self.pretrain_split!r}: use val or train")
        for name in ("batch_size", "num_batches", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        unknown = set(self.datasets.split(",")) - {"pretrain", "sft"}
        if unknown or not self.datasets:
            raise ValueError(f"datasets={self.datasets!r}: use pretrain, sft or pretrain,sft")


def data_sources(cfg, ckpt):
    """{"pretrain": prepared dir, "sft": jsonl path} for the requested data sets. By default
    the pre-training data is the checkpoint's, and the SFT data its testbed's held-out
    conversations (sft_select.jsonl of data.loaders.testbed_of)."""
    requested = cfg.datasets.split(",")
    pretrain_dir = cfg.pretrain_data
    if not pretrain_dir and ("pretrain" in requested or not cfg.sft_data):
        pretrain_dir = resolve_dataset(ckpt["config"]["dataset"])
    sources = {}
    if "pretrain" in requested:
        try:
            data_tokenizer = Tokenizer.from_dict(load_meta(pretrain_dir)["tokenizer"])
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"error: cannot use pre-training data {pretrain_dir}: {e}") from None
        if data_tokenizer != Tokenizer.from_dict(ckpt["tokenizer"]):
            raise SystemExit(f"error: {pretrain_dir} was tokenized with another vocabulary than the checkpoint "
                             f"(re-prepared since?); measure on the data the model was trained on")
        sources["pretrain"] = pretrain_dir
    if "sft" in requested:
        testbed = testbed_of(pretrain_dir) if not cfg.sft_data else None
        path = cfg.sft_data or (testbed and os.path.join(testbed, "sft_select.jsonl"))
        if not path or not os.path.isfile(path):
            where = path or f"the testbed of {pretrain_dir}"
            raise SystemExit(f"error: no SFT data at {where}; pass --sft_data=<jsonl with a \"messages\" field> "
                             f"or --datasets=pretrain")
        sources["sft"] = path
    return sources


def checkpoint_denominators(cfg, ckpt, model, rt):
    """--preconditioned: AdamW's denominators from the checkpoint's optimizer state."""
    if rt.distributed:
        raise SystemExit("error: --preconditioned runs in one process (python sharpness.py, not torchrun)")
    if not ckpt.get("optimizer"):
        raise SystemExit(f"error: {cfg.ckpt} holds no AdamW state (an SFT, merged or exported checkpoint, or a kept "
                         f"ckpt_*.pt of a run without --keep_optimizer=true); Tr(D^-1 H) needs train.py's ckpt.pt")
    try:
        return adam_denominators(model, ckpt["optimizer"])
    except ValueError as e:
        raise SystemExit(f"error: {cfg.ckpt}: {e}") from None


def main(cfg):
    if cfg.figures:
        written = draw_figures(cfg.figures.split(","), cfg.figures_dir)
        for key, value in written.items():
            print(f"{key}: {value}")
        return written
    ckpt = load_checkpoint(cfg.ckpt)
    rt = setup_distributed(cfg.device)  # under torchrun: one process group, the batches split over it
    device = rt.device
    seq_len = cfg.seq_len or ckpt["config"]["seq_len"]
    model = load_model(ckpt, device)
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    denominators = checkpoint_denominators(cfg, ckpt, model, rt) if cfg.preconditioned else None
    results = {}
    for name, path in data_sources(cfg, ckpt).items():
        try:
            if name == "pretrain":
                batches = pretrain_batches(path, seq_len, cfg.batch_size, cfg.num_batches, cfg.pretrain_split)
            else:
                batches = sft_batches(path, tokenizer, seq_len, cfg.batch_size, cfg.num_batches)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: cannot use the {name} data at {path}: {e}") from None
        split = f" over {rt.world_size} processes" if rt.distributed else ""
        rt.log(f"{name}: {len(batches)} batches of {cfg.batch_size} x <= {seq_len} tokens from {path}, "
               f"{cfg.num_samples} probes each{split}")
        eta = Eta(len(range(rt.rank, len(batches), rt.world_size)))

        def progress(done, total, record):
            rt.log(f"  {name} batch {record['batch'] + 1}/{len(batches)}: Tr(H) {record['trace']:.4g} +- "
                   f"{record['stderr']:.2g} (loss {record['loss']:.3f}, {record['tokens']} tokens) | ETA {eta(done)}")

        eta(0)
        results[name] = model_sharpness(model, batches, cfg.num_samples, cfg.seed, progress, cfg.probes_per_call,
                                        cfg.compile, rt.rank, rt.world_size)
        results[name]["data"] = path if name == "sft" else f"{path} ({cfg.pretrain_split} split)"
        r = results[name]
        rt.log(f"{name}: sharpness Tr(H) = {r['trace']:.4g} +- {r['stderr']:.2g} (stderr over {r['stderr_over']}; "
              f"{format_duration(r['seconds'])})")
        if denominators is not None:
            r["preconditioned"] = preconditioned_sharpness(model, denominators, batches, cfg.num_samples, cfg.seed)
            rt.log(f"{name}: preconditioned Tr(D^-1 H) = {r['preconditioned']['trace']:.4g} +- "
                   f"{r['preconditioned']['stderr']:.2g} (AdamW's denominators at step {ckpt.get('step')})")
        if r["trace"] + 2 * r["stderr"] < 0:
            rt.log(f"  note: a negative trace means the model is not near a minimum of the loss on the {name} data: "
                   f"the loss curves down along most directions there (a model never trained on that data)")
    out = cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "sharpness.json")
    settings = {**asdict(cfg), "seq_len": seq_len, "device": device, "loss_normalization": LOSS_NORMALIZATION}
    report = {"ckpt": os.path.abspath(cfg.ckpt), "step": ckpt.get("step"), "settings": settings, "results": results}
    if rt.master:
        write_atomic(out, (json.dumps(report, indent=1) + "\n").encode())
        print(f"wrote {out}")
    if rt.distributed:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main(parse_args(SharpnessConfig, description=__doc__))
