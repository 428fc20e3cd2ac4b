"""
Pre-training and mid-training of a Llama-3 model with the paper's LR schedules
(Sections 2.4, 3.1, 4.1; Appendices B, C, G).

    python train.py --schedule=wso                    # WSO on the offline testbed
    python train.py --schedule=wsd --alpha=0.1        # Eq. 4, decay to 10% of eta_max
    python train.py --stage=mid --init_from=out/ckpt.pt --dataset=testbed_mid \
                    --alpha_mid=1.0 --out_dir=out-mid # Eq. 11
    python train.py --keep_every=100                  # also keep out/ckpt_000100.pt, ... (for tools/merge.py)
    python train.py --stage=cooldown --init_from=out/ckpt_000400.pt --max_iters=100 \
                    --alpha=0.0 --out_dir=out-cool    # WSO + cooldown: decay over steps 401..500
    torchrun --nproc_per_node=2 train.py ...          # DDP (gloo on CPU, NCCL on CUDA)
    torchrun --nproc_per_node=8 train.py --preset=8b --parallel=fsdp ...  # FSDP2 (nanowso/parallel.py)
    python train.py --help                            # every option and its default

Writes out_dir/ckpt.pt (weights, optimizer, RNG states, data position, config; with
--parallel=fsdp the directory out_dir/ckpt_sharded, which every script reads too) and
out_dir/log.jsonl (one JSON object per logged step; eval records carry val_loss).
With --keep_every=N it also keeps out_dir/ckpt_<step:06d>.pt every N steps: weights and the
run's state without AdamW's moments, what tools/merge.py needs (a third of the size); add
--keep_optimizer=true to branch a cooldown from them (stage=cooldown continues AdamW).

Reading order: TrainConfig (every option), starting_point (scratch, resume, mid-training,
cooldown), train_step (one update), main (set-up, then the loop).
"""

import json
import math
import os
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import schedules
from data.formats import Tokenizer, load_meta, load_split
from data.loaders import TokenWindows, pretrain_batches, resolve_dataset, sft_batches, testbed_of, validation_batches
from model import PRESETS, Llama, LlamaConfig, build_config
from nanowso.checkpoint import checkpoint_step, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nanowso.common import Eta, Pace, append_jsonl, format_bytes, parse_args, truncate_log
from nanowso.hessian import sharpness_during_training
from nanowso.optim import load_optimizer_state, make_optimizer, optimizer_step, own_settings, set_lr
from nanowso.runtime import Interrupts, Runtime, fsdp, setup_distributed, to_device
from nanowso.scoring import mean_loss
from nanowso.start import RESUMABLE_CHANGES, check_resume, refuse_config_changes, resume_command


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
    init_from: str = "scratch"  # scratch | resume (out_dir/ckpt.pt) | path to a checkpoint
    # sharpness during training (Figure 3; sharpness.py)
    sharpness_interval: int = 0  # steps between Hessian-trace measurements (and at the end); 0 = off
    sharpness_batches: int = 4  # fixed held-out sequences per data set (the paper: up to 4096)
    sharpness_samples: int = 20  # Hutchinson probes per sequence (the paper: 50)

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
        if self.parallel == "fsdp" and self.sharpness_interval:
            raise ValueError("sharpness_interval needs the whole model in one process, and parallel=fsdp shards it: "
                             "measure the saved checkpoints with sharpness.py instead (torchrun splits its batches)")


# A cooldown branch continues the run of its checkpoint: beyond what a resume may change
# (training.RESUMABLE_CHANGES), only its stage and decay (shape and alpha) differ, and
# max_iters becomes its length M.
BRANCH_CHANGES = RESUMABLE_CHANGES | {"stage", "cooldown", "alpha"}


# ------------------------------------------------------------ where a run starts

