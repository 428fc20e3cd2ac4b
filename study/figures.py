"""
Figures 3 and 4 of the paper (Section 6): sharpness during pre-training, and the score
after SFT against the sharpness SFT started from (with Pearson's r and its bootstrap
interval over seeds); and a Figure 5 of our own, score and sharpness against WSD's decay
length. Plain functions of numbers, drawn with matplotlib; sharpness.py --figures and
reproduce.py feed them. Nothing here runs on its own.
"""

import itertools
import json
import os

import numpy as np

from data.formats import read_jsonl
from schedules import wsd_t_stable
from study.tables import mixed_forgetting, paired, scheduler_label


def plot_sharpness_curves(runs, t_stable=None, path="sharpness_curves.png", ylabel=r"Sharpness $= \mathrm{Tr}(\mathbf{H})$"):
    """Figure 3: sharpness against step, one line with error bars per schedule.
    runs: {label: [(step, trace, stderr), ...]}; t_stable draws WSD's decay start."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in runs.items():
        steps, traces, stderrs = zip(*sorted(points))
        ax.errorbar(steps, traces, yerr=stderrs, marker="o", markersize=3, capsize=2, label=label)
    if t_stable is not None:
        ax.axvline(t_stable, color="gray", linestyle="--", label=r"$T_{\mathrm{stable}}$")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def per_seed_points(points):
    """{label: [(sharpness, score) per seed]} from either that or {label: (sharpness, score)}."""
    return {k: [v] if np.ndim(v) == 1 else list(v) for k, v in points.items()}


def pearson(x, y):
    """Pearson's r, nan for fewer than 2 points or no spread."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 and x.std() > 0 and y.std() > 0 else float("nan")


def pearson_interval(points, rounds=2000, seed=0):
    """A 95% bootstrap interval of Pearson's r between the per-label means: the seeds are
    drawn with replacement (the same draw for every label) and r recomputed. (nan, nan)
    with one seed: there is no spread over seeds to draw from."""
    per_seed = per_seed_points(points)
    n = min(len(v) for v in per_seed.values())
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(rounds):
        draw = rng.integers(n, size=n)
        means = [np.mean([v[i] for i in draw], axis=0) for v in per_seed.values()]
        rs.append(pearson([m[0] for m in means], [m[1] for m in means]))
    rs = np.array(rs)[~np.isnan(rs)]
    return (float(np.percentile(rs, 2.5)), float(np.percentile(rs, 97.5))) if len(rs) else (float("nan"),) * 2


def plot_sharpness_vs_score(points, path="sharpness_vs_score.png", xlabel="pre-training val"):
    """Figure 4: one point per schedule, SFT score against pre-training sharpness, the mean
    over seeds with their standard deviation as error bars on both axes. points: {label:
    (sharpness, score)} or {label: [(sharpness, score) per seed]}. A legend names the points
    (labels written beside them overlap), outside the axes so it hides none. Returns Pearson's
    r of the means (nan for < 2 points or no spread); the title gives it with its bootstrap
    interval over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_seed = per_seed_points(points)
    means = {k: np.mean(v, axis=0) for k, v in per_seed.items()}
    r = pearson([m[0] for m in means.values()], [m[1] for m in means.values()])
    lo, hi = pearson_interval(per_seed)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, values), marker in zip(per_seed.items(), "osD^vP*Xh<>p"):
        spread = np.std(values, axis=0, ddof=1) if len(values) > 1 else (0, 0)
        ax.errorbar(*means[label], xerr=spread[0], yerr=spread[1], fmt=marker, capsize=3, label=label)
    interval = "" if np.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"
    ax.set_title(f"Pearson r = {r:.3f}{interval}")
    ax.set_xlabel(f"sharpness ({xlabel})")
    ax.set_ylabel("score after SFT")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return r


def plot_against_decay_fraction(per_fraction, path="fig5_decay_length.png"):
    """Figure 5 (beyond the paper): the post-SFT score and the sharpness on the training text
    against WSD's decay fraction 1 - rho, mean and standard deviation over seeds.
    per_fraction: {fraction: {"score": [per seed], "sharpness": [per seed]}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted(per_fraction)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, ylabel in ((axes[0], "score", "SFT Task Avg"), (axes[1], "sharpness", "sharpness (train text)")):
        values = [per_fraction[f][key] for f in fractions]
        ax.errorbar(fractions, [np.mean(v) for v in values],
                    yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in values], marker="o", capsize=3)
        ax.set_xlabel(r"decay fraction $1 - \rho$ (WSD, $\alpha_{pre} = 0$)")
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


