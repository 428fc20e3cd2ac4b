"""
One GPU check, in minutes: what the CPU tests cannot show. On a single GPU it trains the
125m preset for 30 steps in bf16 with torch.compile and flash attention, extends that run by a
resume and compares, measures MFU at 125m and 350m against the device's bf16 dense peak, runs
the Hessian-vector product (math attention backend) at T = 1024 on 125m, and trains with FSDP2
on that one GPU; one summary line per check, exit status 1 if any fails.

    python tools/gpu_check.py                    # on a GPU (over 6 minutes on an H200: docs/scale.md)
    python tools/gpu_check.py --device=cpu       # the same checks on the tiny preset (tests run this)

The training data is a synthetic token stream over the full cl100k vocabulary (a fixed random
successor for each of 4096 ids, restarting every 128 tokens), so the loss falls within 30
steps; nothing is downloaded. The runs are this repo's own commands (train.py, torchrun).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Runnable as `python tools/<name>.py` (or `python -m tools.<name>`): the repo root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.formats import Tokenizer, load_meta, write_meta, write_tokens
from model import Llama
from nanowso.common import parse_args
from nanowso.runtime import autocast_context, resolve_device
from sharpness import model_sharpness
from tools import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, where train.py is


@dataclass
class CheckConfig:
    device: str = "auto"  # auto | cuda | cpu
    preset: str = ""  # the trained model; empty: 125m on CUDA, tiny on CPU
    mfu_presets: str = ""  # comma list timed for MFU; empty: 125m,350m on CUDA, tiny on CPU
    steps: int = 30  # training steps of the first check; the resume check stops at 2/3 of them
    batch_size: int = 0  # 0: 16 on CUDA, 4 on CPU
    seq_len: int = 0  # 0: 1024 on CUDA, 64 on CPU (also the HVP's T)
    compile: bool = True  # torch.compile the training runs and the MFU steps
    work_dir: str = ""  # runs and data go here; empty: a temporary directory, removed after


def synthetic_data(directory, n_tokens, compact, seed=0):
    """A prepared data set (train and val splits) of a learnable stream: each of 4096 random
    cl100k ids has one fixed random successor; every 128 tokens the chain restarts. compact:
    store it in a compact vocabulary of those ids (a small output layer, for a CPU) instead
    of the full 100,277 ids a GPU preset trains on."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(Tokenizer().vocab_size, 4096, replace=False)
    tokenizer = Tokenizer(compact_vocab=ids) if compact else Tokenizer()
    successor = dict(zip(ids, rng.permutation(ids)))
    tokens, t = [], ids[0]
    for i in range(n_tokens):
        t = rng.choice(ids) if i % 128 == 0 else successor[t]
        tokens.append(int(t))
    if compact:
        tokens = list(np.searchsorted(tokenizer.compact_vocab, tokens))  # cl100k id -> compact id
    os.makedirs(directory, exist_ok=True)
    cut = n_tokens * 9 // 10
    write_tokens(os.path.join(directory, "train_000000.bin"), tokens[:cut])
    write_tokens(os.path.join(directory, "val_000000.bin"), tokens[cut:])
    write_meta(directory, {"tokenizer": tokenizer.to_dict(), "splits": {"train": ["train_000000.bin"],
                                                                         "val": ["val_000000.bin"]},
                           "num_tokens": {"train": cut, "val": n_tokens - cut}})


