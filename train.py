"""
Pre-training and mid-training of a Llama-3 model with the paper's LR schedules
(Sections 2.4, 3.1, 4.1; Appendices B, C, G).

    python train.py --schedule=wso                    # WSO on the offline testbed, into out/
    python train.py --schedule=wsd --alpha=0.1 --out_dir=out-wsd   # Eq. 4, decay to 10% of eta_max
    python train.py --init_from=resume --out_dir=out  # continue a stopped run (settings not given: its own)
    python train.py --stage=mid --init_from=out/ckpt.pt --dataset=testbed_mid --alpha_mid=1.0 --out_dir=out-mid
    python train.py --keep_every=100 --keep_optimizer=true --out_dir=out-keep   # also keep ckpt_000100.pt, ...
    python train.py --stage=cooldown --init_from=out-keep/ckpt_000400.pt --max_iters=100 --alpha=0.0 --out_dir=out-cool
    torchrun --nproc_per_node=2 train.py ...          # DDP (gloo on CPU, NCCL on CUDA)
    torchrun --nproc_per_node=8 train.py --preset=8b --parallel=fsdp ...  # FSDP2 (nanowso/parallel.py)
    python train.py --help                            # every option and its default

Writes out_dir/ckpt.pt (weights, optimizer, RNG states, data position, config; with
--parallel=fsdp the directory out_dir/ckpt_sharded, which every script reads too) and
out_dir/log.jsonl (one JSON object per logged step; eval records carry val_loss).
With --keep_every=N it also keeps out_dir/ckpt_<step:06d>.pt every N steps: weights and the
run's state without AdamW's moments, what tools/merge.py needs (a third of the size); add
--keep_optimizer=true to branch a cooldown from them (stage=cooldown continues AdamW). A new
run into an out_dir that holds one is refused; --overwrite=true deletes the old run's files first.

Reading order: TrainConfig (every option), main (the loop, top to bottom), set_up (what
the loop reads). Where a run starts (scratch, resume, mid-training, cooldown) and how it
is saved is nanowso/start.py.
"""

import json
import os
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import schedules
from data.loaders import TokenWindows, pretrain_batches, sft_batches, testbed_of, validation_batches
from model import PRESETS
from nanowso.checkpoint import checkpoint_step
from nanowso.common import Eta, Pace, append_jsonl, format_bytes, parse_args, truncate_log
from nanowso.optim import optimizer_step, set_lr
from nanowso.runtime import Interrupts, setup_distributed, to_device
from nanowso.scoring import mean_loss
from nanowso.start import (Run, build_model, checkpoint_path, grad_accumulation, inherit, kept_path, load_data,
                           lr_of_update, prepare_run_dir, resume_command, save_run, starting_point)
