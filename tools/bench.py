"""
Training throughput: tokens/s and model FLOPs utilization (MFU) of one train step
(forward, backward, AdamW update), eager and torch.compile'd, against the device's bf16
dense peak on a known GPU (H100/H200 SXM 989 TFLOP/s, A100 312), else this machine's own
matmul peak measured in the same run; peak memory on a GPU. Speed lives here, never in tests.
tools/gpu_check.py is the one GPU check (training, resume, MFU, HVP, FSDP2).

    python tools/bench.py --dim=256 --ffn_dim=768 --vocab_size=50304   # the CPU reference size (docs/speed.md)
    python tools/bench.py --dim=256 --ffn_dim=768 --vocab_size=50304 --reference=gpt2 --losses=plain,chunked --profile=true
    python tools/bench.py --preset=125m --batch_size=16 --seq_len=1024 --device=cuda
    torchrun --nproc_per_node=8 tools/bench.py --preset=1b --parallel=fsdp --batch_size=4 --seq_len=2048

MFU = flops_per_token * tokens/s / peak, with flops_per_token = 6 * (matmul weights)
+ 12 * n_layers * dim * seq_len (model.Llama.flops_per_token). Under torchrun (--parallel=ddp
or fsdp, as train.py's) every process times its own batch_size x seq_len: tokens/s is the
sum over the processes, MFU and peak memory are per GPU.

--reference=gpt2 times, in the same run and at the same width, depth, heads, vocabulary and
sequence, nanoGPT's GPT-2 model (GPT2 below: LayerNorm, a 4x GELU MLP, learned positions,
fused SDPA, the tied output layer, F.cross_entropy on the full logits) and reports this
model's model-FLOP throughput as a multiple of GPT-2's: a ratio both runs share the machine's
load for. --losses=plain,chunked times the step with each loss path (model.cross_entropy: the
full logits, or chunks of LOSS_CHUNK_ELEMENTS; auto is the model's default for the shape), and
--profile=true prints where an eager step's time goes (torch.profiler, by operator).
"""

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# Runnable as `python tools/<name>.py` (or `python -m tools.<name>`): the repo root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as model_module
from model import PRESETS, Llama, build_config
from nanowso.common import parse_args
from nanowso.runtime import fsdp, setup_distributed

# The vocabulary of presets that take theirs from the data (tiny, 125m, 350m): cl100k_base's
# 100,277 ids padded to a multiple of 64, as train.py pads them for FineWeb-Edu.
DEFAULT_VOCAB = 100288


@dataclass
class BenchConfig:
    preset: str = "tiny"  # model.PRESETS entry; the size fields below override it where > 0
    dim: int = 0  # 0: the preset's
    ffn_dim: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    vocab_size: int = 0  # 0: the preset's, or DEFAULT_VOCAB where the preset takes the data's
    batch_size: int = 8
    seq_len: int = 256
    steps: int = 10  # timed steps (after warm-up)
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    modes: str = "eager,compiled"  # which variants to time
    parallel: str = "ddp"  # under torchrun: ddp | fsdp (train.py's --parallel)
    losses: str = "auto"  # comma-separated loss paths to time: auto | plain | chunked
    reference: str = ""  # gpt2: also time nanoGPT's GPT-2 model of the same shape (one process)
    profile: bool = False  # print an eager step's time by operator (torch.profiler)


def model_config(cfg):
    """The preset's LlamaConfig with the size fields that are set (> 0)."""
    sizes = {k: getattr(cfg, k) or None for k in ("dim", "ffn_dim", "n_layers", "n_heads", "n_kv_heads")}
    vocab = cfg.vocab_size or PRESETS[cfg.preset]["vocab_size"] or DEFAULT_VOCAB
    return build_config(cfg.preset, **sizes, vocab_size=vocab, max_seq_len=cfg.seq_len)


# bf16 dense peaks from the vendors' datasheets (no sparsity), matched in the device's name in
# this order: MFU on a GPU is quoted against these (PaLM, Appendix B; nanochat; torchtitan).
BF16_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def device_peak(device, dtype):
    """(FLOP/s, where it comes from): the datasheet's bf16 dense peak of a known GPU, else
    the matmul peak measured now (a CPU, or fp32)."""
    if device.startswith("cuda") and dtype == "bfloat16":
        name = torch.cuda.get_device_name(device)
        for key, peak in BF16_PEAKS:
            if key in name:
                return peak, f"{key} bf16 dense peak"
    return matmul_peak(device, dtype), "matmul peak measured now"