@dataclass
class Branch:
    """Where stage=mid or stage=cooldown leaves the pre-training run: its step n (T_pre of
    Eq. 11, T_stable of the cooldown) and its LR eta(n) there."""
    pretrain_iters: int
    lr_end_of_pretraining: float


@dataclass
class Counters:
    """How far a run is: optimizer updates (numbered globally across stages), training
    samples consumed (the data position) and tokens seen."""
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0


@dataclass
class Start:
    """What starting_point returns: the model to build and the state to load into it."""
    model_config: LlamaConfig
    model_state: dict | None  # None: a fresh initialization
    optimizer_state: dict | None  # None: a fresh AdamW
    rng: dict | None  # restored when the same run continues (resume, cooldown)
    counters: Counters
    branch: Branch | None
    run_config: dict  # saved with every checkpoint: this run's config, init_from as the run began
    last_step: int
    changes: list  # RECORDED_CHANGES made by resumes: [{"step": n, field: [old, new]}, ...]
    sharded: str | None = None  # a sharded checkpoint that holds model_state (and optimizer_state) instead


def lr_of_update(step, cfg, branch):
    """The learning rate of update `step` (1-based, global across stages)."""
    if cfg.stage == "pre":
        return schedules.pretrain_lr(step, cfg.schedule, lr_max=cfg.learning_rate, warmup_iters=cfg.warmup_iters,
                                     max_iters=cfg.max_iters, alpha=cfg.alpha, stable_ratio=cfg.stable_ratio,
                                     cooldown=cfg.cooldown)
    if cfg.stage == "cooldown":
        return schedules.cooldown_lr(step, lr_max=branch.lr_end_of_pretraining, t_stable=branch.pretrain_iters,
                                     cooldown_iters=cfg.max_iters, alpha=cfg.alpha, cooldown=cfg.cooldown)
    return schedules.midtrain_lr(step, lr_end_of_pretraining=branch.lr_end_of_pretraining,
                                 pretrain_iters=branch.pretrain_iters, mid_iters=cfg.max_iters, alpha_mid=cfg.alpha_mid)


def starting_point(cfg, tokenizer, world_size):
    """Where this run starts: from scratch; resumed from out_dir/ckpt.pt; mid-training from a
    pre-training checkpoint (its weights and optimizer, Eq. 11 from its step and LR, new data);
    or a cooldown branched from a constant-LR checkpoint (the same run continued, decaying)."""
    if cfg.init_from == "scratch":
        # Presets without a vocab_size take the data's, padded to a multiple of 64 (faster matmuls).
        vocab = PRESETS[cfg.preset]["vocab_size"] or math.ceil(tokenizer.vocab_size / 64) * 64
        model_cfg = build_config(cfg.preset, vocab_size=vocab, max_seq_len=max(cfg.seq_len, 2048))
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise SystemExit(f"error: preset {cfg.preset} has vocab_size {model_cfg.vocab_size} < the data's "
                             f"{tokenizer.vocab_size}")
        return Start(model_cfg, None, None, None, Counters(), None, asdict(cfg), cfg.max_iters, [])
    resume = cfg.init_from == "resume"
    source = checkpoint_path(cfg) if resume else cfg.init_from
    ckpt = read_checkpoint(source, cfg)
    if cfg.stage != "pre" and "optimizer" not in ckpt:
        raise SystemExit(f"error: {cfg.init_from} holds weights without AdamW's state (a checkpoint kept by "
                         f"--keep_every, or a merge of such), and stage={cfg.stage} continues the optimizer: "
                         f"branch from a full checkpoint (the run's ckpt.pt), or keep them with "
                         f"--keep_optimizer=true")
    changes = list(ckpt.get("changes", [])) if resume or cfg.stage == "cooldown" else []
    if resume:
        if cfg.warmup_by_rule:
            cfg.warmup_iters = ckpt["config"]["warmup_iters"]
        changed = check_resume(ckpt, cfg, world_size)
        changes += [{"step": ckpt["step"], **changed}] if changed else []
        branch = ckpt.get("branch", ckpt.get("mid"))  # "mid": the key's name before 2026-12
        branch = Branch(**branch) if branch else None
    else:
        branch = branch_point(ckpt, cfg)
    if Tokenizer.from_dict(ckpt["tokenizer"]) != tokenizer:
        raise SystemExit(f"error: {cfg.dataset} uses a different tokenizer/vocabulary than the checkpoint; "
                         f"prepare it with the checkpoint's tokenizer")
    same_run = resume or cfg.stage == "cooldown"
    if same_run:
        counters = Counters(ckpt["step"], ckpt["samples_seen"], ckpt["tokens_seen"])
    elif cfg.stage == "mid":  # new data from its start; steps and tokens count on
        counters = Counters(branch.pretrain_iters, 0, ckpt["tokens_seen"])
    else:  # stage=pre from a checkpoint's weights: a new run
        counters = Counters()
    # Keep where the run started (a mid-training run's pre-training checkpoint), not "resume".
    run_config = {**asdict(cfg), "init_from": ckpt["config"]["init_from"] if resume else cfg.init_from}
    first_step = branch.pretrain_iters + 1 if branch else 1
    return Start(LlamaConfig.from_dict(ckpt["model_config"]), ckpt["model"],
                 ckpt["optimizer"] if resume or cfg.stage != "pre" else None, ckpt["rng"] if same_run else None,
                 counters, branch, run_config, first_step + cfg.max_iters - 1, changes, ckpt.get("sharded"))