from sharpness import adam_denominators, preconditioned_sharpness, sharpness_during_training


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
    warmup_iters: int = -1  # T_warmup; -1: max_iters // 10 (60 of 600; a resume keeps its checkpoint's)
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
    parallel: str = "ddp"  # under torchrun: ddp (a replica per process) | fsdp (sharded, nanowso/parallel.py: 1b, 8b)
    # logging, evaluation, checkpoints
    log_interval: int = 10  # steps between log lines and log.jsonl records
    eval_interval: int = 100  # steps between validation losses (and at the end)
    eval_tokens: int = 65536  # fixed held-out tokens used for val_loss
    checkpoint_interval: int = 0  # steps between checkpoints; 0 means at every eval
    keep_every: int = 0  # also keep out_dir/ckpt_<step>.pt every N steps (tools/merge.py, stage=cooldown); 0 = off
    keep_optimizer: bool = False  # kept checkpoints also hold AdamW's state (3x the size): a cooldown needs it
    init_from: str = "scratch"  # scratch | resume (out_dir/ckpt.pt; settings not given: the checkpoint's) | a path
    overwrite: bool = False  # a new run into an out_dir holding one: delete that run's files first
    # sharpness during training (Figure 3; sharpness.py)
    sharpness_interval: int = 0  # steps between Hessian-trace measurements (and at the end); 0 = off
    sharpness_batches: int = 4  # fixed held-out sequences per data set (the paper: up to 4096)
    sharpness_samples: int = 20  # Hutchinson probes per sequence (the paper: 50)
    sharpness_preconditioned: bool = False  # also Tr(D^-1 H) on the held-out batches, D AdamW's denominators then

    def __post_init__(self):
        self.warmup_by_rule = self.warmup_iters == -1  # not a field: never saved or compared
        if self.warmup_by_rule:
            self.warmup_iters = self.max_iters // 10
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        if self.stage not in ("pre", "mid", "cooldown"):
            raise ValueError(f"stage={self.stage!r}; choose pre, mid or cooldown")
        if self.stage != "pre" and self.init_from == "scratch":
            raise ValueError(f"stage={self.stage} continues a pre-training run: pass --init_from=<its checkpoint>")
        if self.stage == "pre":
            schedules.validate_pretrain(self.schedule, warmup_iters=self.warmup_iters, max_iters=self.max_iters,
                                        alpha=self.alpha, stable_ratio=self.stable_ratio, cooldown=self.cooldown)
        elif self.stage == "mid":
            schedules.validate_midtrain(alpha_mid=self.alpha_mid, mid_iters=self.max_iters)
        else:
            schedules.validate_cooldown(alpha=self.alpha, cooldown_iters=self.max_iters, cooldown=self.cooldown)
        for name in ("sharpness_interval", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        for name in ("batch_size", "seq_len", "log_interval", "eval_interval", "eval_tokens",
                     "sharpness_batches", "sharpness_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel={self.parallel!r}; choose ddp or fsdp")
        if self.sharpness_preconditioned and not self.sharpness_interval:
            raise ValueError("sharpness_preconditioned=true is measured with the in-training sharpness: "
                             "set --sharpness_interval=N too")
        if self.parallel == "fsdp" and self.sharpness_interval:
            raise ValueError("sharpness_interval needs the whole model in one process, and parallel=fsdp shards it: "
                             "measure the saved checkpoints with sharpness.py instead (torchrun splits its batches)")


def main(cfg: TrainConfig, argv=None):
    run = set_up(cfg)
    rt, counters, last_step, ckpt_path = run.rt, run.start.counters, run.start.last_step, checkpoint_path(cfg)
    argv = sys.argv[1:] if argv is None else argv  # for the commands printed on a stop
    eta, pace, interrupts = Eta(last_step, counters.step), Pace(counters.tokens_seen), Interrupts(rt)
    first, t0 = counters.step + 1, time.perf_counter()
    try:
        for step in range(first, last_step + 1):
            # the learning rate of this update (schedules.py: Eq. 4, 5, 9, 10 or 11)
            lr = lr_of_update(step, cfg, run.start.branch)
            set_lr(run.optimizer, lr)
            # forward-backward: grad_accum micro-batches; gradients are reduced across processes after the last
            loss_sum = torch.zeros((), device=rt.device)
            for micro in range(run.grad_accum):
                sample = counters.samples_seen + (micro * rt.world_size + rt.rank) * cfg.batch_size
                x, y = (to_device(t, rt.device) for t in run.train_data.batch(sample, cfg.batch_size))
                with gradient_sync(run, last=micro == run.grad_accum - 1):
                    with rt.autocast:  # the forward pass only: backward runs in the forward's dtypes
                        _, loss = run.step_model(x, y)
                    loss = loss / run.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            if rt.distributed:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            loss = loss_sum.item()
            # step: clip the gradient norm, refuse a NaN or inf, AdamW
            try:
                grad_norm = optimizer_step(run.step_model, run.optimizer, cfg.grad_clip, loss)
            except FloatingPointError as e:
                raise SystemExit(non_finite(step, e, ckpt_path, cfg, argv)) from None
            if cfg.compile and step == first:
                rt.log(f"compiled and took the first step in {time.perf_counter() - t0:.0f} s")
            counters.step, counters.samples_seen = step, counters.samples_seen + run.samples_per_update
            counters.tokens_seen += run.samples_per_update * cfg.seq_len
            if due(step, cfg.log_interval, last_step):  # log
                record = {"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm,
                          "tokens": counters.tokens_seen, "tokens_per_sec": pace(counters.tokens_seen)}
                rt.log(f"step {step}/{last_step} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
                       f"{record['tokens_per_sec']:,.0f} tok/s | ETA {eta(step)}")
                log_record(run, record)
            if due(step, cfg.eval_interval, last_step):  # evaluate: the held-out loss, and sharpness where asked
                val_loss = mean_loss(run.model, run.val_batches, rt.device, rt.autocast)
                rt.log(f"step {step}: val_loss {val_loss:.4f}")
                log_record(run, {"step": step, "tokens": counters.tokens_seen, "val_loss": val_loss})
            if run.sharpness_sets and due(step, cfg.sharpness_interval, last_step):
                measure_sharpness(run)  # every rank measures its share of the batches
            # checkpoint: kept ones (tools/merge.py, cooldowns), then ckpt.pt last: a kill after it loses nothing
            if cfg.keep_every and step % cfg.keep_every == 0:
                save_run(run, kept_path(cfg, step), optimizer=cfg.keep_optimizer)
            if saved := due(step, cfg.checkpoint_interval or cfg.eval_interval, last_step):
                save_run(run, ckpt_path)
            if interrupts.requested():  # Ctrl-C or SIGTERM: stop at this step's end, with a checkpoint
                if not saved:
                    save_run(run, ckpt_path)
                interrupts.stop(f"{ckpt_path} holds step {step} of {last_step}", resume_command(argv))
    finally:
        interrupts.restore()
    if dist.is_initialized():
        dist.destroy_process_group()
    rt.log(f"done: {ckpt_path} holds step {last_step}; log in {run.log_path}")
    return run.model


# ------------------------------------------------------------------ what the loop reads

def set_up(cfg):
    """The Run of `cfg`: processes, data, where it starts, the model; config.json and the
    log's first lines are written."""
    inherit(cfg)  # a resume or a cooldown: what the command does not say is the checkpoint's
    rt = setup_distributed(cfg.device, cfg.dtype, tf32=True, process_group=cfg.parallel == "fsdp")
    if rt.master:
        prepare_run_dir(cfg)  # a new run never lands on an old one
    grad_accum = grad_accumulation(cfg, rt.world_size)
    data_dir, tokenizer, train_shards, val_shards = load_data(cfg)
    start = starting_point(cfg, tokenizer, rt.world_size)
    if cfg.seq_len > start.model_config.max_seq_len:
        raise SystemExit(f"error: seq_len={cfg.seq_len} > the model's max_seq_len={start.model_config.max_seq_len}")
    model, optimizer = build_model(start, cfg, rt)
    train_data = TokenWindows(train_shards, cfg.seq_len, cfg.seed)
    val_batches = validation_batches(val_shards, cfg.seq_len, cfg.eval_tokens, cfg.batch_size)
    # Wrapped, then compiled, as torch documents for DDP: the compiler splits the graph at
    # DDP's gradient buckets (DDPOptimizer), so their all-reduces overlap the backward pass.
    step_model = model  # with --parallel=fsdp already sharded: FSDP2 wraps the module in place
    if rt.distributed and cfg.parallel == "ddp":
        step_model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if rt.device.startswith("cuda") else None)
    step_model = torch.compile(step_model) if cfg.compile else step_model
    tokens_per_update = cfg.batch_size * cfg.seq_len * rt.world_size * grad_accum
    if cfg.compile:
        rt.log("compiling the model: the first step takes a while (a minute or more on a CPU)")
    log_path = start_log(cfg, start, model, data_dir, tokens_per_update, grad_accum, rt)
    sharpness_sets = sharpness_data(cfg, data_dir, tokenizer) if cfg.sharpness_interval else {}
    return Run(cfg=cfg, rt=rt, start=start, tokenizer=tokenizer, model=model, step_model=step_model,
               optimizer=optimizer, train_data=train_data, val_batches=val_batches, sharpness_sets=sharpness_sets,
               grad_accum=grad_accum, samples_per_update=cfg.batch_size * grad_accum * rt.world_size,
               log_path=log_path)


