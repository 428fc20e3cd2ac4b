"""The paper's tables (Tables 1-4): which numbers a row holds, how the task averages are
defined, and the layout, each difference taken from the best decay-based run. Used by
`python evaluate.py --compare <run dirs>` and by reproduce.py; nothing here runs on its own.

A row is a dict: run (a name), seed, schedule, alpha_pre, alpha_mid (nanowso.checkpoint.schedule_of),
and the metrics valid_loss, task_avg, sft_task_avg (and any other key a column names).
"""

import numpy as np

SCHEDULERS = {"wso": "WSO", "wsd": "WSD", "linear": "Linear", "cosine": "Cosine", "wso+cooldown": "WSO + cooldown"}

# The score each pre-/mid-training task contributes to "PT Task Avg" / "MT Task Avg", as the
# paper's Sections 3.1 and 4.1 report them (acc_norm where lm-eval's leaderboards use it). On
# the testbed the average is greedy recall of the facts (exact); its 4-way probes are shown
# beside it but left out of the average: every schedule scores 92-100% on them.
ZERO_SHOT = {"arc_easy": "acc", "arc_challenge": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm",
             "openbookqa": "acc_norm", "piqa": "acc_norm", "winogrande": "acc",
             "testbed_recall": "exact_match", "testbed_mid_recall": "exact_match",
             "testbed_probes": "acc", "testbed_mid_probes": "acc"}
PT_TASKS = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande",
            "testbed_recall"]  # Section 3.1
MT_TASKS = ["arc_challenge", "hellaswag", "winogrande", "drop", "gsm8k_cot", "testbed_mid_recall"]  # Section 4.1
# The paper's tasks that lm-eval's own configs score (evaluate.py --harness, nanowso/harness.py), each
# with the metric it contributes: lm-eval's "metric,filter" key. Appendix E's shots: after
# mid-training DROP 5-shot and GSM8K 8-shot chain-of-thought (gsm8k_cot's own 8); after SFT
# GSM8K 1-shot, DROP 5-shot, AGIEval 3-shot (its English tasks), BBH 3-shot with CoT (bbh's own).
HARNESS = {"gsm8k_cot": "exact_match,strict-match", "drop": "f1,none", "agieval_en": "acc,none",
           "bbh": "exact_match,get-answer"}
ZERO_SHOT.update({task: HARNESS[task] for task in ("drop", "gsm8k_cot")})

# SFT Task Avg, the one definition: 100 x the mean, over the post-SFT tasks present, of
# each task's score in [0, 1] (Appendix E's AlpacaEval win rate, TruthfulQA MC2, MMLU, and
# HARNESS's GSM8K, DROP, AGIEval, BBH).
# The testbed's task scores the mean of its exact match and its choice accuracy
# (scoring.testbed_sft_accuracy): exact match alone sits near its floor on small models.
SFT_SCORES = {
    "alpaca_eval": lambda r: r.get("win_rate"),  # None without a judge: left out
    "truthfulqa_mc2": lambda r: r["acc"],
    "mmlu": lambda r: r["acc"],
    "testbed_sft_test": lambda r: (r["exact_match"] + r["choice"]) / 2,
    **{task: (lambda r, m=metric: r.get(m)) for task, metric in HARNESS.items()},
}


def valid_loss(val_loss):
    """PT/MT Valid Loss of an evaluate.py val_loss result: where the corpus marks its facts'
    values (the testbed's pre-training text), the loss on those tokens; elsewhere the mean
    over all tokens. On the testbed the whole held-out document's loss also charges the
    model for the sentence order of each training document it memorized: in a WSO run
    (150 people, seed 0) it rose 0.45 -> 0.57 -> 0.64 at steps 200, 400, 600 while the value
    loss fell 0.34 -> 0.18 -> 0.15 and recall rose 79% -> 90% -> 95%, so it does not measure
    how well the facts are fit (docs/testbed.md)."""
    return val_loss.get("value_loss", val_loss.get("loss"))


