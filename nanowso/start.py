"""
Where a training run starts and how it is saved, for train.py: what a resume may change
(RESUMABLE_CHANGES, RECORDED_CHANGES) and the refusals that keep a resumed run the same run
(check_resume); the start itself, from scratch, a resume, mid-training or a cooldown
(starting_point, a Start record); the data, the model and AdamW it builds (load_data,
build_model); the Run the loop reads; and the checkpoint it writes (save_run). Nothing here
runs on its own.
"""

import math
import os
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch

import schedules
from data.formats import Tokenizer, load_meta, load_split
from data.loaders import TokenWindows, resolve_dataset
from model import PRESETS, Llama, LlamaConfig, build_config
from nanowso.checkpoint import (checkpoint_config, is_wsd_branch, load_checkpoint, prepare_out_dir, rng_state,
                                save_checkpoint, set_rng_state)
from nanowso.optim import load_optimizer_state, make_optimizer, own_settings
from nanowso.runtime import Runtime, fsdp

# train.py's config fields that may differ between two points of one run (a resume, the
# checkpoints tools/merge.py merges): they change what is printed or where, not the training
# trajectory. max_iters may grow: for WSO that extends a finished run exactly.
RESUMABLE_CHANGES = frozenset({"out_dir", "init_from", "overwrite", "log_interval", "eval_interval", "eval_tokens",
                               "checkpoint_interval", "keep_every", "keep_optimizer", "compile", "max_iters",
                               "sharpness_interval", "sharpness_batches", "sharpness_samples"})
# Fields a resume may change although the trajectory then differs from the resumed step on: the
# remedy for a loss that went to NaN. train.py prints and records them (log.jsonl, config.json,
# the checkpoint's "changes"). learning_rate only for stage=pre: mid-training and cooldowns take
# their LR from the pre-training checkpoint.
RECORDED_CHANGES = frozenset({"learning_rate", "grad_clip"})