def checkpoint_path(cfg):
    """Where this run writes its checkpoint: out_dir/ckpt.pt, or with --parallel=fsdp the
    sharded directory out_dir/ckpt_sharded."""
    return os.path.join(cfg.out_dir, "ckpt_sharded" if cfg.parallel == "fsdp" else "ckpt.pt")


def read_checkpoint(path, cfg):
    """The checkpoint a run starts from. A sharded one read by an FSDP run gives run.pt, its
    model and optimizer standing for the shards that build_model loads into place (DCP
    reshards to this run's processes); any other pairing gives the whole dict (memory-mapped:
    the processes of one machine share its pages)."""
    if cfg.parallel == "fsdp" and fsdp().is_sharded(path):
        state = {**fsdp().load_run_state(path), "model": None, "sharded": path}
        return {**state, "optimizer": "sharded"} if fsdp().holds_optimizer(path) else state
    if cfg.init_from == "resume" and not os.path.exists(path):
        other = "ckpt.pt" if cfg.parallel == "fsdp" else "ckpt_sharded"
        if os.path.exists(os.path.join(cfg.out_dir, other)):
            raise SystemExit(f"error: {cfg.out_dir} holds {other}, written with --parallel="
                             f"{'ddp' if cfg.parallel == 'fsdp' else 'fsdp'}: resume with that")
    return load_checkpoint(path, mmap=cfg.parallel == "fsdp")


def branch_point(ckpt, cfg):
    """The Branch of a mid-training run or a cooldown from checkpoint `ckpt` (None for stage=pre)."""
    if cfg.stage == "pre":
        return None
    if ckpt["config"]["stage"] != "pre":
        raise SystemExit(f"error: {cfg.init_from} is a stage={ckpt['config']['stage']} checkpoint; "
                         f"{'mid-training' if cfg.stage == 'mid' else 'a cooldown'} starts from a pre-training one")
    pre = TrainConfig(**{**ckpt["config"], "init_from": "scratch", "stage": "pre"})
    branch = Branch(ckpt["step"], lr_of_update(ckpt["step"], pre, None))
    if cfg.stage == "cooldown":
        check_cooldown_branch(ckpt, cfg, branch.lr_end_of_pretraining)
    return branch


