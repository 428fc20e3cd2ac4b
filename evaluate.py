"""
Evaluation: the numbers behind the paper's Tables 1-4 (Sections 3.1, 3.2, 4; Appendix E),
scored the way lm-evaluation-harness scores them (ECOSYSTEM.md), so they can be compared.

    python evaluate.py --ckpt=out/ckpt.pt --tasks=val_loss,testbed_probes,testbed_sft_test
    python evaluate.py --ckpt=out/ckpt.pt --tasks=hellaswag,arc_easy --data_files=hellaswag=h.jsonl,arc_easy=a.parquet
    python evaluate.py --compare out-wso out-wsd-0.1 out-cosine-0.0 ...   # the paper's tables
    python evaluate.py --help

Tasks (TASKS below):
    val_loss            mean next-token loss and bits per byte on the checkpoint's val split
    testbed_probes      zero-shot 4-way probes (the analogue of "PT Task Avg"); testbed_mid_probes
    testbed_sft_test    greedy exact match after the chat template (the "SFT Task Avg"); _select
    arc_easy arc_challenge boolq hellaswag openbookqa piqa winogrande   zero-shot (Section 3.1)
    mmlu (5-shot), truthfulqa_mc1, truthfulqa_mc2, alpaca_eval           after SFT (Appendix E)
Hub tasks load from the Hub id in HUB, or offline from --data_files=task=path[,task=path]
(.jsonl/.json/.parquet in the Hub schema; MMLU's shots come from mmlu_dev=path).

Results JSON (--out, default eval.json beside the checkpoint; tasks merge into an existing
file of the same checkpoint and step):
    {"ckpt": str, "step": int, "stage": "pre" | "mid" | "sft",
     "schedule": str, "alpha_pre": float, "alpha_mid": float | null,   # the run's LR schedule
     "config": the checkpoint's training config,
     "tasks": {"val_loss": {"loss", "bpb", "tokens", "bytes", "dataset"},
               "<multiple choice>": {"acc", ["acc_norm"], "n"},          # fractions in [0, 1]
               "truthfulqa_mc2": {"acc", "n"},                           # true-answer mass
               "testbed_sft_test": {"exact_match", "n"},
               "alpaca_eval": {"win_rate": float | null, "n", ["note"]}}}
--compare reads, per run directory:
    eval.json      the pre- or mid-training checkpoint's results:
                   PT/MT Valid Loss = tasks.val_loss.loss,
                   PT Task Avg      = 100 x mean of ZERO_SHOT[task] over the PT_TASKS present,
                   MT Task Avg      = the same over MT_TASKS (for a stage "mid" checkpoint)
    sft_eval.json  results of the fine-tuned checkpoint: SFT Task Avg = 100 x mean of SFT[task]
                   (a null alpaca_eval is left out); if absent, sft/summary.json from
                   `sft.py --out_dir=<run>/sft` supplies its sft_task_avg
    Δ columns subtract the best run that decays the LR in some stage (alpha_pre < 1 or
    alpha_mid < 1): WSO, constant throughout, is never the reference (Tables 1-4).
"""

import importlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from common import Eta, autocast_context, load_checkpoint, parse_args, resolve_device
from data.chat import generation_prompt
from data.common import Tokenizer, load_split, read_jsonl
from model import Llama, LlamaConfig
from train import resolve_dataset, validation_batches

# ------------------------------------------------------------------ generation (SFT)