def run(command, log_path):
    """A repo command, its output in log_path; (ok, seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return done.returncode == 0, time.perf_counter() - t0


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


class Report:
    def __init__(self):
        self.lines, self.failed = [], False

    def __call__(self, name, ok, details):
        line = f"{name:<8} {'PASS' if ok else 'FAIL'}  {details}"
        self.lines.append(line)
        self.failed |= not ok
        print(line, flush=True)


def main(cfg):
    device = resolve_device(cfg.device)
    cuda = device.startswith("cuda")
    preset = cfg.preset or ("125m" if cuda else "tiny")
    mfu_presets = (cfg.mfu_presets or ("125m,350m" if cuda else "tiny")).split(",")
    batch, seq = cfg.batch_size or (16 if cuda else 4), cfg.seq_len or (1024 if cuda else 64)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"gpu_check on {name} ({device}): preset {preset}, batch {batch} x {seq}, compile={cfg.compile}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = cfg.work_dir or tmp
        report = Report()
        data = os.path.join(work, "data")
        synthetic_data(data, n_tokens=max(200_000, 2 * cfg.steps * batch * (seq + 1)), compact=not cuda)
        check_training(cfg, report, work, data, preset, batch, seq, device)
        check_flash_attention(report, device, seq)
        vocab = 0 if cuda else 64 * -(-Tokenizer.from_dict(load_meta(data)["tokenizer"]).vocab_size // 64)
        for p in mfu_presets:  # vocab 0: the preset's (cl100k padded, as train.py pads it)
            check_mfu(report, p, batch, seq, device, cfg.compile, vocab)
        check_hvp(report, preset, seq, device, vocab)
        check_fsdp(cfg, report, work, data, preset, batch, seq, device)
    print(f"summary: {'FAIL' if report.failed else 'all checks passed'} in {time.perf_counter() - t0:.0f} s on {name}",
          flush=True)
    return report


def train_command(data, out_dir, preset, batch, seq, device, cfg, max_iters, *extra):
    return ["train.py", f"--dataset={data}", f"--out_dir={out_dir}", f"--preset={preset}", f"--batch_size={batch}",
            f"--seq_len={seq}", f"--max_iters={max_iters}", "--warmup_iters=3",
            f"--learning_rate={3e-3 if preset == 'tiny' else 1e-3}",
            "--log_interval=1", f"--eval_interval={cfg.steps}", "--eval_tokens=16384", f"--device={device}",
            f"--compile={str(cfg.compile).lower()}", *extra]


def check_training(cfg, report, work, data, preset, batch, seq, device):
    """train: the loss falls over cfg.steps compiled bf16 steps. resume: a run stopped at 2/3
    and resumed (WSO extends exactly) takes the same steps."""
    full, part = os.path.join(work, "full"), os.path.join(work, "part")
    ok, seconds = run([sys.executable, *train_command(data, full, preset, batch, seq, device, cfg, cfg.steps)],
                      os.path.join(work, "full.log"))
    if not ok:
        report("train", False, f"train.py failed; see {work}/full.log")
        return
    got = losses(full)
    first, last = got[1], got[cfg.steps]
    report("train", last["loss"] < 0.99 * first["loss"],  # falls (by 1% at least)
           f"{preset}, {cfg.steps} steps in {seconds:.0f} s (compile included): loss {first['loss']:.3f} -> "
           f"{last['loss']:.3f}, {last['tokens_per_sec']:,.0f} tok/s at the last step")
    stop = cfg.steps * 2 // 3
    ok1, _ = run([sys.executable, *train_command(data, part, preset, batch, seq, device, cfg, stop)],
                 os.path.join(work, "part.log"))
    ok2, _ = run([sys.executable, *train_command(data, part, preset, batch, seq, device, cfg, cfg.steps,
                                                 "--init_from=resume")], os.path.join(work, "resume.log"))
    if not (ok1 and ok2):
        report("resume", False, f"train.py failed; see {work}/part.log, resume.log")
        return
    after = range(stop + 1, cfg.steps + 1)

    def difference(run_losses, steps=after):
        return max(abs(run_losses[s]["loss"] - got[s]["loss"]) / got[s]["loss"] for s in steps)
    resumed = losses(part)
    if not device.startswith("cuda"):  # bit-exact on a CPU
        worst = difference(resumed)
        report("resume", worst < 1e-6, f"stopped at {stop}, resumed to {cfg.steps}: largest relative loss "
                                       f"difference {worst:.1e}")
        return
    # A GPU's kernels are not bitwise deterministic (atomic adds in the embedding's backward), so the
    # same command run twice drifts apart too; the resumed run must drift no more than a rerun, and its
    # first step, taken from the checkpoint's weights, must agree (measured on an H200: reruns 1%
    # apart within 20 steps, a resumed eager run 1e-4 at its first step)
    ok3, _ = run([sys.executable, *train_command(data, os.path.join(work, "rerun"), preset, batch, seq, device, cfg,
                                                 cfg.steps)], os.path.join(work, "rerun.log"))
    if not ok3:
        report("resume", False, f"train.py failed; see {work}/rerun.log")
        return
    first, worst, noise = difference(resumed, [stop + 1]), difference(resumed), difference(losses(os.path.join(work, "rerun")))
    report("resume", first < 1e-3 and worst <= max(2 * noise, 1e-3),
           f"stopped at {stop}, resumed to {cfg.steps}: relative loss difference {first:.1e} at step {stop + 1}, "
           f"{worst:.1e} at most; the same run repeated: {noise:.1e} at most")


def check_flash_attention(report, device, seq):
    """flash: the fused kernel runs at the trained shapes (bf16, causal, head_dim 64)."""
    if not device.startswith("cuda"):
        report("flash", True, "skipped: flash attention is CUDA-only")
        return
    q = torch.randn(2, 12, seq, 64, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        report("flash", True, f"FLASH_ATTENTION runs at (2, 12, {seq}, 64) bf16 causal")
    except RuntimeError as e:
        report("flash", False, f"FLASH_ATTENTION unavailable: {e}")


def check_mfu(report, preset, batch, seq, device, compile, vocab):
    """mfu: tokens/s and MFU of a compiled bf16 train step against the device's bf16 peak."""
    cfg = bench.BenchConfig(preset=preset, batch_size=max(1, batch // 2) if preset == "350m" else batch, seq_len=seq,
                            vocab_size=vocab, steps=10, device=device)
    dtype, autocast = autocast_context(device, "auto")
    torch.manual_seed(0)
    model = Llama(bench.model_config(cfg)).to(device)
    seconds = bench.time_train_step(model, cfg, device, autocast, compiled=compile)
    tokens = cfg.batch_size * seq
    peak, source = bench.device_peak(device, dtype)
    mfu = model.flops_per_token(seq) * tokens / seconds / peak
    shown = f"{peak / 1e12:.0f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.0f} GFLOP/s"
    memory = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.startswith("cuda") else ""
    report("mfu", mfu > 0, f"{preset} {cfg.batch_size}x{seq} {dtype}: {seconds * 1e3:.1f} ms/step, "
                           f"{tokens / seconds:,.0f} tok/s, MFU {100 * mfu:.1f}% of {shown} ({source}){memory}")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def check_hvp(report, preset, seq, device, vocab):
    """hvp: Hutchinson's Tr(H) with 2 probes on one sequence of T = seq, math SDPA backend, fp32."""
    torch.manual_seed(0)
    model = Llama(bench.model_config(bench.BenchConfig(preset=preset, seq_len=seq, vocab_size=vocab))).to(device)
    x = torch.randint(0, model.config.vocab_size, (1, seq))
    t0 = time.perf_counter()
    result = model_sharpness(model, [(x, torch.roll(x, -1, 1))], num_samples=2, seed=0)
    seconds = time.perf_counter() - t0
    ok = bool(np.isfinite(result["trace"]))
    report("hvp", ok, f"{preset} at T={seq}: Tr(H) {result['trace']:.4g} from 2 probes in {seconds:.1f} s")


def check_fsdp(cfg, report, work, data, preset, batch, seq, device):
    """fsdp: --parallel=fsdp on one process (FSDP2 wrapping, DCP checkpoint) starts where the
    single-process run started: its first loss equals the first check's."""
    out = os.path.join(work, "fsdp")
    steps = min(10, cfg.steps)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               *train_command(data, out, preset, batch, seq, device, cfg, steps, "--parallel=fsdp")]
    command[command.index(f"--eval_interval={cfg.steps}")] = f"--eval_interval={steps}"
    # eager: this checks FSDP2's sharding and checkpoints, not the compiler (timed by the mfu check)
    command[command.index(f"--compile={str(cfg.compile).lower()}")] = "--compile=false"
    ok, seconds = run(command, os.path.join(work, "fsdp.log"))
    if not ok:
        report("fsdp", False, f"torchrun train.py --parallel=fsdp failed; see {work}/fsdp.log")
        return
    got, single = losses(out), losses(os.path.join(work, "full"))
    difference = abs(got[1]["loss"] - single[1]["loss"]) / single[1]["loss"]
    sharded = os.path.isfile(os.path.join(out, "ckpt_sharded", ".metadata"))
    report("fsdp", sharded and difference < 1e-2,
           f"{steps} steps in {seconds:.0f} s, step-1 loss {got[1]['loss']:.4f} vs {single[1]['loss']:.4f} "
           f"single-process{' (bf16 parameters under FSDP)' if device.startswith('cuda') else ''}, loss {got[steps]['loss']:.3f} at step {steps}, "
           f"sharded checkpoint {'written' if sharded else 'missing'}")


if __name__ == "__main__":
    sys.exit(1 if main(parse_args(CheckConfig, description=__doc__)).failed else 0)