def check_cooldown_branch(ckpt, cfg, lr_at_branch):
    """A cooldown continues the checkpoint's run from a point where its LR was constant at eta_max."""
    refuse_config_changes(ckpt["config"], cfg, BRANCH_CHANGES, "branch a cooldown")
    if "merge" in ckpt:
        raise SystemExit(f"error: {cfg.init_from} is a merge (tools/merge.py), which already emulates a decay; "
                         f"branch the cooldown from one of the checkpoints it merged")
    if lr_at_branch != cfg.learning_rate:
        raise SystemExit(f"error: cannot branch a cooldown from {cfg.init_from}: at its step {ckpt['step']} the LR of "
                         f"schedule={ckpt['config']['schedule']} was {lr_at_branch:.4g}, not the constant eta_max="
                         f"{cfg.learning_rate:.4g}; branch from a WSO checkpoint after warmup "
                         f"(or a WSD one before T_stable)")


# ------------------------------------------------------------------ training parts

def load_data(cfg):
    """(data dir, tokenizer, train shards, val shards) of --dataset."""
    data_dir = resolve_dataset(cfg.dataset)
    try:
        tokenizer = Tokenizer.from_dict(load_meta(data_dir)["tokenizer"])
        return data_dir, tokenizer, load_split(data_dir, "train"), load_split(data_dir, "val")
    except (OSError, ValueError, KeyError) as e:  # missing, empty or inconsistent data files
        raise SystemExit(f"error: cannot use data set {cfg.dataset!r}: {e}") from None


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


def grad_accumulation(cfg, world_size):
    """Micro-batches per update, so that an update holds tokens_per_step tokens (0: one)."""
    micro_tokens = cfg.batch_size * cfg.seq_len * world_size
    grad_accum = 1 if cfg.tokens_per_step == 0 else cfg.tokens_per_step // micro_tokens
    if cfg.tokens_per_step and (cfg.tokens_per_step % micro_tokens or grad_accum < 1):
        raise SystemExit(f"error: tokens_per_step={cfg.tokens_per_step} is not a multiple of batch_size*seq_len*"
                         f"world_size={micro_tokens}; pick e.g. {max(1, round(cfg.tokens_per_step / micro_tokens)) * micro_tokens}")
    return grad_accum


def train_step(model, optimizer, data, first_sample, cfg, grad_accum, rt: Runtime):
    """One optimizer update: grad_accum micro-batches, clip, AdamW. Returns (loss, grad_norm)
    before the update, or raises FloatingPointError leaving the model untouched."""
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(grad_accum):
        sample = first_sample + (micro * rt.world_size + rt.rank) * cfg.batch_size
        x, y = (to_device(t, rt.device) for t in data.batch(sample, cfg.batch_size))
        last = micro == grad_accum - 1  # gradients are reduced across processes after the last only
        if cfg.parallel == "fsdp":
            model.set_requires_gradient_sync(last)
        sync = model.no_sync() if rt.distributed and cfg.parallel == "ddp" and not last else nullcontext()
        with sync:
            with rt.autocast:  # the forward pass only: backward runs in the forward's dtypes
                _, loss = model(x, y)
            loss = loss / grad_accum
            loss.backward()
        loss_sum += loss.detach()
    if rt.distributed:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    loss = loss_sum.item()
    return loss, optimizer_step(model, optimizer, cfg.grad_clip, loss)


