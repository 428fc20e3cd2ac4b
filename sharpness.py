"""
Loss-landscape sharpness: the trace of the Hessian by Hutchinson's estimator
(Section 6, Definition 6.1; Appendix H, Eq. 12 and Table 23).

    Sharpness(theta_t) = Tr(H(theta_t)),   H = d^2 L(theta_t; D) / d theta^2      (6)
    Tr(H) ~ (1/N) sum_i z_i^T H z_i,       z_i Rademacher (+-1 entries)        (12)

E[z z^T] = I makes each z^T H z an unbiased sample of Tr(H); its variance is
2 (||H||_F^2 - sum_i H_ii^2), so we report the mean with its standard error.
H z is a Hessian-vector product (HVP): the vector-Jacobian product of the gradient,
torch.func.vjp(torch.func.grad(L)): the gradient and its graph are built once per batch
and every probe back-propagates through them; on short batches torch.func.vmap sends a
few probes through at once (auto_probes_per_call). With --compile, torch.compile fuses the
gradient and a vmapped chunk of HVPs into one compiled call (probe_chunk); PyHessian's
double backward stays eager (torch.compile does not trace torch.autograd.grad by default).
bench_hvp.py measures these against the alternatives (jvp of grad per probe; PyHessian).

Measurement (Appendix H): per batch b, t_b = Tr of the Hessian of that batch's loss,
the mean cross-entropy over its target tokens (label != -100), from num_samples
probes drawn by a generator seeded with seed + b, so every checkpoint sees the same
batches and the same probes (common random numbers: differences between schedules
are tighter than either number). The estimate is mean_b t_b +- std_b(t_b) / sqrt(B),
a standard error that holds both the batch-to-batch spread and the probes' noise.

    python sharpness.py --ckpt=out/ckpt.pt                 # pretrain val + SFT held-out
    python sharpness.py --ckpt=out/ckpt.pt --datasets=sft --num_batches=64
    python sharpness.py --ckpt=out/ckpt.pt --compile        # long measurements: compiles once
    python sharpness.py --figures=out-wso,out-wsd,out-cos     # Figures 3-4 from runs of
                                                            # train.py --sharpness_interval=N
    python sharpness.py --help

The paper's settings (Table 23): seq_len 1024, batch size 1, 50 probes, up to 4096
batches per data set, measured every 4000 steps. The defaults here suit the testbed.
"""

import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import Eta, format_duration, load_checkpoint, parse_args, resolve_device
from data.chat import IGNORE, has_supervision, render
from data.common import Tokenizer, load_meta, load_split, read_jsonl, write_atomic
from model import Llama, LlamaConfig
from train import resolve_dataset

LOSS_NORMALIZATION = ("per batch: mean next-token cross-entropy over the batch's target tokens with "
                      "label != -100; the estimate averages the per-batch traces with equal weight")


# ------------------------------------------------------------------- the estimator

def hessian_vector_product(loss_fn, params):
    """v -> H v at `params` (dicts name -> tensor). Reverse-over-reverse: the gradient and
    its graph are computed once; each call back-propagates v through that graph (H is
    symmetric, so the vector-Jacobian product v^T H is H v)."""
    _, vjp_fn = vjp(grad(loss_fn), params)
    # create_graph=False: we need H v itself, not a graph for third derivatives
    return lambda v: vjp_fn(v, create_graph=False)[0]