@torch.no_grad()
def greedy_generate_batch(model, prompts, max_new_tokens, stop_id, vocab_size=None):
    """Greedy continuations of equally long prompts (lists of ids), each up to (not
    including) its stop_id. Equal lengths need no padding: the model takes no attention
    mask, so a padded prompt would attend to pad tokens. Finished rows leave the batch.
    vocab_size excludes the embedding's padding rows, which no tokenizer can decode."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("greedy_generate_batch needs prompts of one length; group them by length")
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)  # (B, T)
    outputs, active = [[] for _ in prompts], list(range(len(prompts)))
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -model.config.max_seq_len:])  # the most recent tokens that fit
        next_id = logits[:, -1, :vocab_size].argmax(dim=-1)  # (B,)
        going = [row for row, token in enumerate(next_id.tolist()) if token != stop_id]
        for row in going:
            outputs[active[row]].append(int(next_id[row]))
        if not going:
            break
        active = [active[row] for row in going]
        ids = torch.cat([ids[going], next_id[going, None]], dim=1)
    return outputs


def greedy_generate(model, prompt_ids, max_new_tokens, stop_id, vocab_size=None):
    """The greedy continuation of one prompt, up to (not including) stop_id."""
    return greedy_generate_batch(model, [list(prompt_ids)], max_new_tokens, stop_id, vocab_size)[0]


def generate_all(model, tokenizer, prompts, max_new_tokens, batch_size):
    """Decoded greedy answers to many prompts, batched among prompts of equal length."""
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    answers = [None] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            outs = greedy_generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, tokenizer.eot,
                                         tokenizer.vocab_size)
            for i, out in zip(chunk, outs):
                answers[i] = tokenizer.decode(out)
    return answers


def testbed_sft_accuracy(model, tokenizer, jsonl_path, batch_size=64, max_new_tokens=24, limit=None):
    """The testbed's two post-SFT tasks on its questions (the analogue of the paper's post-SFT
    scores, Section 3.2), both after the chat template's `<|assistant|>\n`:
      exact_match  the greedy answer, decoded and stripped, equals row["answer"];
      choice       row["answer"] + eos (the tokens SFT supervises) has the highest log-likelihood
                   among every answer the file gives to the same row["attribute"] (~30-50 values:
                   a graded score where exact match sits near the floor); choice_chance is the
                   mean 1 / (number of candidates).
    limit: first rows only."""
    rows = read_jsonl(jsonl_path)[:limit]
    if not rows:
        raise ValueError(f"{jsonl_path} has no rows")
    prompts = [generation_prompt(row["messages"][:-1], tokenizer) for row in rows]
    answers = generate_all(model, tokenizer, prompts, max_new_tokens, batch_size)
    correct = sum(a.strip() == row["answer"] for a, row in zip(answers, rows))

    pools = {}
    for row in rows:
        pools.setdefault(row.get("attribute"), set()).add(row["answer"])
    pools = {attribute: sorted(values) for attribute, values in pools.items()}
    requests, spans = [], []  # spans: (first request, number of candidates, index of the answer)
    for prompt, row in zip(prompts, rows):
        pool = pools[row.get("attribute")]
        spans.append((len(requests), len(pool), pool.index(row["answer"])))
        requests += [(prompt, tokenizer.encode(value) + [tokenizer.eot]) for value in pool]
    scores = loglikelihoods(model, requests, batch_size=batch_size)
    chosen = [np.argmax(scores[start:start + n]) == gold for start, n, gold in spans]
    return {"exact_match": correct / len(rows), "choice": float(np.mean(chosen)),
            "choice_chance": float(np.mean([1 / n for _, n, _ in spans])), "n": len(rows)}


class Judge(Protocol):
    def __call__(self, instruction: str, output_a: str, output_b: str) -> float:
        """Preference for output_b over output_a: 1 b is better, 0 a is, 0.5 a tie."""


def alpaca_eval(model, tokenizer, rows, judge, max_new_tokens=256, batch_size=16):
    """AlpacaEval-style win rate against reference outputs (row["output"]; the paper's
    reference is its WSO model fine-tuned with the lowest LR, judged by Llama-3-70B-Instruct,
    Appendix E). Without a judge there is no number, only the reason."""
    if judge is None:
        return {"win_rate": None, "n": 0, "note": "no judge reachable offline"}
    prompts = [generation_prompt([{"role": "user", "content": r["instruction"]}], tokenizer) for r in rows]
    outputs = generate_all(model, tokenizer, prompts, max_new_tokens, batch_size)
    wins = [judge(r["instruction"], r["output"], out.strip()) for r, out in zip(rows, outputs)]
    return {"win_rate": float(np.mean(wins)), "n": len(rows)}


# ------------------------------------------------------------ log-likelihood scoring


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=16, desc=None):
    """log P(continuation | context) for each (context_ids, continuation_ids), as
    lm-evaluation-harness computes it: the input is context + continuation without its
    last token, cut from the left to max_seq_len; batches are right-padded (a causal model
    never looks right, so padding changes nothing) and run longest first."""
    model.eval()
    device = next(model.parameters()).device
    window = model.config.max_seq_len + 1
    wholes = []
    for context, continuation in requests:
        if not context or not continuation or len(continuation) >= window:
            raise ValueError(f"need a context and a continuation of 1..{window - 1} tokens, "
                             f"got {len(context)} and {len(continuation)}")
        wholes.append((list(context) + list(continuation))[-window:])
    order = sorted(range(len(requests)), key=lambda i: -len(wholes[i]))
    results, eta = [0.0] * len(requests), Eta(len(requests))
    every = max(1, len(order) // batch_size // 10)  # about ten progress lines
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        x = torch.zeros(len(chunk), len(wholes[chunk[0]]) - 1, dtype=torch.long)  # (B, T), right-padded
        for b, i in enumerate(chunk):
            x[b, :len(wholes[i]) - 1] = torch.tensor(wholes[i][:-1])
        logits, _ = model(x.to(device))  # (B, T, V)
        for b, i in enumerate(chunk):
            n, end = len(requests[i][1]), len(wholes[i]) - 1
            logprobs = F.log_softmax(logits[b, end - n:end].float(), dim=-1)  # (n, V)
            targets = torch.tensor(wholes[i][-n:], device=device)
            results[i] = logprobs.gather(-1, targets[:, None]).sum().item()
        done = start + len(chunk)
        if desc and (done == len(order) or (start // batch_size) % every == 0):
            print(f"  {desc}: {done}/{len(order)} requests | ETA {eta(done)}", flush=True)
    return results


def encode_pair(tokenizer, context, continuation):
    """lm-evaluation-harness's context/continuation split: trailing whitespace of the
    context moves to the continuation, and the continuation's ids are those of the whole
    string after the context's, so both tokenize as they would in running text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    # lm-eval scores an empty context after the end-of-text token
    return (context_ids or [tokenizer.eot]), whole[len(context_ids):]