def matmul_peak(device, dtype, n=2048, repeats=10):
    """Measured FLOP/s of a large square matmul: the ceiling MFU is compared against."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    times = []
    for _ in range(repeats + 3):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times[3:])


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class GPT2Block(nn.Module):
    """nanoGPT's block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); the MLP is 4 * dim wide, GELU."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    """The GPT-2 model of nanoGPT's model.py at a LlamaConfig's width, depth, heads, vocabulary
    and length: learned positions, the output layer tied to the token embedding, and
    F.cross_entropy on the full logits. Built here only as a speed reference."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.dim), nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.h = nn.ModuleList(GPT2Block(cfg.dim, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """As model.Llama.flops_per_token: 6 per matmul weight (the tied matrix once, as the output
        layer; not the position table) + 12 * n_layers * dim * seq_len for attention."""
        n_matmul = sum(p.numel() for n, p in self.named_parameters() if p.ndim == 2 and n != "wpe.weight")
        return 6 * n_matmul + 12 * self.config.n_layers * self.config.dim * seq_len


def loss_chunk(loss, vocab_size):
    """model.forward's loss_chunk for a loss path: None (the default for the shape), 0 (the full
    logits) or LOSS_CHUNK_ELEMENTS // V positions at a time."""
    choices = {"auto": None, "plain": 0, "chunked": max(1, model_module.LOSS_CHUNK_ELEMENTS // vocab_size)}
    if loss not in choices:
        raise SystemExit(f"error: --losses has {loss!r}; choose from {', '.join(choices)}")
    return choices[loss]


def train_step(model, cfg, device, autocast, compiled, wrapped=None, loss="auto"):
    """One training step of `model` (or of `wrapped`, the model in DDP) on a fixed random batch,
    as a function of no arguments."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    step_model = wrapped or model
    step_model = torch.compile(step_model) if compiled else step_model
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=device)
    y = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=device)
    kwargs = {} if isinstance(model, GPT2) else {"loss_chunk": loss_chunk(loss, vocab)}

    def step():
        with autocast:
            _, loss = step_model(x, y, **kwargs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_train_step(model, cfg, device, autocast, compiled, wrapped=None, loss="auto"):
    """Median seconds of one step; `wrapped` is what the step runs (model in DDP), if not model."""
    step = train_step(model, cfg, device, autocast, compiled, wrapped, loss)
    for _ in range(3):  # compile and warm up
        step()
    times = []
    for _ in range(cfg.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_step(step, steps=3, rows=15):
    """The operators where `steps` calls of step() spend their time, by self CPU time: a table."""
    step()  # warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def build(model_cfg, cfg, rt):
    """(the model, what a step runs): one process; under torchrun DDP around it, or FSDP2."""
    if cfg.parallel == "fsdp":
        model = fsdp().shard_model(model_cfg, rt.device, bf16=rt.dtype == "bfloat16")
        model.reset_parameters()  # timing only: each process's shards, drawn from its own RNG
        return model, model
    model = Llama(model_cfg).to(rt.device)
    if rt.distributed:
        return model, DDP(model, device_ids=[torch.device(rt.device).index] if rt.device.startswith("cuda") else None)
    return model, model


def main(cfg):
    if cfg.parallel not in ("ddp", "fsdp"):
        raise SystemExit(f"error: --parallel={cfg.parallel!r}; choose ddp or fsdp")
    rt = setup_distributed(cfg.device, cfg.dtype, process_group=cfg.parallel == "fsdp")
    device, dtype, autocast = rt.device, rt.dtype, rt.autocast
    model_cfg = model_config(cfg)
    peak, source = device_peak(device, dtype)
    tokens = cfg.batch_size * cfg.seq_len  # per process
    where = f" x {rt.world_size} processes ({cfg.parallel})" if rt.distributed or cfg.parallel == "fsdp" else ""
    rt.log(f"device={device}{where} dtype={dtype} threads={torch.get_num_threads()} "
           f"peak {peak / 1e9:,.1f} GFLOP/s ({source})")
    results = {}
    variants = [(mode, loss) for mode in cfg.modes.split(",") for loss in cfg.losses.split(",")]
    if cfg.reference:
        if cfg.reference != "gpt2" or rt.distributed or cfg.parallel == "fsdp":
            raise SystemExit(f"error: --reference={cfg.reference!r}; gpt2 is the reference, in one process")
        variants += [(mode, "gpt2") for mode in cfg.modes.split(",")]
    for mode, loss in variants:
        torch.manual_seed(0)
        if loss == "gpt2":
            model = wrapped = GPT2(model_cfg).to(device)
        else:
            model, wrapped = build(model_cfg, cfg, rt)
        flops = model.flops_per_token(cfg.seq_len) * tokens
        compiled = mode == "compiled"
        seconds = time_train_step(model, cfg, device, autocast, compiled, wrapped=wrapped, loss=loss)
        name = mode if loss == "auto" else f"{mode} {loss}"
        results[name] = dict(step_ms=seconds * 1e3, tokens_per_sec=rt.world_size * tokens / seconds,
                             mfu=flops / seconds / peak, flops_per_sec=flops / seconds)
        memory = ""
        if device.startswith("cuda"):
            results[name]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            memory = f" | peak memory {results[name]['peak_memory_gib']:.1f} GiB"
            torch.cuda.reset_peak_memory_stats(device)
        rt.log(f"{name:>17}: {model.num_params():,} params | {seconds * 1e3:8.1f} ms/step | "
               f"{results[name]['tokens_per_sec']:10,.0f} tok/s | {flops / seconds / 1e9:7.1f} GFLOP/s | "
               f"MFU {100 * flops / seconds / peak:5.1f}% of peak "
               f"per {'GPU' if device.startswith('cuda') else 'process'}{memory}")
        if cfg.profile and not compiled:
            rt.log(f"{name}: where an eager step's time goes (3 steps)\n"
                   + profile_step(train_step(model, cfg, device, autocast, False, wrapped, loss)))
    for name in list(results):
        mode, _, loss = name.partition(" ")
        if loss != "gpt2" and f"{mode} gpt2" in results:
            ratio = results[name]["flops_per_sec"] / results[f"{mode} gpt2"]["flops_per_sec"]
            results[name]["vs_gpt2"] = ratio
            rt.log(f"{name:>17}: {ratio:.2f}x the model-FLOP throughput of GPT-2 ({mode})")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main(parse_args(BenchConfig, description=__doc__))
