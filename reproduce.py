"""
The study end to end: pre-train with each LR schedule, fine-tune, evaluate, measure sharpness,
and write the paper's tables and figures (Tables 1-2, Figures 1-4) to results/.

    python reproduce.py                          # Experiment 1 on the offline testbed, seed 0
    python reproduce.py --seeds=0,1,2            # the same over three seeds (mean +- std)
    python reproduce.py --experiment=mid         # Experiment 2: pre-training -> mid-training -> SFT
    python reproduce.py --experiment=decay-free  # WSO vs WSO + cooldown vs WSO + merge (WSM)
    python reproduce.py --help                   # every option

Experiment 1 (Section 3, Table 1): WSO (alpha_pre = 1.0) and WSD, Linear, Cosine with
alpha_pre in {0.0, 0.1}: 7 pre-training runs with one seed, data order and token budget each,
sharpness recorded during training (Figure 3); each final checkpoint goes through the SFT
LR sweep (sft.py: the LR is chosen on the selection people, the score is on the test people)
and the zero-shot probes (evaluate.py). Experiment 2 (Section 4, Table 2): WSD pre-training
with alpha_pre in {1.0, 0.1}, then mid-training with alpha_mid in {1.0, 0.0}, then the same.
Decay-free: one WSO run keeping a checkpoint every M/5 steps over its last M = T/4; then the
WSO model, a cooldown branched at step T - M (train.py --stage=cooldown, to 0 over M steps:
WSD's budget and data), and a WSM merge (merge.py) of those 6 checkpoints for each decay
shape, each through sharpness.py, evaluation and the SFT sweep (table_decay_free.md).

Every stage is a command of this repo (printed, its output in a .log beside its run), and
is skipped when its output is complete: a rerun picks up where an interrupted one stopped
(an unfinished pre-training run resumes from its checkpoint, a sweep from its last finished
LR). Writes, in --out_dir (default results/):
    table1.md / table2.md / table_decay_free.md     per experiment, the paper's layout: the
                            difference from the best decay-based schedule per column, then
                            absolute values; mean +- std over seeds
    results.json            every number of every run and seed, and the Pearson r of Figure 4
                            (results_mid.json, results_decay_free.json for the others)
    fig1_schedules.png, fig2_midtraining.png     the schedules (schedules.py)
    fig3_sharpness_pretrain.png, fig3_sharpness_sft.png   sharpness during pre-training
    fig4_sharpness_vs_sft.png                    post-SFT score against final sharpness (held-out
    fig4_sharpness_train_vs_sft.png              pre-training text, as the paper; training text)
--scale=cpu sizes the testbed study for a 2-core CPU (README, Results: the measured times).
--scale=gpu is Experiment 1 at the 125m preset on FineWeb-Edu, Tulu 3 and the lm-eval tasks;
prepare the data first (README, "At GPU scale").
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from common import format_duration, parse_args
from data.common import read_jsonl, write_atomic
from figures import plot_sharpness_curves, plot_sharpness_vs_score
from schedules import MERGE_SHAPES, plot_figures, wsd_t_stable
from tables import COMPARED, MT_TASKS, PT_TASKS, paper_tables, scheduler_label, sft_task_avg, zero_shot_avg

HERE = os.path.dirname(os.path.abspath(__file__))
# (schedule, alpha_pre) of Table 1, and (alpha_pre, alpha_mid) of Table 2 (WSD pre-training;
# alpha_pre = 1.0 is WSO)
EXPERIMENT_1 = [("wso", 1.0), ("wsd", 0.0), ("wsd", 0.1), ("linear", 0.0), ("linear", 0.1),
                ("cosine", 0.0), ("cosine", 0.1)]
EXPERIMENT_2 = [(1.0, 1.0), (1.0, 0.0), (0.1, 1.0), (0.1, 0.0)]
# Mid-training is 0.45 of pre-training's steps at every scale: Table 21's 36k mid-training
# steps after Table 6's 80k pre-training steps.
MID_FRACTION = 36_000 / 80_000
SCALES = {
    "cpu": dict(train=dict(dataset="testbed", preset="tiny", max_iters=300, warmup_iters=30, batch_size=32,
                           seq_len=128, learning_rate=3e-3, sharpness_interval=50, compile=False),
                mid=dict(dataset="testbed_mid", max_iters=round(MID_FRACTION * 300)),
                # sharpness.py of each final model: 4 x 20 probes take seconds on the tiny model
                sharpness=dict(num_batches=4, num_samples=20),
                sft=dict(dataset="testbed", lrs="5e-4,1e-3,2e-3", epochs=5, compile=False),
                eval=dict(tasks="val_loss,testbed_probes"), mid_eval=dict(tasks="val_loss,testbed_mid_probes")),
    # Table 6's recipe (eta_max 3e-4, AdamW, bf16) at the 125m preset for ~262M tokens a run
    # (1000 x 2^18), Table 8's SFT on a 20k-conversation sample of Tulu 3 with 3 of its LRs;
    # not yet run, so its run time is unmeasured
    "gpu": dict(train=dict(dataset="fineweb_edu", preset="125m", max_iters=1000, warmup_iters=100,
                           tokens_per_step=262144, batch_size=32, seq_len=1024, learning_rate=3e-4,
                           sharpness_interval=100, compile=True),
                mid=dict(dataset="fineweb_edu", max_iters=round(MID_FRACTION * 1000)),
                # Table 23: sequences of 1024 tokens, batch size 1, 50 probes, up to 4096 batches
                # (about 3 HVPs of a forward+backward each, bench_hvp.py: ~2x a run's pre-training)
                sharpness=dict(num_batches=4096, num_samples=50, seq_len=1024, batch_size=1, compile=True),
                sft=dict(dataset="tulu3", lrs="5e-5,1e-4,5e-4", epochs=1, global_batch_size=128, batch_size=16,
                         warmup_iters=10, max_train=20000, max_val=2000, compile=True),
                eval=dict(tasks="val_loss," + ",".join(t for t in PT_TASKS if not t.startswith("testbed"))),
                mid_eval=dict(tasks="val_loss," + ",".join(t for t in MT_TASKS if not t.startswith("testbed"))),
                # the paper scores the fine-tuned model on these (AlpacaEval needs a judge: --judge)
                sft_eval=dict(tasks="mmlu,truthfulqa_mc2")),
}


@dataclass
class ReproduceConfig:
    experiment: str = "pre"  # pre (Table 1) | mid (Table 2) | decay-free (WSO vs cooldown vs merge)
    scale: str = "cpu"  # cpu (the testbed) | gpu (FineWeb-Edu, Tulu 3, lm-eval tasks)
    seeds: str = "0"  # comma-separated training seeds; everything is repeated per seed
    schedules: str = ""  # a subset of the grid, e.g. wso,wsd_a0.1 (run names); empty: all
    out_dir: str = "results"  # tables, figures, results.json
    runs_dir: str = "runs"  # checkpoints and logs of every stage: runs_dir/seed<k>/<run>/
    max_iters: int = 0  # pre-training steps instead of the scale's (mid-training: MID_FRACTION of it)
    sft_lrs: str = ""  # the SFT sweep instead of the scale's
    sft_epochs: int = 0  # SFT epochs instead of the scale's
    eval_limit: int = 0  # score only the first N items of each evaluation task (0: all)
    verbose: bool = False  # stream every stage's output instead of one line per stage

    def __post_init__(self):
        if self.experiment not in ("pre", "mid", "decay-free"):
            raise ValueError(f"experiment={self.experiment!r}; choose pre, mid or decay-free")
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}; choose one of {sorted(SCALES)}")
        try:
            [int(s) for s in self.seeds.split(",")]
        except ValueError:
            raise ValueError(f"seeds={self.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None


def run_name(schedule, alpha_pre, alpha_mid=None):
    name = "wso" if alpha_pre == 1.0 and schedule in ("wso", "wsd") else f"{schedule}_a{alpha_pre:g}"
    return name if alpha_mid is None else f"{name}_mid_a{alpha_mid:g}"


def flags(options):
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]


# --------------------------------------------------------------------- the stages

def plan(cfg):
    """Every stage of the study, in order: (kind, run_dir, command, steps): steps is the
    step a training stage's checkpoint must reach to be done (None for the others)."""
    scale = SCALES[cfg.scale]
    train = dict(scale["train"])
    if cfg.max_iters:  # the warmup keeps its share of the run
        train.update(max_iters=cfg.max_iters, warmup_iters=max(1, round(cfg.max_iters * train["warmup_iters"]
                                                                       / train["max_iters"])))
    sft = {**scale["sft"], **({"lrs": cfg.sft_lrs} if cfg.sft_lrs else {}),
           **({"epochs": cfg.sft_epochs} if cfg.sft_epochs else {})}
    wanted = set(cfg.schedules.split(",")) - {""}
    stages = []
    for seed in [int(s) for s in cfg.seeds.split(",")]:
        seed_dir = os.path.join(cfg.runs_dir, f"seed{seed}")
        if cfg.experiment == "decay-free":
            stages += decay_free_plan(cfg, seed, seed_dir, train, sft, scale)
            continue
        if cfg.experiment == "pre":
            grid = [(run_name(s, a), s, a, None) for s, a in EXPERIMENT_1]
        else:
            grid = [(run_name("wsd", a, m), "wsd", a, m) for a, m in EXPERIMENT_2]
        unknown = wanted - {name for name, *_ in grid}
        if unknown:
            raise SystemExit(f"error: --schedules names {sorted(unknown)}; the grid has "
                             f"{[name for name, *_ in grid]}")
        pretrained = set()
        for name, schedule, alpha_pre, alpha_mid in grid:
            if wanted and name not in wanted:
                continue
            pre_dir = os.path.join(seed_dir, run_name(schedule, alpha_pre))
            if pre_dir not in pretrained:  # Experiment 2 shares each pre-training run
                pretrained.add(pre_dir)
                stages.append(("pre-train", pre_dir, ["train.py", *flags(
                    {**train, "schedule": schedule, "alpha": alpha_pre, "seed": seed, "out_dir": pre_dir})],
                    train["max_iters"]))
            run_dir = pre_dir
            if alpha_mid is not None:
                run_dir = os.path.join(seed_dir, name)
                mid = {**scale["mid"], **({"max_iters": round(MID_FRACTION * cfg.max_iters)} if cfg.max_iters else {})}
                stages.append(("mid-train", run_dir, ["train.py", *flags(
                    {**{k: v for k, v in train.items() if k not in mid}, **mid, "stage": "mid",
                     "alpha_mid": alpha_mid, "sharpness_interval": 0, "seed": seed,
                     "init_from": os.path.join(pre_dir, "ckpt.pt"), "out_dir": run_dir})], mid["max_iters"]))
            tasks = scale["mid_eval" if alpha_mid is not None else "eval"]
            stages += model_stages(cfg, seed, run_dir, tasks, sft)
    return stages


