"""
The study as a plan: the paper's experiments at each scale (Sections 3-6), as the commands
of this repo that make them, in order, with what each stage reads and writes. Pure: nothing
here runs a stage; reproduce.py runs the plan and reports it.

    from study.plan import ReproduceConfig, plan
    plan(ReproduceConfig(experiment="mid"))   # [(kind, run_dir, command, steps), ...]

Experiment 1 (Section 3, Table 1): WSO (alpha_pre = 1.0) and WSD, Linear, Cosine with
alpha_pre in {0.0, 0.1}: 7 pre-training runs with one seed, data order and token budget each,
sharpness recorded during training (Figure 3); each final checkpoint goes through the SFT
LR sweep (sft.py: the LR is chosen on the selection people, the score is on the test people)
and the pre-training tasks (evaluate.py). Experiment 2 (Section 4, Table 2): WSD pre-training
with alpha_pre in {1.0, 0.1}, then mid-training with alpha_mid in {1.0, 0.0}, then the same.
Decay-free: one WSO run keeping a checkpoint every M/5 steps over its last M = T/4; then the
WSO model, a cooldown branched at step T - M (train.py --stage=cooldown, to 0 over M steps:
WSD's budget and data), and a WSM merge (tools/merge.py) of those 6 checkpoints for each decay
shape, each through sharpness.py, evaluation and the SFT sweep.
"""

import dataclasses
import os
from dataclasses import dataclass

from nanowso.checkpoint import checkpoint_step
from schedules import MERGE_SHAPES, SFT_LR_GRIDS, wsd_t_stable
from study.tables import HARNESS, MT_TASKS, PT_TASKS

# (schedule, alpha_pre) of Table 1 (and Table 3, over-training), and (schedule, alpha_pre,
# alpha_mid) of Table 2. Pre-training with alpha_pre = 1.0 is WSO's run, shared.
EXPERIMENT_1 = [("wso", 1.0), ("wsd", 0.0), ("wsd", 0.1), ("linear", 0.0), ("linear", 0.1),
                ("cosine", 0.0), ("cosine", 0.1)]
EXPERIMENT_2 = [("wso", 1.0, 1.0), ("wso", 1.0, 0.0), ("wsd", 0.1, 1.0), ("wsd", 0.1, 0.0),
                ("linear", 0.1, 1.0), ("linear", 0.1, 0.0), ("cosine", 0.1, 1.0), ("cosine", 0.1, 0.0)]
