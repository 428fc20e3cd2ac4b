"""
How much does one Hessian-vector product cost? (the price of sharpness.py, Section 6)

Each row times a full Hutchinson step (draw z, H z, z^T H z in float64) per probe,
as a multiple of one forward + backward with fused attention (what training pays):

    sharpness.py (auto)  hutchinson_trace as model_sharpness calls it at this T: the
                         vmap width of auto_probes_per_call(tokens), 4 or 1 (one of the
                         next two rows, timed again)
    --compile (auto)     the same with sharpness.py --compile: torch.compile(probe_chunk),
                         gradient and vmapped HVPs of auto_probes_per_call(tokens, True)
                         probes in one compiled call (its one-time compile is reported apart)
    vjp(grad) x1         torch.func.vjp(torch.func.grad(L)): gradient graph built once
                         per batch, reused by every probe (reverse-over-reverse)
    vmap x4              the same HVP vmapped over 4 probes at a time (probes_per_call=4)
    jvp(grad)            torch.func.jvp(torch.func.grad(L)) per probe: recomputes the
                         forward and backward for every probe (forward-over-reverse)
    PyHessian            autograd.grad(create_graph=True) once, then
                         autograd.grad(g . z, retain_graph=True) per probe

Every HVP runs with the math SDPA backend (fused kernels have no double backward);
the gap to the reference includes materializing the T x T attention matrices.
Rounds interleave the methods, and each ratio uses the reference of its own round,
so a machine shared with other jobs moves numerator and denominator together;
`--clock=cpu` (process CPU time) with `--threads=1` is the steadiest on a busy machine.

    python tools/bench_hvp.py                              # model.PRESETS["tiny"], vocab 960, batch 1
    python tools/bench_hvp.py --seq_lens=256,1024 --probes=20 --rounds=3 --threads=2 --clock=wall
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

# Runnable as `python tools/<name>.py` (or `python -m tools.<name>`): the repo root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Llama, build_config
from sharpness import auto_probes_per_call, hutchinson_trace, rademacher_like


def quadratic_form(z, hz):
    return sum((z[n].double() * hz[n].double()).sum() for n in z).item()


def pyhessian(loss_fn, params, num_probes, generator):
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(leaves), list(leaves.values()), create_graph=True)
        for _ in range(num_probes):
            z = rademacher_like(params, generator)
            hz = torch.autograd.grad(grads, list(leaves.values()), grad_outputs=list(z.values()), retain_graph=True)
            quadratic_form(z, dict(zip(leaves, hz)))


def jvp_of_grad(loss_fn, params, num_probes, generator):
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(num_probes):
            z = rademacher_like(params, generator)
            quadratic_form(z, jvp(grad(loss_fn), (params,), (z,))[1])


def bench(seq_len, args, clock):
    torch.manual_seed(0)
    model = Llama(build_config("tiny", vocab_size=args.vocab_size, max_seq_len=seq_len)).eval()
    x = torch.randint(0, args.vocab_size, (1, seq_len))
    y = torch.randint(0, args.vocab_size, (1, seq_len))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(p):
        return functional_call(model, p, (x, y))[1]

    def reference():
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()

    few = min(args.probes, 5)  # jvp(grad) does not amortize anything: a few probes suffice
    auto = auto_probes_per_call(x.numel())  # what model_sharpness uses for this batch
    compiled = auto_probes_per_call(x.numel(), compile=True)
    print(f"  T={seq_len}: sharpness.py (auto) runs probes_per_call={auto}, with --compile {compiled}")
    methods = {
        "sharpness.py (auto)": (args.probes, lambda n, g: hutchinson_trace(loss_fn, params, n, g, auto)),
        "--compile (auto)": (args.probes, lambda n, g: hutchinson_trace(loss_fn, params, n, g, compiled, True)),
        "vjp(grad) x1": (args.probes, lambda n, g: hutchinson_trace(loss_fn, params, n, g, 1)),
        "vmap x4": (args.probes, lambda n, g: hutchinson_trace(loss_fn, params, n, g, 4)),
        "jvp(grad)": (few, lambda n, g: jvp_of_grad(loss_fn, params, n, g)),
        "PyHessian": (args.probes, lambda n, g: pyhessian(loss_fn, params, n, g)),
    }
    for name, (num_probes, run) in methods.items():  # warm up: first calls pay one-time costs
        start = time.perf_counter()
        run(num_probes, torch.Generator().manual_seed(0))  # all of them: --compile compiles per chunk width
        if name == "--compile (auto)":
            print(f"  T={seq_len}: --compile compiled in {time.perf_counter() - start:.0f} s", flush=True)
    reference()
    ratios = {name: [] for name in methods}
    reference_seconds = []
    for r in range(args.rounds):
        times = []
        for _ in range(3):
            start = clock()
            reference()
            times.append(clock() - start)
        reference_seconds.append(statistics.median(times))
        names = list(methods)
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no method always runs first
            num_probes, run = methods[name]
            start = clock()
            run(num_probes, torch.Generator().manual_seed(r))
            ratios[name].append((clock() - start) / num_probes / reference_seconds[-1])
        print(f"  T={seq_len} round {r + 1}/{args.rounds}: fwd+bwd {reference_seconds[-1] * 1e3:.1f} ms | "
              + " | ".join(f"{name} {v[-1]:.2f}x" for name, v in ratios.items()), flush=True)
    return statistics.median(reference_seconds), ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", default="256,1024")
    parser.add_argument("--probes", type=int, default=20, help="probes per timing (the setup is amortized over them)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab_size", type=int, default=960, help="the testbed's 957 ids, padded to 64")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"tiny preset, fp32, batch 1, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"{args.probes} probes, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = {int(t): bench(int(t), args, clock) for t in args.seq_lens.split(",")}
    names = list(next(iter(rows.values()))[1])
    print(f"\nper probe, as a multiple of fwd+bwd with fused attention (median of {args.rounds} rounds [min, max])")
    print(f"{'T':>6} {'fwd+bwd':>9} " + " ".join(f"{name:>20}" for name in names))
    for seq_len, (reference_seconds, ratios) in rows.items():
        cells = [f"{statistics.median(v):.2f}x [{min(v):.2f}, {max(v):.2f}]" for v in ratios.values()]
        print(f"{seq_len:>6} {reference_seconds * 1e3:>7.1f}ms " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
