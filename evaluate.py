"""
Evaluation of one checkpoint: the numbers behind the paper's Tables 1-4 (Sections 3.1, 3.2,
4; Appendix E), scored the way lm-evaluation-harness scores them (nanowso/scoring.py), so they can
be compared; and --compare, the tables themselves from several runs (study/tables.py).

    python evaluate.py --ckpt=out/ckpt.pt --tasks=val_loss,testbed_recall,testbed_probes,testbed_sft_test
    python evaluate.py --ckpt=out/ckpt.pt --tasks=hellaswag,arc_easy --data_files=hellaswag=h.jsonl,arc_easy=a.parquet
    python evaluate.py --ckpt=out/sft/lr_0.001/ckpt.pt --harness=gsm8k_cot,drop --harness_fewshot=drop=5   # lm-eval's tasks
    python evaluate.py --compare out-wso out-wsd-0.1 out-cosine-0.0 ...   # the paper's tables
    python evaluate.py --help

Tasks (TASKS below):
    val_loss            mean next-token loss and bits per byte on the checkpoint's val split, and
                        value_loss on the tokens of fact values where the corpus marks them
    testbed_recall      greedy recall of every fact from a trained phrasing, exact (the testbed's
                        "PT Task Avg"); testbed_mid_recall from the mid-training phrasings
    testbed_probes      zero-shot 4-way probes, lm-eval style; testbed_mid_probes
    testbed_sft_test    after the chat template: greedy exact match, and choice among the
                        attribute's values by log-likelihood (the "SFT Task Avg" is their mean
                        x100, tables.sft_task_avg); testbed_sft_select on the selection people
    arc_easy arc_challenge boolq hellaswag openbookqa piqa winogrande   zero-shot (Section 3.1)
    mmlu (5-shot), truthfulqa_mc1, truthfulqa_mc2, alpaca_eval           after SFT (Appendix E)
--harness runs any task of lm-evaluation-harness with lm-eval's own configs (nanowso/harness.py);
each named task's metrics go to tasks[name] ("metric,filter" keys), every item to
<out>_harness_samples.jsonl.
Hub tasks load from the Hub id in HUB, or offline from --data_files=task=path[,task=path]
(.jsonl/.json/.parquet in the Hub schema; MMLU's shots come from mmlu_dev=path). Prompts
and metrics follow lm-evaluation-harness's task YAMLs (lm_eval/tasks/<task>/*.yaml).

Results JSON (--out, default eval.json beside the checkpoint; tasks merge into an existing
file of the same checkpoint and step):
    {"ckpt": str, "step": int, "stage": "pre" | "mid" | "sft",
     "schedule": str, "alpha_pre": float, "alpha_mid": float | null,   # the run's LR schedule
     "config": the checkpoint's training config,
     "tasks": {"val_loss": {"loss", "bpb", "tokens", "bytes", "dataset", ["value_loss", "value_tokens"]},
               "testbed_recall": {"exact_match", "n"},
               "<multiple choice>": {"acc", ["acc_norm"], "n"},          # fractions in [0, 1]
               "truthfulqa_mc2": {"acc", "n"},                           # true-answer mass
               "testbed_sft_test": {"exact_match", "choice", "choice_chance", "n"},
               "alpaca_eval": {"win_rate": float | null, "stderr", "position_bias", "n", "reference",
                               "judge", "items" (every verdict, nanowso/judge.py), or "note" without --judge}}}
--compare reads, per run directory:
    eval.json      the pre- or mid-training checkpoint's results:
                   PT/MT Valid Loss = tables.valid_loss: tasks.val_loss.value_loss on the
                                      testbed's pre-training text, else tasks.val_loss.loss,
                   PT Task Avg      = 100 x mean of tables.ZERO_SHOT[task] over the PT_TASKS present,
                   MT Task Avg      = the same over MT_TASKS (for a stage "mid" checkpoint)
    sft_eval.json  results of the fine-tuned checkpoint: SFT Task Avg (tables.sft_task_avg; a null
                   alpaca_eval is left out); if absent, sft/summary.json from
                   `sft.py --out_dir=<run>/sft` supplies its sft_task_avg (the same definition)
    Δ columns subtract the best run that decays the LR in some stage (alpha_pre < 1 or
    alpha_mid < 1): WSO, constant throughout, is never the reference (Tables 1-4).
"""

