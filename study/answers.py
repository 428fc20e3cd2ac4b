"""
What a testbed's SFT score is made of, read from the raw answers: for each sweep of a study
(runs/<study>/seed<k>/<run>/sft), the fine-tuned model at the selected LR (or --lr) answers the
test questions again; per attribute it reports exact match, the right kind of answer (a city
for a city question, true or not: scoring.testbed_sft_accuracy's type_match) and the ranked
choice, and pairs each schedule with WSO seed by seed (study.tables.paired). Every greedy answer
is saved beside its checkpoint (answers_test.json) to be read. A score that grows by answering
in the right format is format learning, not recall of what pre-training stored.

    python -m study.answers --runs=runs/hmm --out=results/hmm/answers.md
    python -m study.answers --runs=runs/hmm --lr=0.00032      # every sweep at one LR instead
"""

import glob
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from data.formats import Tokenizer, read_jsonl
from data.loaders import testbed_of
from nanowso.checkpoint import load_checkpoint, load_model
from nanowso.common import parse_args
from nanowso.scoring import answered_in_kind, testbed_sft_accuracy
from study.tables import markdown, paired

MEASURES = ("exact_match", "type_match", "choice")


@dataclass
class AnswersConfig:
    runs: str = "runs/hmm"  # a study's runs_dir: seed<k>/<run>/sft/summary.json under it
    lr: str = "best"  # best: each sweep's selected LR; or one LR of the grid, e.g. 0.00032
    out: str = ""  # write the markdown tables here too


def sweeps(runs_dir):
    """[(seed, run, sweep dir)] of every finished sweep under a study's runs_dir."""
    found = []
    for summary in sorted(glob.glob(os.path.join(runs_dir, "seed*", "*", "sft", "summary.json"))):
        sweep = os.path.dirname(summary)
        run_dir = os.path.dirname(sweep)
        found.append((int(os.path.basename(os.path.dirname(run_dir))[4:]), os.path.basename(run_dir), sweep))
    return found


def lr_dir(sweep, lr):
    """The folder of the LR asked for in one sweep (summary.json's runs), or an error naming the grid."""
    with open(os.path.join(sweep, "summary.json")) as f:
        summary = json.load(f)
    want = summary["best_lr"] if lr == "best" else float(lr)
    for r in summary["runs"]:
        if abs(r["lr"] - want) <= 1e-9 * max(1.0, abs(want)):
            return r["run_dir"], summary["dataset"], r["lr"]
    grid = ", ".join(f"{r['lr']:g}" for r in summary["runs"])
    raise SystemExit(f"error: {sweep} has no LR {lr}; its grid: {grid}")


def answers_of(run_dir, dataset):
    """testbed_sft_accuracy on the test split for one fine-tuned checkpoint, cached in
    run_dir/answers_test.json (with every greedy answer) so a rerun reads instead of scoring."""
    cache = os.path.join(run_dir, "answers_test.json")
    testbed = testbed_of(dataset)
    if testbed is None:
        raise SystemExit(f"error: {run_dir} was fine-tuned on {dataset!r}, which has no testbed questions to answer")
    if os.path.exists(cache):
        with open(cache) as f:
            return in_kind_again(json.load(f), read_jsonl(os.path.join(testbed, "sft_test.jsonl")))
    ckpt = load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    model = load_model(ckpt)
    with torch.no_grad():
        result = testbed_sft_accuracy(model, Tokenizer.from_dict(ckpt["tokenizer"]),
                                      os.path.join(testbed, "sft_test.jsonl"), keep_answers=True)
    with open(cache + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(cache + ".tmp", cache)
    return result


def in_kind_again(result, rows):
    """A cached result with type_match scored again from its saved answers by today's
    scoring.answered_in_kind (which once took only a date some test person has for a date)."""
    typed = answered_in_kind(result["answers"], rows[:len(result["answers"])])
    result["type_match"] = float(np.mean(typed))
    for attribute, measures in result["by_attribute"].items():
        measures["type_match"] = float(np.mean(
            [t for t, row in zip(typed, rows) if row.get("attribute") == attribute]))
    return result


def report(rows, reference="wso"):
    """Markdown: per attribute and measure, each schedule's mean over seeds (percent) and its
    paired difference from the reference with the 95% t interval and the detectable effect."""
    runs = list(dict.fromkeys(r["run"] for r in rows))
    attributes = ["all"] + sorted({a for r in rows for a in r["by_attribute"]})
    by = {(r["run"], r["seed"]): r for r in rows}

    def value(r, attribute, measure):
        return 100 * (r[measure] if attribute == "all" else r["by_attribute"][attribute][measure])

    means, diffs = [], []
    for attribute in attributes:
        for measure in MEASURES:
            line = [attribute, measure]
            for run in runs:
                values = [value(r, attribute, measure) for r in rows if r["run"] == run]
                line.append(f"{sum(values) / len(values):.1f}")
            means.append(line)
            for run in runs:
                if run == reference:
                    continue
                seeds = sorted(s for (name, s) in by if name == run and (reference, s) in by)
                if len(seeds) < 2:
                    continue
                d = [value(by[(run, s)], attribute, measure) - value(by[(reference, s)], attribute, measure)
                     for s in seeds]
                p = paired(d)
                diffs.append([f"{run} - {reference}", attribute, measure, ", ".join(f"{v:+.1f}" for v in d),
                              f"{p['mean']:+.1f}", f"[{p['low']:+.1f}, {p['high']:+.1f}]", f"{p['detectable']:.1f}"])
    text = markdown(["attribute", "measure (%)"] + runs, means)
    if diffs:
        text += "\n\n" + markdown(["pair (per seed)", "attribute", "measure", "per seed (points)", "mean",
                                   "95% t interval", "detectable (80% power)"], diffs)
    return text


def main(cfg):
    found = sweeps(cfg.runs)
    if not found:
        raise SystemExit(f"error: no finished SFT sweep under {cfg.runs} (seed<k>/<run>/sft/summary.json); "
                         f"run reproduce.py first")
    rows = []
    for k, (seed, run, sweep) in enumerate(found, 1):
        run_dir, dataset, lr = lr_dir(sweep, cfg.lr)
        print(f"[{k}/{len(found)}] seed {seed} {run} lr {lr:g}", file=sys.stderr, flush=True)
        rows.append({"seed": seed, "run": run, "lr": lr, **answers_of(run_dir, dataset)})
    title = f"SFT test answers at {'each sweep' + chr(39) + 's selected LR' if cfg.lr == 'best' else 'lr ' + cfg.lr}"
    text = f"## {title} ({cfg.runs}, {len(rows)} sweeps)\n\n{report(rows)}\n"
    print(text)
    if cfg.out:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        with open(cfg.out, "a") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main(parse_args(AnswersConfig, description=__doc__))