def task_average(tasks, score_of):
    """100 x the mean score of the tasks present (score_of: task -> its metric), or None."""
    values = [tasks[t][m] for t, m in score_of.items() if t in tasks and tasks[t].get(m) is not None]
    return 100 * float(np.mean(values)) if values else None


def zero_shot_avg(tasks, stage):
    """PT Task Avg of a pre-training checkpoint's tasks, MT Task Avg of a mid-training one's."""
    return task_average(tasks, {t: ZERO_SHOT[t] for t in (MT_TASKS if stage == "mid" else PT_TASKS)})


def sft_task_avg(tasks):
    """SFT Task Avg of a fine-tuned model's task results {task: result} (see SFT_SCORES)."""
    scores = [SFT_SCORES[t](tasks[t]) for t in SFT_SCORES if t in tasks]
    scores = [s for s in scores if s is not None]
    return 100 * float(np.mean(scores)) if scores else None


def constant_lr(row):
    """WSO: no decay in any stage. Every column's reference is the best of the other runs."""
    return row["alpha_pre"] == 1.0 and row["alpha_mid"] in (None, 1.0)


def scheduler_label(schedule):
    if schedule and schedule.startswith("wso+merge "):
        return f"WSO + merge ({schedule.split(' ', 1)[1]})"
    return SCHEDULERS.get(schedule, schedule or "?")


def alpha_label(alpha):
    return "–" if alpha is None else f"{alpha:.1f}"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def mean_std(values, spec, sign=False):
    """"mean ± std" over seeds (the sample std), the mean alone for one value, n/a for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    spec = ("+" if sign else "") + spec
    text = format(float(np.mean(values)), spec)
    return text + (f" ± {np.std(values, ddof=1):{spec.lstrip('+')}}" if len(values) > 1 else "")


# (key, title, lower is better, format) of the columns the Δ table compares
COMPARED = [("valid_loss", "Valid Loss ↓", True, ".3f"), ("task_avg", "Task Avg", False, ".1f"),
            ("sft_task_avg", "SFT Task Avg", False, ".1f")]


def column_title(key, title, mid):
    """"PT ..." or "MT ..." for the pre-/mid-training metrics, as the paper heads them."""
    return f"{'MT' if mid else 'PT'} {title}" if key in ("valid_loss", "task_avg") else title


def deltas(rows, compared):
    """{(run, key): [row[key] - reference per seed]}: the reference is the best value of the
    runs that decay the LR (not constant_lr) in the same seed."""
    out = {}
    for key, _, lower, _ in compared:
        for seed in sorted({r["seed"] for r in rows}):
            mine = [r for r in rows if r["seed"] == seed and r[key] is not None]
            decayed = [r[key] for r in mine if not constant_lr(r)]
            if not decayed:
                continue
            ref = min(decayed) if lower else max(decayed)
            for r in mine:
                out.setdefault((r["run"], key), []).append(r[key] - ref)
    return out


def paper_tables(rows, mid, compared=COMPARED, absolute=(), label_keys=()):
    """Markdown in the paper's layout: per compared metric, each run's difference from the
    best decay-based run (per seed, then mean ± std over seeds), the best mean in bold; then
    the absolute values of the compared metrics and of `absolute` [(key, title, format)]
    (format "per seed": each seed's value, comma-separated, with † where the row's
    key + "_at_edge" is true). Runs keep their order in rows; label_keys [(key, title)] name
    them further (the decay-length ablation's decay fraction)."""
    names = list(dict.fromkeys(r["run"] for r in rows))
    first = {n: next(r for r in rows if r["run"] == n) for n in names}
    header = ["Scheduler", "α_pre"] + (["α_mid"] if mid else []) + [title for _, title in label_keys]
    labels = {n: [scheduler_label(first[n]["schedule"]), alpha_label(first[n]["alpha_pre"])]
              + ([alpha_label(first[n]["alpha_mid"])] if mid else [])
              + [f"{first[n][key]:g}" for key, _ in label_keys] for n in names}
    diff = deltas(rows, compared)
    relative = [labels[n] + [mean_std(diff.get((n, key), []), spec, sign=True) for key, _, _, spec in compared]
                for n in names]
    for j, (key, _, lower, _) in enumerate(compared):  # bold the best mean difference
        means = [np.mean(diff[n, key]) if diff.get((n, key)) else None for n in names]
        if any(m is not None for m in means):
            i = means.index((min if lower else max)(m for m in means if m is not None))
            relative[i][len(header) + j] = f"**{relative[i][len(header) + j]}**"
    columns = [(key, column_title(key, title, mid), spec) for key, title, _, spec in compared] + list(absolute)

    def cell(n, key, spec):
        values = [r.get(key) for r in rows if r["run"] == n]
        if spec == "per seed":  # † where the row says the value is at an edge (key + "_at_edge")
            edges = [r.get(key + "_at_edge") for r in rows if r["run"] == n]
            return ",".join("n/a" if v is None else f"{v:g}" + "†" * bool(e) for v, e in zip(values, edges))
        return mean_std(values, spec)

    return (markdown(header + [column_title(key, title, mid) + " Δ" for key, title, _, _ in compared], relative),
            markdown(header + [title for _, title, _ in columns],
                     [labels[n] + [cell(n, key, spec) for key, _, spec in columns] for n in names]))


# ------------------------------------------------------------------ paired comparisons

# Student's t quantiles for df = 1..30 (the normal's beyond): the paired t-test's power.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
T_80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868,
        0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855,
        0.854, 0.854)