def build_model(start, cfg, rt):
    """The model and AdamW of `start` on this process's device, seeded by --seed; with
    --parallel=fsdp sharded over the processes (nanowso/parallel.py), starting from the same weights."""
    torch.manual_seed(cfg.seed)
    if cfg.parallel == "fsdp":
        parallel = fsdp()
        model = parallel.shard_model(start.model_config, rt.device, bf16=rt.dtype == "bfloat16")
        optimizer = make_optimizer(model, cfg, rt.device)
        with own_settings(optimizer):  # this run's AdamW settings win, as in load_optimizer_state
            if start.sharded:
                parallel.load_sharded(start.sharded, model, optimizer if start.optimizer_state else None)
            else:  # the single-process initialization (made on rank 0 only), or a ckpt.pt's state
                initial = start.model_state
                if initial is None and rt.master:
                    initial = Llama(start.model_config).state_dict()
                parallel.load_full_state(model, optimizer, initial, start.optimizer_state)
    else:
        model = Llama(start.model_config).to(rt.device)
        optimizer = make_optimizer(model, cfg, rt.device)
        if start.model_state is not None:
            model.load_state_dict(start.model_state)
        if start.optimizer_state is not None:
            load_optimizer_state(optimizer, start.optimizer_state)  # this run's AdamW settings win
    if start.rng is not None:
        set_rng_state(start.rng)
    return model, optimizer


def log_record(run, record):
    if run.rt.master:
        append_jsonl(run.log_path, record)


def checkpoint(run, path, optimizer=True):
    """Write everything a resume needs, atomically (common.save_checkpoint; by the master), or
    with --parallel=fsdp as a sharded directory (parallel.save_sharded; by every process).
    optimizer=False leaves out AdamW's state (kept checkpoints: tools/merge.py reads weights)."""
    counters = run.start.counters
    state = {"config": run.start.run_config, "model_config": run.start.model_config.to_dict(),
             "tokenizer": run.tokenizer.to_dict(), "step": counters.step, "samples_seen": counters.samples_seen,
             "tokens_seen": counters.tokens_seen, "rng": rng_state(),
             "branch": run.start.branch and asdict(run.start.branch), "world_size": run.rt.world_size,
             "changes": run.start.changes}
    if run.cfg.parallel == "fsdp":
        fsdp().save_sharded(path, run.model, run.optimizer if optimizer else None, state)
    elif run.rt.master:
        save_checkpoint(path, {"model": run.model.state_dict(),
                               **({"optimizer": run.optimizer.state_dict()} if optimizer else {}), **state})


def measure_sharpness(run):
    """In-training sharpness on each fixed data set, printed and appended to log.jsonl."""
    counters, cfg = run.start.counters, run.cfg
    record = {"step": counters.step, "tokens": counters.tokens_seen}
    for name, batches in run.sharpness_sets.items():
        result = sharpness_during_training(run.model, batches, cfg.sharpness_samples, seed=cfg.seed, rank=run.rt.rank,
                                           world_size=run.rt.world_size)
        record[f"sharpness_{name}"], record[f"sharpness_{name}_stderr"] = result["sharpness"], result["sharpness_stderr"]
        run.rt.log(f"step {counters.step}: sharpness ({name}) {result['sharpness']:.2f} +- "
                   f"{result['sharpness_stderr']:.2f}")
    log_record(run, record)


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
        per_checkpoint = (3 if cfg.keep_optimizer else 1) * sum(p.numel() * p.element_size() for p in model.parameters())
        rt.log(f"keeping {cfg.out_dir}/ckpt_<step>.pt every {cfg.keep_every} steps: {kept} checkpoints of "
               f"~{format_bytes(per_checkpoint)}, ~{format_bytes(kept * per_checkpoint)} in all")
    return log_path


@dataclass
class Run:
    """Everything the training loop reads; only `counters` (and the model) change."""
    cfg: TrainConfig
    rt: Runtime
    start: Start
    tokenizer: Tokenizer
    model: Llama  # uncompiled, unwrapped: evaluation, sharpness and checkpoints use it
    step_model: torch.nn.Module  # what the update runs: model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    train_data: TokenWindows
    val_batches: list
    sharpness_sets: dict
    grad_accum: int
    log_path: str


