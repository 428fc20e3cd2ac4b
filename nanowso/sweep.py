"""
The bookkeeping of sft.py's LR sweep: the tokenized conversations every LR shares
(Examples), what every LR starts from (Sweep), starting or resuming one LR (start_lr),
LRs an earlier run finished (finished_runs), choosing the best LR (select, at_edge) and
summary.json with its table (summarize). The loop itself is sft.py's finetune.
Nothing here runs on its own.
"""

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from data.conversations import message_lists, tokenize, update_batches
from data.formats import Tokenizer, load_split, write_atomic
from data.loaders import pad_collate, resolve_dataset, validation_batches
from nanowso.checkpoint import set_rng_state, training_config
from nanowso.common import Eta, append_jsonl, truncate_log
from nanowso.optim import load_optimizer_state, own_settings
from nanowso.runtime import Interrupts, Runtime, fsdp
from nanowso.scoring import mean_loss
from study.tables import mixed_forgetting

# the --select_by metrics; alpaca_eval: the win rate over a reference (nanowso/judge.py), as the paper selects
HIGHER_IS_BETTER = {"sft_select_task_avg": True, "sft_select_exact_match": True, "val_loss": False,
                    "alpaca_eval": True}


FINAL_LOSS_STEPS = 10  # final_train_loss averages the last updates: one batch alone is noisy


@dataclass
class Examples:
    """The tokenized conversations of a sweep, the same for every LR."""
    train: list  # [(ids, labels)] int32 arrays
    val: list
    batches: list  # the example indices of each update (update_batches)
    counts: dict  # conversations read and left without supervision, updates per LR: for the log


@dataclass
class Sweep:
    """What every LR of the sweep fine-tunes from and with."""
    cfg: object  # sft.SFTConfig
    rt: Runtime
    model: torch.nn.Module  # uncompiled: evaluation and checkpoints
    step_model: torch.nn.Module  # what the update runs (compiled with --compile)
    examples: Examples
    init_weights: dict  # the checkpoint's weights: every LR starts from them
    init_config: dict  # the checkpoint's training config
    tokenizer: Tokenizer
    eta: Eta  # of the whole sweep, in updates
    interrupts: Interrupts | None = None  # Ctrl-C / SIGTERM: stop at an update boundary (main sets it)
    argv: tuple = ()  # the command's arguments: rerunning it resumes
    updates_done: int = 0
    alpaca: tuple | None = None  # --select_by=alpaca_eval: (judge, rows, reference outputs or "lowest")
    pretrain_val: list | None = None  # held-out pre-training batches that measure forgetting (None: not measured)
    pretrain_loss_before: float | None = None  # the initial model's loss on them (measure_before)


def prepare_examples(cfg, tokenizer, train_chats, val_chats):
    """Tokenized conversations, the order of every update, and the counts for the log."""
    train, train_cut, train_unanswered = tokenize(train_chats, tokenizer, cfg.seq_len, "train", cfg.num_proc)
    val, val_cut, val_unanswered = tokenize(val_chats, tokenizer, cfg.seq_len, "val", cfg.num_proc)
    if not train or not val:
        split, chats = ("training", train_chats) if not train else ("validation", val_chats)
        if not (train_cut if not train else val_cut):
            roles = sorted({str(m.get("role")) for messages in message_lists(chats) for m in messages})
            raise SystemExit(f"error: no {split} conversation has an assistant turn (roles: {', '.join(roles)}); SFT "
                             f"learns from assistant messages only: each conversation needs one with role "
                             f"\"assistant\"")
        raise SystemExit(f"error: seq_len={cfg.seq_len} cuts away every assistant answer of the "
                         f"{split} conversations; raise --seq_len")
    if train_cut or val_cut:
        print(f"warning: seq_len={cfg.seq_len} cuts the whole answer of {train_cut} training and {val_cut} "
              f"validation conversations; they add nothing to the loss")
    if train_unanswered or val_unanswered:
        print(f"warning: {train_unanswered} training and {val_unanswered} validation conversations have no "
              f"assistant turn, nothing to learn from: left out")
    train_cut, val_cut = train_cut + train_unanswered, val_cut + val_unanswered  # the counts the log keeps
    batches = update_batches(len(train), cfg)
    if cfg.warmup_iters >= len(batches):
        print(f"warning: {len(batches)} updates per LR <= warmup_iters={cfg.warmup_iters}; "
              f"schedules.sft_lr shortens the warmup to {len(batches) - 1}")
    counts = {"train": len(train_chats), "val": len(val_chats), "train_without_supervision": train_cut,
              "val_without_supervision": val_cut, "updates_per_lr": len(batches)}
    return Examples(train=train, val=val, batches=batches, counts=counts)