def paired(values, ratio=False, rounds=10_000, seed=0):
    """What per-seed paired values (a run minus WSO on the same seed, or with ratio=True their
    ratio, taken on the log scale) say: {n, mean, sd, low, high, boot_low, boot_high,
    detectable}. low-high is the 95% t interval of the mean; boot_low-boot_high the percentile
    bootstrap over seeds, kept beside it because with few seeds it covers less than it says
    (it never leaves the data's range: at most 1 - 2^(1-n) coverage, 75% for 3 seeds). detectable
    is the smallest true effect these n seeds find with 80% power in a two-sided paired t-test
    at 5%, about (t_.975 + t_.80) sd / sqrt(n) with n - 1 degrees of freedom. For a ratio the
    mean is the geometric mean, the intervals are mapped back, and detectable is the smallest
    factor's distance from 1. nan where n < 2."""
    x = np.log(np.asarray(values, dtype=float)) if ratio else np.asarray(values, dtype=float)
    n, nan = len(x), float("nan")
    mean, sd, low, high, boot_low, boot_high, detectable = float(x.mean()) if n else nan, nan, nan, nan, nan, nan, nan
    if n >= 2:
        df = n - 1
        t975, t80 = (T_975[df - 1], T_80[df - 1]) if df <= len(T_975) else (1.960, 0.842)
        sd = float(x.std(ddof=1))
        se = sd / np.sqrt(n)
        low, high, detectable = mean - t975 * se, mean + t975 * se, (t975 + t80) * se
        means = x[np.random.default_rng(seed).integers(n, size=(rounds, n))].mean(axis=1)
        boot_low, boot_high = float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
    back = (lambda v: float(np.exp(v))) if ratio else float
    return {"n": n, "mean": back(mean), "sd": sd, "low": back(low), "high": back(high), "boot_low": back(boot_low),
            "boot_high": back(boot_high), "detectable": float(np.expm1(detectable)) if ratio else float(detectable)}


def mixed_forgetting(runs):
    """A line saying why these runs' forgetting cannot be compared (some measured none, or
    from other tokens), or "" when they can."""
    trained = [r for r in runs if r.get("diverged_at_step") is None]
    # the initial loss to 4 decimals: a GPU's rerun may differ in the last bits
    bases = {(r.get("forgetting_tokens"), round(r.get("pretrain_val_loss_before") or 0.0, 4))
             for r in trained if "forgetting" in r}
    missing = [f"{r['lr']:g}" for r in trained if "forgetting" not in r]
    if bases and missing:
        return f"LRs {', '.join(missing)} have no forgetting (finished before it was measured, or with it off)"
    if len(bases) > 1:
        return "its LRs measured forgetting on different held-out tokens (reruns with another --forgetting_tokens)"
    return ""


