"""
The study end to end: pre-train with each LR schedule, fine-tune, evaluate, measure sharpness,
and write the paper's tables and figures (Tables 1-2, Figures 1-4) to results/.

    python reproduce.py                          # Experiment 1 on the offline testbed, seed 0
    python reproduce.py --seeds=0,1,2 --jobs=2   # three seeds, two stages at a time (mean +- std)
    python reproduce.py --experiment=mid         # Experiment 2: pre-training -> mid-training -> SFT
    python reproduce.py --experiment=over        # Experiment 3: 4x the pre-training steps
    python reproduce.py --experiment=decay-length  # WSD's decay fraction 0.1 .. 1.0 (beyond the paper)
    python reproduce.py --experiment=decay-free  # WSO vs WSO + cooldown vs WSO + merge (WSM)
    python reproduce.py --scale=hmm --schedules=wso,wsd_a0 --seeds=0,1,2,3,4 --jobs=2   # the paper's regime
    python reproduce.py --quick                  # WSO vs WSD to 0 in the paper's regime, 2 seeds, small
    python reproduce.py --help                   # every option

How long, on a 2-core CPU (--scale=cpu): the estimate of what is left is printed before the
first stage (--dry_run=true prints only that and the stages). It is calibrated on the slowest
machine measured and runs high on faster ones; measured wall times are in docs/results.md. The
other experiments are of the same order per seed, `over` four times as long.

The experiments and the commands that make them are study/plan.py's plan (its docstring says
what each experiment runs); this script runs that plan and writes the tables and figures.

Every stage is a command of this repo (printed, its output in a .log beside its run), and
is skipped when its output is complete: a rerun picks up where an interrupted one stopped
(an unfinished pre-training run resumes from its checkpoint, a sweep from its last finished
LR). Before the first stage it prints the estimated time of what is left to run
(--dry_run=true prints only that and the stages' commands). Writes, in
--out_dir (default results/; a run with fewer seeds or runs than the results there writes to
runs_dir/report/ instead):
    table1.md / table2.md / table3.md / table_decay_length.md / table_decay_free.md
                            per experiment, the paper's layout: the difference from the best
                            decay-based schedule per column, then absolute values; mean +- std
                            over seeds
    results.json            every number of every run and seed, and the Pearson r of Figure 4
                            with its bootstrap interval (results_mid.json, results_over.json, ...)
    fig1_schedules.png, fig2_midtraining.png     the schedules (schedules.py)
    fig3_sharpness_{pretrain,train_text,sft}.png sharpness during pre-training
    fig4_sharpness_vs_sft.png                    post-SFT score against final sharpness (held-out
    fig4_sharpness_train_vs_sft.png              pre-training text, as the paper; training text)
    fig5_decay_length.png                        score and sharpness against WSD's decay length
    fig_frontier.png        the learning-forgetting frontier: each sweep's LRs as (forgetting,
                            SFT score), forgetting the rise of the held-out pre-training loss
    fig_frontier_paired.png with 2+ seeds, each run minus WSO per seed at every SFT LR: the
                            score and the forgetting, with the mean's 95% t interval
    and, with 2+ seeds, a table pairing each run with WSO seed by seed (differences, or ratios
    for sharpness): the mean, its 95% bootstrap interval and the smallest effect the seeds
    detect (results.json: paired_vs_wso)
--scale=cpu sizes the testbed study for a 2-core CPU (docs/results.md: the measured times).
--scale=hmm is the paper's regime on a CPU (data/hmm/prepare.py: text with irreducible
entropy, seen about once, facts embedded as a long tail), with the AdamW-preconditioned
sharpness of every trained model beside the plain one.
--scale=gpu is Experiment 1 at the 125m preset on FineWeb-Edu, Tulu 3 and the lm-eval tasks;
prepare the data first (docs/results.md, "At GPU scale").
"""