import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from data.formats import Tokenizer, load_rows, load_split, load_value_mask, read_jsonl, write_jsonl
from data.loaders import resolve_dataset, testbed_of, validation_batches
from model import IGNORE_INDEX
from nanowso.checkpoint import load_checkpoint, load_model, schedule_of, training_config
from nanowso.common import Eta, parse_args
from nanowso.judge import alpaca_eval, alpaca_rows, load_judge, reference_outputs
from nanowso.runtime import autocast_context, resolve_device
from nanowso.scoring import mean_loss, recall_accuracy, score_items, testbed_sft_accuracy
from study.tables import SCHEDULERS, ZERO_SHOT, paper_tables, sft_task_avg, valid_loss, zero_shot_avg

# ------------------------------------------------------------------ tasks


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
    ("mc2_targets"): every choice labelled 1 is true, wherever it stands (lm-eval 0.4.13's
    truthfulqa/utils.py process_results_mc2 sums probs_norm[labels == 1]; older versions took
    the answers before the first 0, the same only on the Hub's true-first layout)."""
    labels = [int(label) for label in doc[targets]["labels"]]
    return {"context": f"{TRUTHFULQA_PRIMER}\n\nQ: {doc['question']}\nA:", "choices": list(doc[targets]["choices"]),
            "gold": 0, "labels": labels}


# Hub id, config, split of each lm-eval data set (the dataset_path, dataset_name and test or
# validation split of lm_eval/tasks/<task>/*.yaml).
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
}


def load_docs(name, data_files):
    """Rows of a Hub data set, or of the local file data_files[name] in its schema."""
    from datasets import load_dataset
    if name in data_files:
        rows = load_rows(data_files[name])
        if not rows:
            raise SystemExit(f"error: {data_files[name]} (--data_files {name}) has no rows")
        return rows
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
TASKS = ["val_loss", *MC_METRICS, "testbed_recall", "testbed_mid_recall", "testbed_sft_test", "testbed_sft_select",
         "alpaca_eval"]


# ------------------------------------------------------------------ validation loss


def validation_loss(model, tokenizer, shards, seq_len, eval_tokens, batch_size=16, value_mask=None):
    """Mean next-token loss on fixed held-out tokens (data.loaders.validation_batches, the
    same as train.py's val_loss) and bits per byte: total nats / ln 2 / UTF-8 bytes of the
    target tokens, which compares across tokenizers. The end-of-text separator stands for
    no text: 0 bytes. With value_mask (shards of 0/1 beside the tokens), also value_loss:
    the mean loss of the target tokens that spell fact values, what storing facts lowers
    (the template words between them are learned within a few steps)."""
    device = next(model.parameters()).device
    batches = validation_batches(shards, seq_len, eval_tokens, batch_size)
    targets = np.concatenate([y.numpy().ravel() for _, y in batches])
    ids, counts = np.unique(targets, return_counts=True)
    cl100k = ids if tokenizer.compact_vocab is None else np.asarray(tokenizer.compact_vocab)[ids]
    n_bytes = [0 if i == tokenizer.eot else len(tokenizer.enc.decode_single_token_bytes(int(c)))
               for i, c in zip(ids, cl100k)]
    total_bytes = int(np.dot(n_bytes, counts))
    loss = mean_loss(model, batches, device, nullcontext())  # main runs every task inside autocast
    result = {"loss": loss, "bpb": loss * len(targets) / math.log(2) / total_bytes, "tokens": len(targets),
              "bytes": total_bytes}
    if value_mask is not None:
        masks = validation_batches(value_mask, seq_len, eval_tokens, batch_size)
        values = [(x, torch.where(m == 1, y, IGNORE_INDEX)) for (x, y), (_, m) in zip(batches, masks)]
        result.update(value_loss=mean_loss(model, values, device, nullcontext()),
                      value_tokens=int(sum((m == 1).sum() for _, m in masks)))
    return result


# ------------------------------------------------------------------ one checkpoint


