"""
Pre-training and mid-training of a Llama-3 model with the paper's LR schedules
(Sections 2.4, 3.1, 4.1; Appendices B, C, G).

    python train.py --schedule=wso                    # WSO on the offline testbed
    python train.py --schedule=wsd --alpha=0.1        # Eq. 4, decay to 10% of eta_max
    python train.py --stage=mid --init_from=out/ckpt.pt --dataset=testbed_mid \
                    --alpha_mid=1.0 --out_dir=out-mid # Eq. 11
    python train.py --keep_every=100                  # also keep out/ckpt_000100.pt, ... (for merge.py)
    python train.py --stage=cooldown --init_from=out/ckpt_000400.pt --max_iters=100 \
                    --alpha=0.0 --out_dir=out-cool    # WSO + cooldown: decay over steps 401..500
    torchrun --nproc_per_node=2 train.py ...          # DDP (gloo on CPU, NCCL on CUDA)
    python train.py --help                            # every option and its default

Writes out_dir/ckpt.pt (weights, optimizer, RNG states, data position, config) and
out_dir/log.jsonl (one JSON object per logged step; eval records carry val_loss).
With --keep_every=N it also keeps out_dir/ckpt_<step:06d>.pt every N steps: full
checkpoints, to merge (merge.py) or to branch a cooldown from (stage=cooldown).
"""

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import schedules
from common import (Eta, append_jsonl, autocast_context, load_checkpoint, parse_args, resolve_device,
                    rng_state, save_checkpoint, set_rng_state, truncate_log)