OVER_TRAINING = 4  # Experiment 3 (Section 5, Table 3): this many times the pre-training steps
# Beyond the paper: WSD (alpha_pre 0) decaying over these fractions 1 - rho of the post-warmup
# steps; 0.25 is Experiment 1's WSD, 1.0 is its Linear (WSD with rho = 0 is Eq. 10).
DECAY_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
EXPERIMENTS = ("pre", "mid", "over", "decay-length", "decay-free")
# Mid-training is 0.45 of pre-training's steps at every scale: Table 21's 36k mid-training
# steps after Table 6's 80k pre-training steps.
MID_FRACTION = 36_000 / 80_000
SCALES = {
    "cpu": dict(train=dict(dataset="testbed", preset="tiny", max_iters=600, warmup_iters=60, batch_size=32,
                           seq_len=128, learning_rate=3e-3, sharpness_interval=100, compile=False),
                mid=dict(dataset="testbed_mid", max_iters=round(MID_FRACTION * 600)),
                # sharpness.py of each final model: 4 x 20 probes take seconds on the tiny model
                sharpness=dict(num_batches=4, num_samples=20),
                # one pre-training run (COST 1.0) on one thread, its 7 sharpness measurements included,
                # two side by side (--jobs=2) on the slowest 2-core CPU measured (docs/LOG.md); faster
                # machines finish early
                seconds_per_cost=440,
                # 600 steps store the facts under every schedule (data/testbed/prepare.py's sizes);
                # SFT: 5 epochs of the 450 training conversations, 71 updates, 5 of warmup (~7%)
                sft=dict(dataset="testbed", lrs=",".join(f"{lr:g}" for lr in SFT_LR_GRIDS["testbed"]), epochs=5,
                         warmup_iters=5, compile=False),
                eval=dict(tasks="val_loss,testbed_recall,testbed_probes"),
                mid_eval=dict(tasks="val_loss,testbed_mid_recall,testbed_mid_probes")),
    # The paper's regime on a CPU (data/hmm/prepare.py): the tiny model reads text with
    # irreducible entropy about once (0.82 passes; held-out loss 4.3 nats, 0.1-0.2 above the
    # language's floor), the people's facts embedded 50 times each. Sharpness along training
    # on 16 held-out sequences x 10 probes (the same for every schedule and seed), and after
    # it on 32 x 10, plain and AdamW-preconditioned (standard errors near 5%). SFT: the
    # testbed's 450 conversations, 10 epochs (141 updates, 20 of warmup), each LR's forgetting
    # measured for the learning-forgetting frontier.
    "hmm": dict(train=dict(dataset="hmm", preset="tiny", max_iters=600, warmup_iters=60, batch_size=32,
                           seq_len=128, learning_rate=3e-3, sharpness_interval=200, sharpness_batches=16,
                           sharpness_samples=10, compile=False),
                mid=dict(dataset="hmm_mid", max_iters=round(MID_FRACTION * 600)),
                sharpness=dict(num_batches=32, num_samples=10),
                preconditioned=True,  # a held-out sharpness stage with --preconditioned=true per trained model
                # one WSO run of 600 steps with its in-training sharpness, two side by side on this
                # 2-core AMD EPYC (--quick, docs/LOG.md 2026-12-04): 6 min 53 s
                seconds_per_cost=415,
                sft=dict(dataset="hmm", lrs=",".join(f"{lr:g}" for lr in SFT_LR_GRIDS["hmm"]), epochs=10,
                         warmup_iters=20, compile=False),
                eval=dict(tasks="val_loss,testbed_recall,testbed_probes"),
                mid_eval=dict(tasks="val_loss,testbed_mid_recall,testbed_mid_probes")),
    # Table 6's recipe (eta_max 3e-4, AdamW, bf16) at the 125m preset for ~262M tokens a run
    # (1000 x 2^18), Table 8's SFT on a 20k-conversation sample of Tulu 3 with 3 of its LRs;
    # not yet run, so its run time is unmeasured
    "gpu": dict(train=dict(dataset="fineweb_edu", preset="125m", max_iters=1000, warmup_iters=100,
                           tokens_per_step=262144, batch_size=32, seq_len=1024, learning_rate=3e-4,
                           sharpness_interval=100, compile=True),
                mid=dict(dataset="fineweb_edu", max_iters=round(MID_FRACTION * 1000)),
                # Table 23: sequences of 1024 tokens, batch size 1, 50 probes, up to 4096 batches
                # (about 3 HVPs of a forward+backward each, tools/bench_hvp.py: ~2x a run's pre-training)
                sharpness=dict(num_batches=4096, num_samples=50, seq_len=1024, batch_size=1, compile=True),
                seconds_per_cost=None,  # not run yet
                sft=dict(dataset="tulu3", lrs="5e-5,1e-4,5e-4", epochs=1, global_batch_size=128, batch_size=16,
                         warmup_iters=10, max_train=20000, max_val=2000, compile=True),
                eval=dict(tasks="val_loss," + ",".join(t for t in PT_TASKS if not t.startswith("testbed"))),
                mid_eval=dict(tasks="val_loss," + ",".join(t for t in MT_TASKS if t not in HARNESS
                                                           and not t.startswith("testbed")),
                              harness=",".join(t for t in MT_TASKS if t in HARNESS), harness_fewshot="drop=5"),
                # Table 18's suite after SFT, less AlpacaEval (it needs a judge: --judge); DROP,
                # GSM8K, AGIEval and BBH in lm-eval's own configs (nanowso/harness.py)
                sft_eval=dict(tasks="mmlu,truthfulqa_mc2", harness=",".join(HARNESS),
                              harness_fewshot="gsm8k_cot=1,drop=5,agieval_en=3")),
}


# python reproduce.py --quick: the premise, the mechanism and the frontier in the paper's regime
# (--scale=hmm), two seeds of WSO and WSD to 0 at the study's length (the WSD runs branch from the
# WSO runs at T_stable, so a seed trains 600 + 135 steps, not 1200) and a 3-LR sweep of 5 epochs:
# 13 min 56 s from a fresh clone on a 2-core AMD EPYC otherwise idle (docs/LOG.md 2026-12-04).
# Half the steps (300) was tried first: 15 min, but the facts were not yet learned (recall 4%,
# SFT at its floor, the val loss 0.4 nats above the 600-step runs' and 0.5 apart between seeds).
QUICK = dict(experiment="pre", scale="hmm", schedules="wso,wsd_a0", seeds="0,1",
             sft_lrs="1e-4,3.2e-4,1e-3", sft_epochs=5, jobs=2, runs_dir="runs/quick", out_dir="results/quick")