def load_weights(sweep, model_state, optimizer=None, optimizer_state=None):
    """Weights (and AdamW's state, single-process form) into the model; under FSDP rank 0's are
    broadcast into every process's shards (parallel.load_full_state)."""
    if sweep.cfg.parallel == "fsdp":
        with own_settings(optimizer) if optimizer else nullcontext():
            fsdp().load_full_state(sweep.model, optimizer, model_state, optimizer_state)
        return
    sweep.model.load_state_dict(model_state)
    if optimizer_state is not None:
        load_optimizer_state(optimizer, optimizer_state)


def full_state(sweep, optimizer=None):
    """(weights, AdamW's state or None) as one process holds them. Under FSDP they are gathered
    to rank 0's CPU memory, a collective every process calls (the others get empty dicts)."""
    if sweep.cfg.parallel != "fsdp":
        return sweep.model.state_dict(), optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(sweep.model, options=options)
    adam = get_optimizer_state_dict(sweep.model, optimizer, options=options) if optimizer else None
    return weights, fsdp().by_index(adam) if adam and sweep.rt.master else adam


def micro_batches(sweep, batch):
    """The update's examples, padded per micro-batch of cfg.batch_size."""
    size, pad_id = sweep.cfg.batch_size, sweep.tokenizer.eot
    return [pad_collate([sweep.examples.train[i] for i in batch[j:j + size]], pad_id)
            for j in range(0, len(batch), size)]


def val_loss(sweep):
    """Mean loss over every supervised token of the validation conversations (in file order)."""
    val, size = sweep.examples.val, sweep.cfg.batch_size
    batches = [pad_collate(val[i:i + size], sweep.tokenizer.eot) for i in range(0, len(val), size)]
    return mean_loss(sweep.model, batches, sweep.rt.device, sweep.rt.autocast)


def pretrain_val_batches(cfg, ckpt):
    """The first cfg.forgetting_tokens of the val split of the data the checkpoint was last
    trained on (pre- or mid-training: training_config), in windows of its seq_len, as
    evaluate.py's val_loss reads them; None when off, or (said, not silent) when that split
    cannot be read here."""
    if not cfg.forgetting_tokens:
        return None
    config = training_config(ckpt)
    dataset = config.get("dataset", "testbed")
    try:
        shards = load_split(resolve_dataset(dataset), "val")
        return validation_batches(shards, config.get("seq_len", 128), cfg.forgetting_tokens, cfg.batch_size)
    except (OSError, KeyError, ValueError, SystemExit) as e:
        print(f"note: forgetting is not measured: cannot read the val split of the training data {dataset!r} "
              f"({e}); prepare it, or pass --forgetting_tokens=0")
        return None


def measure_before(sweep):
    """The initial model's loss on the held-out pre-training batches: forgetting's zero."""
    if sweep.pretrain_val is not None:
        load_weights(sweep, sweep.init_weights)  # under FSDP the sharded model holds no weights yet
        sweep.pretrain_loss_before = mean_loss(sweep.model, sweep.pretrain_val, sweep.rt.device, sweep.rt.autocast)
        print(f"held-out pre-training loss before SFT: {sweep.pretrain_loss_before:.4f} "
              f"({sum(y.numel() for _, y in sweep.pretrain_val):,} tokens): each LR's forgetting is measured from it")


def forgetting(sweep):
    """{pretrain_val_loss, forgetting}: the fine-tuned model's loss on the held-out pre-training
    batches, and how much SFT raised it (the x of the learning-forgetting frontier); {} when not
    measured."""
    if sweep.pretrain_val is None:
        return {}
    loss = mean_loss(sweep.model, sweep.pretrain_val, sweep.rt.device, sweep.rt.autocast)
    return {"pretrain_val_loss": loss, "forgetting": loss - sweep.pretrain_loss_before,
            **forgetting_basis(sweep)}


def forgetting_basis(sweep):
    """What a result's forgetting was measured from: the token count and the initial loss."""
    return {"forgetting_tokens": sweep.cfg.forgetting_tokens, "pretrain_val_loss_before": sweep.pretrain_loss_before}