def start_log(cfg, start, model, data_dir, tokens_per_update, grad_accum, rt):
    """Reset log.jsonl (a resume keeps the steps its checkpoint holds), write config.json,
    and print what this run does."""
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if rt.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if cfg.init_from == "resume":
            truncate_log(log_path, start.counters.step)
            if start.changes and start.changes[-1]["step"] == start.counters.step:  # made by this resume
                append_jsonl(log_path, {"step": start.counters.step, "changed": start.changes[-1]})
        elif os.path.exists(log_path):
            os.remove(log_path)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"train": start.run_config, "model": start.model_config.to_dict(), "data_dir": data_dir,
                       "changes": start.changes}, f, indent=2)
    schedule = {"pre": cfg.schedule, "mid": f"mid alpha_mid={cfg.alpha_mid}",
                "cooldown": f"{cfg.cooldown} cooldown to alpha={cfg.alpha}"}[cfg.stage]
    rt.log(f"{cfg.stage}-training {cfg.preset} ({model.num_params():,} parameters) on {cfg.dataset}: "
           f"steps {start.counters.step + 1}..{start.last_step}, {tokens_per_update:,} tokens/update (grad_accum="
           f"{grad_accum}, world_size={rt.world_size}), schedule={schedule}, device={rt.device}, dtype={rt.dtype}, "
           f"compile={cfg.compile}")
    if cfg.keep_every:
        kept = start.last_step // cfg.keep_every - start.counters.step // cfg.keep_every
        # weights, and with --keep_optimizer AdamW's two moments, each the size of the parameters
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        per_checkpoint = (3 if cfg.keep_optimizer else 1) * parameter_bytes
        rt.log(f"keeping {cfg.out_dir}/ckpt_<step>.pt every {cfg.keep_every} steps: {kept} checkpoints of "
               f"~{format_bytes(per_checkpoint)}, ~{format_bytes(kept * per_checkpoint)} in all")
    return log_path