def requests_of(item):
    """The (context, continuation) strings of one item, target delimiter " ". Winogrande
    items have one context per option and a shared continuation (partial scoring)."""
    if "contexts" in item:
        return [(c, " " + item["continuation"]) for c in item["contexts"]]
    return [(item["context"], " " + choice) for choice in item["choices"]]


def item_metrics(item, scores, metrics):
    """acc: the highest log-likelihood is gold; acc_norm: the same per character of the
    choice; mc2: TruthfulQA's probability mass on the true answers (the first n_true).
    np.argmax breaks ties to the first index, as lm-eval does."""
    scores = np.asarray(scores, dtype=np.float64)
    out = {}
    if "acc" in metrics:
        out["acc"] = float(np.argmax(scores) == item["gold"])
    if "acc_norm" in metrics:
        lengths = np.array([len(choice) for choice in item["choices"]], dtype=np.float64)
        out["acc_norm"] = float(np.argmax(scores / lengths) == item["gold"])
    if "mc2" in metrics:
        p = np.exp(scores - scores.max())  # lm-eval's exp(scores), normalized; shifted so it cannot underflow to 0/0
        out["acc"] = float(p[:item["n_true"]].sum() / p.sum())
    return out


def score_items(model, tokenizer, items, metrics, batch_size=16, desc=None):
    """Mean of each metric over multiple-choice items, plus their count n."""
    if not items:
        raise ValueError("no items to score")
    pairs = [requests_of(item) for item in items]
    flat = [encode_pair(tokenizer, c, k) for item_pairs in pairs for c, k in item_pairs]
    scores = loglikelihoods(model, flat, batch_size, desc)
    per_item, start = [], 0
    for item, item_pairs in zip(items, pairs):
        per_item.append(item_metrics(item, scores[start:start + len(item_pairs)], metrics))
        start += len(item_pairs)
    means = {name: float(np.mean([m[name] for m in per_item])) for name in per_item[0]}
    return {**means, "n": len(items)}