def sharpness_stage(cfg, run_dir, split):
    """Sharpness of run_dir/ckpt.pt with the scale's settings: on held-out text and SFT
    conversations (split=val, as the paper), or on the training text itself (split=train),
    where training sought its minimum."""
    kind, args, out = (("sharpness", [], "sharpness.json") if split == "val" else
                       ("sharpness (train)", ["--datasets=pretrain", "--pretrain_split=train"], "sharpness_train.json"))
    return (kind, run_dir, ["sharpness.py", f"--ckpt={os.path.join(run_dir, 'ckpt.pt')}", *args,
                            *flags(SCALES[cfg.scale]["sharpness"]), f"--out={os.path.join(run_dir, out)}"], None)


def model_stages(cfg, seed, run_dir, tasks, sft):
    """What every final model of a study goes through: evaluation, sharpness on its training
    text, the SFT sweep and, where the data set is not the testbed (whose sweep scores its test
    people itself), benchmarks of the fine-tuned model at the selected LR ({best_ckpt} is read
    at run time)."""
    ckpt = os.path.join(run_dir, "ckpt.pt")
    stages = [("evaluate", run_dir, ["evaluate.py", *flags(
                  {**tasks, "ckpt": ckpt, "out": os.path.join(run_dir, "eval.json"), "limit": cfg.eval_limit})], None),
              sharpness_stage(cfg, run_dir, "train"),
              ("SFT", run_dir, ["sft.py", *flags(
                  {**sft, "seed": seed, "init_from": ckpt, "out_dir": os.path.join(run_dir, "sft")})], None)]
    sft_tasks = SCALES[cfg.scale].get("sft_eval")
    if sft_tasks:
        stages.append(("SFT eval", run_dir, ["evaluate.py", *flags(
            {**sft_tasks, "ckpt": "{best_ckpt}", "limit": cfg.eval_limit,
             "out": os.path.join(run_dir, "sft_eval.json")})], None))
    return stages