def start_lr(lr, sweep, optimizer, log_path, resume_path, identity):
    """Load the model (and optimizer) an LR starts from, and start or continue its log:
    (updates done, their losses)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    state = resumable(resume_path, identity)
    master = sweep.rt.master  # the only process that writes (every process reads resume.pt)
    if state:
        load_weights(sweep, state["model"], optimizer, state["optimizer"])
        set_rng_state(state["rng"])
        if master:
            truncate_log(log_path, state["step"])
        print(f"[lr {lr:g}] resuming at update {state['step'] + 1} of {len(sweep.examples.batches)} from {resume_path}")
    else:
        load_weights(sweep, sweep.init_weights)
        if master and os.path.exists(log_path):  # an attempt that left no resume.pt: start this LR over
            os.remove(log_path)
        if master:
            append_jsonl(log_path, {"step": 0, **sweep.examples.counts})
    sweep.model.train()  # evaluation of the previous LR left it in eval mode
    done = state["step"] if state else 0
    sweep.updates_done += done
    return done, (state["losses"] if state else [])


def resumable(path, identity):
    """The state an interrupted attempt of this LR saved, if it was made by the same sweep."""
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("identity") != identity:
        print(f"note: {path} was made with other settings or another checkpoint; starting this LR over")
        return None
    return state


def finished_runs(cfg, lrs, identity):
    """Results of LRs an earlier run of this sweep completed, and the LRs still to run."""
    runs, todo = [], []
    for lr in lrs:
        result_path = os.path.join(cfg.out_dir, f"lr_{lr:g}", "result.json")
        if not os.path.exists(result_path):
            todo.append(lr)
            continue
        with open(result_path) as f:
            saved = json.load(f)
        if saved["config"] != identity:
            raise SystemExit(f"error: {result_path} was made with other settings or another checkpoint; "
                             f"use another --out_dir (or delete it)")
        print(f"[lr {lr:g}] finished earlier ({result_path}): skipped")
        runs.append({**saved["result"], "run_dir": os.path.dirname(result_path)})  # out_dir may have moved
    return runs, todo


def select(runs, metric):
    """The run with the best `metric` (ties go to the smaller LR); diverged runs never win."""
    scored = [r for r in runs if r[metric] is not None]
    if not scored:
        return None
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    return max(scored, key=lambda r: (sign * r[metric], -r["lr"]))


def at_edge(lr, lrs):
    """Whether a chosen LR is the lowest or highest of a sweep of several: then the sweep
    did not bracket the optimum, and the score may understate what SFT can do."""
    return lr is not None and len(lrs) > 1 and lr in (min(lrs), max(lrs))


def summarize(cfg, sweep, init, metric, lrs, runs):
    """summary.json from every LR's result, and the table printed."""
    runs.sort(key=lambda r: r["lr"])
    best = select(runs, metric) or {"lr": None, "run_dir": None, "sft_task_avg": None}
    summary = {"dataset": cfg.dataset, "init_from": cfg.init_from, "init": init,
               "select_by": metric, "higher_is_better": HIGHER_IS_BETTER[metric], "best_lr": best["lr"],
               "best_ckpt": best["run_dir"] and os.path.join(best["run_dir"], "ckpt.pt"),
               "sft_task_avg": best["sft_task_avg"], "data": sweep.examples.counts,
               "pretrain_val_loss_before": sweep.pretrain_loss_before, "runs": runs}
    summary["best_lr_at_edge"] = at_edge(best["lr"], lrs)
    mixed = mixed_forgetting(runs)
    if mixed:
        print(f"warning: the forgetting of this sweep does not compare across LRs: {mixed}; the frontier refuses it "
              f"(fine-tune into a new --out_dir for one)")
    if sweep.rt.master:
        write_atomic(os.path.join(cfg.out_dir, "summary.json"), (json.dumps(summary, indent=1) + "\n").encode())
    print_table(summary)
    if summary["best_lr_at_edge"]:
        print(f"warning: the chosen LR {best['lr']:g} is at the {'low' if best['lr'] == lrs[0] else 'high'} edge of "
              f"the swept LRs {[f'{lr:g}' for lr in lrs]}: the optimum may lie beyond it; widen --lrs")
    return summary


def print_table(summary):
    alpaca = any("alpaca_eval" in r for r in summary["runs"])
    # scores in percent, as the paper's tables (sft_select_task_avg is one already; the rest are fractions)
    forgot = any(r.get("forgetting") is not None for r in summary["runs"])
    print(f"{'lr':>9} {'train_loss':>10} {'val_loss':>9} {'select_avg%':>11} {'test_em%':>8} {'test_choice%':>12}"
          + f" {'alpaca_win%':>11}" * alpaca + f" {'forgetting':>10}" * forgot)
    fmt = lambda v, spec, scale=1: format(v * scale, spec) if v is not None else "-"  # noqa: E731
    for r in summary["runs"]:
        mark = "  <- best" if r["lr"] == summary["best_lr"] else ""
        print(f"{r['lr']:>9g} {fmt(r['final_train_loss'], '>10.4f')} {fmt(r['val_loss'], '>9.4f')} "
              f"{fmt(r['sft_select_task_avg'], '>11.1f')} {fmt(r['sft_test_exact_match'], '>8.1f', 100)} "
              f"{fmt(r['sft_test_choice'], '>12.1f', 100)}" + f" {fmt(r.get('alpaca_eval'), '>11.1f', 100)}" * alpaca
              + f" {fmt(r.get('forgetting'), '>+10.4f')}" * forgot + mark)
    avg = summary["sft_task_avg"]
    print(f"selected by {summary['select_by']}: lr {summary['best_lr']}, sft_task_avg "
          f"{'-' if avg is None else f'{avg:.1f}'}")