def quick_config(cfg):
    """cfg with QUICK's settings where --quick is on and the command did not give its own (a
    config built in code: where it holds the default)."""
    if not cfg.quick:
        return cfg
    default = ReproduceConfig()
    given = getattr(cfg, "given", None)
    chosen = {k: v for k, v in QUICK.items()
              if (k not in given if given is not None else getattr(cfg, k) == getattr(default, k))}
    return dataclasses.replace(cfg, **chosen)


@dataclass
class ReproduceConfig:
    experiment: str = "pre"  # pre (Table 1) | mid (Table 2) | over (Table 3) | decay-length | decay-free
    scale: str = "cpu"  # cpu (the biography testbed) | hmm (the paper's regime on a CPU) | gpu (FineWeb-Edu, Tulu 3)
    seeds: str = "0"  # comma-separated training seeds; everything is repeated per seed
    schedules: str = ""  # a subset of the grid, e.g. wso,wsd_a0.1 (run names); empty: all
    out_dir: str = "results"  # tables, figures, results.json
    runs_dir: str = "runs"  # checkpoints and logs of every stage: runs_dir/seed<k>/<run>/
    max_iters: int = 0  # pre-training steps instead of the scale's (mid-training: MID_FRACTION of it)
    sft_lrs: str = ""  # the SFT sweep instead of the scale's
    sft_epochs: int = 0  # SFT epochs instead of the scale's
    eval_limit: int = 0  # score only the first N items of each evaluation task (0: all)
    jobs: int = 1  # independent stages run at once, each in its own process
    threads: int = 0  # torch threads per stage; 0: all cores with --jobs=1, else cores // jobs
    verbose: bool = False  # stream every stage's output instead of one line per stage
    dry_run: bool = False  # print the stages still to run and the estimated time; run nothing
    quick: bool = False  # WSO vs WSD to 0 in the paper's regime, small (QUICK); options given still win

    def __post_init__(self):
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"experiment={self.experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
        if self.jobs < 1 or self.threads < 0:
            raise ValueError(f"jobs={self.jobs} must be >= 1 and threads={self.threads} >= 0")
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}; choose one of {sorted(SCALES)}")
        try:
            [int(s) for s in self.seeds.split(",")]
        except ValueError:
            raise ValueError(f"seeds={self.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None


def run_name(schedule, alpha_pre, alpha_mid=None):
    name = "wso" if alpha_pre == 1.0 and schedule in ("wso", "wsd") else f"{schedule}_a{alpha_pre:g}"
    return name if alpha_mid is None else f"{name}_mid_a{alpha_mid:g}"


def grid(experiment):
    """[(run name, pre-training run name, train.py options, alpha_mid)] of an experiment."""
    if experiment == "mid":
        return [(run_name(s, a, m), run_name(s, a), {"schedule": s, "alpha": a}, m) for s, a, m in EXPERIMENT_2]
    if experiment == "decay-length":
        named = {0.25: "wsd_a0", 1.0: "linear_a0"}  # Experiment 1's runs, the same commands
        return [(named.get(f, f"wsd_a0_decay{f:g}"),) * 2 + (
            {"schedule": "linear", "alpha": 0.0} if f == 1.0 else
            {"schedule": "wsd", "alpha": 0.0, **({} if f == 0.25 else {"stable_ratio": 1 - f})}, None)
            for f in DECAY_FRACTIONS]
    prefix = "over/" if experiment == "over" else ""
    return [(prefix + run_name(s, a),) * 2 + ({"schedule": s, "alpha": a}, None) for s, a in EXPERIMENT_1]


def flags(options):
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]


# --------------------------------------------------------------------- the stages