def rademacher_like(params, generator=None):
    """One probe z: entries +-1 with equal probability, a tensor per parameter. Each
    random draw gives 16 entries (its 16 low bits): drawing the entries one by one costs
    a tenth of an HVP of the testbed model on CPU."""
    first = next(iter(params.values()))
    device = generator.device if generator is not None else first.device
    sizes = [p.numel() for p in params.values()]
    words = torch.randint(0, 2**16, ((sum(sizes) + 15) // 16, 1), generator=generator, device=device,
                          dtype=torch.int32)
    bits = (words >> torch.arange(16, device=device, dtype=torch.int32)).bitwise_and_(1)  # (words, 16)
    signs = bits.flatten()[:sum(sizes)].to(first.dtype).mul_(2).sub_(1)
    return {name: z.view_as(p).to(p) for (name, p), z in zip(params.items(), signs.split(sizes))}


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
    (bench_hvp.py). It compiles once per input shape (a minute or more), so the chunks
    are made equal: probes_per_call is then the widest, and the last chunk is padded
    with zero probes (H 0 = 0, dropped)."""
    if num_samples < 1 or probes_per_call < 1:
        raise ValueError(f"num_samples={num_samples} and probes_per_call={probes_per_call} must be >= 1")
    if compile:  # chunks of equal width: one compiled shape, and fewer zero probes than chunks
        probes_per_call = math.ceil(num_samples / math.ceil(num_samples / probes_per_call))
    samples = []
    # Fused SDPA kernels have neither double backward nor forward-mode AD
    # (PyTorch issues 116350, 128971): the HVP needs the math backend.
    with sdpa_kernel(SDPBackend.MATH):
        hvp = None if compile else hessian_vector_product(loss_fn, params)
        for start in range(0, num_samples, probes_per_call):
            probes = [rademacher_like(params, generator) for _ in range(min(probes_per_call, num_samples - start))]
            with torch.no_grad():
                z = {n: torch.stack([p[n] for p in probes]) for n in params}  # (probes, *shape)
                if compile:  # zero probes up to the compiled width; their z^T H z = 0 is dropped
                    pad = probes_per_call - len(probes)
                    z = {n: torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for n, t in z.items()}
                    zhz = compiled_probe_chunk()(loss_fn, params, z)[:len(probes)]
                else:
                    if len(probes) > 1:
                        hz = vmap(hvp)(z)
                    else:  # one probe: no vmap, just a leading dimension of 1
                        hz = {n: t.unsqueeze(0) for n, t in hvp(probes[0]).items()}
                    zhz = quadratic_forms(z, hz)
            samples.extend(zhz.tolist())
    samples = np.array(samples)
    stderr = samples.std(ddof=1) / math.sqrt(num_samples) if num_samples > 1 else float("nan")
    return float(samples.mean()), float(stderr)


def auto_probes_per_call(tokens, compile=False):
    """How many probes to vmap together for a batch of `tokens` positions (padding
    included). bench_hvp.py, tiny preset on CPU, per probe as a multiple of a
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
    return lambda params: functional_call(model, params, (x, y), tie_weights=True)[1]


def model_sharpness(model, batches, num_samples, seed=0, progress=None, probes_per_call=0, compile=False):
    """Tr(H) of the model's loss averaged over `batches` [(x, y), ...] (Appendix H).
    probes_per_call: probes vmapped together (hutchinson_trace); 0 picks
    auto_probes_per_call(x.numel(), compile) per batch. compile: torch.compile the HVP,
    with every batch padded to the longest (pad_batches) so it compiles once. Both
    change the speed, not the probes.
    The model is measured in eval mode and left in the mode it came in; its weights,
    .grad fields and torch's global RNG are not touched. progress(done, total, record)
    is called after each batch. Returns a dict of every number (see LOSS_NORMALIZATION)."""
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
    try:
        for b, (x, y) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            loss_fn = batch_loss_fn(model, x, y)
            generator = torch.Generator(device).manual_seed(seed + b)
            width = probes_per_call or auto_probes_per_call(x.numel(), compile)
            trace, stderr = hutchinson_trace(loss_fn, params, num_samples, generator, width, compile)
            with torch.no_grad():
                loss = loss_fn(params).item()
            records.append({"trace": trace, "stderr": stderr, "loss": loss, "tokens": int((y != IGNORE).sum())})
            if progress is not None:
                progress(b + 1, len(batches), records[-1])
    finally:
        model.train(was_training)
    traces = np.array([r["trace"] for r in records])
    stderr = traces.std(ddof=1) / math.sqrt(len(traces)) if len(traces) > 1 else records[0]["stderr"]
    return {"trace": float(traces.mean()), "stderr": float(stderr),
            "stderr_over": "batches" if len(traces) > 1 else "probes",
            "loss": float(np.mean([r["loss"] for r in records])), "num_batches": len(records),
            "num_samples": num_samples, "seed": seed, "num_params": sum(p.numel() for p in params.values()),
            "tokens": sum(r["tokens"] for r in records), "loss_normalization": LOSS_NORMALIZATION,
            "seconds": time.perf_counter() - start, "per_batch": records}


def pad_batches(batches, length):
    """Every (x, y) right-padded to `length` positions, x with token 0 and y with -100.
    The loss and its Hessian do not change: causal attention keeps a position from seeing
    later ones, and a position without a label adds nothing to the mean."""
    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)
    return [(pad(x, 0), pad(y, IGNORE)) for x, y in batches]