def set_up(cfg):
    """The Run of `cfg`: processes, data, where it starts, the model; config.json and the
    log's first lines are written."""
    rt = setup_distributed(cfg.device, cfg.dtype, tf32=True, process_group=cfg.parallel == "fsdp")
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
    log_path = start_log(cfg, start, model, data_dir, tokens_per_update, grad_accum, rt)
    sharpness_sets = sharpness_data(cfg, data_dir, tokenizer) if cfg.sharpness_interval else {}
    return Run(cfg, rt, start, tokenizer, model, step_model, optimizer, train_data, val_batches, sharpness_sets,
               grad_accum, log_path)


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


def main(cfg: TrainConfig, argv=None):
    run = set_up(cfg)
    rt, counters, last_step = run.rt, run.start.counters, run.start.last_step
    argv = sys.argv[1:] if argv is None else argv  # for the commands printed on a stop
    ckpt_path = checkpoint_path(cfg)
    eta, pace = Eta(last_step, counters.step), Pace(counters.tokens_seen)
    interrupts, begin = Interrupts(rt), counters.step + 1
    try:
        for step in range(begin, last_step + 1):
            saved = train_one(run, step, ckpt_path, eta, pace, argv, compiling=cfg.compile and step == begin)
            if interrupts.requested():
                if not saved:
                    checkpoint(run, ckpt_path)
                interrupts.stop(f"{ckpt_path} holds step {step} of {last_step}", resume_command(argv))
    finally:
        interrupts.restore()
    if dist.is_initialized():
        dist.destroy_process_group()
    return run.model


def train_one(run, step, ckpt_path, eta, pace, argv, compiling):
    """Update `step` and what is due after it: log line, validation, sharpness, checkpoints.
    Returns whether ckpt_path was written."""
    cfg, rt, counters, last_step = run.cfg, run.rt, run.start.counters, run.start.last_step
    lr = lr_of_update(step, cfg, run.start.branch)
    set_lr(run.optimizer, lr)
    if compiling:
        rt.log("compiling the model: the first step takes a while (a minute or more on a CPU)")
        t0 = time.perf_counter()
    try:
        loss, grad_norm = train_step(run.step_model, run.optimizer, run.train_data, counters.samples_seen, cfg,
                                     run.grad_accum, rt)
    except FloatingPointError as e:
        raise SystemExit(non_finite(step, e, ckpt_path, cfg, argv)) from None
    if compiling:
        rt.log(f"compiled and took the first step in {time.perf_counter() - t0:.0f} s")
    counters.step = step
    counters.samples_seen += cfg.batch_size * run.grad_accum * rt.world_size
    counters.tokens_seen += cfg.batch_size * cfg.seq_len * run.grad_accum * rt.world_size
    if due(step, cfg.log_interval, last_step):
        record = {"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm, "tokens": counters.tokens_seen,
                  "tokens_per_sec": pace(counters.tokens_seen)}
        rt.log(f"step {step}/{last_step} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
               f"{record['tokens_per_sec']:,.0f} tok/s | ETA {eta(step)}")
        log_record(run, record)
    if due(step, cfg.eval_interval, last_step):
        val_loss = mean_loss(run.model, run.val_batches, rt.device, rt.autocast)
        rt.log(f"step {step}: val_loss {val_loss:.4f}")
        log_record(run, {"step": step, "tokens": counters.tokens_seen, "val_loss": val_loss})
    if run.sharpness_sets and due(step, cfg.sharpness_interval, last_step):
        measure_sharpness(run)  # every rank measures its share of the batches
    if cfg.keep_every and step % cfg.keep_every == 0:
        kept = f"ckpt_{step:06d}_sharded" if cfg.parallel == "fsdp" else f"ckpt_{step:06d}.pt"
        checkpoint(run, os.path.join(cfg.out_dir, kept), optimizer=cfg.keep_optimizer)
    saved = due(step, cfg.checkpoint_interval or cfg.eval_interval, last_step)
    if saved:  # last: a kill after it loses nothing
        checkpoint(run, ckpt_path)
    return saved


if __name__ == "__main__":
    main(parse_args(TrainConfig, description=__doc__))