def decay_free_plan(cfg, seed, seed_dir, train, sft, scale):
    """One WSO run keeping checkpoints over its last quarter; a cooldown branch and a merge per
    decay shape from them; then sharpness, evaluation and SFT of each final model."""
    total = train["max_iters"]
    cool = max(5, total // 4 // 5 * 5)  # the last M steps, M a multiple of the 5 merge intervals
    keep, branch = cool // 5, total - cool
    wso_dir = os.path.join(seed_dir, "wso_kept")
    stages = [("pre-train", wso_dir, ["train.py", *flags({**train, "schedule": "wso", "seed": seed,
                                                          "keep_every": keep, "out_dir": wso_dir})], total)]
    kept = [os.path.join(wso_dir, f"ckpt_{step:06d}.pt") for step in range(branch, total + 1, keep)]
    finals = {"wso": wso_dir}
    cool_dir = os.path.join(seed_dir, "wso_cooldown")
    stages.append(("cooldown", cool_dir, ["train.py", *flags(
        {**train, "schedule": "wso", "seed": seed, "stage": "cooldown", "alpha": 0.0, "max_iters": cool,
         "sharpness_interval": 0, "init_from": kept[0], "out_dir": cool_dir})], total))
    finals["wso_cooldown"] = cool_dir
    for shape in MERGE_SHAPES:  # schedules.merge_weights' shapes
        merge_dir = os.path.join(seed_dir, f"wso_merge_{shape}")
        stages.append(("merge", merge_dir, ["merge.py", f"--ckpts={','.join(kept)}", f"--shape={shape}",
                                            f"--out={os.path.join(merge_dir, 'ckpt.pt')}"], None))
        finals[f"wso_merge_{shape}"] = merge_dir
    wanted = set(cfg.schedules.split(",")) - {""}
    if wanted - set(finals):
        raise SystemExit(f"error: --schedules names {sorted(wanted - set(finals))}; the grid has {list(finals)}")
    for name, run_dir in finals.items():
        if wanted and name not in wanted:
            continue
        stages.append(sharpness_stage(cfg, run_dir, "val"))
        stages += model_stages(cfg, seed, run_dir, scale["eval"], sft)
    return stages


def is_done(kind, run_dir, steps):
    """Whether a stage's output is complete: a final checkpoint, eval.json, summary.json."""
    if kind in TRAINING:
        path = os.path.join(run_dir, "ckpt.pt")
        # mmap: only the bytes of "step" are read, not the weights
        return (os.path.isfile(path)
                and torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"] >= steps)
    return os.path.isfile(os.path.join(run_dir, OUTPUT[kind]))


TRAINING = ("pre-train", "mid-train", "cooldown")
OUTPUT = {"evaluate": "eval.json", "SFT": "sft/summary.json", "SFT eval": "sft_eval.json", "merge": "ckpt.pt",
          "sharpness": "sharpness.json", "sharpness (train)": "sharpness_train.json"}


def run_stage(kind, run_dir, command, steps, verbose):
    """Run one stage as a subprocess; an interrupted training run resumes from its checkpoint."""
    if kind in TRAINING and os.path.isfile(os.path.join(run_dir, "ckpt.pt")):
        command = [arg for arg in command if not arg.startswith("--init_from=")] + ["--init_from=resume"]
    if kind == "SFT eval":
        with open(os.path.join(run_dir, "sft", "summary.json")) as f:
            best = json.load(f)["best_ckpt"]
        command = [arg.replace("{best_ckpt}", best or "") for arg in command]
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "".join(c for c in kind.replace(" ", "_") if c.isalnum() or c == "_") + ".log")
    argv = [sys.executable, os.path.join(HERE, command[0]), *command[1:]]
    with open(log, "a") as f:
        f.write("$ " + " ".join(["python", *command]) + "\n")
        f.flush()
        result = subprocess.run(argv, stdout=None if verbose else f, stderr=subprocess.STDOUT if not verbose else None)
    if result.returncode != 0:
        raise SystemExit(f"error: {kind} of {run_dir} failed (exit {result.returncode}); see {log}\n"
                         f"  python {' '.join(command)}")


# Relative cost of each kind of stage on the testbed (measured), for the study's ETA
COST = {"pre-train": 1.0, "mid-train": 0.5, "cooldown": 0.3, "merge": 0.02, "sharpness": 0.1, "evaluate": 0.1,
        "SFT": 1.1, "SFT eval": 0.1, "sharpness (train)": 0.1}


def run_all(cfg):
    stages = plan(cfg)
    todo = [s for s in stages if not is_done(s[0], s[1], s[3])]
    print(f"{len(stages)} stages, {len(stages) - len(todo)} done earlier, {len(todo)} to run "
          f"(logs in each run's folder under {cfg.runs_dir}/)")
    total = sum(COST[kind] for kind, *_ in todo)
    spent, start = 0.0, time.time()
    for i, (kind, run_dir, command, steps) in enumerate(todo, 1):
        stage_start = time.time()
        if not is_done(kind, run_dir, steps):  # another invocation (another seed split) may have done it
            run_stage(kind, run_dir, command, steps, cfg.verbose)
        spent += COST[kind]
        elapsed = time.time() - start
        eta = format_duration(elapsed / spent * (total - spent))
        print(f"[{i}/{len(todo)}] {kind:9s} {run_dir} | {format_duration(time.time() - stage_start)} | "
              f"study ETA {eta}", flush=True)


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
        # sharpness: recorded during pre-training (log.jsonl), or measured after (sharpness.json)
        log = os.path.join(run_dir, "log.jsonl")
        sharp = [r for r in read_jsonl(log) if "sharpness_pretrain" in r] if os.path.isfile(log) else []
        measured = os.path.join(run_dir, "sharpness.json")
        if os.path.isfile(measured):
            with open(measured) as f:
                results = json.load(f)["results"]
            sharp = [{"step": None, **{f"sharpness_{k}": v["trace"] for k, v in results.items()}}]
        seed, name = run_dir.split(os.sep)[-2:]
        best = next((r for r in sft["runs"] if r["lr"] == sft["best_lr"]), {})
        with open(os.path.join(run_dir, "sharpness_train.json")) as f:
            on_train = json.load(f)["results"]["pretrain"]
        rows.append({
            "run": name, "seed": int(seed[len("seed"):]), "schedule": ev["schedule"], "alpha_pre": ev["alpha_pre"],
            "alpha_mid": ev["alpha_mid"], "valid_loss": ev["tasks"]["val_loss"]["loss"],
            "task_avg": zero_shot_avg(ev["tasks"], ev["stage"]),
            "sft_task_avg": sft_score(run_dir, sft), "sft_best_lr": sft["best_lr"],
            "sft_test_exact_match": best.get("sft_test_exact_match"), "sft_test_choice": best.get("sft_test_choice"),
            "sft_val_loss": best.get("val_loss"),
            "sharpness_pretrain": sharp[-1]["sharpness_pretrain"] if sharp else None,
            "sharpness_sft": sharp[-1].get("sharpness_sft") if sharp else None,
            "sharpness_train": on_train["trace"], "sharpness_train_stderr": on_train["stderr"],
            "sharpness_curve": [(r["step"], r["sharpness_pretrain"], r.get("sharpness_sft")) for r in sharp
                                if r["step"] is not None],
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
ABSOLUTE = [("sharpness_pretrain", "Sharpness (PT val)", ".0f"), ("sharpness_sft", "Sharpness (SFT data)", ".0f"),
            ("sharpness_train", "Sharpness (train text)", ".0f"), ("sft_best_lr", "SFT LR (per seed)", "per seed")]


def figures(rows, out_dir, suffix=""):
    """Figures 1-2 (schedules), 3 (sharpness during pre-training, mean over seeds with the
    seed-to-seed standard error, or the estimator's with one seed) and 4 (post-SFT score
    against final pre-training sharpness, one point per run averaged over seeds)."""
    written = dict(zip(("fig1", "fig2"), plot_figures(out_dir)))
    names = list(dict.fromkeys(r["run"] for r in rows))
    label = {n: next(scheduler_label(r["schedule"]) + (f" a={r['alpha_pre']:g}" if r["alpha_pre"] is not None else "")
                     + (f" mid a={r['alpha_mid']:g}" if r["alpha_mid"] is not None else "") for r in rows if r["run"] == n)
             for n in names}
    for column, data in ((1, "pretrain"), (2, "sft")):
        curves = {}
        for n in names:
            per_step = {}
            for r in (r for r in rows if r["run"] == n):
                for point in r["sharpness_curve"]:
                    if point[column] is not None:
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
            written[f"fig3_{data}"] = plot_sharpness_curves(curves, t_stable,
                                                            os.path.join(out_dir, f"fig3_sharpness_{data}{suffix}.png"))
    for key, data in (("sharpness_pretrain", "pretraining val"), ("sharpness_train", "its training text")):
        points = {}
        for n in names:
            mine = [r for r in rows if r["run"] == n and r[key] is not None and r["sft_task_avg"] is not None]
            if mine:
                points[label[n]] = (float(np.mean([r[key] for r in mine])),
                                    float(np.mean([r["sft_task_avg"] for r in mine])))
        if len(points) >= 2:
            name = "fig4_sharpness_vs_sft" if key == "sharpness_pretrain" else "fig4_sharpness_train_vs_sft"
            path = os.path.join(out_dir, f"{name}{suffix}.png")
            written[name], written[f"pearson_r_{key}"] = path, plot_sharpness_vs_score(points, path, xlabel=data)
    return written


def report(cfg):
    rows = collect(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    mid = cfg.experiment == "mid"
    relative, absolute = paper_tables(rows, mid, COMPARED_HERE, ABSOLUTE)
    seeds = sorted({r["seed"] for r in rows})
    title, file = {"pre": ("Table 1 analogue (pre-training -> SFT)", "table1.md"),
                   "mid": ("Table 2 analogue (mid-training -> SFT)", "table2.md"),
                   "decay-free": ("Decay-free alternatives (WSO, WSO + cooldown, WSO + merge -> SFT)",
                                  "table_decay_free.md")}[cfg.experiment]
    text = (f"## {title}, {cfg.scale} scale, seeds {','.join(map(str, seeds))}\n\n"
            f"Δ from the best decay-based schedule per column and seed, then mean ± std over seeds; "
            f"best mean in bold.\n\n{relative}\n\nAbsolute values (mean ± std over seeds; task scores x 100; "
            f"sharpness = Hessian trace of the model that SFT starts from):\n\n{absolute}\n")
    table_path = os.path.join(cfg.out_dir, file)
    write_atomic(table_path, text.encode())
    suffix = {"pre": "", "mid": "_mid", "decay-free": "_decay_free"}[cfg.experiment]
    written = figures(rows, cfg.out_dir, suffix)
    results = {"config": asdict(cfg), "scale": SCALES[cfg.scale], "rows": rows,
               "pearson_r": {k[len("pearson_r_"):]: v for k, v in written.items() if k.startswith("pearson_r_")},
               "files": [table_path, *[v for k, v in written.items() if not k.startswith("pearson_r")]]}
    results_path = os.path.join(cfg.out_dir, f"results{suffix}.json")
    write_atomic(results_path, (json.dumps(results, indent=1) + "\n").encode())
    print(text)
    print(f"wrote {', '.join(results['files'])} and {results_path}")
    return results


def main(cfg):
    start = time.time()
    run_all(cfg)
    results = report(cfg)
    print(f"study done in {format_duration(time.time() - start)}")
    return results


if __name__ == "__main__":
    main(parse_args(ReproduceConfig, description=__doc__))