@dataclass
class EvalConfig:
    ckpt: str = "out/ckpt.pt"  # checkpoint to evaluate (train.py or sft.py)
    tasks: str = "val_loss,testbed_recall,testbed_probes,testbed_sft_test"  # comma-separated; see the docstring
    data_files: str = ""  # task=path[,task=path]: local files in the Hub schema (mmlu_dev= for MMLU shots)
    out: str = ""  # results JSON; default eval.json beside the checkpoint
    batch_size: int = 16  # sequences per forward pass
    limit: int = 0  # score only the first N items of each task (0: all)
    judge: str = ""  # alpaca_eval's judge: a local HF model dir | an OpenAI-compatible URL | module:callable (nanowso/judge.py)
    judge_model: str = ""  # the model name an OpenAI-compatible judge server serves
    judge_reference: str = ""  # alpaca_eval's reference: a checkpoint | an outputs .jsonl | "" the rows' own output
    harness: str = ""  # lm-eval tasks or groups (gsm8k,drop,agieval,bbh,...) run by nanowso/harness.py; alone, no --tasks
    harness_files: str = ""  # task=path or task:split=path: local files in the Hub schema for --harness tasks
    harness_fewshot: str = ""  # task=N[,task=N]: shots where the paper differs from lm-eval's config (drop=5)
    harness_chat: str = "auto"  # lm-eval prompts in the chat template: auto (for SFT checkpoints) | true | false
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, else fp32) | float32 | bfloat16

    def __post_init__(self):
        if self.limit < 0:
            raise ValueError(f"limit={self.limit} must be >= 0 (0 scores every item)")
        if not self.harness and not [t for t in self.tasks.split(",") if t.strip()]:
            raise ValueError(f"tasks={self.tasks!r} names no task: give some of {', '.join(TASKS)} (or --harness)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


def testbed_folder(ckpt):
    """The testbed the checkpoint was trained on (probes and SFT files sit in its root,
    beside pretrain/ and mid/), else data/testbed."""
    for config in (ckpt.get("config", {}), training_config(ckpt)):
        testbed = testbed_of(config.get("dataset", "testbed"))
        if testbed:
            return testbed
    return testbed_of("testbed")


def parse_data_files(text):
    pairs = [p for p in text.split(",") if p]
    if any("=" not in p for p in pairs):
        raise SystemExit(f"error: --data_files={text}: expected task=path[,task=path]")
    return dict(p.split("=", 1) for p in pairs)


def run_task(task, model, tokenizer, ckpt, cfg, data_files, out):
    limit = cfg.limit or None
    if task == "val_loss":
        config = training_config(ckpt)
        dataset = data_files.get("val_loss", config.get("dataset", "testbed"))
        try:
            data_dir = resolve_dataset(dataset)
            shards, value_mask = load_split(data_dir, "val"), load_value_mask(data_dir, "val")
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"error: no validation split for {dataset!r}: {e}") from None
        result = validation_loss(model, tokenizer, shards, config.get("seq_len", 128),
                                 config.get("eval_tokens", 65536), cfg.batch_size, value_mask)
        return {**result, "dataset": dataset}
    if task.startswith("testbed_"):
        name = {"testbed_probes": "probes", "testbed_recall": "probes", "testbed_mid_probes": "mid_probes",
                "testbed_mid_recall": "mid_probes"}.get(task, task[len("testbed_"):])
        path = data_files.get(task) or os.path.join(testbed_folder(ckpt), f"{name}.jsonl")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {task} needs {path}, which does not exist; run python data/testbed/prepare.py")
        if task.startswith("testbed_sft"):
            return testbed_sft_accuracy(model, tokenizer, path, batch_size=cfg.batch_size, limit=limit)
        if task.endswith("_recall"):
            return recall_accuracy(model, tokenizer, read_jsonl(path)[:limit], batch_size=cfg.batch_size)
        items = [probe_item(row) for row in read_jsonl(path)[:limit]]
        return score_items(model, tokenizer, items, MC_METRICS[task], cfg.batch_size, task)
    if task == "alpaca_eval":
        device = next(model.parameters()).device
        judge = load_judge(cfg.judge, cfg.judge_model, device)
        if judge is None:
            return alpaca_eval(model, tokenizer, [], None, [])[0]
        rows = alpaca_rows(data_files.get(task, ""))[:limit]
        references = reference_outputs(cfg.judge_reference, rows, batch_size=cfg.batch_size, device=device)
        result, items = alpaca_eval(model, tokenizer, rows, judge, references, batch_size=cfg.batch_size)
        path = os.path.splitext(out)[0] + "_alpaca_eval.jsonl"
        write_jsonl(path, items)
        return {**result, "reference": cfg.judge_reference or "the rows' output", "judge": cfg.judge, "items": path}
    return score_items(model, tokenizer, load_items(task, data_files)[:limit], MC_METRICS[task], cfg.batch_size, task)


