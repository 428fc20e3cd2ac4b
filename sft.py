"""
Supervised fine-tuning (SFT) with the paper's learning-rate sweep (Section 3.1; Appendix D, Table 8).

    python sft.py --init_from=out/ckpt.pt                      # the testbed: sweep, select, test
    python sft.py --init_from=out/ckpt.pt --learning_rate=8.5e-4  # one LR instead of the sweep
    python sft.py --init_from=out-1b/ckpt.pt --dataset=tulu3 --lrs=paper --global_batch_size=128 \
                  --epochs=1 --warmup_iters=100 --compile=true --out_dir=sft-1b   # Table 8 as printed
    python sft.py --init_from=out/ckpt.pt --dataset=my_chats.jsonl   # any file with a `messages` column
    python sft.py --help                                       # every option and its default

Every peak LR of the sweep fine-tunes all parameters of the same checkpoint, with a fresh
AdamW, for `epochs` passes over the training conversations in a seeded order: warmup, then
cosine to 0 (schedules.sft_lr). Conversations are rendered with the tulu chat template
(data/chat.py) and cut to seq_len tokens; only assistant content + eos is in the loss, a mean
over the supervised tokens of each global batch. Micro-batches are padded to their longest
conversation (labels -100 on padding), not packed: no conversation ever sees another.
Data sets:
    testbed    train on sft_train.jsonl; the task average on sft_select.jsonl chooses the LR;
               the task average on sft_test.jsonl (people never seen in SFT) is the score: the
               mean of exact match and choice (evaluate.testbed_sft_accuracy), x100
    tulu3      allenai/tulu-3-sft-olmo-2-mixture (train split), split 9:1 (seeded) into
               train and validation as the paper does; the LR is chosen by validation loss
               (the paper chose by AlpacaEval, which needs an LLM judge)
    a file     .jsonl/.json/.parquet with a `messages` column: like tulu3
    a folder   a testbed made by data/testbed/prepare.py --out_dir=...: like testbed

Writes out_dir/lr_<lr>/{ckpt.pt, log.jsonl, result.json} per LR (result.json last: an LR
that has it is skipped when the sweep is rerun), out_dir/config.json, and out_dir/summary.json:
    dataset, init_from, init {schedule, alpha_pre, alpha_mid, stage, step}: what was fine-tuned
               (evaluate.schedule_of: alpha_pre is 1.0 for WSO, alpha_mid null before mid-training)
    select_by, higher_is_better: the metric that chose the LR
    best_lr, best_ckpt: the chosen LR and its fine-tuned checkpoint
    sft_task_avg: sft_test_task_avg of the chosen LR (testbed; null for other data)
    data {train, val, train_without_supervision, val_without_supervision, updates_per_lr}
    runs: one per LR, ascending: {lr, run_dir, steps, diverged_at_step, final_train_loss,
          val_loss, sft_{select,test}_{exact_match,choice} in [0, 1], sft_{select,test}_task_avg
          = 50 x (exact_match + choice), sft_task_avg} (null without a testbed; a diverged run
          has null metrics and is never chosen)
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from datasets import load_dataset

import schedules
from common import (Eta, append_jsonl, autocast_context, load_checkpoint, parse_args, resolve_device,
                    rng_state, save_checkpoint)
from data.chat import IGNORE, has_supervision, render
from data.common import Tokenizer, load_meta, read_jsonl, write_atomic
from evaluate import schedule_of, testbed_sft_accuracy
from model import Llama, LlamaConfig
from train import DATA_DIR, make_optimizer

TULU3 = "allenai/tulu-3-sft-olmo-2-mixture"
LR_GRIDS = {
    # Table 8 as printed (1B and 8B models). Tables 11, 13 and 17 report selected LRs of 3e-4 and 3e-5,
    # which it lacks: add them with --lrs=... to sweep what the paper seems to have swept.
    "paper": (5e-7, 1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3),
    # The tiny model (pre-trained at 3e-3) does best near 5e-4..1e-3 in a pilot sweep of a
    # 600-step WSO checkpoint with the defaults below; ~1.7x apart around that.
    "testbed": (3e-4, 5e-4, 8.5e-4, 1.5e-3, 2.5e-3),
}
HIGHER_IS_BETTER = {"sft_select_task_avg": True, "sft_select_exact_match": True, "val_loss": False}  # the --select_by metrics
FINAL_LOSS_STEPS = 10  # final_train_loss averages the last updates: one batch alone is noisy


@dataclass
class SFTConfig:
    init_from: str = ""  # the checkpoint to fine-tune (train.py's ckpt.pt); required
    dataset: str = "testbed"  # testbed | tulu3 | a .jsonl/.parquet file with `messages` | a testbed folder
    out_dir: str = "out-sft"  # out_dir/lr_<lr>/ per LR, out_dir/summary.json
    # the LR sweep (Table 8)
    lrs: str = "testbed"  # peak LRs, comma-separated, or a named grid: testbed | paper (Table 8's)
    learning_rate: float = 0.0  # one peak LR instead of the sweep; 0 uses --lrs
    select_by: str = "auto"  # sft_select_task_avg | sft_select_exact_match | val_loss; auto: the first on a testbed, else val_loss
    # schedule and batch: the testbed's 1,500 conversations need more passes and smaller batches
    # than Table 8's ~845k; 10 epochs x 1,500 / 32 = 469 updates (the paper: ~6.6k)
    warmup_iters: int = 20  # updates of linear warmup before the cosine to 0 (the paper: 100)
    epochs: int = 10  # passes over the training conversations (the paper: 1)
    global_batch_size: int = 32  # sequences per update (the paper: 128)
    batch_size: int = 32  # sequences per micro-batch; global_batch_size / batch_size micro-batches per update
    seq_len: int = 2048  # render(max_len=seq_len): a longer conversation is cut; cut conversations are counted
    max_train: int = 0  # Tulu 3 or a file: only the first N training conversations of the seeded split (0: all)
    max_val: int = 0  # likewise for the validation conversations that choose the LR (0: all)
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
    log_interval: int = 10  # updates between progress lines and log.jsonl records

    def __post_init__(self):
        for name, least in (("warmup_iters", 0), ("epochs", 1), ("global_batch_size", 1), ("batch_size", 1),
                            ("log_interval", 1)):
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
        sweep_lrs(self)


# Fields that may change between a sweep and its rerun without changing any LR's result.
RERUN_CHANGES = {"out_dir", "lrs", "learning_rate", "select_by", "log_interval", "compile", "device"}


def sweep_lrs(cfg):
    """The peak LRs to fine-tune with, ascending."""
    if cfg.learning_rate:
        return [cfg.learning_rate]
    if cfg.lrs in LR_GRIDS:
        return list(LR_GRIDS[cfg.lrs])
    try:
        lrs = sorted({float(text) for text in cfg.lrs.split(",")})
    except ValueError:
        raise ValueError(f"lrs={cfg.lrs!r}: give comma-separated numbers or one of {sorted(LR_GRIDS)}") from None
    if not lrs or lrs[0] <= 0 or not math.isfinite(lrs[-1]):
        raise ValueError(f"lrs={cfg.lrs!r}: every LR must be a finite number > 0")
    return lrs


# ---------------------------------------------------------------------------- data

def testbed_dir(name):
    """The testbed folder of --dataset, or None when the data set is not a testbed."""
    if name == "testbed":
        from data.testbed.prepare import is_prepared, prepare
        path = os.path.join(DATA_DIR, "testbed")
        if not is_prepared(path):
            prepare(path)
        return path
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "sft_train.jsonl")):
        return name
    return None


def load_messages(name):
    """The `messages` column of Tulu 3 or a local file, through Hugging Face `datasets`."""
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    kind = kinds.get(os.path.splitext(name)[1])
    if name != "tulu3" and not (kind and os.path.isfile(name)):
        raise SystemExit(f"error: unknown data set {name!r}: use testbed, tulu3, a testbed folder, "
                         f"or an existing {'/'.join(kinds)} file with a `messages` column")
    if name != "tulu3" and os.path.getsize(name) == 0:
        raise SystemExit(f"error: data set {name!r} is an empty file")
    try:
        if name == "tulu3":
            rows = load_dataset(TULU3, split="train")  # no official split: the paper makes its own 9:1
        else:
            rows = load_dataset(kind, data_files=name, split="train")
    except Exception as e:  # offline (the Hub), a malformed file: say which data set and why
        raise SystemExit(f"error: cannot load data set {name!r} ({type(e).__name__}: {e}); offline, "
                         f"pass a local copy: --dataset=path/to/file.parquet") from None
    if "messages" not in rows.column_names:
        raise SystemExit(f"error: data set {name!r} has no `messages` column (it has {rows.column_names})")
    return list(rows["messages"])


def split_train_val(conversations, seed):
    """The paper's own 9:1 train/validation split (Appendix D), seeded."""
    order = np.random.default_rng(seed).permutation(len(conversations))
    n_val = max(1, len(conversations) // 10)
    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]