def plan(cfg):
    """Every stage of the study, in order: (kind, run_dir, command, steps): steps is the
    step a training stage's checkpoint must reach to be done (None for the others)."""
    scale = SCALES[cfg.scale]
    train = dict(scale["train"])
    factor = OVER_TRAINING if cfg.experiment == "over" else 1
    steps = (cfg.max_iters or train["max_iters"]) * factor
    if steps != train["max_iters"]:  # the warmup keeps its share; over-training measures as often per share
        train.update(max_iters=steps, warmup_iters=max(1, round(steps / train["max_iters"] * train["warmup_iters"])),
                     sharpness_interval=factor * train["sharpness_interval"])
    sft = {**scale["sft"], **({"lrs": cfg.sft_lrs} if cfg.sft_lrs else {}),
           **({"epochs": cfg.sft_epochs} if cfg.sft_epochs else {})}
    wanted = set(cfg.schedules.split(",")) - {""}
    stages = []
    for seed in [int(s) for s in cfg.seeds.split(",")]:
        seed_dir = os.path.join(cfg.runs_dir, f"seed{seed}")
        if cfg.experiment == "decay-free":
            stages += decay_free_plan(cfg, seed, seed_dir, train, sft, scale)
            continue
        rows = grid(cfg.experiment)
        unknown = wanted - {name for name, *_ in rows}
        if unknown:
            raise SystemExit(f"error: --schedules names {sorted(unknown)}; the grid has "
                             f"{[name for name, *_ in rows]}")
        pretrained = set()
        branch_at = wsd_branch_step(cfg, seed_dir, train, rows, wanted)
        for name, pre_name, options, alpha_mid in rows:
            if wanted and name not in wanted:
                continue
            pre_dir = os.path.join(seed_dir, pre_name)
            if pre_dir not in pretrained:  # Experiment 2 shares each pre-training run
                pretrained.add(pre_dir)
                if branch_at and options["schedule"] == "wsd" and "stable_ratio" not in options:
                    stages.append(decay_branch(seed_dir, pre_dir, train, options, seed, branch_at))
                else:
                    keep = {"keep_every": branch_at, "keep_optimizer": True} if branch_at and pre_name == "wso" else {}
                    stages.append(("pre-train", pre_dir, ["train.py", *flags(
                        {**train, **options, **keep, "seed": seed, "out_dir": pre_dir})], train["max_iters"]))
            run_dir = pre_dir
            if alpha_mid is not None:
                run_dir = os.path.join(seed_dir, name)
                mid = {**scale["mid"], **({"max_iters": round(MID_FRACTION * cfg.max_iters)} if cfg.max_iters else {})}
                stages.append(("mid-train", run_dir, ["train.py", *flags(
                    {**{k: v for k, v in train.items() if k not in mid}, **mid, "stage": "mid",
                     "alpha_mid": alpha_mid, "sharpness_interval": 0, "seed": seed,
                     "init_from": os.path.join(pre_dir, "ckpt.pt"), "out_dir": run_dir})], mid["max_iters"]))
            tasks = scale["mid_eval" if alpha_mid is not None else "eval"]
            if scale.get("preconditioned"):  # the model's own AdamW state: a trained run's checkpoint
                stages.append(sharpness_stage(cfg, run_dir, "val", preconditioned=True))
            stages += model_stages(cfg, seed, run_dir, tasks, sft)
    return stages


def wsd_branch_step(cfg, seed_dir, train, rows, wanted):
    """WSD's T_stable where this seed's WSD runs (Table 6's stable_ratio) are to branch from its
    WSO run (checkpoint.is_wsd_branch: the same updates, WSD's first T_stable steps trained once),
    else 0: when the plan has no WSO run and WSD run of this seed, or when the WSO run passed
    that step without keeping its checkpoint (a study begun before branching: WSD from scratch)."""
    runs = {pre_name: options for name, pre_name, options, _ in rows if not wanted or name in wanted}
    if runs.get("wso", {}).get("schedule") != "wso" or not any(
            options["schedule"] == "wsd" and "stable_ratio" not in options for options in runs.values()):
        return 0
    step = wsd_t_stable(warmup_iters=train["warmup_iters"], max_iters=train["max_iters"], stable_ratio=0.75)
    wso = os.path.join(seed_dir, "wso")
    ckpt = os.path.join(wso, "ckpt.pt")
    if os.path.isfile(ckpt) and checkpoint_step(ckpt) >= step and not os.path.isfile(
            os.path.join(wso, f"ckpt_{step:06d}.pt")):
        return 0
    return step


