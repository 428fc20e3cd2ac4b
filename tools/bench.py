"""
Training throughput: tokens/s and model FLOPs utilization (MFU) of one train step
(forward, backward, AdamW update), eager and torch.compile'd, against the device's bf16
dense peak on a known GPU (H100/H200 SXM 989 TFLOP/s, A100 312), else this machine's own
matmul peak measured in the same run; peak memory on a GPU. Speed lives here, never in tests.
tools/gpu_check.py is the one GPU check (training, resume, MFU, HVP, FSDP2).

    python tools/bench.py --dim=256 --ffn_dim=768 --vocab_size=50304   # the CPU reference size (docs/speed.md)
    python tools/bench.py --preset=125m --batch_size=16 --seq_len=1024 --device=cuda
    torchrun --nproc_per_node=8 tools/bench.py --preset=1b --parallel=fsdp --batch_size=4 --seq_len=2048

MFU = flops_per_token * tokens/s / peak, with flops_per_token = 6 * (matmul weights)
+ 12 * n_layers * dim * seq_len (model.Llama.flops_per_token). Under torchrun (--parallel=ddp
or fsdp, as train.py's) every process times its own batch_size x seq_len: tokens/s is the
sum over the processes, MFU and peak memory are per GPU.
"""

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# Runnable as `python tools/<name>.py` (or `python -m tools.<name>`): the repo root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def time_train_step(model, cfg, device, autocast, compiled, wrapped=None):
    """Median seconds of one step; `wrapped` is what the step runs (model in DDP), if not model."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    step_model = wrapped or model
    step_model = torch.compile(step_model) if compiled else step_model
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=device)
    y = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=device)

    def step():
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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
    for mode in cfg.modes.split(","):
        torch.manual_seed(0)
        model, wrapped = build(model_cfg, cfg, rt)
        flops = model.flops_per_token(cfg.seq_len) * tokens
        seconds = time_train_step(model, cfg, device, autocast, compiled=(mode == "compiled"), wrapped=wrapped)
        results[mode] = dict(step_ms=seconds * 1e3, tokens_per_sec=rt.world_size * tokens / seconds,
                             mfu=flops / seconds / peak)
        memory = ""
        if device.startswith("cuda"):
            results[mode]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            memory = f" | peak memory {results[mode]['peak_memory_gib']:.1f} GiB"
            torch.cuda.reset_peak_memory_stats(device)
        rt.log(f"{mode:>9}: {model.num_params():,} params | {seconds * 1e3:8.1f} ms/step | "
               f"{results[mode]['tokens_per_sec']:10,.0f} tok/s | MFU {100 * flops / seconds / peak:5.1f}% of peak "
               f"per {'GPU' if device.startswith('cuda') else 'process'}{memory}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main(parse_args(BenchConfig, description=__doc__))