def main(cfg: EvalConfig):
    alone = cfg.harness and cfg.tasks == EvalConfig.tasks  # --harness without --tasks runs only the harness
    tasks = [] if alone else [t for t in cfg.tasks.split(",") if t]
    if cfg.harness_chat not in ("auto", "true", "false"):
        raise SystemExit(f"error: --harness_chat={cfg.harness_chat}: expected auto, true or false")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
    data_files = parse_data_files(cfg.data_files)
    ckpt = load_checkpoint(cfg.ckpt)
    device = resolve_device(cfg.device)
    _, autocast = autocast_context(device, cfg.dtype)
    model = load_model(ckpt, device)
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
          f"alpha_pre {alpha_pre}, alpha_mid {alpha_mid}) on {', '.join(tasks + [cfg.harness] * bool(cfg.harness))}; "
          f"device={device}")
    eta = Eta(len(tasks))
    eta(0)
    for k, task in enumerate(tasks):
        t0 = time.perf_counter()
        with autocast:
            results["tasks"][task] = run_task(task, model, tokenizer, ckpt, cfg, data_files, out)
        shown = {key: round(v, 4) if isinstance(v, float) else v for key, v in results["tasks"][task].items()}
        print(f"[{k + 1}/{len(tasks)}] {task}: {shown} ({time.perf_counter() - t0:.1f}s, ETA {eta(k + 1)})")
        write_results(results, out)
    if cfg.harness:
        run_harness(cfg, model, tokenizer, results, autocast, out)
    print(f"wrote {out}")
    return results


def write_results(results, out):
    with open(out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out + ".tmp", out)


def run_harness(cfg, model, tokenizer, results, autocast, out):
    """--harness: lm-eval's tasks through nanowso/harness.py. Each named task's (or group's) metrics,
    lm-eval's "metric,filter" keys, go to tasks[name]; lm-eval's whole results under "harness";
    every scored item, to look at, to <out>_harness_samples.jsonl."""
    from nanowso import harness
    names = [t for t in cfg.harness.split(",") if t]
    chat = {"auto": results["stage"] == "sft", "true": True, "false": False}[cfg.harness_chat]
    samples = os.path.splitext(out)[0] + "_harness_samples.jsonl"
    t0 = time.perf_counter()
    with autocast:
        got = harness.run(model, tokenizer, names, cfg.harness_files, cfg.harness_fewshot, cfg.limit,
                          cfg.batch_size, chat, samples)
    print(got.pop("table"))
    for name in names:
        results["tasks"][name] = got["results"].get(name, {})
    results["harness"] = got
    write_results(results, out)
    print(f"harness: {', '.join(names)} ({time.perf_counter() - t0:.1f}s, chat template {chat}); "
          f"every item in {samples}")


# ------------------------------------------------------------------ the paper's tables

def load_run(run_dir):
    """A row of tables.paper_tables from a run directory's eval.json and its SFT results."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; run python evaluate.py --ckpt={run_dir}/ckpt.pt first")
    with open(path) as f:
        ev = json.load(f)
    sft_eval, summary = os.path.join(run_dir, "sft_eval.json"), os.path.join(run_dir, "sft", "summary.json")
    sft_avg = None
    if os.path.isfile(sft_eval):
        with open(sft_eval) as f:
            sft_avg = sft_task_avg(json.load(f)["tasks"])
    elif os.path.isfile(summary):
        with open(summary) as f:
            sft_avg = json.load(f)["sft_task_avg"]
    row = {"run": run_dir, "seed": 0, "stage": ev["stage"], "schedule": ev["schedule"], "alpha_pre": ev["alpha_pre"],
           "alpha_mid": ev["alpha_mid"], "valid_loss": valid_loss(ev["tasks"].get("val_loss", {})),
           "task_avg": zero_shot_avg(ev["tasks"], ev["stage"]), "sft_task_avg": sft_avg}
    return {**row, **{t: 100 * ev["tasks"][t][m] for t, m in ZERO_SHOT.items()
                      if ev["tasks"].get(t, {}).get(m) is not None}}


def compare(run_dirs):
    """Markdown of the paper's tables for pre-training runs and for mid-training runs: rows in
    the paper's order (scheduler, then alpha_pre and alpha_mid from high to low), each task's
    score beside the averages."""
    order = list(SCHEDULERS)
    runs = sorted((load_run(d) for d in run_dirs),
                  key=lambda r: (order.index(r["schedule"]) if r["schedule"] in order else len(order),
                                 -(r["alpha_pre"] or 0), -(r["alpha_mid"] or 0)))
    out = []
    for mid, title in ((False, "Pre-training -> SFT (Table 1/3 layout)"),
                       (True, "Mid-training -> SFT (Table 2/4 layout)")):
        chosen = [r for r in runs if (r["stage"] == "mid") == mid]
        if chosen:
            tasks = [(t, t, ".1f") for t in ZERO_SHOT if any(t in r for r in chosen)]
            relative, absolute = paper_tables(chosen, mid, absolute=tasks)
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