def decay_branch(seed_dir, run_dir, train, options, seed, step):
    """A WSD run as its decay from the WSO run's checkpoint at T_stable = step (train.py
    --stage=cooldown; the rest of the settings are the WSO run's, inherited)."""
    return ("decay", run_dir, ["train.py", *flags(
        {**train, "schedule": "wso", "stage": "cooldown", "alpha": options["alpha"],
         "max_iters": train["max_iters"] - step, "seed": seed,
         "init_from": os.path.join(seed_dir, "wso", f"ckpt_{step:06d}.pt"), "out_dir": run_dir})], train["max_iters"])


def sharpness_stage(cfg, run_dir, split, preconditioned=False):
    """Sharpness of run_dir/ckpt.pt with the scale's settings: on held-out text and SFT
    conversations (split=val, as the paper; preconditioned: also Tr(D^-1 H), D from the
    checkpoint's AdamW state), or on the training text itself (split=train), where training
    sought its minimum."""
    kind, args, out = (("sharpness", ["--preconditioned=true"] * preconditioned, "sharpness.json") if split == "val"
                       else ("sharpness (train)", ["--datasets=pretrain", "--pretrain_split=train"],
                             "sharpness_train.json"))
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
                                                          "keep_every": keep, "keep_optimizer": True,
                                                          "out_dir": wso_dir})], total)]
    kept = [os.path.join(wso_dir, f"ckpt_{step:06d}.pt") for step in range(branch, total + 1, keep)]
    finals = {"wso": wso_dir}
    cool_dir = os.path.join(seed_dir, "wso_cooldown")
    stages.append(("cooldown", cool_dir, ["train.py", *flags(
        {**train, "schedule": "wso", "seed": seed, "stage": "cooldown", "alpha": 0.0, "max_iters": cool,
         "sharpness_interval": 0, "init_from": kept[0], "out_dir": cool_dir})], total))
    finals["wso_cooldown"] = cool_dir
    for shape in MERGE_SHAPES:  # schedules.merge_weights' shapes
        merge_dir = os.path.join(seed_dir, f"wso_merge_{shape}")
        stages.append(("merge", merge_dir, ["tools/merge.py", f"--ckpts={','.join(kept)}", f"--shape={shape}",
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
        return os.path.isfile(path) and checkpoint_step(path) >= steps
    return os.path.isfile(os.path.join(run_dir, OUTPUT[kind]))


TRAINING = ("pre-train", "mid-train", "cooldown", "decay")
OUTPUT = {"evaluate": "eval.json", "SFT": "sft/summary.json", "SFT eval": "sft_eval.json", "merge": "ckpt.pt",
          "sharpness": "sharpness.json", "sharpness (train)": "sharpness_train.json"}


# Relative cost of each kind of stage on the testbed (measured), for the study's ETA: 1.0 is one
# pre-training run of the scale's steps; a training stage costs in proportion to its steps (stage_cost)
COST = {"pre-train": 1.0, "mid-train": 1.0, "cooldown": 1.0, "decay": 0.25, "merge": 0.02, "sharpness": 0.03, "evaluate": 0.03,
        "SFT": 0.5, "SFT eval": 0.1, "sharpness (train)": 0.03}


def stage_cost(stage, pretrain_steps: int) -> float:
    """A stage's share of the study's time: COST, times steps / pretrain_steps for training
    (Experiment 3's 4x pre-training costs 4, a 270-step mid-training 0.45)."""
    kind, _, _, steps = stage
    return COST[kind] * (steps / pretrain_steps if kind in TRAINING else 1.0)


PRODUCERS = (*TRAINING, "merge")  # the stages that write a run's ckpt.pt


def dependencies(stages):
    """For each stage, the earlier stages it must wait for: those that write the checkpoint it
    reads (its own run's training or merge, or the run its command points into), and for
    "SFT eval" its run's SFT. Stages of one run that only read its checkpoint are independent."""
    deps = []
    for i, (kind, run_dir, command, _) in enumerate(stages):
        needs = {j for j, (other, other_dir, _, _) in enumerate(stages[:i]) if other in PRODUCERS and (
            other_dir == run_dir or any(other_dir + os.sep in arg for arg in command))}
        if kind == "SFT eval":
            needs |= {j for j, (other, other_dir, _, _) in enumerate(stages[:i]) if other == "SFT" and other_dir == run_dir}
        deps.append(needs)
    return deps