FRONTIER_FORGETTING = 0.01  # nats: between the HMM sweeps' 1.8e-4 and 3.2e-4 points in the pilots (docs/LOG.md)


def score_over_lrs(points):
    """The SFT score averaged over every LR of a sweep's frontier [(forgetting, score, lr)]: one
    number per sweep with no LR selected on the 100 selection questions; None for no points."""
    return sum(score for _, score, _ in points) / len(points) if points else None


def score_at_forgetting(points, level=FRONTIER_FORGETTING):
    """The SFT score a sweep reaches at `level` nats of forgetting: its frontier [(forgetting,
    score, lr)] interpolated linearly in log forgetting between the two points around `level`;
    None where the sweep does not reach that far on both sides. One number per sweep that
    compares schedules at equal forgetting, where the selected LR compares them at unequal."""
    points = sorted((f, score) for f, score, _ in points if f > 0)
    for (f0, s0), (f1, s1) in zip(points, points[1:]):
        if f0 <= level <= f1:
            w = 0.0 if f1 == f0 else (np.log(level) - np.log(f0)) / (np.log(f1) - np.log(f0))
            return float(s0 + w * (s1 - s0))
    return None


# (key, what it is, how two runs compare: "diff" = run - WSO, "ratio" = run / WSO, format)
PAIRED = [("valid_loss", "Valid Loss", "diff", ".4f"), ("sharpness_pretrain", "Tr(H) held-out", "ratio", ".3f"),
          ("sharpness_preconditioned", "Tr(D^-1 H) held-out", "ratio", ".3f"),
          ("sharpness_train", "Tr(H) training text", "ratio", ".3f"), ("recall", "Recall before SFT", "diff", ".1f"),
          ("sft_task_avg", "SFT Task Avg (selected LR)", "diff", ".1f"),
          ("sft_task_avg_over_lrs", "SFT Task Avg, mean over the sweep's LRs", "diff", ".1f"),
          # how much of what the model recalled before SFT its SFT answers bring out: the SFT
          # score with the recall it starts from divided out (a schedule that stored fewer facts
          # is not charged for them here)
          ("sft_em_over_recall", "SFT exact match / recall before SFT", "ratio", ".3f"),
          ("sft_score_at_forgetting", f"SFT Task Avg at {FRONTIER_FORGETTING:g} nats forgetting", "diff", ".1f")]


def paired_rows(rows, reference="wso", paired_keys=PAIRED):
    """{(run, key): per-seed values} of each run against `reference` on the seeds both have."""
    by = {(r["run"], r["seed"]): r for r in rows}
    out = {}
    for run in dict.fromkeys(r["run"] for r in rows if r["run"] != reference):
        for key, _, how, _ in paired_keys:
            values = []
            for (name, seed), r in sorted(by.items()):
                base = by.get((reference, seed))
                if name != run or base is None or r.get(key) is None or base.get(key) is None:
                    continue
                if how == "ratio" and min(r[key], base[key]) <= 0:
                    continue  # a negative trace (far from a minimum on that data) has no ratio
                values.append(r[key] / base[key] if how == "ratio" else r[key] - base[key])
            if values:
                out[(run, key)] = values
    return out


def paired_table(rows, reference="wso", paired_keys=PAIRED):
    """Markdown: each run against the reference seed by seed, with paired's intervals and the
    effect the seeds can detect (a ratio's: its distance from 1)."""
    table = []
    for (run, key), values in paired_rows(rows, reference, paired_keys).items():
        _, what, how, spec = next(p for p in paired_keys if p[0] == key)
        p = paired(values, ratio=how == "ratio")
        sign = "/" if how == "ratio" else "-"
        table.append([f"{run} {sign} {reference}", what, ", ".join(format(v, spec) for v in values),
                      format(p["mean"], spec), f"[{p['low']:{spec}}, {p['high']:{spec}}]",
                      f"[{p['boot_low']:{spec}}, {p['boot_high']:{spec}}]", format(p["detectable"], spec)])
    return markdown(["pair (per seed)", "quantity", "per seed", "mean", "95% t interval", "bootstrap",
                     "detectable (80% power)"], table)