from data.common import Tokenizer, load_meta, load_split
from model import PRESETS, Llama, LlamaConfig, build_config

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "testbed"  # testbed | testbed_mid | fineweb_edu | path to a prepared dir
    out_dir: str = "out"  # where ckpt.pt and log.jsonl go
    # model
    preset: str = "tiny"  # tiny | 125m | 350m | 1b | 8b (model.PRESETS)
    # LR schedule (schedules.py)
    stage: str = "pre"  # pre: Eq. 4/5/9/10; mid: Eq. 11 from a pre-training checkpoint; cooldown: from a WSO one
    schedule: str = "wso"  # wso | wsd | cosine | linear
    learning_rate: float = 3e-3  # eta_max (the paper: 3e-4 for 1B/8B; 3e-3 suits the tiny testbed model)
    alpha: float = 0.1  # alpha_pre, minimum-LR factor of the decay schedules and the cooldown (wso ignores it)
    warmup_iters: int = 60  # T_warmup
    max_iters: int = 600  # T_pre (stage=pre), T_mid (stage=mid) or the cooldown length M: optimizer updates
    stable_ratio: float = 0.75  # rho of WSD: T_stable = T_warmup + rho * (T_pre - T_warmup)
    cooldown: str = "linear"  # decay shape of WSD and stage=cooldown: linear (the paper) | 1-sqrt | cosine
    alpha_mid: float = 1.0  # Eq. 11: 0 decays linearly to zero, 1 keeps the LR constant
    # batch: tokens per update = batch_size * seq_len * grad_accum * world_size
    batch_size: int = 32  # sequences per micro-batch per process
    seq_len: int = 128
    tokens_per_step: int = 0  # global tokens per update; 0 means one micro-batch per process
    # AdamW (Table 6)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # system
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, else fp32) | float32 | bfloat16
    compile: bool = True  # torch.compile the training step's model
    # logging, evaluation, checkpoints
    log_interval: int = 10  # steps between log lines and log.jsonl records
    eval_interval: int = 100  # steps between validation losses (and at the end)
    eval_tokens: int = 65536  # fixed held-out tokens used for val_loss
    checkpoint_interval: int = 0  # steps between checkpoints; 0 means at every eval
    keep_every: int = 0  # also keep out_dir/ckpt_<step>.pt every N steps (merge.py, stage=cooldown); 0 = off
    init_from: str = "scratch"  # scratch | resume (out_dir/ckpt.pt) | path to a checkpoint
    # sharpness during training (Figure 3; sharpness.py)
    sharpness_interval: int = 0  # steps between Hessian-trace measurements (and at the end); 0 = off
    sharpness_batches: int = 4  # fixed held-out sequences per data set (the paper: up to 4096)
    sharpness_samples: int = 20  # Hutchinson probes per sequence (the paper: 50)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        if self.stage not in ("pre", "mid", "cooldown"):
            raise ValueError(f"stage={self.stage!r}; choose pre, mid or cooldown")
        if self.stage == "pre":
            schedules.validate_pretrain(self.schedule, warmup_iters=self.warmup_iters, max_iters=self.max_iters,
                                        alpha=self.alpha, stable_ratio=self.stable_ratio, cooldown=self.cooldown)
        else:
            if self.init_from == "scratch":
                raise ValueError(f"stage={self.stage} continues a pre-training run: pass --init_from=<its checkpoint>")
            if not 0.0 <= self.alpha_mid <= 1.0:
                raise ValueError(f"alpha_mid={self.alpha_mid} is outside [0, 1]")
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha={self.alpha} is outside [0, 1]")
            if self.cooldown not in schedules.COOLDOWNS:
                raise ValueError(f"cooldown={self.cooldown!r} is not one of {schedules.COOLDOWNS}")
            if self.max_iters < 1:
                raise ValueError(f"max_iters={self.max_iters} must be >= 1 (T_mid, or the cooldown length)")
        for name in ("sharpness_interval", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        for name in ("batch_size", "seq_len", "log_interval", "eval_interval", "eval_tokens",
                     "sharpness_batches", "sharpness_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")


# Fields that may differ when resuming: they change what is printed or where, not the
# training trajectory. max_iters may grow: for WSO that extends a finished run exactly.
RESUMABLE_CHANGES = {"out_dir", "init_from", "log_interval", "eval_interval", "eval_tokens",
                     "checkpoint_interval", "keep_every", "compile", "max_iters", "sharpness_interval",
                     "sharpness_batches", "sharpness_samples"}
# A cooldown branch continues the run of its checkpoint: beyond those, only its stage and
# decay (shape and alpha) differ, and max_iters becomes its length M.
BRANCH_CHANGES = RESUMABLE_CHANGES | {"stage", "cooldown", "alpha"}


# ---------------------------------------------------------------------------- data

def resolve_dataset(name):
    """A data set name -> its prepared directory; the testbed is generated on first use."""
    named = {"testbed": "testbed/pretrain", "testbed_mid": "testbed/mid", "fineweb_edu": "fineweb_edu"}
    if name in named:
        path = os.path.join(DATA_DIR, named[name])
        if name.startswith("testbed"):
            from data.testbed.prepare import is_prepared, prepare
            if not is_prepared(os.path.join(DATA_DIR, "testbed")):
                prepare(os.path.join(DATA_DIR, "testbed"))
        if not os.path.exists(os.path.join(path, "meta.json")):
            raise SystemExit(f"error: data set {name!r} is not prepared; run python data/{name}/prepare.py --help")
        return path
    if os.path.exists(os.path.join(name, "meta.json")):
        return name
    raise SystemExit(f"error: unknown data set {name!r}: use one of {sorted(named)} "
                     f"or a directory holding a prepared meta.json")


class TokenWindows:
    """Training batches: the token stream cut into windows of seq_len + 1 tokens, each
    epoch in a new seeded order (and a seeded shift of the window grid, so boundaries
    move). Sample k is a pure function of (seed, k): the data position is just the
    number of samples consumed, which makes resuming and DDP splitting exact."""

    def __init__(self, shards, seq_len, seed):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        # (len - T) // T windows fit in a shard whatever the shift in [0, T).
        counts = np.array([max((len(s) - seq_len) // seq_len, 0) for s in shards])
        self.first_window = np.concatenate([[0], np.cumsum(counts)])
        self.num_windows = int(counts.sum())
        if self.num_windows == 0:
            total = sum(len(s) for s in shards)
            raise SystemExit(f"error: the training split has {total} tokens, too few for one window of "
                             f"seq_len={seq_len} (need >= {2 * seq_len}); lower --seq_len or prepare more data")
        self._epoch, self._order, self._shift = None, None, None

    def _start_epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        self._epoch, self._order, self._shift = epoch, rng.permutation(self.num_windows), int(rng.integers(self.seq_len))

    def batch(self, first_sample, batch_size):
        rows = []
        for k in range(first_sample, first_sample + batch_size):
            epoch, i = divmod(k, self.num_windows)
            if epoch != self._epoch:
                self._start_epoch(epoch)
            w = int(self._order[i])
            shard = int(np.searchsorted(self.first_window, w, side="right")) - 1
            start = self._shift + (w - self.first_window[shard]) * self.seq_len
            rows.append(self.shards[shard][start:start + self.seq_len + 1])
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        return xy[:, :-1], xy[:, 1:]


def validation_batches(shards, seq_len, eval_tokens, batch_size):
    """Fixed held-out tokens: the first eval_tokens of the val split, in order."""
    tokens = np.concatenate([np.asarray(s[:eval_tokens + 1]) for s in shards])[:eval_tokens + 1]
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        raise SystemExit(f"error: the val split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
    x = torch.from_numpy(tokens[:n * seq_len].astype(np.int64)).view(n, seq_len)
    y = torch.from_numpy(tokens[1:n * seq_len + 1].astype(np.int64)).view(n, seq_len)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def sharpness_data(cfg, data_dir, tokenizer):
    """{data set: fixed batches} on which train.py measures sharpness: held-out pre-training
    tokens, and the SFT selection conversations when the data set is a testbed corpus."""
    import sharpness
    sets = {"pretrain": sharpness.pretrain_batches(data_dir, cfg.seq_len, 1, cfg.sharpness_batches)}
    sft_path = os.path.join(os.path.dirname(os.path.normpath(data_dir)), "sft_select.jsonl")
    if os.path.isfile(sft_path):
        sets["sft"] = sharpness.sft_batches(sft_path, tokenizer, cfg.seq_len, 1, cfg.sharpness_batches)
    return sets


# ------------------------------------------------------------------ training parts

def make_optimizer(model, cfg, device):
    """AdamW (Table 6). Weight decay on matrices only: RMSNorm gains are scales that
    the following normalization makes scale-free, and decaying them to 0 fights that
    (nanoGPT, OLMo and Llama recipes do the same)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(step, cfg, mid):
    """The learning rate of update `step` (1-based, global across stages)."""
    if cfg.stage == "pre":
        return schedules.pretrain_lr(step, cfg.schedule, lr_max=cfg.learning_rate, warmup_iters=cfg.warmup_iters,
                                     max_iters=cfg.max_iters, alpha=cfg.alpha, stable_ratio=cfg.stable_ratio,
                                     cooldown=cfg.cooldown)
    if cfg.stage == "cooldown":
        return schedules.cooldown_lr(step, lr_max=mid["lr_end_of_pretraining"], t_stable=mid["pretrain_iters"],
                                     cooldown_iters=cfg.max_iters, alpha=cfg.alpha, cooldown=cfg.cooldown)
    return schedules.midtrain_lr(step, lr_end_of_pretraining=mid["lr_end_of_pretraining"],
                                 pretrain_iters=mid["pretrain_iters"], mid_iters=cfg.max_iters, alpha_mid=cfg.alpha_mid)


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """Mean next-token loss over the fixed validation tokens."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


def train_step(model, optimizer, data, first_sample, cfg, ctx):
    """One optimizer update: grad_accum micro-batches, clip, AdamW. Returns (loss, grad_norm)
    before the update, or raises FloatingPointError leaving the model untouched."""
    loss_sum = torch.zeros((), device=ctx["device"])
    for micro in range(ctx["grad_accum"]):
        sample = first_sample + (micro * ctx["world_size"] + ctx["rank"]) * cfg.batch_size
        x, y = data.batch(sample, cfg.batch_size)
        x, y = x.to(ctx["device"], non_blocking=True), y.to(ctx["device"], non_blocking=True)
        last = micro == ctx["grad_accum"] - 1
        sync = model.no_sync() if ctx["ddp"] and not last else nullcontext()
        with sync, ctx["autocast"]:
            _, loss = model(x, y)
            loss = loss / ctx["grad_accum"]
            loss.backward()
        loss_sum += loss.detach()
    if ctx["ddp"]:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    loss_value, grad_norm = loss_sum.item(), grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss={loss_value}, grad_norm={grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


def check_same_run(saved, cfg, may_differ, action):
    mismatched = {k: (saved[k], v) for k, v in asdict(cfg).items()
                  if k not in may_differ and k in saved and saved[k] != v}
    if mismatched:
        lines = "\n".join(f"  --{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in mismatched.items())
        raise SystemExit(f"error: cannot {action}, the config differs from the checkpoint's:\n{lines}\n"
                         f"pass the checkpoint's values (or start a new run in another --out_dir)")


def check_resume_config(saved, cfg):
    check_same_run(saved, cfg, RESUMABLE_CHANGES, "resume")
    decay = "the cooldown" if cfg.stage == "cooldown" else f"schedule={cfg.schedule}"
    decays_over_max_iters = cfg.stage == "cooldown" or (cfg.stage == "pre" and cfg.schedule != "wso")
    if cfg.max_iters < saved["max_iters"] or (decays_over_max_iters and cfg.max_iters != saved["max_iters"]):
        print(f"warning: max_iters {saved['max_iters']} -> {cfg.max_iters} changes the LR of steps already "
              f"taken for {decay}; only WSO extends a run exactly")


def check_cooldown_branch(ckpt, cfg, lr_at_branch):
    """A cooldown continues the checkpoint's run from a point where its LR was constant at eta_max."""
    check_same_run(ckpt["config"], cfg, BRANCH_CHANGES, "branch a cooldown")
    if "merge" in ckpt:
        raise SystemExit(f"error: {cfg.init_from} is a merge (merge.py), which already emulates a decay; "
                         f"branch the cooldown from one of the checkpoints it merged")
    if lr_at_branch != cfg.learning_rate:
        raise SystemExit(f"error: cannot branch a cooldown from {cfg.init_from}: at its step {ckpt['step']} the LR of "
                         f"schedule={ckpt['config']['schedule']} was {lr_at_branch:.4g}, not the constant eta_max="
                         f"{cfg.learning_rate:.4g}; branch from a WSO checkpoint after warmup "
                         f"(or a WSD one before T_stable)")


def format_bytes(n):
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


# --------------------------------------------------------------------------- main

def main(cfg: TrainConfig):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    dtype, autocast = autocast_context(device, cfg.dtype)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    micro_tokens = cfg.batch_size * cfg.seq_len * world_size
    grad_accum = 1 if cfg.tokens_per_step == 0 else cfg.tokens_per_step // micro_tokens
    if cfg.tokens_per_step and (cfg.tokens_per_step % micro_tokens or grad_accum < 1):
        raise SystemExit(f"error: tokens_per_step={cfg.tokens_per_step} is not a multiple of batch_size*seq_len*"
                         f"world_size={micro_tokens}; pick e.g. {max(1, round(cfg.tokens_per_step / micro_tokens)) * micro_tokens}")
    tokens_per_update = micro_tokens * grad_accum

    # Where do we start from?
    # mid: where stage=mid or stage=cooldown leaves the pre-training run,
    # {"pretrain_iters": n, "lr_end_of_pretraining": eta(n)}
    ckpt, mid, run_config = None, None, asdict(cfg)
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        check_resume_config(ckpt["config"], cfg)
        mid = ckpt.get("mid")
        # Keep where the run started (a mid-training run's pre-training checkpoint), not "resume".
        run_config["init_from"] = ckpt["config"]["init_from"]
    elif cfg.init_from != "scratch":
        ckpt = load_checkpoint(cfg.init_from)
        if cfg.stage != "pre" and ckpt["config"]["stage"] != "pre":
            raise SystemExit(f"error: {cfg.init_from} is a stage={ckpt['config']['stage']} checkpoint; "
                             f"{'mid-training' if cfg.stage == 'mid' else 'a cooldown'} starts from a pre-training one")
        if cfg.stage != "pre":  # Eq. 11 and the cooldown continue from eta(n) of the pre-training run at its step n
            pre = TrainConfig(**{**ckpt["config"], "init_from": "scratch", "stage": "pre"})
            mid = {"pretrain_iters": ckpt["step"], "lr_end_of_pretraining": lr_at(ckpt["step"], pre, None)}
        if cfg.stage == "cooldown":
            check_cooldown_branch(ckpt, cfg, mid["lr_end_of_pretraining"])

    data_dir = resolve_dataset(cfg.dataset)
    try:
        tokenizer = Tokenizer.from_dict(load_meta(data_dir)["tokenizer"])
        train_shards, val_shards = load_split(data_dir, "train"), load_split(data_dir, "val")
    except (OSError, ValueError, KeyError) as e:  # missing, empty or inconsistent data files
        raise SystemExit(f"error: cannot use data set {cfg.dataset!r}: {e}") from None
    if ckpt is not None and Tokenizer.from_dict(ckpt["tokenizer"]) != tokenizer:
        raise SystemExit(f"error: {cfg.dataset} uses a different tokenizer/vocabulary than the checkpoint; "
                         f"prepare it with the checkpoint's tokenizer")

    if ckpt is not None:
        model_cfg = LlamaConfig.from_dict(ckpt["model_config"])
    else:
        # Presets without a vocab_size take the data's, padded to a multiple of 64 (faster matmuls).
        vocab = PRESETS[cfg.preset]["vocab_size"] or math.ceil(tokenizer.vocab_size / 64) * 64
        model_cfg = build_config(cfg.preset, vocab_size=vocab, max_seq_len=max(cfg.seq_len, 2048))
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise SystemExit(f"error: preset {cfg.preset} has vocab_size {model_cfg.vocab_size} < the data's "
                             f"{tokenizer.vocab_size}")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise SystemExit(f"error: seq_len={cfg.seq_len} > the model's max_seq_len={model_cfg.max_seq_len}")

    torch.manual_seed(cfg.seed)
    model = Llama(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    step, samples_seen, tokens_seen = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if cfg.init_from == "resume" or cfg.stage != "pre":
            optimizer.load_state_dict(ckpt["optimizer"])
        if cfg.init_from == "resume" or cfg.stage == "cooldown":  # the same run, continued
            step, samples_seen, tokens_seen = ckpt["step"], ckpt["samples_seen"], ckpt["tokens_seen"]
            set_rng_state(ckpt["rng"])
        elif cfg.stage == "mid":
            step, tokens_seen = mid["pretrain_iters"], ckpt["tokens_seen"]
    first_step = mid["pretrain_iters"] + 1 if mid else 1
    last_step = first_step + cfg.max_iters - 1
    del ckpt

    train_data = TokenWindows(train_shards, cfg.seq_len, cfg.seed)
    val_batches = validation_batches(val_shards, cfg.seq_len, cfg.eval_tokens, cfg.batch_size)

    raw_model = model  # uncompiled, unwrapped: for eval and checkpoints
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device.startswith("cuda") else None)
    ctx = dict(device=device, autocast=autocast, grad_accum=grad_accum, world_size=world_size, rank=rank, ddp=ddp)

    os.makedirs(cfg.out_dir, exist_ok=True)
    log_path, ckpt_path = os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "ckpt.pt")
    if master:
        if cfg.init_from == "resume":
            truncate_log(log_path, step)
        elif os.path.exists(log_path):
            os.remove(log_path)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"train": run_config, "model": model_cfg.to_dict(), "data_dir": data_dir}, f, indent=2)
    schedule = {"pre": cfg.schedule, "mid": f"mid alpha_mid={cfg.alpha_mid}",
                "cooldown": f"{cfg.cooldown} cooldown to alpha={cfg.alpha}"}[cfg.stage]
    log(f"{cfg.stage}-training {cfg.preset} ({raw_model.num_params():,} parameters) on {cfg.dataset}: "
        f"steps {step + 1}..{last_step}, {tokens_per_update:,} tokens/update (grad_accum={grad_accum}, "
        f"world_size={world_size}), schedule={schedule}, device={device}, dtype={dtype}, compile={cfg.compile}")
    if cfg.keep_every:
        kept = last_step // cfg.keep_every - step // cfg.keep_every
        # weights and AdamW's two moments, each the size of the parameters
        per_checkpoint = 3 * sum(p.numel() * p.element_size() for p in raw_model.parameters())
        log(f"keeping {cfg.out_dir}/ckpt_<step>.pt every {cfg.keep_every} steps: {kept} checkpoints of "
            f"~{format_bytes(per_checkpoint)}, ~{format_bytes(kept * per_checkpoint)} in all")

    def checkpoint(path=ckpt_path):
        if master:
            save_checkpoint(path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "config": run_config,
                "model_config": model_cfg.to_dict(), "tokenizer": tokenizer.to_dict(), "step": step,
                "samples_seen": samples_seen, "tokens_seen": tokens_seen, "rng": rng_state(), "mid": mid})

    def run_eval():
        val_loss = evaluate(raw_model, val_batches, device, autocast)
        log(f"step {step}: val_loss {val_loss:.4f}")
        if master:
            append_jsonl(log_path, {"step": step, "tokens": tokens_seen, "val_loss": val_loss})

    def run_sharpness():
        from sharpness import sharpness_during_training
        record = {"step": step, "tokens": tokens_seen}
        for name, batches in sharpness_sets.items():
            result = sharpness_during_training(raw_model, batches, cfg.sharpness_samples, seed=cfg.seed)
            record[f"sharpness_{name}"], record[f"sharpness_{name}_stderr"] = result["sharpness"], result["sharpness_stderr"]
            log(f"step {step}: sharpness ({name}) {result['sharpness']:.2f} +- {result['sharpness_stderr']:.2f}")
        append_jsonl(log_path, record)

    sharpness_sets = sharpness_data(cfg, data_dir, tokenizer) if cfg.sharpness_interval and master else {}
    checkpoint_interval = cfg.checkpoint_interval or cfg.eval_interval
    eta, last_time, last_tokens = Eta(last_step, step), time.perf_counter(), tokens_seen
    while step < last_step:
        lr = lr_at(step + 1, cfg, mid)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            loss, grad_norm = train_step(model, optimizer, train_data, samples_seen, cfg, ctx)
        except FloatingPointError as e:
            raise SystemExit(f"error: non-finite training values at step {step + 1} ({e}); stopped without updating. "
                             f"The last good checkpoint ({ckpt_path}) is kept: lower --learning_rate or check the data, "
                             f"then --init_from=resume") from None
        step += 1
        samples_seen += cfg.batch_size * grad_accum * world_size
        tokens_seen += tokens_per_update
        if step % cfg.log_interval == 0 or step == last_step:
            now = time.perf_counter()
            tokens_per_sec = (tokens_seen - last_tokens) / (now - last_time)
            last_time, last_tokens = now, tokens_seen
            log(f"step {step}/{last_step} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
                f"{tokens_per_sec:,.0f} tok/s | ETA {eta(step)}")
            if master:
                append_jsonl(log_path, {"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm,
                                        "tokens": tokens_seen, "tokens_per_sec": tokens_per_sec})
        if step % cfg.eval_interval == 0 or step == last_step:
            run_eval()
        if sharpness_sets and (step % cfg.sharpness_interval == 0 or step == last_step):
            run_sharpness()  # the master measures; other ranks wait at their next all-reduce
        if step % checkpoint_interval == 0 or step == last_step:
            checkpoint()
        if cfg.keep_every and step % cfg.keep_every == 0:
            checkpoint(os.path.join(cfg.out_dir, f"ckpt_{step:06d}.pt"))
    if ddp:
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main(parse_args(TrainConfig, description=__doc__))
