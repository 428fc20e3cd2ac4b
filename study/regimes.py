"""
Why the biography testbed inverted the paper's mechanism and the HMM corpus does not: the
Hessian trace recorded during pre-training drawn against the loss at the same step, one panel
per testbed, on the training text (against the training loss) and on held-out text (against
the held-out loss). Reads train.py runs made with --sharpness_interval (their log.jsonl).

    python -m study.regimes --memorization=runs/bio/seed0/wso,runs/bio/seed0/wsd_a0 \
        --entropy=runs/hmm/seed0/wso,runs/hmm/seed0/wsd_a0 --out=results/fig_trace_vs_loss.png

Runs of one schedule over several seeds (the same label) are averaged step by step.
"""

import json
import os
from dataclasses import dataclass

import numpy as np

from nanowso.common import parse_args
from study.figures import run_records
from study.tables import scheduler_label


def trace_loss_path(run_dir, data="train_text", window=50):
    """[(step, loss, trace)] of one run at each in-training sharpness step: with data="pretrain"
    the held-out loss evaluated at that step, with "train_text" the mean training loss logged
    over the `window` steps up to it (the batch loss is noisy)."""
    records = run_records(run_dir)
    points = []
    for r in records:
        trace = r.get(f"sharpness_{data}")
        if trace is None:
            continue
        step = r["step"]
        if data == "pretrain":
            losses = [q["val_loss"] for q in records if q.get("step") == step and "val_loss" in q]
        else:
            losses = [q["loss"] for q in records if "loss" in q and step - window < q["step"] <= step]
        if losses:
            points.append((step, float(np.mean(losses)), trace))
    return points


def run_label(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)["train"]
    schedule = "wsd" if cfg.get("stage") == "cooldown" else cfg["schedule"]  # a WSD branch of a WSO run
    return "WSO" if schedule == "wso" else f"{scheduler_label(schedule)} to {cfg['alpha']:g}"


def mean_paths(run_dirs, data):
    """{label: [(step, mean loss, mean trace)]} over the runs that share a label."""
    by_label = {}
    for run_dir in run_dirs:
        by_label.setdefault(run_label(run_dir), []).append(trace_loss_path(run_dir, data))
    out = {}
    for label, paths in by_label.items():
        steps = sorted(set.intersection(*(set(s for s, _, _ in p) for p in paths)))
        out[label] = [(s, float(np.mean([l for p in paths for t, l, _ in p if t == s])),
                       float(np.mean([h for p in paths for t, _, h in p if t == s]))) for s in steps]
    return out


def plot_trace_against_loss(panels, path):
    """panels: {(column title, row): {label: [(step, loss, trace)]}}, row "train_text" or
    "pretrain"; each path drawn with its first and last steps marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(title for title, _ in panels))
    rows = [r for r in ("train_text", "pretrain") if any(row == r for _, row in panels)]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(5.5 * len(columns), 4 * len(rows)), squeeze=False)
    names = {"train_text": ("training loss", r"Tr(H) on the training text"),
             "pretrain": ("held-out loss", r"Tr(H) on held-out text")}
    for (title, row), paths in panels.items():
        ax = axes[rows.index(row)][columns.index(title)]
        for label, points in paths.items():
            steps, losses, traces = zip(*points)
            line, = ax.plot(losses, traces, marker="o", markersize=3, label=label)
            ax.annotate(f"step {steps[0]}", (losses[0], traces[0]), fontsize=7, color=line.get_color())
            ax.annotate(f"{steps[-1]}", (losses[-1], traces[-1]), fontsize=7, color=line.get_color())
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_xlabel(names[row][0])
        ax.set_ylabel(names[row][1])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


@dataclass
class RegimesConfig:
    memorization: str = ""  # comma-separated train.py run dirs on the biography testbed
    entropy: str = ""  # comma-separated train.py run dirs on the HMM corpus
    out: str = "fig_trace_vs_loss.png"


def main(cfg):
    groups = {"memorization (biographies, ~59 passes)": cfg.memorization,
              "irreducible entropy (HMM corpus, ~1 pass)": cfg.entropy}
    panels = {}
    for title, dirs in groups.items():
        run_dirs = [d for d in dirs.split(",") if d]
        for run_dir in run_dirs:
            if not os.path.isfile(os.path.join(run_dir, "log.jsonl")):
                raise SystemExit(f"error: {run_dir} has no log.jsonl: pass train.py run directories")
        for data in ("train_text", "pretrain"):
            paths = {k: v for k, v in mean_paths(run_dirs, data).items() if v} if run_dirs else {}
            if paths:
                panels[(title, data)] = paths
    if not panels:
        raise SystemExit("error: no sharpness records in the runs given; train with --sharpness_interval=N")
    print(f"wrote {plot_trace_against_loss(panels, cfg.out)}")
    for (title, data), paths in panels.items():
        for label, points in paths.items():
            print(f"{title} | {data} | {label}: " + ", ".join(f"{s}: {l:.3f} {t:.0f}" for s, l, t in points))


if __name__ == "__main__":
    main(parse_args(RegimesConfig, description=__doc__))
