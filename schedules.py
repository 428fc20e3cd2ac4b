"""Learning-rate schedules of the paper (Section 2.4, Appendix B, Appendix D Table 8).

Every script takes its learning rate from here. Each schedule is a pure function of the
1-based update index t (update t uses eta(t), t = 1..T) and the hyperparameters, named
as in the paper: lr_max = eta_max, warmup_iters = T_warmup, max_iters = T_pre,
alpha = alpha_pre, stable_ratio = rho.

Pre-training, with the warmup eta_max * t / T_warmup for t <= T_warmup shared by all:
    WSO     Eq. (5)/(8)  eta_max for T_warmup < t <= T_pre   (WSD with alpha_pre = 1; alpha unused)
    WSD     Eq. (4)/(7)  eta_max up to T_stable, then
                         eta_max * ((1 - alpha_pre) * (T_pre - t) / (T_pre - T_stable) + alpha_pre)
    Cosine  Eq. (9)      eta_max * (alpha_pre + (1 - alpha_pre) / 2 * (1 + cos(pi * p))),
                         p = (t - T_warmup) / (T_pre - T_warmup)
    Linear  Eq. (10)     eta_max * ((1 - alpha_pre) * (T_pre - t) / (T_pre - T_warmup) + alpha_pre)
WSD's decay phase may also be shaped 1-sqrt or cosine (cooldown=...); the paper uses linear.
Mid-training, Eq. (11), for T_pre < t <= T_pre + T_mid:
    eta(T_pre) * ((1 - alpha_mid) * (T_pre + T_mid - t) / T_mid + alpha_mid)
Cooldown branched from a constant-LR checkpoint at update n ("WSO + cooldown"), n < t <= n + M:
    eta_max * (alpha_pre + (1 - alpha_pre) * s((t - n) / M))     s: the cooldown shape
    i.e. WSD's decay phase, Eq. (4), with T_stable = n and T_pre = n + M
SFT, Table 8: linear warmup, then cosine to a minimum LR of 0.

Checkpoint merging ("WSO + merge"; WSM, Tian et al., 2025, Theorem 3.1). Merging the
checkpoints theta_n, ..., theta_{n+k} of a constant-LR run with weights c_0..c_k,
    sum_j c_j theta_{n+j} = theta_n + sum_{i=1..k} w_i (theta_{n+i} - theta_{n+i-1}),
    c_0 = 1 - w_1,  c_j = w_j - w_{j+1} (0 < j < k),  c_k = w_k,  so  w_i = sum_{j>=i} c_j,
takes the updates from theta_{n+i-1} to theta_{n+i} with the LR multiplied by w_i: a decay
(tools/merge.py). The multipliers w_i of each shape (merge_weights), with u_i = i / (k + 1):
    linear        1 - u_i                  c_j = 1 / (k + 1): the uniform mean
    cosine        (1 + cos(pi u_i)) / 2
    1-sqrt        1 - sqrt(u_i)
    inverse-sqrt  1 / sqrt(i + 1)          eta ~ 1/sqrt(t), t counted in checkpoint intervals
The first three are the cooldown shapes, reaching 0 one interval past the last checkpoint.
All are non-increasing and at most 1, so every c_j >= 0, and the c_j sum to 1.

Draw the paper's Figures 1 and 2:
    python schedules.py --out_dir=.
"""
import argparse
import math
import os

PRETRAIN_SCHEDULES = ("wso", "wsd", "cosine", "linear")

# Shape of the WSD decay phase: the fraction of (1 - alpha_pre) left at progress u in (0, 1].
# The paper decays linearly; 1-sqrt (Hagele et al., 2024) and cosine are common alternatives.
_COOLDOWN_SHAPES = {
    "linear": lambda u: 1 - u,  # Eq. (4): 1 - u = (T_pre - t) / (T_pre - T_stable)
    "1-sqrt": lambda u: 1 - math.sqrt(u),
    "cosine": lambda u: (1 + math.cos(math.pi * u)) / 2,
}
COOLDOWNS = tuple(_COOLDOWN_SHAPES)