import collections
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from data.formats import write_atomic
from nanowso.common import format_duration, parse_args
from schedules import plot_figures, wsd_t_stable
from study.figures import (
    pearson_interval,
    plot_against_decay_fraction,
    plot_frontier,
    plot_paired_by_lr,
    plot_sharpness_curves,
    plot_sharpness_vs_score,
    run_records,
)
from study.jobs import makespan, run_dag
from study.plan import (
    DECAY_FRACTIONS,
    OVER_TRAINING,
    SCALES,
    TRAINING,
    ReproduceConfig,
    dependencies,
    grid,
    is_done,
    plan,
    quick_config,
    stage_cost,
)
from study.tables import (
    COMPARED,
    PAIRED,
    paired,
    paired_rows,
    paired_table,
    paper_tables,
    scheduler_label,
    score_at_forgetting,
    score_over_lrs,
    sft_task_avg,
    valid_loss,
    zero_shot_avg,
)

HERE = os.path.dirname(os.path.abspath(__file__))
# The CPU kernels every stage runs on. torch (ATen), MKL and oneDNN each pick their kernels by
# the CPU's instruction set, and AVX-512 kernels add in another order than AVX2's: the same
# seed on an AVX-512 machine follows another trajectory from the first steps (docs/results.md).
# Pinned to AVX2 (ATen's env var is read in aten/src/ATen/native/DispatchStub.cpp; MKL's is its
# Conditional Numerical Reproducibility branch), an AVX-512 machine gives the AVX2 machine's
# numbers to the last digit. Set only where torch would pick AVX-512 (other CPUs run their own
# kernels); a variable already in the environment wins (ATEN_CPU_CAPABILITY=avx512 lets torch
# use AVX-512).
CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CPU_KERNELS = CPU_KERNELS if torch.backends.cpu.get_cpu_capability() == "AVX512" else {}


def pinned_kernels():
    """The CPU_KERNELS variables the environment does not set already."""
    return {k: v for k, v in CPU_KERNELS.items() if k not in os.environ}


def run_stage(kind, run_dir, command, steps, verbose, threads=0):
    """Run one stage as a subprocess (with `threads` torch threads; 0: torch's default) on the
    pinned CPU_KERNELS; an interrupted training run resumes from its checkpoint."""
    if kind in TRAINING and os.path.isfile(os.path.join(run_dir, "ckpt.pt")):
        command = [arg for arg in command if not arg.startswith("--init_from=")] + ["--init_from=resume"]
    if kind == "SFT eval":
        with open(os.path.join(run_dir, "sft", "summary.json")) as f:
            best = json.load(f)["best_ckpt"]
        command = [arg.replace("{best_ckpt}", best or "") for arg in command]
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "".join(c for c in kind.replace(" ", "_") if c.isalnum() or c == "_") + ".log")
    argv = [sys.executable, os.path.join(HERE, command[0]), *command[1:]]
    pinned = pinned_kernels()
    env = {**os.environ, **pinned,
           **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})}
    with open(log, "a") as f:
        f.write("$ " + " ".join([*(f"{k}={v}" for k, v in pinned.items()), "python", *command]) + "\n")
        f.flush()
        result = subprocess.run(argv, stdout=None if verbose else f, stderr=subprocess.STDOUT if not verbose else None,
                                env=env)
    if result.returncode != 0:
        raise SystemExit(f"error: {kind} of {run_dir} failed (exit {result.returncode}); see {log}\n"
                         f"  python {' '.join(command)}")