def load_data(cfg, tokenizer):
    """(train conversations, val conversations, testbed folder or None). Tulu 3 or a file may be
    any text: the checkpoint's tokenizer encodes it (a compact one spells unknown tokens in bytes).
    A testbed must have been tokenized with the checkpoint's own vocabulary."""
    testbed = testbed_dir(cfg.dataset)
    if testbed is None:
        conversations = load_messages(cfg.dataset)
        if not conversations:
            raise SystemExit(f"error: data set {cfg.dataset!r} has no conversations")
        train, val = split_train_val(conversations, cfg.seed)
        return train[:cfg.max_train or None], val[:cfg.max_val or None], None
    try:
        testbed_tokenizer = Tokenizer.from_dict(load_meta(testbed)["tokenizer"])
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if testbed_tokenizer != tokenizer:
        raise SystemExit(f"error: the testbed at {testbed} uses a different tokenizer/vocabulary than "
                         f"--init_from={cfg.init_from}; fine-tune a checkpoint pre-trained on this testbed")
    train, val = (read_jsonl(os.path.join(testbed, f)) for f in ("sft_train.jsonl", "sft_select.jsonl"))
    if not train or not val:
        raise SystemExit(f"error: the testbed at {testbed} has an empty SFT file; re-run data/testbed/prepare.py")
    return [r["messages"] for r in train], [r["messages"] for r in val], testbed


