r"""
Supervised fine-tuning (SFT) with the paper's learning-rate sweep (Section 3.1; Appendix D, Table 8).

    python sft.py --init_from=out/ckpt.pt                      # the testbed: sweep, select, test
    python sft.py --init_from=out/ckpt.pt --learning_rate=8.5e-4  # one LR instead of the sweep
    python sft.py --init_from=out-1b/ckpt.pt --dataset=tulu3 --lrs=paper --global_batch_size=128 \
                  --epochs=1 --warmup_iters=100 --compile=true --out_dir=sft-1b   # Table 8 as printed
    python sft.py --init_from=out/ckpt.pt --dataset=my_chats.jsonl   # any file with a `messages` column
    torchrun --nproc_per_node=8 sft.py --init_from=out-1b/ckpt.pt ...  # DDP: micro-batches split over 8
    torchrun --nproc_per_node=8 sft.py --init_from=out-8b/ckpt.pt --parallel=fsdp ...  # FSDP2 (nanowso/parallel.py)
    python sft.py --help                                       # every option and its default

Every peak LR of the sweep fine-tunes all parameters of the same checkpoint, with a fresh
AdamW, for `epochs` passes over the training conversations in a seeded order: warmup, then
cosine to 0 (schedules.sft_lr). Conversations are rendered with the tulu chat template
(data/chat.py) and cut to seq_len tokens; only assistant content + eos is in the loss, a mean
over the supervised tokens of each global batch. Micro-batches are padded to their longest
conversation (labels IGNORE_INDEX on padding), not packed: no conversation ever sees another.
Data sets:
    testbed    train on sft_train.jsonl; the task average on sft_select.jsonl chooses the LR;
               the task average on sft_test.jsonl (people never seen in SFT) is the score:
               SFT Task Avg as study/tables.py's sft_task_avg defines it, 100 x the mean of exact match
               and choice (nanowso/scoring.py's testbed_sft_accuracy)
    tulu3      allenai/tulu-3-sft-olmo-2-mixture (train split), split 9:1 (seeded) into
               train and validation as the paper does; the LR is chosen by validation loss, or
               as the paper chose it with --select_by=alpaca_eval --judge=...: the win rate over
               the lowest LR's outputs (nanowso/judge.py; the paper's reference is the WSO sweep's)
    a file     .jsonl/.json/.parquet with a `messages` column: like tulu3
    a folder   a testbed made by data/testbed/prepare.py --out_dir=...: like testbed

Writes out_dir/lr_<lr>/{ckpt.pt, log.jsonl, result.json} per LR (result.json last: an LR
that has it is skipped when the sweep is rerun), out_dir/config.json, and out_dir/summary.json:
    dataset, init_from, init {schedule, alpha_pre, alpha_mid, stage, step}: what was fine-tuned
               (nanowso/checkpoint.py's schedule_of: alpha_pre is 1.0 for WSO, alpha_mid null before mid-training)
    select_by, higher_is_better: the metric that chose the LR
    best_lr, best_ckpt: the chosen LR and its fine-tuned checkpoint
    best_lr_at_edge: whether best_lr is the lowest or highest of several LRs (also warned)
    sft_task_avg: sft_test_task_avg of the chosen LR (testbed; null for other data)
    data {train, val, train_without_supervision, val_without_supervision, updates_per_lr}
    runs: one per LR, ascending: {lr, run_dir, steps, diverged_at_step, final_train_loss,
          val_loss, sft_{select,test}_{exact_match,choice,type_match} in [0, 1], sft_{select,test}_task_avg
          = 50 x (exact_match + choice), sft_task_avg, sft_test_by_attribute (the three per
          attribute: scoring.testbed_sft_accuracy)} (null without a testbed; a diverged run
          has null metrics and is never chosen), with --select_by=alpaca_eval
          alpaca_eval, alpaca_eval_stderr (every verdict in lr_<lr>/alpaca_eval.jsonl), and
          pretrain_val_loss, forgetting, forgetting_tokens, pretrain_val_loss_before: the loss on
          the first --forgetting_tokens of the val split of the data the checkpoint was trained
          on (pre- or mid-training) after SFT, its rise over the initial model's, and what it
          was measured from
    pretrain_val_loss_before: the initial model's (null when not measured)

Adaptability as a learning-forgetting frontier (Watts et al. 2026, arXiv 2605.02105): each LR
of a sweep is a point (forgetting, SFT score); a schedule whose points lie up and to the left
learns more for what it forgets, which one selected score cannot show:
    python sft.py --frontier=out-wso-sft,out-wsd-sft --frontier_path=frontier.png

Reading order: SFTConfig (every option), finetune (one LR, the loop top to bottom), train_step
(one update), main (the sweep); the sweep's bookkeeping is nanowso/sweep.py.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import schedules
from data.conversations import load_data
from data.formats import Tokenizer, write_atomic, write_jsonl
from model import IGNORE_INDEX, LlamaConfig
from nanowso.checkpoint import load_checkpoint, load_model, prepare_out_dir, rng_state, save_checkpoint, schedule_of
from nanowso.common import Eta, append_jsonl, parse_args
from nanowso.judge import alpaca_rows, load_judge, model_outputs, pairwise, reference_outputs
from nanowso.optim import make_optimizer, optimizer_step, set_lr
from nanowso.runtime import Interrupts, Runtime, fsdp, setup_distributed, to_device
from nanowso.scoring import testbed_sft_accuracy
from nanowso.sweep import (FINAL_LOSS_STEPS, HIGHER_IS_BETTER, Sweep, finished_runs, forgetting, forgetting_basis,
                           full_state, measure_before, micro_batches, prepare_examples, pretrain_val_batches, start_lr,
                           summarize, val_loss)
from schedules import SFT_LR_GRIDS
from study.figures import frontier_curves, plot_frontier
from study.tables import sft_task_avg


@dataclass
class SFTConfig:
    init_from: str = ""  # the checkpoint to fine-tune (train.py's ckpt.pt); required
    dataset: str = "testbed"  # testbed | tulu3 | a .jsonl/.parquet file with `messages` | a testbed folder
    out_dir: str = "out-sft"  # out_dir/lr_<lr>/ per LR, out_dir/summary.json
    # the LR sweep (Table 8)
    lrs: str = "testbed"  # peak LRs, comma-separated, or a named grid: testbed | hmm | paper (Table 8's)
    learning_rate: float = 0.0  # one peak LR instead of the sweep; 0 uses --lrs
    select_by: str = "auto"  # sft_select_task_avg | sft_select_exact_match | val_loss | alpaca_eval; auto: the first on a testbed, else val_loss
    # --select_by=alpaca_eval (nanowso/judge.py): the judge, what it compares with, on which instructions
    judge: str = ""  # a local HF model dir | an OpenAI-compatible URL | module:callable
    judge_model: str = ""  # the model name an OpenAI-compatible judge server serves
    judge_reference: str = "lowest"  # lowest (this sweep's lowest LR: the paper's, for the WSO sweep) | a checkpoint | an outputs .jsonl
    judge_data: str = ""  # AlpacaEval rows (.jsonl/.json/.parquet with `instruction`); "" the Hub's 805
    judge_limit: int = 0  # judge only the first N instructions (0: all)
    # schedule and batch: the testbed's 450 training conversations need more passes and smaller
    # batches than Table 8's ~845k: 10 epochs x 450 / 32 = 141 updates (the paper: ~6.6k)
    warmup_iters: int = 20  # updates of linear warmup before the cosine to 0 (the paper: 100)
    epochs: int = 10  # passes over the training conversations (the paper: 1)
    global_batch_size: int = 32  # sequences per update (the paper: 128)
    batch_size: int = 32  # sequences per micro-batch; global_batch_size / batch_size micro-batches per update
    seq_len: int = 2048  # render(max_len=seq_len): a longer conversation is cut; cut conversations are counted
    max_train: int = 0  # Tulu 3 or a file: only the first N training conversations of the seeded split (0: all)
    max_val: int = 0  # likewise for the validation conversations that choose the LR (0: all)
    num_proc: int = 0  # processes that tokenize (datasets.map); 0: one per core from 10,000 conversations
    # AdamW (Table 8), a fresh state: SFT starts a new optimization
    weight_decay: float = 0.0  # Table 8
    beta1: float = 0.9  # Table 8 gives no betas or eps: pre-training's (Table 6)
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # system
    seed: int = 0  # the data order and the 9:1 train/validation split
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, else fp32) | float32 | bfloat16
    compile: bool = False  # torch.compile the training model; pays off on GPUs (on the CPU testbed: +90 s)
    parallel: str = "ddp"  # under torchrun: ddp (a replica per process) | fsdp (sharded, nanowso/parallel.py: 1b, 8b)
    log_interval: int = 10  # updates between progress lines and log.jsonl records
    checkpoint_interval: int = 100  # updates between lr_<lr>/resume.pt (weights + AdamW) inside an LR; 0: only on Ctrl-C
    overwrite: bool = False  # out_dir holds a sweep of other settings (or this one): delete its files first
    # forgetting: each fine-tuned model's loss on held-out pre-training text minus the initial model's
    forgetting_tokens: int = 65536  # tokens of the checkpoint's val split (as evaluate.py's val_loss); 0: off
    frontier: str = ""  # comma list of finished sweeps' out_dirs: draw their learning-forgetting frontier instead
    frontier_path: str = "frontier.png"  # where --frontier draws it

    def __post_init__(self):
        for name, least in (("warmup_iters", 0), ("epochs", 1), ("global_batch_size", 1), ("batch_size", 1),
                            ("log_interval", 1), ("checkpoint_interval", 0), ("num_proc", 0),
                            ("forgetting_tokens", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {least}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2: a token and the next one to predict")
        if self.global_batch_size % self.batch_size:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not a multiple of "
                             f"batch_size={self.batch_size}")
        if self.select_by not in ("auto", *HIGHER_IS_BETTER):
            raise ValueError(f"select_by={self.select_by!r}; choose auto or one of {sorted(HIGHER_IS_BETTER)}")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0 (or 0 to sweep --lrs)")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel={self.parallel!r}; choose ddp or fsdp")
        sweep_lrs(self)


# Fields that may change between a sweep and its rerun without changing any LR's result.
RERUN_CHANGES = {"out_dir", "lrs", "learning_rate", "select_by", "log_interval", "compile", "device", "judge",
                 "judge_model", "judge_reference", "judge_data", "judge_limit",
                 "checkpoint_interval", "num_proc", "parallel", "overwrite", "frontier", "frontier_path",
                 "forgetting_tokens"}  # each result records what its forgetting was measured from (or none)


def sweep_lrs(cfg):
    """The peak LRs to fine-tune with, ascending."""
    if cfg.learning_rate:
        return [cfg.learning_rate]
    if cfg.lrs in SFT_LR_GRIDS:
        return list(SFT_LR_GRIDS[cfg.lrs])
    try:
        lrs = sorted({float(text) for text in cfg.lrs.split(",")})
    except ValueError:
        raise ValueError(f"lrs={cfg.lrs!r}: give comma-separated numbers or one of {sorted(SFT_LR_GRIDS)}") from None
    if not lrs or lrs[0] <= 0 or not math.isfinite(lrs[-1]):
        raise ValueError(f"lrs={cfg.lrs!r}: every LR must be a finite number > 0")
    return lrs


# ------------------------------------------------------------------ training parts

def train_step(model, optimizer, micro_batches, cfg, rt: Runtime):
    """One update over the micro-batches; returns (loss, grad_norm, supervised tokens) or raises
    FloatingPointError before touching the weights. The loss is the mean over every supervised
    token of the global batch (each micro-batch's mean weighted by its token share), so short and
    long answers count the same wherever they fall (Tulu 3 sums per token for the same reason).
    Under torchrun process r takes micro-batches r, r + world_size, ...: DDP and FSDP average the
    processes' gradients, so each weight is scaled by world_size to keep the sum. Every process
    runs as many micro-batches (ceil(n / world_size)), a process short of one (an update whose
    count does not divide) repeating one with weight 0: FSDP gathers each block's weights in
    every forward and backward, so all processes must run the same number of them."""
    supervised = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro_batches)
    mine = [(x, y, 1.0) for x, y in micro_batches[rt.rank::rt.world_size]]
    mine += [(*micro_batches[0], 0.0)] * (-(-len(micro_batches) // rt.world_size) - len(mine))
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    for i, (x, y, weight) in enumerate(mine):
        last = i == len(mine) - 1  # DDP (and FSDP) reduce the gradients in the last backward only
        if cfg.parallel == "fsdp":
            model.set_requires_gradient_sync(last)
        with model.no_sync() if rt.distributed and cfg.parallel == "ddp" and not last else nullcontext():
            with rt.autocast:
                _, loss = model(to_device(x, rt.device), to_device(y, rt.device))
            loss = loss * (weight * int((y != IGNORE_INDEX).sum()) / supervised)
            (loss * rt.world_size).backward()
        loss_sum += loss.item()
    if rt.distributed:
        dist.all_reduce(loss_sum)  # the global batch's loss (gloo and NCCL both sum float64)
    loss_sum = loss_sum.item()
    return loss_sum, optimizer_step(model, optimizer, cfg.grad_clip, loss_sum), supervised


def finetune(lr, run_dir, sweep, identity):
    """Fine-tune from the initial weights at peak LR `lr`; returns this LR's result record.
    An attempt of the same sweep that was stopped (Ctrl-C, SIGTERM, a crash after a periodic
    save) left run_dir/resume.pt: this LR continues from it, as if never stopped."""
    cfg, model, batches = sweep.cfg, sweep.model, sweep.examples.batches
    if cfg.parallel == "fsdp":
        fsdp().reshard(model)  # the previous LR's scoring left the weights gathered: AdamW must hold the shards
    optimizer = make_optimizer(model, cfg, sweep.rt.device)  # fresh: SFT starts a new optimization
    schedules.validate_sft(lr_max=lr, warmup_iters=cfg.warmup_iters, max_iters=len(batches))
    log_path, resume_path = os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "resume.pt")
    done, losses = start_lr(lr, sweep, optimizer, log_path, resume_path, identity)
    result = {"lr": lr, "run_dir": run_dir, "steps": len(batches), "diverged_at_step": None}
    eta, last_time, tokens = Eta(len(batches), done), time.perf_counter(), 0
    for step, batch in enumerate(batches[done:], start=done + 1):
        # the learning rate of this update: warmup, then cosine to 0 (schedules.sft_lr)
        lr_now = schedules.sft_lr(step, lr_max=lr, warmup_iters=cfg.warmup_iters, max_iters=len(batches))
        set_lr(optimizer, lr_now)
        # forward-backward over the micro-batches, then the clipped AdamW step (train_step)
        try:
            loss, grad_norm, supervised = train_step(sweep.step_model, optimizer, micro_batches(sweep, batch), cfg,
                                                     sweep.rt)
        except FloatingPointError as e:  # a too-large LR: this point of the sweep failed, not the sweep
            print(f"[lr {lr:g}] non-finite values at step {step} ({e}); this LR is marked diverged")
            result.update(diverged_at_step=step, final_train_loss=None, val_loss=None,
                          **({"pretrain_val_loss": None, "forgetting": None, **forgetting_basis(sweep)}
                             if sweep.pretrain_val else {}))
            if sweep.rt.master and os.path.exists(resume_path):
                os.remove(resume_path)
            return result
        losses.append(loss)
        tokens += supervised
        sweep.updates_done += 1
        if step % cfg.log_interval == 0 or step == len(batches):  # log
            now = time.perf_counter()
            tokens_per_sec, last_time, tokens = tokens / (now - last_time), now, 0
            print(f"[lr {lr:g}] step {step}/{len(batches)} | loss {loss:.4f} | lr {lr_now:.2e} | "
                  f"grad_norm {grad_norm:.3f} | {tokens_per_sec:,.0f} supervised tok/s | "
                  f"ETA {eta(step)} (sweep {sweep.eta(sweep.updates_done)})")
            if sweep.rt.master:
                append_jsonl(log_path, {"step": step, "lr": lr_now, "loss": loss, "grad_norm": grad_norm,
                                        "supervised_tokens": supervised, "tokens_per_sec": tokens_per_sec})
        if step == len(batches):
            break
        # checkpoint: lr_<lr>/resume.pt every checkpoint_interval updates, and on Ctrl-C or SIGTERM
        stop = sweep.interrupts.requested()
        if stop or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0):
            weights, adam = full_state(sweep, optimizer)  # every process: under FSDP a gather
            if sweep.rt.master:
                save_checkpoint(resume_path, {"model": weights, "optimizer": adam, "step": step, "losses": losses,
                                              "rng": rng_state(), "identity": identity})
        if stop:
            sweep.interrupts.stop(f"{resume_path} holds update {step} of {len(batches)} at lr {lr:g}; finished LRs "
                                  f"are kept", sweep.argv)
    # the final checkpoint, without AdamW's state: a finished LR never continues (a 1B model's is 8 GB)
    weights, _ = full_state(sweep)
    if sweep.rt.master:
        save_checkpoint(os.path.join(run_dir, "ckpt.pt"), {
            "model": weights, "model_config": model.config.to_dict(),
            "tokenizer": sweep.tokenizer.to_dict(), "config": {**asdict(cfg), "learning_rate": lr, "stage": "sft"},
            "init_config": sweep.init_config, "step": len(batches), "rng": rng_state()})
        if os.path.exists(resume_path):
            os.remove(resume_path)
    result.update(final_train_loss=float(np.mean(losses[-FINAL_LOSS_STEPS:])), val_loss=val_loss(sweep),
                  **forgetting(sweep))
    return result


def testbed_scores(model, tokenizer, testbed):
    """The testbed's two tasks (exact match, choice: scoring.testbed_sft_accuracy) on the
    selection and test people, and each split's SFT Task Avg (tables.sft_task_avg); all None
    without a testbed (testbed=None) or for a diverged run (model=None)."""
    scores = {}
    for split in ("sft_select", "sft_test"):
        result = {"exact_match": None, "choice": None}
        if testbed and model is not None:
            result = testbed_sft_accuracy(model, tokenizer, os.path.join(testbed, f"{split}.jsonl"))
        for task in ("exact_match", "choice", "type_match"):
            scores[f"{split}_{task}"] = result.get(task)
        if split == "sft_test":
            scores["sft_test_by_attribute"] = result.get("by_attribute")
        avg = None if result["choice"] is None else sft_task_avg({"testbed_sft_test": result})
        scores[f"{split}_task_avg"] = None if avg is None else round(avg, 4)
    scores["sft_task_avg"] = scores["sft_test_task_avg"]  # the paper's "SFT Task Avg" analogue
    return scores


# --------------------------------------------------------------------------- main


def set_up(cfg):
    """(the Sweep, what was fine-tuned, the testbed folder or None, the selection metric)."""
    if not cfg.init_from:
        raise SystemExit("error: pass --init_from=<checkpoint to fine-tune> (e.g. out/ckpt.pt from train.py)")
    rt = setup_distributed(cfg.device, cfg.dtype, process_group=cfg.parallel == "fsdp")
    if not rt.master:  # under torchrun the master prints; the others' lines would repeat its own
        sys.stdout = open(os.devnull, "w")
    ckpt = load_checkpoint(cfg.init_from, mmap=cfg.parallel == "fsdp")  # FSDP: the processes share its pages
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    train_chats, val_chats, testbed = load_data(cfg, tokenizer)
    metric = cfg.select_by if cfg.select_by != "auto" else "sft_select_task_avg" if testbed else "val_loss"
    if metric.startswith("sft_select") and not testbed:
        raise SystemExit(f"error: --select_by={metric} needs a testbed; use --select_by=val_loss")
    alpaca = alpaca_setup(cfg, rt) if metric == "alpaca_eval" else None
    max_seq_len = ckpt["model_config"]["max_seq_len"]
    if cfg.seq_len > max_seq_len:
        raise SystemExit(f"error: seq_len={cfg.seq_len} > the model's max_seq_len={max_seq_len}")
    examples = prepare_examples(cfg, tokenizer, train_chats, val_chats)
    torch.manual_seed(cfg.seed)
    if cfg.parallel == "fsdp":  # sharded, its weights loaded per LR (start_lr)
        model = fsdp().shard_model(LlamaConfig.from_dict(ckpt["model_config"]), rt.device, bf16=rt.dtype == "bfloat16")
    else:
        model = load_model(ckpt, rt.device)
    step_model = model  # under torchrun wrapped in DDP, then compiled (the order torch documents)
    if rt.distributed and cfg.parallel == "ddp":
        step_model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if rt.device.startswith("cuda") else None)
    # padded lengths differ from batch to batch: dynamic shapes
    step_model = torch.compile(step_model, dynamic=True) if cfg.compile else step_model
    init = dict(zip(("schedule", "alpha_pre", "alpha_mid"), schedule_of(ckpt)), stage=ckpt["config"].get("stage"),
                step=ckpt["step"])
    sweep = Sweep(cfg=cfg, rt=rt, model=model, step_model=step_model, examples=examples, init_weights=ckpt["model"],
                  init_config=ckpt["config"], tokenizer=tokenizer, eta=Eta(0), alpaca=alpaca,
                  pretrain_val=pretrain_val_batches(cfg, ckpt))
    measure_before(sweep)
    return sweep, init, testbed, metric


def alpaca_setup(cfg, rt):
    """--select_by=alpaca_eval: the judge, the AlpacaEval rows and the reference outputs."""
    if not cfg.judge:
        raise SystemExit("error: --select_by=alpaca_eval needs --judge (a local HF model directory, an "
                         "OpenAI-compatible URL with --judge_model, or module:callable; nanowso/judge.py)")
    rows = alpaca_rows(cfg.judge_data)[:cfg.judge_limit or None]
    references = "lowest" if cfg.judge_reference == "lowest" else reference_outputs(
        cfg.judge_reference, rows, batch_size=cfg.batch_size, device=rt.device)
    return load_judge(cfg.judge, cfg.judge_model, rt.device), rows, references


def alpaca_score(lr, run_dir, sweep, model):
    """The fine-tuned model's AlpacaEval win rate, every verdict in run_dir/alpaca_eval.jsonl."""
    if sweep.alpaca is None:
        return {}
    if model is None:  # diverged
        return {"alpaca_eval": None, "alpaca_eval_stderr": None}
    judge, rows, references = sweep.alpaca
    lowest = sweep_lrs(sweep.cfg)[0]
    if references == "lowest" and lr != lowest:
        path = os.path.join(sweep.cfg.out_dir, f"lr_{lowest:g}", "alpaca_eval.jsonl")
        if not os.path.isfile(path):
            raise SystemExit(f"error: the reference, the lowest LR's outputs ({path}), is missing: it diverged or "
                             f"was fine-tuned without --select_by=alpaca_eval; pass --judge_reference")
        references = reference_outputs(path, rows)
    outputs = model_outputs(model, sweep.tokenizer, rows, batch_size=sweep.cfg.batch_size)
    if references == "lowest":  # the lowest LR itself, its own reference: a tie by definition, no judge needed
        items = [{"instruction": r["instruction"], "output": out, "reference": out, "win": 0.5}
                 for r, out in zip(rows, outputs)]
        result = {"win_rate": 0.5, "stderr": 0.0, "position_bias": 0.0, "n": len(rows)}
    else:
        result, items = pairwise(judge, [r["instruction"] for r in rows], outputs, references)
    if sweep.rt.master:
        write_jsonl(os.path.join(run_dir, "alpaca_eval.jsonl"), items)
    print(f"[lr {lr:g}] alpaca_eval win rate {result['win_rate']:.3f} +- {result['stderr'] or 0:.3f} over "
          f"{result['n']} instructions (position bias {result['position_bias']:+.3f})")
    return {"alpaca_eval": result["win_rate"], "alpaca_eval_stderr": result["stderr"]}


def main(cfg: SFTConfig, argv=None):
    if cfg.frontier:
        path = plot_frontier(frontier_curves(cfg.frontier.split(",")), cfg.frontier_path)
        print(f"wrote {path}")
        return path
    sweep, init, testbed, metric = set_up(cfg)
    # A finished LR is reused only if it was made from the same settings and checkpoint.
    identity = {**{k: v for k, v in asdict(cfg).items() if k not in RERUN_CHANGES}, "init": init}
    if sweep.rt.master:
        prepare_sweep_dir(cfg, identity)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"sft": asdict(cfg), "model": sweep.model.config.to_dict(), "init_config": sweep.init_config,
                       "identity": identity}, f, indent=2)
    lrs, updates = sweep_lrs(cfg), len(sweep.examples.batches)
    print(f"SFT of {cfg.init_from} ({sweep.model.num_params():,} parameters) on {cfg.dataset}: "
          f"{len(sweep.examples.train)} training conversations, {updates} updates of {cfg.global_batch_size} "
          f"per LR (grad_accum={cfg.global_batch_size // cfg.batch_size}), LRs {[f'{lr:g}' for lr in lrs]}, "
          f"select by {metric}, device={sweep.rt.device}, dtype={sweep.rt.dtype}, compile={cfg.compile}")

    runs, todo = finished_runs(cfg, lrs, identity)
    unjudged = [f"{r['lr']:g}" for r in runs if metric == "alpaca_eval" and "alpaca_eval" not in r]
    if unjudged:
        raise SystemExit(f"error: LRs {', '.join(unjudged)} in {cfg.out_dir} finished without AlpacaEval scores; "
                         f"fine-tune into another --out_dir to select by alpaca_eval")
    sweep.eta, sweep.interrupts, sweep.argv = Eta(len(todo) * updates), Interrupts(sweep.rt), tuple(argv or ())
    try:
        for lr in todo:
            runs.append(run_lr(lr, sweep, identity, testbed))
            if sweep.interrupts.requested() and lr != todo[-1]:
                sweep.interrupts.stop(f"the LRs up to {lr:g} are finished", sweep.argv)
    finally:
        sweep.interrupts.restore()
    summary = summarize(cfg, sweep, init, metric, lrs, runs)
    if dist.is_initialized():  # torchrun's, or --parallel=fsdp's group of one
        dist.destroy_process_group()
    if summary["best_lr"] is None:
        diverged = ", ".join(f"{r['lr']:g} at update {r['diverged_at_step']}" for r in runs)
        raise SystemExit(f"error: no LR of the sweep gave a model to select (every one diverged: {diverged}); "
                         f"sweep lower LRs (--lrs) or check the data")
    return summary