def run_all(cfg):
    stages = plan(cfg)
    pending = [i for i, s in enumerate(stages) if not is_done(s[0], s[1], s[3])]
    deps = dependencies(stages)
    todo = [stages[i] for i in pending]
    position = {i: k for k, i in enumerate(pending)}
    threads = cfg.threads or (max(1, (os.cpu_count() or 1) // cfg.jobs) if cfg.jobs > 1 else 0)
    progress = StudyProgress(todo, cfg.max_iters or SCALES[cfg.scale]["train"]["max_iters"])
    depends_on = lambda k: [position[j] for j in deps[pending[k]] if j in position]  # noqa: E731
    per_cost = SCALES[cfg.scale]["seconds_per_cost"]
    seconds = makespan([progress.cost(s) * per_cost for s in todo], depends_on, cfg.jobs) if per_cost else 0
    estimate = (f"about {format_duration(seconds)} (from stage times measured one thread each, two at a "
                f"time, on a 2-core CPU)" if per_cost else "time unmeasured at this scale")
    print(f"{len(stages)} stages, {len(stages) - len(todo)} done earlier, {len(todo)} to run, {cfg.jobs} at a time, "
          f"{estimate}; logs in each run's folder under {cfg.runs_dir}/", flush=True)
    if "ATEN_CPU_CAPABILITY" in pinned_kernels():
        print("this CPU has AVX-512; the stages run on AVX2 kernels, so their numbers match an AVX2 machine's: "
              + " ".join(f"{k}={v}" for k, v in pinned_kernels().items()), flush=True)
    if cfg.dry_run:
        for kind, run_dir, command, _ in todo:
            print(f"  {kind:17s} python {' '.join(command)}")
        return

    def run(stage):
        kind, run_dir, command, steps = stage
        if not is_done(kind, run_dir, steps):  # another invocation (another seed split) may have done it
            run_stage(kind, run_dir, command, steps, cfg.verbose, threads)

    run_dag(todo, depends_on, run, cfg.jobs, progress.done)


class StudyProgress:
    """One line as each stage finishes, with the study's ETA from the stages' relative cost
    (study.plan.stage_cost) and the pace of the last WINDOW finishes (a pause, or other work beside
    the study, fades from the estimate instead of weighing on it to the end)."""

    WINDOW = 8

    def __init__(self, todo, pretrain_steps, clock=time.time):
        self.cost = lambda stage: stage_cost(stage, pretrain_steps)
        self.todo, self.total, self.finished, self.clock = todo, sum(map(self.cost, todo)), 0, clock
        self.marks = collections.deque([(clock(), 0.0)], maxlen=self.WINDOW + 1)  # (time, cost spent)

    def eta(self):
        (t0, spent0), (t1, spent1) = self.marks[0], self.marks[-1]
        return format_duration((t1 - t0) / (spent1 - spent0) * (self.total - spent1))

    def done(self, _, stage, seconds):
        self.finished += 1
        self.marks.append((self.clock(), self.marks[-1][1] + self.cost(stage)))
        print(f"[{self.finished}/{len(self.todo)}] {stage[0]:9s} {stage[1]} | {format_duration(seconds)} | "
              f"study ETA {self.eta()}", flush=True)


# ---------------------------------------------------------------- tables and figures

def collect(cfg):
    """Every number of every (run, seed): the rows of results.json."""
    rows = []
    for kind, run_dir, command, _ in plan(cfg):
        if kind != "SFT":
            continue
        with open(os.path.join(run_dir, "eval.json")) as f:
            ev = json.load(f)
        with open(os.path.join(run_dir, "sft", "summary.json")) as f:
            sft = json.load(f)
        # sharpness: recorded during pre-training (log.jsonl), and measured after (sharpness.json,
        # the final value where present; with --preconditioned also Tr(D^-1 H))
        log = os.path.join(run_dir, "log.jsonl")
        sharp = [r for r in run_records(run_dir) if "sharpness_pretrain" in r] if os.path.isfile(log) else []
        measured, after = os.path.join(run_dir, "sharpness.json"), {}
        if os.path.isfile(measured):
            with open(measured) as f:
                after = json.load(f)["results"]
            sharp = [*sharp, {"step": None, **{f"sharpness_{k}": v["trace"] for k, v in after.items()},
                              **{f"sharpness_{k}_stderr": v["stderr"] for k, v in after.items()}}]
        preconditioned = after.get("pretrain", {}).get("preconditioned", {})
        frontier = [(r["forgetting"], r["sft_test_task_avg"], r["lr"]) for r in sft["runs"]
                    if r.get("forgetting") is not None and r.get("sft_test_task_avg") is not None]
        seed, name = os.path.relpath(run_dir, cfg.runs_dir).split(os.sep, 1)  # seed<k>, [over/]<run>
        best = next((r for r in sft["runs"] if r["lr"] == sft["best_lr"]), {})
        with open(os.path.join(run_dir, "sharpness_train.json")) as f:
            on_train = json.load(f)["results"]["pretrain"]
        tasks = ev["tasks"]
        recall = (tasks.get("testbed_mid_recall") if ev["stage"] == "mid" else tasks.get("testbed_recall")) or {}
        probes = (tasks.get("testbed_mid_probes") if ev["stage"] == "mid" else tasks.get("testbed_probes")) or {}
        em = best.get("sft_test_exact_match")
        rows.append({
            "run": name, "seed": int(seed[len("seed"):]), "schedule": ev["schedule"], "alpha_pre": ev["alpha_pre"],
            "alpha_mid": ev["alpha_mid"], "valid_loss": valid_loss(ev["tasks"]["val_loss"]),
            "val_loss_all_tokens": ev["tasks"]["val_loss"]["loss"],
            "task_avg": zero_shot_avg(ev["tasks"], ev["stage"]),
            "sft_task_avg": sft_score(run_dir, sft), "sft_best_lr": sft["best_lr"],
            "sft_test_exact_match": best.get("sft_test_exact_match"), "sft_test_choice": best.get("sft_test_choice"),
            "sft_val_loss": best.get("val_loss"), "sft_final_train_loss": best.get("final_train_loss"),
            "sft_best_lr_at_edge": sft.get("best_lr_at_edge"),
            # before SFT: greedy recall and 4-way probes (x 100), the loss on fact values
            "recall": recall.get("exact_match") and 100 * recall["exact_match"],
            "probes": probes.get("acc") and 100 * probes["acc"],
            # how much of what the model knows SFT brings out: test exact match / recall
            "sft_em_over_recall": em / recall["exact_match"] if em is not None and recall.get("exact_match") else None,
            "sharpness_pretrain": sharp[-1]["sharpness_pretrain"] if sharp else None,
            "sharpness_pretrain_stderr": sharp[-1].get("sharpness_pretrain_stderr") if sharp else None,
            "sharpness_preconditioned": preconditioned.get("trace"),
            "sharpness_preconditioned_stderr": preconditioned.get("stderr"),
            # the learning-forgetting frontier: every LR of the sweep, (forgetting, SFT score, LR)
            "sft_frontier": frontier,
            "sft_score_at_forgetting": score_at_forgetting(frontier),
            "sft_task_avg_over_lrs": score_over_lrs(frontier),
            "sharpness_sft": sharp[-1].get("sharpness_sft") if sharp else None,
            "sharpness_train": on_train["trace"], "sharpness_train_stderr": on_train["stderr"],
            "sharpness_curve": [(r["step"], r["sharpness_pretrain"], r.get("sharpness_sft"), r.get("sharpness_train_text"),
                                 r.get("sharpness_preconditioned")) for r in sharp if r["step"] is not None],
            "run_dir": run_dir})
    return rows


def sft_score(run_dir, summary):
    """The post-SFT task average: the benchmarks of sft_eval.json (GPU scale), else the
    testbed sweep's own score."""
    path = os.path.join(run_dir, "sft_eval.json")
    if os.path.isfile(path):
        with open(path) as f:
            return sft_task_avg(json.load(f)["tasks"])
    return summary["sft_task_avg"]


# The Δ table compares the paper's three columns and the SFT validation loss; the absolute
# table adds the sharpness of the model SFT starts from and the LR each seed's sweep chose.
COMPARED_HERE = [*COMPARED, ("sft_val_loss", "SFT Valid Loss ↓", True, ".3f")]
ABSOLUTE = [("val_loss_all_tokens", "Val Loss (all tokens) ↓", ".3f"), ("recall", "Recall", ".1f"), ("probes", "4-way", ".1f"),
            ("sft_em_over_recall", "SFT EM / Recall", ".2f"), ("sft_final_train_loss", "SFT Train Loss", ".3f"),
            ("sharpness_pretrain", "Sharpness (PT val)", ".0f"), ("sharpness_sft", "Sharpness (SFT data)", ".0f"),
            ("sharpness_train", "Sharpness (train text)", ".0f"), ("sft_best_lr", "SFT LR (per seed)", "per seed")]


def figures(rows, out_dir, suffix=""):
    """Figures 1-2 (schedules), 3 (sharpness during pre-training, mean over seeds with the
    seed-to-seed standard error, or the estimator's with one seed) and 4 (post-SFT score
    against final pre-training sharpness, one point per run averaged over seeds)."""
    written = dict(zip(("fig1", "fig2"), plot_figures(out_dir)))
    names, label = run_labels(rows)
    for column, data in ((1, "pretrain"), (2, "sft"), (3, "train_text"), (4, "preconditioned")):
        curves = {}
        for n in names:
            per_step = {}
            for r in (r for r in rows if r["run"] == n):
                for point in r["sharpness_curve"]:
                    if len(point) > column and point[column] is not None:
                        per_step.setdefault(point[0], []).append(point[column])
            if per_step:
                curves[label[n]] = [(s, float(np.mean(v)), float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1
                                     else 0.0) for s, v in sorted(per_step.items())]
        if curves:
            first = next(r for r in rows if r["run"] == names[0])
            with open(os.path.join(first["run_dir"], "config.json")) as f:
                train = json.load(f)["train"]
            t_stable = wsd_t_stable(warmup_iters=train["warmup_iters"], max_iters=train["max_iters"],
                                    stable_ratio=train["stable_ratio"])
            path = os.path.join(out_dir, f"fig3_sharpness_{data}{suffix}.png")
            if data == "preconditioned":
                written[f"fig3_{data}"] = plot_sharpness_curves(curves, t_stable, path,
                                                                ylabel=r"AdamW-preconditioned $\mathrm{Tr}(D^{-1}H)$")
            else:
                written[f"fig3_{data}"] = plot_sharpness_curves(curves, t_stable, path)
    frontier = frontier_figure(rows, os.path.join(out_dir, f"fig_frontier{suffix}.png"))
    by_lr = paired_frontier_figure(rows, os.path.join(out_dir, f"fig_frontier_paired{suffix}.png"))
    return {**written, **figure4(rows, out_dir, suffix), **({"frontier": frontier} if frontier else {}),
            **({"frontier_paired": by_lr} if by_lr else {})}


def frontier_figure(rows, path):
    """The learning-forgetting frontier of every run and seed (sft.py's forgetting per LR), or
    None where the sweeps did not measure it."""
    names, label = run_labels(rows)
    curves = {label[n]: [r["sft_frontier"] for r in rows if r["run"] == n and r.get("sft_frontier")] for n in names}
    curves = {k: v for k, v in curves.items() if v}
    return plot_frontier((curves, "SFT Task Avg (test people)"), path) if curves else None


def paired_frontier_figure(rows, path, reference="wso"):
    """Each run's SFT score and forgetting minus WSO's on the same seed at every LR both sweeps
    ran (study.figures.plot_paired_by_lr), or None without 2 paired seeds."""
    names, label = run_labels(rows)
    by = {(r["run"], r["seed"]): {lr: (f, score) for f, score, lr in r.get("sft_frontier") or []} for r in rows}
    pairs = {}
    for name in names:
        seeds = sorted(s for (n, s) in by if n == name and (reference, s) in by and name != reference)
        lrs = sorted(set.intersection(*[set(by[(name, s)]) & set(by[(reference, s)]) for s in seeds])) if seeds else []
        if len(seeds) >= 2 and lrs:
            pairs[label[name]] = {key: {lr: [by[(name, s)][lr][i] - by[(reference, s)][lr][i] for s in seeds]
                                        for lr in lrs} for i, key in enumerate(("forgetting", "score"))}
    return plot_paired_by_lr(pairs, label.get(reference, "WSO"), path) if pairs else None


def run_labels(rows):
    """The runs in plan order, and each one's label in the figures ("WSD a=0.1 mid a=0")."""
    names = list(dict.fromkeys(r["run"] for r in rows))
    label = {n: next(scheduler_label(r["schedule"]) + (f" a={r['alpha_pre']:g}" if r["alpha_pre"] is not None else "")
                     + (f" mid a={r['alpha_mid']:g}" if r["alpha_mid"] is not None else "")
                     + (f" decay {r['decay_fraction']:g}" if r.get("decay_fraction") is not None else "")
                     for r in rows if r["run"] == n)
             for n in names}
    return names, label


def figure4(rows, out_dir, suffix=""):
    """Figure 4 from results.json's rows alone (no run directories needed: it can be redrawn
    from a published results*.json), and Pearson's r with its bootstrap interval."""
    names, label = run_labels(rows)
    written = {}
    for key, data in (("sharpness_pretrain", "pretraining val"), ("sharpness_train", "its training text")):
        points = {label[n]: [(r[key], r["sft_task_avg"]) for r in rows if r["run"] == n and r[key] is not None
                             and r["sft_task_avg"] is not None] for n in names}
        points = {k: v for k, v in points.items() if v}
        if len(points) >= 2:
            name = "fig4_sharpness_vs_sft" if key == "sharpness_pretrain" else "fig4_sharpness_train_vs_sft"
            path = os.path.join(out_dir, f"{name}{suffix}.png")
            written[name], written[f"pearson_r_{key}"] = path, plot_sharpness_vs_score(points, path, xlabel=data)
            written[f"pearson_r_{key}_interval"] = pearson_interval(points)
    return written


def decay_length_figure(rows, out_dir):
    """Figure 5: score and sharpness against WSD's decay fraction (the rows' decay_fraction,
    study.plan.DECAY_FRACTIONS)."""
    per_fraction = {}
    for r in rows:
        if r["sft_task_avg"] is not None and r["sharpness_train"] is not None:
            point = per_fraction.setdefault(r["decay_fraction"], {"score": [], "sharpness": []})
            point["score"].append(r["sft_task_avg"])
            point["sharpness"].append(r["sharpness_train"])
    return plot_against_decay_fraction(per_fraction, os.path.join(out_dir, "fig5_decay_length.png"))


def output_dir(cfg, rows, suffix):
    """--out_dir, unless the results there cover more than these rows (more seeds or more
    runs: the published set) -- then runs_dir/report/, so a partial rerun never overwrites
    them."""
    published = os.path.join(cfg.out_dir, f"results{suffix}.json")
    if os.path.isfile(published):
        with open(published) as f:
            have = {(r["run"], r["seed"]) for r in json.load(f)["rows"]}
        if not have <= {(r["run"], r["seed"]) for r in rows}:
            out = os.path.join(cfg.runs_dir, "report")
            print(f"note: {published} holds runs or seeds this invocation does not; writing to {out} instead")
            return out
    return cfg.out_dir


def report(cfg):
    rows = collect(cfg)
    suffix = {"pre": "", "mid": "_mid", "over": "_over", "decay-length": "_decay_length",
              "decay-free": "_decay_free"}[cfg.experiment]
    out_dir = output_dir(cfg, rows, suffix)
    os.makedirs(out_dir, exist_ok=True)
    mid = cfg.experiment == "mid"
    label_keys = []
    if cfg.experiment == "decay-length":
        fraction = {name: f for (name, *_), f in zip(grid("decay-length"), DECAY_FRACTIONS)}
        for r in rows:
            r["decay_fraction"] = fraction[r["run"]]
        label_keys = [("decay_fraction", "Decay over (1 - ρ)")]
    columns = ABSOLUTE + [("sharpness_preconditioned", "Tr(D^-1 H) (PT val)", ".3g")] * any(
        r.get("sharpness_preconditioned") is not None for r in rows)  # --scale=hmm measures it
    relative, absolute = paper_tables(rows, mid, COMPARED_HERE, columns, label_keys)
    seeds = sorted({r["seed"] for r in rows})
    title, file = {"pre": ("Table 1 analogue (pre-training -> SFT)", "table1.md"),
                   "mid": ("Table 2 analogue (mid-training -> SFT)", "table2.md"),
                   "over": (f"Table 3 analogue (over-training, {OVER_TRAINING}x the steps -> SFT)", "table3.md"),
                   "decay-length": ("WSD's decay length (alpha_pre 0, decay over 1 - rho of training) -> SFT",
                                    "table_decay_length.md"),
                   "decay-free": ("Decay-free alternatives (WSO, WSO + cooldown, WSO + merge -> SFT)",
                                  "table_decay_free.md")}[cfg.experiment]
    text = (f"## {title}, {cfg.scale} scale, seeds {','.join(map(str, seeds))}\n\n"
            f"Δ from the best decay-based schedule per column and seed, then mean ± std over seeds; "
            f"best mean in bold.\n\n{relative}\n\nAbsolute values (mean ± std over seeds; task scores x 100; "
            f"sharpness = Hessian trace of the model that SFT starts from; recall and 4-way before SFT; "
            f"† the sweep chose an edge of its LR grid):\n\n{absolute}\n")
    reference = "over/wso" if cfg.experiment == "over" else "wso"
    pairs = paired_rows(rows, reference)
    if any(len(values) > 1 for values in pairs.values()):  # intervals need 2+ seeds
        text += (f"\nEach run against WSO on the same seed (same data order and initial weights): per seed, the "
                 f"mean (geometric for ratios) with its 95% t interval, the percentile bootstrap over seeds (it "
                 f"covers less than 95% with few seeds), and the smallest effect these seeds detect with 80% "
                 f"power (paired t-test at 5%; for a ratio, its distance from 1):\n\n"
                 f"{paired_table(rows, reference)}\n")
    elif len(seeds) > 1:
        text += f"\nNo run named {reference} in this experiment: nothing is paired with WSO.\n"
    table_path = os.path.join(out_dir, file)
    write_atomic(table_path, text.encode())
    written = figures(rows, out_dir, suffix)
    if cfg.experiment == "decay-length":
        written["fig5"] = decay_length_figure(rows, out_dir)
    results = {"config": asdict(cfg), "scale": SCALES[cfg.scale], "rows": rows,
               "pearson_r": {k[len("pearson_r_"):]: v for k, v in written.items() if k.startswith("pearson_r_")},
               "pearson_r_note": "r of the per-run means over seeds; *_interval: 95% bootstrap over seeds",
               "paired_vs_wso": {f"{run} {key}": {"per_seed": values, **{
                   k: None if isinstance(v, float) and np.isnan(v) else v  # strict JSON: no NaN
                   for k, v in paired(values, ratio=dict((p[0], p[2]) for p in PAIRED)[key] == "ratio").items()}}
                   for (run, key), values in pairs.items()},
               "files": [table_path, *[v for k, v in written.items() if not k.startswith("pearson_r")]]}
    results_path = os.path.join(out_dir, f"results{suffix}.json")
    write_atomic(results_path, (json.dumps(results, indent=1) + "\n").encode())
    print(text)
    print(f"wrote {', '.join(results['files'])} and {results_path}")
    return results


def main(cfg):
    start, cfg = time.time(), quick_config(cfg)
    run_all(cfg)
    if cfg.dry_run:
        return None
    results = report(cfg)
    print(f"study done in {format_duration(time.time() - start)}")
    return results


if __name__ == "__main__":
    main(parse_args(ReproduceConfig, description=__doc__))