FRONTIER_SCORES = (("sft_test_task_avg", "SFT Task Avg (test people)"), ("alpaca_eval", "AlpacaEval win rate"),
                   ("val_loss", "SFT validation loss (lower is better)"))


def frontier_curves(sweep_dirs):
    """The learning-forgetting frontier of finished sft.py sweeps, from their summary.json:
    ({label: [[(forgetting, score, lr) per LR] per sweep]}, the score's axis label). A sweep's
    label is the schedule it fine-tuned (sweeps of one schedule, e.g. seeds, share a label);
    the score is the first of FRONTIER_SCORES the sweeps have; diverged LRs are left out."""
    summaries = []
    for sweep_dir in sweep_dirs:
        path = os.path.join(sweep_dir, "summary.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {sweep_dir} has no summary.json: not a finished sft.py sweep (its out_dir)")
        with open(path) as f:
            summary = json.load(f)
        if not any(r.get("forgetting") is not None for r in summary["runs"]):
            raise SystemExit(f"error: {path} holds no forgetting (a sweep made before sft.py measured it, or with "
                             f"--forgetting_tokens=0); fine-tune again into a new --out_dir")
        mixed = mixed_forgetting(summary["runs"])
        if mixed:
            raise SystemExit(f"error: {path}: {mixed}; fine-tune again into a new --out_dir")
        summaries.append(summary)
    key, ylabel = next((k, label) for k, label in FRONTIER_SCORES
                       if all(any(r.get(k) is not None for r in s["runs"]) for s in summaries))
    curves = {}
    for summary in summaries:
        init = summary["init"]
        label = scheduler_label(init.get("schedule")) + "".join(
            f" {name}={init[key]:g}" for key, name in (("alpha_pre", "a"), ("alpha_mid", "mid a"))
            if init.get(key) is not None and not (key == "alpha_pre" and init.get("schedule") == "wso"))
        points = [(r["forgetting"], r[key], r["lr"]) for r in summary["runs"]
                  if r.get("forgetting") is not None and r[key] is not None]
        curves.setdefault(label, []).append(points)
    return curves, ylabel