def refuse_config_changes(saved, cfg, may_differ, action):
    """Exit naming every field of dataclass `cfg` outside `may_differ` that differs from the
    saved config."""
    mismatched = {k: (saved[k], v) for k, v in asdict(cfg).items()
                  if k not in may_differ and k in saved and saved[k] != v}
    if mismatched:
        lines = "\n".join(f"  --{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in mismatched.items())
        raise SystemExit(f"error: cannot {action}, the config differs from the checkpoint's:\n{lines}\n"
                         f"pass the checkpoint's values (or start a new run in another --out_dir)")


def check_resume(ckpt, cfg, world_size):
    """train.py resuming checkpoint `ckpt` with TrainConfig `cfg`: refuse what would silently
    change the run, warn about a new max_iters, return the RECORDED_CHANGES it makes
    ({field: [old, new]}), printed here."""
    saved = ckpt["config"]
    recorded = RECORDED_CHANGES if cfg.stage == "pre" else RECORDED_CHANGES - {"learning_rate"}
    refuse_config_changes(saved, cfg, RESUMABLE_CHANGES | recorded, "resume")
    changed = {k: [saved[k], getattr(cfg, k)] for k in sorted(recorded) if k in saved and saved[k] != getattr(cfg, k)}
    for k, (old, new) in changed.items():
        print(f"note: --{k} changes from {old:g} to {new:g} from step {ckpt['step'] + 1} on (recorded in log.jsonl, "
              f"config.json and the checkpoint)")
    saved_world = ckpt.get("world_size", world_size)  # older checkpoints do not say
    if cfg.tokens_per_step == 0 and saved_world != world_size:
        raise SystemExit(f"error: cannot resume: the checkpoint was trained by {saved_world} processes and this run "
                         f"has {world_size}; with tokens_per_step=0 (one micro-batch per process) that changes the "
                         f"global batch. Resume with {saved_world} processes, or fix the global batch with "
                         f"--tokens_per_step in a new run")
    if cfg.stage == "cooldown":
        decay, decays_over_max_iters = "the cooldown", True
    elif cfg.stage == "mid":
        decay, decays_over_max_iters = f"Eq. 11 with alpha_mid={cfg.alpha_mid}", cfg.alpha_mid < 1
    else:
        decay, decays_over_max_iters = f"schedule={cfg.schedule}", cfg.schedule != "wso"
    if cfg.max_iters < saved["max_iters"] or (decays_over_max_iters and cfg.max_iters != saved["max_iters"]):
        print(f"warning: max_iters {saved['max_iters']} -> {cfg.max_iters} changes the LR of steps already "
              f"taken for {decay}; only a constant LR (WSO, or alpha_mid=1) extends a run exactly")
    return changed


def resume_command(argv, init_from="resume"):
    """This process's arguments with --init_from=<init_from> in place of any --init_from."""
    return [a for a in argv if not a.startswith("--init_from=")] + [f"--init_from={init_from}"]


# ------------------------------------------------------------ where a run starts

# A cooldown branch continues the run of its checkpoint: beyond what a resume may change
# (RESUMABLE_CHANGES), only its stage and decay (shape and alpha) differ, and
# max_iters becomes its length M.
BRANCH_CHANGES = RESUMABLE_CHANGES | {"stage", "cooldown", "alpha"}


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
        return Start(model_config=model_cfg, model_state=None, optimizer_state=None, rng=None, counters=Counters(),
                     branch=None, run_config=asdict(cfg), last_step=cfg.max_iters, changes=[])
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
        changed = check_resume(ckpt, cfg, world_size)
        changes += [{"step": ckpt["step"], **changed}] if changed else []
        branch = ckpt.get("branch", ckpt.get("mid"))  # older checkpoints name it "mid"
        branch = Branch(**branch) if branch else None
    else:
        branch = branch_point(ckpt, cfg)
    if Tokenizer.from_dict(ckpt["tokenizer"]) != tokenizer:
        raise SystemExit(f"error: {cfg.dataset} uses a different tokenizer/vocabulary than the checkpoint; "
                         f"prepare it with the checkpoint's tokenizer")
    same_run = resume or cfg.stage == "cooldown"
    if same_run:
        counters = Counters(step=ckpt["step"], samples_seen=ckpt["samples_seen"], tokens_seen=ckpt["tokens_seen"])
    elif cfg.stage == "mid":  # new data from its start; steps and tokens count on
        counters = Counters(step=branch.pretrain_iters, samples_seen=0, tokens_seen=ckpt["tokens_seen"])
    else:  # stage=pre from a checkpoint's weights: a new run
        counters = Counters()
    # Keep where the run started (a mid-training run's pre-training checkpoint), not "resume".
    run_config = {**asdict(cfg), "init_from": ckpt["config"]["init_from"] if resume else cfg.init_from}
    first_step = branch.pretrain_iters + 1 if branch else 1
    if resume and counters.step >= first_step + cfg.max_iters - 1:
        raise SystemExit(nothing_to_resume(source, counters.step, first_step + cfg.max_iters - 1, cfg))
    return Start(model_config=LlamaConfig.from_dict(ckpt["model_config"]), model_state=ckpt["model"],
                 optimizer_state=ckpt["optimizer"] if resume or cfg.stage != "pre" else None,
                 rng=ckpt["rng"] if same_run else None, counters=counters, branch=branch, run_config=run_config,
                 last_step=first_step + cfg.max_iters - 1, changes=changes, sharded=ckpt.get("sharded"))


def inherit(cfg):
    """A resume or a cooldown continues the checkpoint's run: every setting the command does
    not give (parse_args records cfg.given) is the checkpoint's, but a cooldown's own length,
    decay and logging (BRANCH_CHANGES). The warmup by rule (--warmup_iters=-1) is always the
    checkpoint's: a tenth of the new --max_iters would be another run's. Read before the data
    is: --dataset is among them."""
    resume = cfg.init_from == "resume"
    if not resume and cfg.stage != "cooldown":
        return
    path = checkpoint_path(cfg) if resume else cfg.init_from
    if not (os.path.isfile(path) or os.path.isdir(path)):
        return  # read_checkpoint says what is missing
    saved, keep = checkpoint_config(path), set() if resume else BRANCH_CHANGES
    given = getattr(cfg, "given", None)  # None: built in code, every field as given
    for name, value in saved.items():
        if name in keep or not hasattr(cfg, name) or name in ("stage", "out_dir", "init_from"):
            continue
        if (name == "warmup_iters" and cfg.warmup_by_rule) or (given is not None and name not in given):
            setattr(cfg, name, value)


def nothing_to_resume(path, step, last_step, cfg):
    """The message for a resume that has no step to take (the run is finished, or --max_iters
    is below the checkpoint's step)."""
    if step == last_step:
        state = f"the run is finished: {path} holds its last step, {step}"
    else:
        state = f"{path} holds step {step}, past --max_iters={cfg.max_iters} (its last step would be {last_step})"
    extend = (" To extend it (exactly so for a constant LR) pass a larger --max_iters." if cfg.stage == "pre" else
              " A branch ends at its --max_iters; branch anew for a longer one.")
    return f"error: nothing to do: {state}.{extend}"


def prepare_run_dir(cfg):
    """out_dir ready for this run: a resume continues the run there (the directory must be
    writable); anything else is a new run, refused where a run is (checkpoint.prepare_out_dir)."""
    source = os.path.abspath(cfg.init_from)
    if (cfg.overwrite and cfg.init_from not in ("scratch", "resume")
            and os.path.dirname(source) == os.path.abspath(cfg.out_dir)):
        raise SystemExit(f"error: --overwrite=true would delete {cfg.init_from}, the checkpoint this run starts from; "
                         f"write the new run to another --out_dir")
    if cfg.init_from == "resume" and not os.path.isdir(cfg.out_dir):
        return  # nothing there to resume: read_checkpoint says so
    prepare_out_dir(cfg.out_dir, overwrite=cfg.overwrite, what="a training run", new=cfg.init_from != "resume",
                    way_on="--init_from=resume continues it")


def checkpoint_path(cfg):
    """Where this run writes its checkpoint: out_dir/ckpt.pt, or with --parallel=fsdp the
    sharded directory out_dir/ckpt_sharded."""
    return os.path.join(cfg.out_dir, "ckpt_sharded" if cfg.parallel == "fsdp" else "ckpt.pt")


def kept_path(cfg, step):
    """Where --keep_every keeps the checkpoint of `step`: out_dir/ckpt_<step:06d>.pt (or _sharded)."""
    return os.path.join(cfg.out_dir, f"ckpt_{step:06d}_sharded" if cfg.parallel == "fsdp" else f"ckpt_{step:06d}.pt")


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
    config = ckpt["config"]
    if cfg.stage == "mid" and is_wsd_branch(config, ckpt.get("branch")):  # a WSD run made as a branch of WSO's
        config = {**config, "schedule": "wsd", "max_iters": ckpt["branch"]["pretrain_iters"] + config["max_iters"]}
    elif config["stage"] != "pre":
        raise SystemExit(f"error: {cfg.init_from} is a stage={config['stage']} checkpoint; "
                         f"{'mid-training' if cfg.stage == 'mid' else 'a cooldown'} starts from a pre-training one")
    pre = SimpleNamespace(**{**config, "stage": "pre"})  # the pre-training run's config
    branch = Branch(pretrain_iters=ckpt["step"], lr_end_of_pretraining=lr_of_update(ckpt["step"], pre, None))
    if cfg.stage == "cooldown":
        check_cooldown_branch(ckpt, cfg, branch.lr_end_of_pretraining)
        schedules.validate_cooldown(alpha=cfg.alpha, cooldown_iters=cfg.max_iters, cooldown=cfg.cooldown,
                                    lr_max=branch.lr_end_of_pretraining, t_stable=branch.pretrain_iters)
    else:  # what the checkpoint brings to Eq. 11, checked once as TrainConfig checks the rest
        schedules.validate_midtrain(alpha_mid=cfg.alpha_mid, mid_iters=cfg.max_iters,
                                    pretrain_iters=branch.pretrain_iters,
                                    lr_end_of_pretraining=branch.lr_end_of_pretraining)
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


def load_data(cfg):
    """(data dir, tokenizer, train shards, val shards) of --dataset."""
    data_dir = resolve_dataset(cfg.dataset)
    try:
        tokenizer = Tokenizer.from_dict(load_meta(data_dir)["tokenizer"])
        return data_dir, tokenizer, load_split(data_dir, "train"), load_split(data_dir, "val")
    except (OSError, ValueError, KeyError) as e:  # missing, empty or inconsistent data files
        raise SystemExit(f"error: cannot use data set {cfg.dataset!r}: {e}") from None


def grad_accumulation(cfg, world_size):
    """Micro-batches per update, so that an update holds tokens_per_step tokens (0: one)."""
    micro_tokens = cfg.batch_size * cfg.seq_len * world_size
    grad_accum = 1 if cfg.tokens_per_step == 0 else cfg.tokens_per_step // micro_tokens
    if cfg.tokens_per_step and (cfg.tokens_per_step % micro_tokens or grad_accum < 1):
        raise SystemExit(f"error: tokens_per_step={cfg.tokens_per_step} is not a multiple of batch_size*seq_len*"
                         f"world_size={micro_tokens}; pick e.g. "
                         f"{max(1, round(cfg.tokens_per_step / micro_tokens)) * micro_tokens}")
    return grad_accum


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


def save_run(run, path, optimizer=True):
    """Write everything a resume needs, atomically (checkpoint.save_checkpoint; by the master), or
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


@dataclass
class Run:
    """Everything the training loop reads; only `counters` (and the model) change."""
    cfg: object  # train.TrainConfig
    rt: Runtime
    start: Start
    tokenizer: Tokenizer
    model: Llama  # uncompiled, unwrapped: evaluation, sharpness and checkpoints use it
    step_model: torch.nn.Module  # what the update runs: model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    train_data: TokenWindows
    val_batches: list
    sharpness_sets: dict
    grad_accum: int  # micro-batches per update
    samples_per_update: int  # batch_size * grad_accum * world_size
    log_path: str