def _check_range(name, value, low, high, meaning):
    if not low <= value <= high:  # also rejects NaN
        raise ValueError(f"{name}={value!r} is outside [{low}, {high}]; {name} is {meaning}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def _check_lr_max(lr_max):
    if not lr_max > 0:
        raise ValueError(f"lr_max={lr_max!r} must be > 0; lr_max is the peak LR (eta_max in the paper)")


def _check_count(name, value, meaning):
    if value < 1:
        raise ValueError(f"{name}={value!r} must be >= 1; {name} is {meaning}")


# The LR functions below check only t, the update they are asked about. Their settings are
# checked once, where a run is configured, by these validate_* functions (train.py's
# TrainConfig and sft.py call them), not at every update.

def validate_pretrain(schedule, *, warmup_iters, max_iters, alpha, stable_ratio=0.75, cooldown="linear", lr_max=None):
    """Raise ValueError, naming the parameter, unless pretrain_lr accepts these settings."""
    if lr_max is not None:
        _check_lr_max(lr_max)
    _check_choice("schedule", schedule, PRETRAIN_SCHEDULES)
    _check_choice("cooldown", cooldown, COOLDOWNS)
    _check_count("max_iters", max_iters, "the number of pre-training updates (T_pre in the paper)")
    # At least one update must follow the warmup, or the schedule never reaches its end.
    _check_range("warmup_iters", warmup_iters, 0, max_iters - 1,
                 "the number of warmup updates (T_warmup in the paper), fewer than max_iters")
    # WSO is WSD with alpha_pre = 1 and ignores alpha, but a bad value is still a config error.
    _check_range("alpha", alpha, 0, 1, "the minimum-LR factor (alpha_pre in the paper)")
    _check_range("stable_ratio", stable_ratio, 0, 1,
                 "the WSD stable fraction of the post-warmup updates (rho in the paper)")


def validate_cooldown(*, alpha, cooldown_iters, cooldown="linear", lr_max=None, t_stable=0):
    """Raise ValueError, naming the parameter, unless cooldown_lr accepts these settings."""
    if lr_max is not None:
        _check_lr_max(lr_max)
    if t_stable < 0:
        raise ValueError(f"t_stable={t_stable!r} must be >= 0; t_stable is the last update at lr_max "
                         "before the cooldown")
    _check_choice("cooldown", cooldown, COOLDOWNS)
    _check_range("alpha", alpha, 0, 1, "the minimum-LR factor the cooldown decays to (alpha_pre in the paper)")
    _check_count("cooldown_iters", cooldown_iters, "the number of cooldown updates (M; train.py's --max_iters)")


def validate_midtrain(*, alpha_mid, mid_iters, pretrain_iters=1, lr_end_of_pretraining=0.0):
    """Raise ValueError, naming the parameter, unless midtrain_lr accepts these settings."""
    _check_count("pretrain_iters", pretrain_iters, "the number of pre-training updates (T_pre in the paper)")
    if not lr_end_of_pretraining >= 0:  # 0 is fine: pre-training may decay to zero
        raise ValueError(f"lr_end_of_pretraining={lr_end_of_pretraining!r} must be >= 0; "
                         "it is the pre-training LR at T_pre, pretrain_lr(T_pre, ...)")
    _check_range("alpha_mid", alpha_mid, 0, 1, "the mid-training minimum-LR factor (alpha_mid in the paper)")
    _check_count("mid_iters", mid_iters,
                 "the number of mid-training updates (T_mid in the paper; train.py's --max_iters)")


def validate_sft(*, lr_max, warmup_iters, max_iters):
    """Raise ValueError, naming the parameter, unless sft_lr accepts these settings."""
    _check_lr_max(lr_max)
    _check_count("max_iters", max_iters, "the number of SFT updates")
    if warmup_iters < 0:
        raise ValueError(f"warmup_iters={warmup_iters!r} must be >= 0; warmup_iters is the number of SFT warmup updates")


def wsd_t_stable(*, warmup_iters, max_iters, stable_ratio):
    """T_stable, the last update at eta_max before WSD decays (Table 6: rho of the post-warmup updates).

    Rounded to the nearest whole update with Python's round (an exact half goes to the even
    number); Table 6's T_pre = 80000, T_warmup = 1000, rho = 0.75 gives 1000 + 59250 = 60250.
    """
    return warmup_iters + round(stable_ratio * (max_iters - warmup_iters))


def pretrain_lr(t, schedule, *, lr_max, warmup_iters, max_iters, alpha, stable_ratio=0.75, cooldown="linear"):
    """eta(t) for pre-training update t in [1, max_iters]; it ends at exactly alpha * lr_max.

    `cooldown` picks the shape of the WSD decay phase ("linear" is Eq. (4)); the other
    schedules ignore it. With stable_ratio = 1 there is no decay phase and WSD equals WSO.
    """
    _check_range("t", t, 1, max_iters, "the 1-based index of the pre-training update")
    if t <= warmup_iters:  # the warmup shared by Eq. (4), (5), (9), (10)
        return lr_max * t / warmup_iters
    if schedule == "wso":  # Eq. (5)
        return lr_max
    if schedule == "wsd":  # Eq. (4), with a choice of decay shape
        t_stable = wsd_t_stable(warmup_iters=warmup_iters, max_iters=max_iters, stable_ratio=stable_ratio)
        if t <= t_stable:
            return lr_max
        return cooldown_lr(t, lr_max=lr_max, t_stable=t_stable, cooldown_iters=max_iters - t_stable, alpha=alpha,
                           cooldown=cooldown)
    if schedule == "cosine":  # Eq. (9)
        progress = (t - warmup_iters) / (max_iters - warmup_iters)
        return lr_max * (alpha + (1 - alpha) / 2 * (1 + math.cos(math.pi * progress)))
    return lr_max * ((1 - alpha) * (max_iters - t) / (max_iters - warmup_iters) + alpha)  # Eq. (10)


def cooldown_lr(t, *, lr_max, t_stable, cooldown_iters, alpha, cooldown="linear"):
    """eta(t) for update t in [T_stable + 1, T_stable + cooldown_iters]: Eq. (4)'s decay phase.

    WSD decays from T_stable; a cooldown branched from a WSO checkpoint at update n is the
    same decay with T_stable = n, so "WSO + cooldown" equals a WSD run that stopped its
    stable phase at n. It ends at exactly alpha * lr_max.
    """
    _check_range("t", t, t_stable + 1, t_stable + cooldown_iters,
                 "the global index of the cooldown update (t_stable + 1 .. t_stable + cooldown_iters)")
    u = (t - t_stable) / cooldown_iters
    return lr_max * (alpha + (1 - alpha) * _COOLDOWN_SHAPES[cooldown](u))


def midtrain_lr(t, *, lr_end_of_pretraining, pretrain_iters, mid_iters, alpha_mid):
    """Eq. (11): eta(t) for mid-training update t in [T_pre + 1, T_pre + T_mid] (global numbering).

    Mid-training continues from the final pre-training LR, lr_end_of_pretraining =
    pretrain_lr(T_pre, ...); alpha_mid = 0 decays it linearly to 0 at T_pre + T_mid, alpha_mid = 1 keeps it constant.
    """
    _check_range("t", t, pretrain_iters + 1, pretrain_iters + mid_iters,
                 "the global index of the mid-training update (T_pre + 1 .. T_pre + T_mid)")
    return lr_end_of_pretraining * ((1 - alpha_mid) * (pretrain_iters + mid_iters - t) / mid_iters + alpha_mid)


def sft_lr(t, *, lr_max, warmup_iters, max_iters):
    """Table 8: eta(t) for SFT update t in [1, max_iters]; warmup, then cosine to exactly 0.

    A short fine-tune may have fewer updates than Table 8's 100 warmup steps. Then the
    warmup is shortened to max_iters - 1 updates, so the run still peaks at lr_max (the LR
    being swept) and still ends at the minimum LR 0; a warmup that fits is left unchanged.
    A single update (max_iters = 1) is then all decay, and its LR is 0.
    """
    _check_range("t", t, 1, max_iters, "the 1-based index of the SFT update")
    warmup_iters = min(warmup_iters, max_iters - 1)
    if t <= warmup_iters:
        return lr_max * t / warmup_iters
    progress = (t - warmup_iters) / (max_iters - warmup_iters)
    return lr_max * (1 + math.cos(math.pi * progress)) / 2


# The peak LRs the SFT sweep tries (sft.py --lrs=<name>; reproduce.py's testbed study).
SFT_LR_GRIDS = {
    # Table 8 as printed (1B and 8B models). Tables 11, 13 and 17 report selected LRs of 3e-4 and 3e-5,
    # which it lacks: add them with --lrs=... to sweep what the paper seems to have swept.
    "paper": (5e-7, 1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3),
    # The tiny testbed model (pre-trained at 3e-3), points a factor 10^(1/4) = 1.78 apart. On the
    # study's SFT (5 epochs of 450 conversations, 71 updates) the best LR was 1e-3 for WSO, with
    # 1.8e-3 a point behind, and 5.6e-4 for Cosine (alpha 0); 1e-4 led only with 1,500
    # conversations. sft.py warns when the choice is at an edge.
    "testbed": (1e-4, 1.8e-4, 3.2e-4, 5.6e-4, 1e-3, 1.8e-3),
    # The HMM testbed (data/hmm, 10 epochs, 141 updates): in 3 pilot pairs on the testbed grid
    # the best LR was 1e-4 or 1.8e-4, the lowest points (docs/LOG.md), so this grid goes two
    # points lower and drops 1.8e-3 (scores near the floor, held-out loss up 0.4-0.6 nats).
    "hmm": (3.2e-5, 5.6e-5, 1e-4, 1.8e-4, 3.2e-4, 5.6e-4, 1e-3),
}


MERGE_SHAPES = (*COOLDOWNS, "inverse-sqrt")


def merge_weights(k, shape="linear"):
    """WSM Theorem 3.1: c_0..c_k merging the k + 1 checkpoints theta_n..theta_{n+k} so that the
    k updates between them are taken with the decay multipliers w_1..w_k of `shape`."""
    _check_count("k", k, "the number of checkpoint intervals merged (k + 1 checkpoints)")
    _check_choice("shape", shape, MERGE_SHAPES)
    if shape == "inverse-sqrt":
        decay = [1 / math.sqrt(i + 1) for i in range(1, k + 1)]
    else:
        decay = [_COOLDOWN_SHAPES[shape](i / (k + 1)) for i in range(1, k + 1)]
    w = [1.0, *decay, 0.0]  # w_0 = 1 and w_{k+1} = 0 make c_0 = 1 - w_1 and c_k = w_k the general c_j
    return [w[j] - w[j + 1] for j in range(k + 1)]


def plot_figures(out_dir):
    """Figure 1 (pre-training schedules, Table 6) and Figure 2 (mid-training, Table 21)."""
    import matplotlib
    matplotlib.use("Agg")  # draw to files; no display needed
    import matplotlib.pyplot as plt

    lr_max, warmup_iters, t_pre, t_mid = 3e-4, 1000, 80_000, 36_000
    pre = dict(lr_max=lr_max, warmup_iters=warmup_iters, max_iters=t_pre)
    # Every 250th update (and the first) keeps the figures fast; T_warmup, T_stable = 60250,
    # T_pre and T_pre + T_mid are multiples of 250, so every kink is drawn where it is.
    pre_steps = [1, *range(250, t_pre + 1, 250)]
    mid_steps = list(range(t_pre + 250, t_pre + t_mid + 1, 250))
    os.makedirs(out_dir, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(pre_steps, [pretrain_lr(t, "wso", alpha=1.0, **pre) for t in pre_steps], color="k", label="WSO")
    for name, color in (("WSD", "tab:blue"), ("Cosine", "tab:orange"), ("Linear", "tab:green")):
        for alpha, style in ((0.1, "-"), (0.0, "-.")):
            ax.plot(pre_steps, [pretrain_lr(t, name.lower(), alpha=alpha, **pre) for t in pre_steps],
                    color=color, linestyle=style, label=rf"{name}, $\alpha_{{pre}}$={alpha}")
    t_stable = wsd_t_stable(warmup_iters=warmup_iters, max_iters=t_pre, stable_ratio=0.75)
    ax.axvline(t_stable, color="gray", linestyle="--", linewidth=1, label=rf"WSD $T_{{stable}}$={t_stable}")
    ax.set(xlabel="update t", ylabel=r"learning rate $\eta(t)$", title="Pre-training LR schedules (Figure 1)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))  # outside: curves fill the axes
    fig1 = os.path.join(out_dir, "fig1_schedules.png")
    fig.savefig(fig1, dpi=120, bbox_inches="tight")

    # The paper's mid-training runs start from WSD; alpha_pre = 1 is WSO.
    fig, ax = plt.subplots(figsize=(7, 4))
    for alpha_pre, color in ((1.0, "k"), (0.1, "tab:blue")):
        pre_lrs = [pretrain_lr(t, "wsd", alpha=alpha_pre, **pre) for t in pre_steps]
        for alpha_mid, style in ((1.0, "-"), (0.0, "-.")):
            mid_lrs = [midtrain_lr(t, lr_end_of_pretraining=pre_lrs[-1], pretrain_iters=t_pre,
                                   mid_iters=t_mid, alpha_mid=alpha_mid) for t in mid_steps]
            ax.plot(pre_steps + mid_steps, pre_lrs + mid_lrs, color=color, linestyle=style,
                    label=rf"$\alpha_{{pre}}$={alpha_pre}, $\alpha_{{mid}}$={alpha_mid}")
    ax.axvline(t_pre, color="gray", linestyle="--", linewidth=1, label=rf"$T_{{pre}}$={t_pre}: mid-training starts")
    ax.set(xlabel="update t", ylabel=r"learning rate $\eta(t)$", title="Pre- and mid-training LR schedules (Figure 2)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    fig2 = os.path.join(out_dir, "fig2_midtraining.png")
    fig.savefig(fig2, dpi=120, bbox_inches="tight")
    return fig1, fig2


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw the paper's Figures 1 and 2 (LR schedules).")
    parser.add_argument("--out_dir", default=".", help="folder for fig1_schedules.png and fig2_midtraining.png")
    for path in plot_figures(parser.parse_args().out_dir):
        print(path)