def sharpness_data(cfg, data_dir, tokenizer):
    """{data set: fixed batches} on which train.py measures sharpness: held-out pre-training
    tokens (as the paper), the first tokens of the training text itself (where training seeks
    its minimum), and the SFT selection conversations when the data set belongs to a testbed."""
    sets = {"pretrain": pretrain_batches(data_dir, cfg.seq_len, 1, cfg.sharpness_batches),
            "train_text": pretrain_batches(data_dir, cfg.seq_len, 1, cfg.sharpness_batches, split="train")}
    testbed = testbed_of(data_dir)
    if testbed:
        sets["sft"] = sft_batches(os.path.join(testbed, "sft_select.jsonl"), tokenizer, cfg.seq_len, 1,
                                  cfg.sharpness_batches)
    return sets


def measure_sharpness(run):
    """In-training sharpness on each fixed data set, printed and appended to log.jsonl."""
    counters, cfg = run.start.counters, run.cfg
    record = {"step": counters.step, "tokens": counters.tokens_seen}
    for name, batches in run.sharpness_sets.items():
        result = sharpness_during_training(run.model, batches, cfg.sharpness_samples, seed=cfg.seed, rank=run.rt.rank,
                                           world_size=run.rt.world_size)
        record[f"sharpness_{name}"] = result["sharpness"]
        record[f"sharpness_{name}_stderr"] = result["sharpness_stderr"]
        run.rt.log(f"step {counters.step}: sharpness ({name}) {result['sharpness']:.2f} +- "
                   f"{result['sharpness_stderr']:.2f}")
    if cfg.sharpness_preconditioned and run.optimizer.state:  # AdamW has stepped: it has denominators
        # the same held-out batches, measured whole in each process (sharpness.py --preconditioned's numbers)
        denominators = adam_denominators(run.model, run.optimizer.state_dict())
        result = preconditioned_sharpness(run.model, denominators, run.sharpness_sets["pretrain"],
                                          cfg.sharpness_samples, cfg.seed)
        record["sharpness_preconditioned"], record["sharpness_preconditioned_stderr"] = result["trace"], result["stderr"]
        run.rt.log(f"step {counters.step}: Tr(D^-1 H) (pretrain) {result['trace']:.4g} +- {result['stderr']:.2g}")
    log_record(run, record)


def gradient_sync(run, last):
    """Whether this micro-batch's backward reduces gradients across processes: only the
    last one's does (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if run.cfg.parallel == "fsdp":
        run.step_model.set_requires_gradient_sync(last)
    return run.step_model.no_sync() if run.rt.distributed and run.cfg.parallel == "ddp" and not last else nullcontext()


def log_record(run, record):
    if run.rt.master:
        append_jsonl(run.log_path, record)


def due(step, interval, last_step):
    """Whether something done every `interval` steps (and at the end) is due after `step`."""
    return step % interval == 0 or step == last_step


def non_finite(step, error, ckpt_path, cfg, argv):
    """The error for a NaN or inf at `step`: which checkpoint is kept, and a command that goes on."""
    lower = [a for a in argv if not a.startswith("--learning_rate=")] + [f"--learning_rate={cfg.learning_rate / 2:g}"]
    if os.path.exists(ckpt_path) and cfg.stage != "pre":  # Eq. 11 and the cooldown take eta from the branch point
        advice = (f"{ckpt_path} (step {checkpoint_step(ckpt_path)}) is kept. stage={cfg.stage} takes its LR from the "
                  f"pre-training checkpoint, so check the data, or branch from an earlier checkpoint; to retry as is:"
                  f"\n  python train.py {shlex.join(resume_command(argv))}")
    elif os.path.exists(ckpt_path):
        advice = (f"{ckpt_path} (step {checkpoint_step(ckpt_path)}) is kept. To go on from it with half the LR "
                  f"(or check the data):\n  python train.py {shlex.join(resume_command(lower))}")
    else:
        advice = (f"No checkpoint was written yet (one is at every --eval_interval). Start again with half the "
                  f"LR (or check the data):\n  python train.py {shlex.join(lower)}")
    return f"error: non-finite training values at step {step} ({error}); stopped without updating. {advice}"


if __name__ == "__main__":
    main(parse_args(TrainConfig, description=__doc__))