# ------------------------------------------------------------------ task formats


def hellaswag_preprocess(text):
    """lm-eval's clean-up of HellaSwag's WikiHow artifacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc):
    context = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"context": hellaswag_preprocess(context), "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"])}


def arc_item(doc):
    return {"context": f"Question: {doc['question']}\nAnswer:", "choices": list(doc["choices"]["text"]),
            "gold": list(doc["choices"]["label"]).index(doc["answerKey"])}


def piqa_item(doc):
    return {"context": f"Question: {doc['goal']}\nAnswer:", "choices": [doc["sol1"], doc["sol2"]],
            "gold": int(doc["label"])}


def boolq_item(doc):
    return {"context": f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(doc["label"])}


def openbookqa_item(doc):
    return {"context": doc["question_stem"], "choices": list(doc["choices"]["text"]),
            "gold": list(doc["choices"]["label"]).index(doc["answerKey"].strip())}


def winogrande_item(doc):
    i = doc["sentence"].index("_")
    return {"contexts": [doc["sentence"][:i] + doc["option1"], doc["sentence"][:i] + doc["option2"]],
            "continuation": doc["sentence"][i + 1:].strip(), "gold": {"1": 0, "2": 1}[doc["answer"]]}


def probe_item(row):
    return {"context": row["context"], "choices": list(row["choices"]), "gold": int(row["gold"])}


def mmlu_question(doc):
    a, b, c, d = doc["choices"]
    return f"{doc['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def mmlu_items(test_docs, dev_docs, shots=5):
    """5-shot MMLU: per subject, the first `shots` dev questions with their answer letters."""
    dev_by_subject = {}
    for doc in dev_docs:
        dev_by_subject.setdefault(doc["subject"], []).append(doc)
    items = []
    for doc in test_docs:
        subject = doc["subject"].replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        shown = dev_by_subject.get(doc["subject"], [])[:shots]
        examples = "".join(f"{mmlu_question(d)} {'ABCD'[d['answer']]}\n\n" for d in shown)
        items.append({"context": header + examples + mmlu_question(doc), "choices": ["A", "B", "C", "D"],
                      "gold": int(doc["answer"])})
    return items


# lm-eval's truthfulqa_mc1/mc2 prompt: six QA pairs before the question.
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")


def truthfulqa_item(doc, targets):
    """MC1 (targets "mc1_targets"): the first choice is the one true answer. MC2
    ("mc2_targets"): the true answers come first, up to the first label 0."""
    labels = list(doc[targets]["labels"])
    return {"context": f"{TRUTHFULQA_PRIMER}\n\nQ: {doc['question']}\nA:", "choices": list(doc[targets]["choices"]),
            "gold": 0, "n_true": labels.index(0)}


# Hub id, config, split of each lm-eval data set (ECOSYSTEM.md).
HUB = {
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "piqa": ("baber/piqa", None, "validation"),  # lm-eval's data-file copy of the script-only "piqa"
    "boolq": ("super_glue", "boolq", "validation"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "mmlu": ("cais/mmlu", "all", "test"),
    "mmlu_dev": ("cais/mmlu", "all", "dev"),
    "truthfulqa": ("truthful_qa", "multiple_choice", "validation"),
    "alpaca_eval": ("tatsu-lab/alpaca_eval", "alpaca_eval", "eval"),
}


def load_docs(name, data_files):
    """Rows of a Hub data set, or of the local file data_files[name] in its schema."""
    from datasets import load_dataset
    if name in data_files:
        path = data_files[name]
        if not os.path.isfile(path):
            raise SystemExit(f"error: data file for {name} not found: {path}")
        kind = "parquet" if path.endswith(".parquet") else "json"
        return list(load_dataset(kind, data_files=path, split="train"))
    hub_id, config, split = HUB[name]
    try:
        return list(load_dataset(hub_id, config, split=split))
    except Exception as e:  # offline, or the Hub changed
        raise SystemExit(f"error: cannot load {hub_id} ({config}, {split}) from the Hub ({type(e).__name__}); "
                         f"pass a local copy with --data_files={name}=path.jsonl") from None


def load_items(task, data_files):
    """The multiple-choice items of a Hub task."""
    item_of = {"hellaswag": hellaswag_item, "arc_easy": arc_item, "arc_challenge": arc_item, "piqa": piqa_item,
               "boolq": boolq_item, "openbookqa": openbookqa_item, "winogrande": winogrande_item}
    if task in item_of:
        return [item_of[task](doc) for doc in load_docs(task, data_files)]
    if task == "mmlu":
        return mmlu_items(load_docs("mmlu", data_files), load_docs("mmlu_dev", data_files))
    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        return [truthfulqa_item(doc, task[-3:] + "_targets") for doc in load_docs("truthfulqa", data_files)]
    raise KeyError(task)


# Metrics each multiple-choice task reports, as lm-eval's task configs do.
MC_METRICS = {
    "hellaswag": ("acc", "acc_norm"), "arc_easy": ("acc", "acc_norm"), "arc_challenge": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"), "openbookqa": ("acc", "acc_norm"), "boolq": ("acc",), "winogrande": ("acc",),
    "mmlu": ("acc",), "truthfulqa_mc1": ("acc",), "truthfulqa_mc2": ("mc2",),
    "testbed_probes": ("acc", "acc_norm"), "testbed_mid_probes": ("acc", "acc_norm"),
}
# The score each task contributes to a table's average (--compare), x 100.
ZERO_SHOT = {"arc_easy": "acc", "arc_challenge": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm",
             "openbookqa": "acc_norm", "piqa": "acc_norm", "winogrande": "acc",
             "testbed_probes": "acc", "testbed_mid_probes": "acc"}
PT_TASKS = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande",
            "testbed_probes"]  # Section 3.1
MT_TASKS = ["arc_challenge", "hellaswag", "winogrande", "testbed_mid_probes"]  # Section 4.1 (no DROP, GSM8K)
SFT = {"alpaca_eval": "win_rate", "truthfulqa_mc2": "acc", "mmlu": "acc", "testbed_sft_test": "exact_match"}
TASKS = ["val_loss", *MC_METRICS, "testbed_sft_test", "testbed_sft_select", "alpaca_eval"]


# ------------------------------------------------------------------ validation loss


@torch.no_grad()
def validation_loss(model, tokenizer, shards, seq_len, eval_tokens, batch_size=16):
    """Mean next-token loss on fixed held-out tokens (train.validation_batches) and bits
    per byte: total nats / ln 2 / UTF-8 bytes of the target tokens, which compares across
    tokenizers. The end-of-text separator stands for no text: 0 bytes."""
    model.eval()
    device = next(model.parameters()).device
    batches = validation_batches(shards, seq_len, eval_tokens, batch_size)
    ids = np.unique(np.concatenate([y.numpy().ravel() for _, y in batches]))
    cl100k = ids if tokenizer.compact_vocab is None else np.asarray(tokenizer.compact_vocab)[ids]
    n_bytes = {int(i): 0 if i == tokenizer.eot else len(tokenizer.enc.decode_single_token_bytes(int(c)))
               for i, c in zip(ids, cl100k)}
    nats, tokens, total_bytes = 0.0, 0, 0
    for x, y in batches:
        logits, _ = model(x.to(device))
        nats += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten().to(device), reduction="sum").item()
        tokens += y.numel()
        total_bytes += sum(n_bytes[i] for i in y.flatten().tolist())
    return {"loss": nats / tokens, "bpb": nats / math.log(2) / total_bytes, "tokens": tokens, "bytes": total_bytes}


# ------------------------------------------------------------------ one checkpoint


@dataclass
class EvalConfig:
    ckpt: str = "out/ckpt.pt"  # checkpoint to evaluate (train.py or sft.py)
    tasks: str = "val_loss,testbed_probes,testbed_sft_test"  # comma-separated; see the docstring
    data_files: str = ""  # task=path[,task=path]: local files in the Hub schema (mmlu_dev= for MMLU shots)
    out: str = ""  # results JSON; default eval.json beside the checkpoint
    batch_size: int = 16  # sequences per forward pass
    limit: int = 0  # score only the first N items of each task (0: all)
    judge: str = ""  # module:callable implementing Judge, for alpaca_eval; none offline
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, else fp32) | float32 | bfloat16


def training_config(ckpt):
    """The pre- or mid-training config behind a checkpoint (for sft.py's, the one it fine-tuned)."""
    config = ckpt.get("config", {})
    return ckpt.get("init_config", {}) if config.get("stage") == "sft" else config


def testbed_dir(ckpt):
    """The testbed the checkpoint was trained on (probes and SFT files sit in its root,
    beside pretrain/ and mid/), else data/testbed."""
    for config in (ckpt.get("config", {}), training_config(ckpt)):
        dataset = os.path.abspath(config.get("dataset", "testbed"))
        for directory in (dataset, os.path.dirname(dataset)):
            if os.path.isfile(os.path.join(directory, "probes.jsonl")):
                return directory
    return os.path.dirname(resolve_dataset("testbed"))


def schedule_of(ckpt):
    """(schedule, alpha_pre, alpha_mid) of the run behind a checkpoint. A mid-training
    run's schedule and alpha_pre are those of the pre-training run it continued, read from
    the config.json that train.py wrote beside that run's checkpoint (None if it is gone).
    A merge (merge.py) is ("wso+merge <shape>", None, None); a cooldown branched from a
    WSO checkpoint (train.py --stage=cooldown) is ("wso+cooldown", its alpha, None)."""
    if "merge" in ckpt:
        return f"wso+merge {ckpt['merge']['shape']}", None, None
    pre, alpha_mid = training_config(ckpt), None
    if pre.get("stage") == "cooldown":
        return "wso+cooldown", pre.get("alpha"), None
    if pre.get("stage") == "mid":
        alpha_mid = pre.get("alpha_mid")
        path = os.path.join(os.path.dirname(pre.get("init_from", "")), "config.json")
        pre = {}
        if os.path.isfile(path):
            with open(path) as f:
                pre = json.load(f).get("train", {})
    if pre.get("stage") != "pre":
        return None, None, alpha_mid
    return pre["schedule"], 1.0 if pre["schedule"] == "wso" else pre["alpha"], alpha_mid


def parse_data_files(text):
    pairs = [p for p in text.split(",") if p]
    if any("=" not in p for p in pairs):
        raise SystemExit(f"error: --data_files={text}: expected task=path[,task=path]")
    return dict(p.split("=", 1) for p in pairs)


def load_judge(spec):
    """--judge=module:callable -> that Judge; "" -> None."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"error: --judge={spec}: {e}; expected module:callable") from None


def run_task(task, model, tokenizer, ckpt, cfg, data_files):
    limit = cfg.limit or None
    if task == "val_loss":
        config = training_config(ckpt)
        dataset = data_files.get("val_loss", config.get("dataset", "testbed"))
        try:
            shards = load_split(resolve_dataset(dataset), "val")
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"error: no validation split for {dataset!r}: {e}") from None
        result = validation_loss(model, tokenizer, shards, config.get("seq_len", 128),
                                 config.get("eval_tokens", 65536), cfg.batch_size)
        return {**result, "dataset": dataset}
    if task.startswith("testbed_"):
        name = {"testbed_probes": "probes", "testbed_mid_probes": "mid_probes"}.get(task, task[len("testbed_"):])
        path = data_files.get(task) or os.path.join(testbed_dir(ckpt), f"{name}.jsonl")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {task} needs {path}, which does not exist; run python data/testbed/prepare.py")
        if task.startswith("testbed_sft"):
            return testbed_sft_accuracy(model, tokenizer, path, batch_size=cfg.batch_size, limit=limit)
        items = [probe_item(row) for row in read_jsonl(path)[:limit]]
        return score_items(model, tokenizer, items, MC_METRICS[task], cfg.batch_size, task)
    if task == "alpaca_eval":
        judge = load_judge(cfg.judge)
        rows = load_docs(task, data_files)[:limit] if judge else []
        return alpaca_eval(model, tokenizer, rows, judge, batch_size=cfg.batch_size)
    return score_items(model, tokenizer, load_items(task, data_files)[:limit], MC_METRICS[task], cfg.batch_size, task)


def main(cfg: EvalConfig):
    tasks = [t for t in cfg.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
    data_files = parse_data_files(cfg.data_files)
    ckpt = load_checkpoint(cfg.ckpt)
    device = resolve_device(cfg.device)
    _, autocast = autocast_context(device, cfg.dtype)
    model = Llama(LlamaConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device)
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    schedule, alpha_pre, alpha_mid = schedule_of(ckpt)
    out = cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "eval.json")
    results = {"ckpt": os.path.abspath(cfg.ckpt), "step": ckpt.get("step"),
               "stage": ckpt.get("config", {}).get("stage"),
               "schedule": schedule, "alpha_pre": alpha_pre, "alpha_mid": alpha_mid,
               "config": ckpt.get("config", {}), "tasks": {}}
    if os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)
        if (previous.get("ckpt"), previous.get("step")) == (results["ckpt"], results["step"]):
            results["tasks"] = previous["tasks"]
    print(f"evaluating {cfg.ckpt} (step {results['step']}, {results['stage']}, schedule {schedule}, "
          f"alpha_pre {alpha_pre}, alpha_mid {alpha_mid}) on {', '.join(tasks)}; device={device}")
    eta = Eta(len(tasks))
    eta(0)
    for k, task in enumerate(tasks):
        t0 = time.perf_counter()
        with autocast:
            results["tasks"][task] = run_task(task, model, tokenizer, ckpt, cfg, data_files)
        shown = {key: round(v, 4) if isinstance(v, float) else v for key, v in results["tasks"][task].items()}
        print(f"[{k + 1}/{len(tasks)}] {task}: {shown} ({time.perf_counter() - t0:.1f}s, ETA {eta(k + 1)})")
        with open(out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out + ".tmp", out)
    print(f"wrote {out}")
    return results


# ------------------------------------------------------------------ the paper's tables

SCHEDULERS = {"wso": "WSO", "wsd": "WSD", "linear": "Linear", "cosine": "Cosine", "wso+cooldown": "WSO + cooldown"}
# (key, lower is better, format) of the three compared metrics
METRICS = [("valid_loss", True, "+.3f"), ("task_avg", False, "+.1f"), ("sft_task_avg", False, "+.1f")]


def task_average(tasks, score_of):
    """100 x the mean score of the tasks present (score_of: task -> its metric)."""
    values = [tasks[t][m] for t, m in score_of.items() if t in tasks and tasks[t].get(m) is not None]
    return 100 * float(np.mean(values)) if values else None


def load_run(run_dir):
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; run python evaluate.py --ckpt={run_dir}/ckpt.pt first")
    with open(path) as f:
        ev = json.load(f)
    task_set = MT_TASKS if ev["stage"] == "mid" else PT_TASKS
    sft_eval, summary = os.path.join(run_dir, "sft_eval.json"), os.path.join(run_dir, "sft", "summary.json")
    sft_task_avg = None
    if os.path.isfile(sft_eval):
        with open(sft_eval) as f:
            sft_task_avg = task_average(json.load(f)["tasks"], SFT)
    elif os.path.isfile(summary):
        with open(summary) as f:
            sft_task_avg = json.load(f)["sft_task_avg"]
    return {"stage": ev["stage"], "schedule": ev["schedule"], "alpha_pre": ev["alpha_pre"],
            "alpha_mid": ev["alpha_mid"], "valid_loss": ev["tasks"].get("val_loss", {}).get("loss"),
            "task_avg": task_average(ev["tasks"], {t: ZERO_SHOT[t] for t in task_set}), "sft_task_avg": sft_task_avg,
            "scores": {t: 100 * ev["tasks"][t][m] for t, m in ZERO_SHOT.items() if t in ev["tasks"]}}


def constant_lr(run):
    """WSO: no decay in any stage. The reference of each column is the best of the others."""
    return run["alpha_pre"] == 1.0 and run["alpha_mid"] in (None, 1.0)


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def tables(runs, mid):
    """Table 1/3 (mid=False) or Table 2/4 (mid=True) layout: differences from the best
    decay-based run per metric, best in bold; then the absolute values."""
    prefix = "MT" if mid else "PT"
    runs = sorted(runs, key=lambda r: (list(SCHEDULERS).index(r["schedule"]) if r["schedule"] in SCHEDULERS else 9,
                                       -(r["alpha_pre"] or 0), -(r["alpha_mid"] or 0)))
    labels = [[SCHEDULERS.get(r["schedule"], r["schedule"] or "?"), fmt(r["alpha_pre"], ".1f")]
              + ([fmt(r["alpha_mid"], ".1f")] if mid else []) for r in runs]
    names = [f"{prefix} Valid Loss ↓", f"{prefix} Task Avg", "SFT Task Avg"]
    columns = []
    for key, lower, spec in METRICS:
        reference = [r[key] for r in runs if not constant_lr(r) and r[key] is not None]
        if not reference:
            columns.append(["n/a"] * len(runs))
            continue
        ref = min(reference) if lower else max(reference)
        deltas = [None if r[key] is None else r[key] - ref for r in runs]
        best = (min if lower else max)(d for d in deltas if d is not None)
        columns.append([fmt(d, spec) if d != best else f"**{d:{spec}}**" for d in deltas])
    label_header = ["Scheduler", "α_pre"] + (["α_mid"] if mid else [])
    relative = markdown(label_header + [n + " Δ" for n in names],
                        [label + [col[i] for col in columns] for i, label in enumerate(labels)])
    tasks = [t for t in ZERO_SHOT if any(t in r["scores"] for r in runs)]
    absolute = markdown(label_header + names + tasks,
                        [label + [fmt(r["valid_loss"], ".3f"), fmt(r["task_avg"], ".1f"), fmt(r["sft_task_avg"], ".1f")]
                         + [fmt(r["scores"].get(t), ".1f") for t in tasks] for label, r in zip(labels, runs)])
    return relative, absolute


def compare(run_dirs):
    """Markdown of the paper's tables for pre-training runs and for mid-training runs."""
    runs = [load_run(d) for d in run_dirs]
    out = []
    for mid, title in ((False, "Pre-training -> SFT (Table 1/3 layout)"),
                       (True, "Mid-training -> SFT (Table 2/4 layout)")):
        chosen = [r for r in runs if (r["stage"] == "mid") == mid]
        if chosen:
            relative, absolute = tables(chosen, mid)
            out += [f"### {title}: Δ from the best decay-based run per column, best in bold", "", relative, "",
                    "Absolute values (task scores x 100):", "", absolute, ""]
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        if len(sys.argv) < 3:
            raise SystemExit("error: --compare needs run directories, each holding an eval.json")
        print(compare(sys.argv[2:]))
    else:
        main(parse_args(EvalConfig, description=__doc__))