def prepare_sweep_dir(cfg, identity):
    """A sweep reruns into its own out_dir (finished LRs are kept); one of other settings or
    another checkpoint is refused there, or with --overwrite=true replaces it."""
    path = os.path.join(cfg.out_dir, "config.json")
    earlier = None
    if os.path.isfile(path):
        with open(path) as f:
            earlier = json.load(f).get("identity")
    same = earlier is None or earlier == identity  # older sweeps did not record it: finished_runs checks each LR
    prepare_out_dir(cfg.out_dir, overwrite=cfg.overwrite, new=cfg.overwrite or not same,
                    what="an SFT sweep of other settings or another checkpoint",
                    way_on="rerun it with its own settings to continue it")


def run_lr(lr, sweep, identity, testbed):
    """One LR of the sweep, fine-tuned and scored; its result.json is written last."""
    run_dir = os.path.join(sweep.cfg.out_dir, f"lr_{lr:g}")
    result = finetune(lr, run_dir, sweep, identity)
    model = sweep.model if result["diverged_at_step"] is None else None
    result.update(testbed_scores(model, sweep.tokenizer, testbed))
    result.update(alpaca_score(lr, run_dir, sweep, model))
    if sweep.rt.master:
        append_jsonl(os.path.join(run_dir, "log.jsonl"), {"step": result["steps"], **{
            k: result[k] for k in ("val_loss", "sft_select_task_avg", "sft_test_task_avg")}})
        write_atomic(os.path.join(run_dir, "result.json"),
                     json.dumps({"config": identity, "result": result}, indent=1).encode())
    return result


if __name__ == "__main__":
    main(parse_args(SFTConfig, description=__doc__), sys.argv[1:])