def sharpness_during_training(raw_model, batches, num_samples, seed=0):
    """For train.py's --sharpness_interval: {"sharpness", "sharpness_stderr"} of the
    uncompiled, unwrapped model on fixed batches. Training is not disturbed: probes
    come from a private generator (no draw from the global RNG), the model returns to
    train mode, weights and .grad are untouched. In train.py:

        sharpness_data = pretrain_batches(data_dir, cfg.seq_len, 1, cfg.sharpness_batches)  # once
        ...
        if cfg.sharpness_interval and step % cfg.sharpness_interval == 0:   # after the update
            record = sharpness_during_training(raw_model, sharpness_data, 50, cfg.seed)
            if master:
                append_jsonl(log_path, {"step": step, **record})

    outside autocast (it measures in float32). No collective is involved: every DDP
    rank computes the same numbers, or the master alone when that takes less than
    the process group's timeout. On a GPU it needs memory for the gradient's graph."""
    result = model_sharpness(raw_model, batches, num_samples, seed)
    return {"sharpness": result["trace"], "sharpness_stderr": result["stderr"]}


# --------------------------------------------------------------------- batches

def pretrain_batches(data_dir, seq_len, batch_size, num_batches, split="val"):
    """The first num_batches * batch_size windows of seq_len + 1 tokens of the split
    (val: held out, as the paper; train: where training sought a minimum), in order
    (the same tokens for every checkpoint)."""
    needed = num_batches * batch_size * seq_len + 1  # read no more of the split than is used
    tokens = np.concatenate([np.asarray(s[:needed]) for s in load_split(data_dir, split)])[:needed]
    num_windows = min((len(tokens) - 1) // seq_len, num_batches * batch_size) // batch_size * batch_size
    if num_windows == 0:
        raise ValueError(f"the {split} split of {data_dir} has {len(tokens)} tokens, too few for one batch of "
                         f"{batch_size} x {seq_len + 1}; lower --seq_len or --batch_size")
    ids = torch.from_numpy(tokens[:num_windows * seq_len + 1].astype(np.int64))
    x, y = ids[:-1].view(-1, seq_len), ids[1:].view(-1, seq_len)  # (windows, T)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, num_windows, batch_size)]


def sft_batches(sft_jsonl, tokenizer, seq_len, batch_size, num_batches):
    """The first conversations of sft_jsonl rendered with the tulu template (data/chat.py),
    cut to seq_len + 1 tokens, as (x, y) = (ids[:-1], labels[1:]). A batch is padded to
    its longest row with eot, label -100: causal attention keeps padding at the end from
    changing the other positions. Conversations whose answer the cut removes are skipped."""
    batches, rows, skipped = [], [], 0
    for row in read_jsonl(sft_jsonl):
        if len(batches) == num_batches:
            break
        ids, labels = render(row["messages"], tokenizer, max_len=seq_len + 1)
        if not has_supervision(labels[1:]):
            skipped += 1
            continue
        rows.append((ids[:-1], labels[1:]))
        if len(rows) == batch_size:
            length = max(len(ids) for ids, _ in rows)
            x = torch.tensor([ids + [tokenizer.eot] * (length - len(ids)) for ids, _ in rows])
            y = torch.tensor([labels + [IGNORE] * (length - len(labels)) for _, labels in rows])
            batches.append((x, y))
            rows = []
    if skipped:
        print(f"note: {skipped} conversations of {sft_jsonl} had no answer token within seq_len={seq_len}; skipped")
    if not batches:
        raise ValueError(f"{sft_jsonl} has no conversation with an answer within seq_len={seq_len} "
                         f"(or fewer than batch_size={batch_size} such conversations)")
    return batches


# ------------------------------------------------------------------------ plots

def plot_sharpness_curves(runs, t_stable=None, path="sharpness_curves.png"):
    """Figure 3: sharpness against step, one line with error bars per schedule.
    runs: {label: [(step, trace, stderr), ...]}; t_stable draws WSD's decay start."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in runs.items():
        steps, traces, stderrs = zip(*sorted(points))
        ax.errorbar(steps, traces, yerr=stderrs, marker="o", markersize=3, capsize=2, label=label)
    if t_stable is not None:
        ax.axvline(t_stable, color="gray", linestyle="--", label=r"$T_{\mathrm{stable}}$")
    ax.set_xlabel("step")
    ax.set_ylabel(r"Sharpness $= \mathrm{Tr}(\mathbf{H})$")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_sharpness_vs_score(points, path="sharpness_vs_score.png", xlabel="pre-training val"):
    """Figure 4: one point per schedule, SFT score against pre-training sharpness.
    points: {label: (sharpness, score)}. Returns Pearson's r (nan for < 2 points or
    no spread), also printed on the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(points)
    sharpness = np.array([points[k][0] for k in labels], dtype=float)
    score = np.array([points[k][1] for k in labels], dtype=float)
    defined = len(labels) > 1 and sharpness.std() > 0 and score.std() > 0
    r = float(np.corrcoef(sharpness, score)[0, 1]) if defined else float("nan")
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(sharpness, score)
    for label, sx, sy in zip(labels, sharpness, score):
        ax.annotate(label, (sx, sy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_title(f"Pearson r = {r:.3f}")
    ax.set_xlabel(f"sharpness ({xlabel})")
    ax.set_ylabel("score after SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return r


def draw_figures(run_dirs, out_dir):
    """Figures 3 and 4 from train.py runs made with --sharpness_interval: Figure 3 per data
    set from each run's log.jsonl; Figure 4 from each run's last pre-training sharpness and
    the sft_task_avg of sft.py's summary (run_dir/sft/summary.json), where present."""
    from schedules import wsd_t_stable
    curves, final, t_stable, scores = {}, {}, None, {}
    for run_dir in run_dirs:
        config_path, log_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "log.jsonl")
        if not (os.path.isfile(config_path) and os.path.isfile(log_path)):
            raise SystemExit(f"error: {run_dir} is not a train.py run directory (no config.json or log.jsonl)")
        with open(config_path) as f:
            cfg = json.load(f)["train"]
        label = "WSO" if cfg["schedule"] == "wso" else f"{cfg['schedule'].upper()} a={cfg['alpha']}"
        if cfg["schedule"] == "wsd":  # the paper draws WSD's decay start
            t_stable = wsd_t_stable(warmup_iters=cfg["warmup_iters"], max_iters=cfg["max_iters"],
                                    stable_ratio=cfg["stable_ratio"])
        records = [r for r in read_jsonl(log_path) if any(k.startswith("sharpness_") for k in r)]
        if not records:
            raise SystemExit(f"error: {log_path} has no sharpness records; train with --sharpness_interval=N")
        for name in ("pretrain", "sft"):
            points = [(r["step"], r[f"sharpness_{name}"], r[f"sharpness_{name}_stderr"])
                      for r in records if f"sharpness_{name}" in r]
            if points:
                curves.setdefault(name, {})[label] = points
        final[label] = records[-1].get("sharpness_pretrain")
        summary = os.path.join(run_dir, "sft", "summary.json")
        if os.path.isfile(summary):
            with open(summary) as f:
                scores[label] = json.load(f).get("sft_task_avg")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, runs in curves.items():
        written[f"fig3_{name}"] = plot_sharpness_curves(runs, t_stable, os.path.join(out_dir, f"fig3_sharpness_{name}.png"))
    points = {k: (final[k], v) for k, v in scores.items() if v is not None and final[k] is not None}
    if len(points) >= 2:
        path = os.path.join(out_dir, "fig4_sharpness_vs_sft.png")
        written["fig4"], written["pearson_r"] = path, plot_sharpness_vs_score(points, path)
    else:
        print(f"note: Figure 4 needs sft/summary.json (python sft.py) in at least 2 runs; found {len(points)}")
    return written


# --------------------------------------------------------------------------- CLI

@dataclass
class SharpnessConfig:
    ckpt: str = "out/ckpt.pt"  # checkpoint written by train.py
    datasets: str = "pretrain,sft"  # comma list: pretrain (val split) and/or sft (held-out conversations)
    pretrain_data: str = ""  # prepared data dir; empty: the checkpoint's training data set
    pretrain_split: str = "val"  # val: held-out text (the paper) | train: the training text itself
    sft_data: str = ""  # jsonl of {"messages": [...]}; empty: sft_select.jsonl beside the testbed's corpus
    seq_len: int = 0  # tokens per sequence; 0: the checkpoint's training seq_len (the paper: 1024)
    batch_size: int = 1  # sequences per batch (the paper: 1)
    num_batches: int = 8  # batches per data set (the paper: up to 4096)
    num_samples: int = 50  # Hutchinson probes per batch (the paper: 50)
    seed: int = 0  # batch b uses probe seed seed + b
    probes_per_call: int = 0  # probes vmapped per HVP call; 0: auto (auto_probes_per_call)
    compile: bool = False  # torch.compile the HVP: faster per probe, after a compile of a minute or more
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str = ""  # JSON path; empty: sharpness.json next to the checkpoint
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


def load_model(ckpt, device):
    """The checkpoint's model in float32 (a state saved in bf16 is converted, and said so)."""
    model = Llama(LlamaConfig.from_dict(ckpt["model_config"]))
    low = sorted({str(t.dtype) for t in ckpt["model"].values() if t.is_floating_point() and t.dtype != torch.float32})
    if low:
        print(f"note: the checkpoint holds {', '.join(low)} weights; measuring them converted to float32")
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def data_sources(cfg, ckpt):
    """{"pretrain": prepared dir, "sft": jsonl path} for the requested data sets. By default
    the pre-training data is the checkpoint's, and the SFT data its testbed's held-out
    conversations (sft_select.jsonl in the parent of the corpus directory)."""
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
        path = cfg.sft_data or os.path.join(os.path.dirname(os.path.normpath(pretrain_dir)), "sft_select.jsonl")
        if not os.path.isfile(path):
            raise SystemExit(f"error: no SFT data at {path}; pass --sft_data=<jsonl with a \"messages\" field> "
                             f"or --datasets=pretrain")
        sources["sft"] = path
    return sources


def main(cfg):
    if cfg.figures:
        written = draw_figures(cfg.figures.split(","), cfg.figures_dir)
        for key, value in written.items():
            print(f"{key}: {value}")
        return written
    ckpt = load_checkpoint(cfg.ckpt)
    device = resolve_device(cfg.device)
    seq_len = cfg.seq_len or ckpt["config"]["seq_len"]
    model = load_model(ckpt, device)
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    results = {}
    for name, path in data_sources(cfg, ckpt).items():
        try:
            if name == "pretrain":
                batches = pretrain_batches(path, seq_len, cfg.batch_size, cfg.num_batches, cfg.pretrain_split)
            else:
                batches = sft_batches(path, tokenizer, seq_len, cfg.batch_size, cfg.num_batches)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: cannot use the {name} data at {path}: {e}") from None
        print(f"{name}: {len(batches)} batches of {cfg.batch_size} x <= {seq_len} tokens from {path}, "
              f"{cfg.num_samples} probes each")
        eta = Eta(len(batches))

        def progress(done, total, record):
            print(f"  {name} batch {done}/{total}: Tr(H) {record['trace']:.4g} +- {record['stderr']:.2g} "
                  f"(loss {record['loss']:.3f}, {record['tokens']} tokens) | ETA {eta(done)}", flush=True)

        eta(0)
        results[name] = model_sharpness(model, batches, cfg.num_samples, cfg.seed, progress, cfg.probes_per_call,
                                        cfg.compile)
        results[name]["data"] = path if name == "sft" else f"{path} ({cfg.pretrain_split} split)"
        r = results[name]
        print(f"{name}: sharpness Tr(H) = {r['trace']:.4g} +- {r['stderr']:.2g} (stderr over {r['stderr_over']}; "
              f"{format_duration(r['seconds'])})")
    out = cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "sharpness.json")
    settings = {**asdict(cfg), "seq_len": seq_len, "device": device, "loss_normalization": LOSS_NORMALIZATION}
    report = {"ckpt": os.path.abspath(cfg.ckpt), "step": ckpt.get("step"), "settings": settings, "results": results}
    write_atomic(out, (json.dumps(report, indent=1) + "\n").encode())
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main(parse_args(SharpnessConfig, description=__doc__))