def tokenize(conversations, tokenizer, seq_len, split):
    """[(ids, labels)] of the conversations that keep supervision after the cut, and the
    number of those that lose it: they would add nothing to the loss, so they are left out
    of the batches, and counted so that the cut never drops data silently."""
    examples, without_supervision = [], 0
    for i, messages in enumerate(conversations):
        try:
            ids, labels = render(messages, tokenizer, max_len=seq_len)
        except ValueError as e:
            raise SystemExit(f"error: {split} conversation {i}: {e}") from None
        if has_supervision(labels[1:]):  # labels[0] has no token before it to predict it from
            examples.append((np.array(ids, dtype=np.int32), np.array(labels, dtype=np.int32)))  # Tulu 3: GBs
        else:
            without_supervision += 1
    return examples, without_supervision


def update_batches(num_examples, cfg):
    """The example indices of each update: `epochs` seeded permutations one after another,
    cut into global batches (the last one may be smaller). The same for every LR."""
    order = np.concatenate([np.random.default_rng([cfg.seed, epoch]).permutation(num_examples)
                            for epoch in range(cfg.epochs)])
    return [order[i:i + cfg.global_batch_size].tolist() for i in range(0, len(order), cfg.global_batch_size)]


def collate(examples, pad_id):
    """Right-padded (x, y) with y = next token's label, -100 on padding. The causal mask keeps
    real tokens from attending to the padding after them, so no attention mask is needed."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, (ids, labels) in enumerate(examples):
        x[row, :len(ids) - 1] = torch.from_numpy(ids[:-1])
        y[row, :len(ids) - 1] = torch.from_numpy(labels[1:])
    return x, y


# ------------------------------------------------------------------ training parts

def train_step(model, optimizer, micro_batches, cfg, ctx):
    """One update over the micro-batches; returns (loss, grad_norm, supervised tokens) or raises
    FloatingPointError before touching the weights. The loss is the mean over every supervised
    token of the global batch (each micro-batch's mean weighted by its token share), so short and
    long answers count the same wherever they fall (Tulu 3 sums per token for the same reason)."""
    supervised = sum(int((y != IGNORE).sum()) for _, y in micro_batches)
    loss_sum = 0.0
    for x, y in micro_batches:
        with ctx["autocast"]:
            _, loss = model(x.to(ctx["device"]), y.to(ctx["device"]))
        loss = loss * (int((y != IGNORE).sum()) / supervised)
        loss.backward()
        loss_sum += loss.item()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss={loss_sum}, grad_norm={grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, supervised


@torch.no_grad()
def val_loss(model, examples, cfg, ctx):
    """Mean loss over every supervised token of the validation conversations (in file order)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        x, y = collate(examples[i:i + cfg.batch_size], ctx["pad_id"])
        with ctx["autocast"]:
            _, loss = model(x.to(ctx["device"]), y.to(ctx["device"]))
        n = int((y != IGNORE).sum())
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


def finetune(lr, run_dir, model, raw_model, data, cfg, ctx):
    """Fine-tune from the initial weights at peak LR `lr`; returns this LR's result record."""
    raw_model.load_state_dict(ctx["init_weights"])
    raw_model.train()  # evaluation of the previous LR left it in eval mode
    optimizer = make_optimizer(raw_model, cfg, ctx["device"])  # fresh: SFT starts a new optimization
    batches, log_path = data["batches"], os.path.join(run_dir, "log.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(log_path):  # an unfinished earlier attempt: start this LR over
        os.remove(log_path)
    append_jsonl(log_path, {"step": 0, **data["counts"]})
    losses, result = [], {"lr": lr, "run_dir": run_dir, "steps": len(batches), "diverged_at_step": None}
    eta, last_time, tokens = Eta(len(batches)), time.perf_counter(), 0
    for step, batch in enumerate(batches, start=1):
        lr_now = schedules.sft_lr(step, lr_max=lr, warmup_iters=cfg.warmup_iters, max_iters=len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        micro_batches = [collate([data["train"][i] for i in batch[j:j + cfg.batch_size]], ctx["pad_id"])
                         for j in range(0, len(batch), cfg.batch_size)]
        try:
            loss, grad_norm, supervised = train_step(model, optimizer, micro_batches, cfg, ctx)
        except FloatingPointError as e:  # a too-large LR: this point of the sweep failed, not the sweep
            print(f"[lr {lr:g}] non-finite values at step {step} ({e}); this LR is marked diverged")
            result.update(diverged_at_step=step, final_train_loss=None, val_loss=None)
            return result
        losses.append(loss)
        tokens += supervised
        ctx["sweep_done"] += 1
        if step % cfg.log_interval == 0 or step == len(batches):
            now = time.perf_counter()
            tokens_per_sec, last_time, tokens = tokens / (now - last_time), now, 0
            print(f"[lr {lr:g}] step {step}/{len(batches)} | loss {loss:.4f} | lr {lr_now:.2e} | "
                  f"grad_norm {grad_norm:.3f} | {tokens_per_sec:,.0f} supervised tok/s | "
                  f"ETA {eta(step)} (sweep {ctx['sweep_eta'](ctx['sweep_done'])})")
            append_jsonl(log_path, {"step": step, "lr": lr_now, "loss": loss, "grad_norm": grad_norm,
                                    "supervised_tokens": supervised, "tokens_per_sec": tokens_per_sec})
    # No optimizer state: an unfinished LR is rerun whole, and a 1B model's AdamW state is 8 GB.
    save_checkpoint(os.path.join(run_dir, "ckpt.pt"), {
        "model": raw_model.state_dict(), "model_config": raw_model.config.to_dict(),
        "tokenizer": ctx["tokenizer"].to_dict(), "config": {**asdict(cfg), "learning_rate": lr, "stage": "sft"},
        "init_config": ctx["init_config"], "step": len(batches), "rng": rng_state()})
    result.update(final_train_loss=float(np.mean(losses[-FINAL_LOSS_STEPS:])),
                  val_loss=val_loss(raw_model, data["val"], cfg, ctx))
    return result


def score(result, raw_model, testbed, ctx):
    """The testbed's two tasks (exact match, choice: evaluate.testbed_sft_accuracy) on the
    selection and test people; each split's task average is their mean, x100."""
    for split in ("sft_select", "sft_test"):
        scores = {"exact_match": None, "choice": None}
        if testbed and result["diverged_at_step"] is None:
            scores = testbed_sft_accuracy(raw_model, ctx["tokenizer"], os.path.join(testbed, f"{split}.jsonl"))
        for task in ("exact_match", "choice"):
            result[f"{split}_{task}"] = scores[task]
        result[f"{split}_task_avg"] = (None if scores["choice"] is None else
                                       round(50 * (scores["exact_match"] + scores["choice"]), 4))
    result["sft_task_avg"] = result["sft_test_task_avg"]  # the paper's "SFT Task Avg" analogue
    return result


def select(runs, metric):
    """The run with the best `metric` (ties go to the smaller LR); diverged runs never win."""
    scored = [r for r in runs if r[metric] is not None]
    if not scored:
        return None
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    return max(scored, key=lambda r: (sign * r[metric], -r["lr"]))


def print_table(summary):
    print(f"{'lr':>9} {'train_loss':>10} {'val_loss':>9} {'select_avg':>10} {'test_em':>8} {'test_choice':>11}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for r in summary["runs"]:
        mark = "  <- best" if r["lr"] == summary["best_lr"] else ""
        print(f"{r['lr']:>9g} {fmt(r['final_train_loss'], '>10.4f')} {fmt(r['val_loss'], '>9.4f')} "
              f"{fmt(r['sft_select_task_avg'], '>10.1f')} {fmt(r['sft_test_exact_match'], '>8.3f')} "
              f"{fmt(r['sft_test_choice'], '>11.3f')}{mark}")
    avg = summary["sft_task_avg"]
    print(f"selected by {summary['select_by']}: lr {summary['best_lr']}, sft_task_avg "
          f"{'-' if avg is None else f'{avg:.1f}'}")


# --------------------------------------------------------------------------- main

def prepare_examples(cfg, tokenizer, train_chats, val_chats):
    """Tokenized conversations, the order of every update, and the counts for the log."""
    train, train_cut = tokenize(train_chats, tokenizer, cfg.seq_len, "train")
    val, val_cut = tokenize(val_chats, tokenizer, cfg.seq_len, "val")
    if not train or not val:
        raise SystemExit(f"error: seq_len={cfg.seq_len} cuts away every assistant answer of the "
                         f"{'training' if not train else 'validation'} conversations; raise --seq_len")
    if train_cut or val_cut:
        print(f"warning: seq_len={cfg.seq_len} cuts the whole answer of {train_cut} training and {val_cut} "
              f"validation conversations; they add nothing to the loss")
    batches = update_batches(len(train), cfg)
    if cfg.warmup_iters >= len(batches):
        print(f"warning: {len(batches)} updates per LR <= warmup_iters={cfg.warmup_iters}; "
              f"schedules.sft_lr shortens the warmup to {len(batches) - 1}")
    counts = {"train": len(train_chats), "val": len(val_chats), "train_without_supervision": train_cut,
              "val_without_supervision": val_cut, "updates_per_lr": len(batches)}
    return dict(train=train, val=val, batches=batches, counts=counts)


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


def main(cfg: SFTConfig):
    if not cfg.init_from:
        raise SystemExit("error: pass --init_from=<checkpoint to fine-tune> (e.g. out/ckpt.pt from train.py)")
    device = resolve_device(cfg.device)
    dtype, autocast = autocast_context(device, cfg.dtype)
    ckpt = load_checkpoint(cfg.init_from)
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    train_chats, val_chats, testbed = load_data(cfg, tokenizer)
    metric = cfg.select_by if cfg.select_by != "auto" else "sft_select_task_avg" if testbed else "val_loss"
    if metric.startswith("sft_select") and not testbed:
        raise SystemExit(f"error: --select_by={metric} needs a testbed; use --select_by=val_loss")
    model_cfg = LlamaConfig.from_dict(ckpt["model_config"])
    if cfg.seq_len > model_cfg.max_seq_len:
        raise SystemExit(f"error: seq_len={cfg.seq_len} > the model's max_seq_len={model_cfg.max_seq_len}")
    data = prepare_examples(cfg, tokenizer, train_chats, val_chats)

    torch.manual_seed(cfg.seed)
    model = Llama(model_cfg).to(device)
    raw_model = model  # uncompiled: for evaluation and checkpoints
    if cfg.compile:
        model = torch.compile(model, dynamic=True)  # padded lengths differ from batch to batch
    init = dict(zip(("schedule", "alpha_pre", "alpha_mid"), schedule_of(ckpt)), stage=ckpt["config"].get("stage"),
                step=ckpt["step"])
    ctx = dict(device=device, autocast=autocast, pad_id=tokenizer.eot, tokenizer=tokenizer,
               init_weights=ckpt["model"], init_config=ckpt["config"], sweep_done=0)
    del ckpt

    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump({"sft": asdict(cfg), "model": model_cfg.to_dict(), "init_config": ctx["init_config"]}, f, indent=2)
    lrs = sweep_lrs(cfg)
    print(f"SFT of {cfg.init_from} ({raw_model.num_params():,} parameters) on {cfg.dataset}: "
          f"{len(data['train'])} training conversations, {len(data['batches'])} updates of {cfg.global_batch_size} "
          f"per LR (grad_accum={cfg.global_batch_size // cfg.batch_size}), LRs {[f'{lr:g}' for lr in lrs]}, "
          f"select by {metric}, device={device}, dtype={dtype}, compile={cfg.compile}")

    # A finished LR is reused only if it was made from the same settings and checkpoint.
    identity = {**{k: v for k, v in asdict(cfg).items() if k not in RERUN_CHANGES}, "init": init}
    runs, todo = finished_runs(cfg, lrs, identity)
    ctx["sweep_eta"] = Eta(len(todo) * len(data["batches"]))
    for lr in todo:
        run_dir = os.path.join(cfg.out_dir, f"lr_{lr:g}")
        result = score(finetune(lr, run_dir, model, raw_model, data, cfg, ctx), raw_model, testbed, ctx)
        append_jsonl(os.path.join(run_dir, "log.jsonl"), {"step": result["steps"], **{
            k: result[k] for k in ("val_loss", "sft_select_task_avg", "sft_test_task_avg")}})
        write_atomic(os.path.join(run_dir, "result.json"),
                     json.dumps({"config": identity, "result": result}, indent=1).encode())
        runs.append(result)

    runs.sort(key=lambda r: r["lr"])
    best = select(runs, metric) or {"lr": None, "run_dir": None, "sft_task_avg": None}
    summary = {"dataset": cfg.dataset, "init_from": cfg.init_from, "init": init,
               "select_by": metric, "higher_is_better": HIGHER_IS_BETTER[metric], "best_lr": best["lr"],
               "best_ckpt": best["run_dir"] and os.path.join(best["run_dir"], "ckpt.pt"),
               "sft_task_avg": best["sft_task_avg"], "data": data["counts"], "runs": runs}
    write_atomic(os.path.join(cfg.out_dir, "summary.json"), (json.dumps(summary, indent=1) + "\n").encode())
    print_table(summary)
    return summary


if __name__ == "__main__":
    main(parse_args(SFTConfig, description=__doc__))