def plot_frontier(curves, path="frontier.png"):
    """Each sweep's LRs as a line of (forgetting, score) points, one colour per schedule, the
    lowest and highest LR named; what a schedule buys shows as its lines lying above and to the
    left of the others'. curves: frontier_curves' pair."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, ylabel = curves
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for (label, sweeps), color in zip(curves.items(), colors):
        for i, points in enumerate(sweeps):
            x, y, lrs = zip(*sorted(points, key=lambda p: p[2]))
            ax.plot(x, y, marker="o", markersize=3, color=color, alpha=0.8, label=label if i == 0 else None)
            for j in (0, len(lrs) - 1):
                ax.annotate(f"{lrs[j]:g}", (x[j], y[j]), fontsize=6, color=color, xytext=(3, 3),
                            textcoords="offset points")
    xs = [p[0] for sweeps in curves.values() for points in sweeps for p in points]
    if min(xs) > 0:
        ax.set_xscale("log")
    else:  # SFT lowered the held-out loss somewhere: linear around 0
        ax.set_xscale("symlog", linthresh=min((abs(x) for x in xs if x), default=1e-3))
    ax.set_xlabel("forgetting: held-out pre-training loss after SFT minus before (nats)")
    ax.set_ylabel(ylabel)
    ax.set_title("learning-forgetting frontier (one line per sweep, points: SFT LRs)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_paired_by_lr(pairs, reference="WSO", path="frontier_paired.png"):
    """Each run minus the reference seed by seed at every SFT LR both swept: the score after SFT
    (left) and the forgetting (right), thin lines per seed, the mean with its 95% t interval
    (tables.paired). pairs: {label: {"score": {lr: [per-seed differences]}, "forgetting": {...}}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"][1:])  # the reference's is the first
    for (label, by), color in zip(pairs.items(), colors):
        for ax, key in zip(axes, ("score", "forgetting")):
            lrs = sorted(by[key])
            per_seed = np.array([by[key][lr] for lr in lrs])  # (LRs, seeds)
            ax.plot(lrs, per_seed, color=color, alpha=0.25, linewidth=0.8)
            stats = [paired(by[key][lr]) for lr in lrs]
            ax.plot(lrs, [p["mean"] for p in stats], color=color, marker="o", markersize=3,
                    label=f"{label} - {reference} ({per_seed.shape[1]} seeds)")
            ax.fill_between(lrs, [p["low"] for p in stats], [p["high"] for p in stats], color=color, alpha=0.2)
    for ax, what in zip(axes, ("SFT Task Avg difference (points)", "forgetting difference (nats)")):
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("SFT learning rate")
        ax.set_ylabel(what)
    axes[0].legend(fontsize=7)
    fig.suptitle("paired by seed at each SFT LR: mean, 95% t interval, each seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def run_records(run_dir):
    """The records of a train.py run's log.jsonl; for a cooldown branch, preceded by those of the
    run it branched from up to the branch step, so that its curves start at step 0 as the
    same run trained from scratch would draw them (checkpoint.is_wsd_branch)."""
    records = read_jsonl(os.path.join(run_dir, "log.jsonl"))
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)["train"]
    if cfg.get("stage") != "cooldown" or not records:
        return records
    source = os.path.dirname(cfg["init_from"])
    if not os.path.isfile(os.path.join(source, "log.jsonl")):  # a relative path from elsewhere, or moved runs:
        source = os.path.join(os.path.dirname(os.path.abspath(run_dir)), os.path.basename(source))  # its sibling
    first = min(r["step"] for r in records)
    if not os.path.isfile(os.path.join(source, "log.jsonl")):
        return records
    return [r for r in run_records(source) if r["step"] < first] + records


def draw_figures(run_dirs, out_dir):
    """Figures 3 and 4 from train.py runs made with --sharpness_interval: Figure 3 per data
    set from each run's log.jsonl; Figure 4 from each run's last pre-training sharpness and
    the sft_task_avg of sft.py's summary (run_dir/sft/summary.json), where present."""
    curves, final, t_stable, scores = {}, {}, None, {}
    for run_dir in run_dirs:
        config_path, log_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "log.jsonl")
        if not (os.path.isfile(config_path) and os.path.isfile(log_path)):
            raise SystemExit(f"error: {run_dir} is not a train.py run directory (no config.json or log.jsonl)")
        with open(config_path) as f:
            cfg = json.load(f)["train"]
        cooldown = cfg.get("stage") == "cooldown"
        label = (f"WSO+cooldown a={cfg['alpha']}" if cooldown else "WSO" if cfg["schedule"] == "wso"
                 else f"{cfg['schedule'].upper()} a={cfg['alpha']}")
        if cfg["schedule"] == "wsd" and not cooldown:  # the paper draws WSD's decay start
            t_stable = wsd_t_stable(warmup_iters=cfg["warmup_iters"], max_iters=cfg["max_iters"],
                                    stable_ratio=cfg["stable_ratio"])
        records = [r for r in run_records(run_dir) if any(k.startswith("sharpness_") for k in r)]
        if not records:
            raise SystemExit(f"error: {log_path} has no sharpness records; train with --sharpness_interval=N")
        for name in ("pretrain", "sft"):
            points = [(r["step"], r[f"sharpness_{name}"], r[f"sharpness_{name}_stderr"])
                      for r in records if f"sharpness_{name}" in r]
            if points:
                curves.setdefault(name, {})[label] = points
        final[label] = records[-1].get("sharpness_pretrain")
        summary = os.path.join(run_dir, "sft", "summary.json")
        if os.path.isfile(summary):
            with open(summary) as f:
                scores[label] = json.load(f).get("sft_task_avg")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, runs in curves.items():
        path = os.path.join(out_dir, f"fig3_sharpness_{name}.png")
        written[f"fig3_{name}"] = plot_sharpness_curves(runs, t_stable, path)
    points = {k: (final[k], v) for k, v in scores.items() if v is not None and final[k] is not None}
    if len(points) >= 2:
        path = os.path.join(out_dir, "fig4_sharpness_vs_sft.png")
        written["fig4"], written["pearson_r"] = path, plot_sharpness_vs_score(points, path)
    else:
        print(f"note: Figure 4 needs sft/summary.json (python sft.py) in at least 2 runs; found {len(points)}")
    return written
