"""Tests for schedules.py: every schedule against the paper's equations at every step.

The references below are direct transcriptions of Eq. (4), (5), (9), (10), (11) and
Table 8, written case by case; T_stable is written out by hand for each horizon. The merge
weights are tested in test_merge.py.
    python -m pytest -q tests/test_schedules.py
"""
import math
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # plain `pytest` finds schedules.py too, not only `python -m pytest`

from schedules import (  # noqa: E402
    COOLDOWNS,
    PRETRAIN_SCHEDULES,
    cooldown_lr,
    midtrain_lr,
    pretrain_lr,
    sft_lr,
    validate_cooldown,
    validate_midtrain,
    validate_pretrain,
    validate_sft,
    wsd_t_stable,
)

LR_MAX = 0.3  # not 1, so a missing eta_max factor shows
ALPHAS = (0.0, 0.1, 0.5, 1.0)
# (T_pre, T_warmup, rho, T_stable): T_stable = T_warmup + round(rho * (T_pre - T_warmup)) by hand.
HORIZONS = (
    (20, 4, 0.75, 16),  # 0.75 * 16 = 12, integral
    (19, 4, 0.75, 15),  # 0.75 * 15 = 11.25 -> 11
    (20, 4, 0.7, 15),   # 0.7 * 16 = 11.2 -> 11
    (17, 4, 0.5, 10),   # 0.5 * 13 = 6.5 -> 6: an exact half goes to the even number
    (21, 4, 0.9, 19),   # 0.9 * 17 = 15.3 -> 15
    (20, 4, 0.8, 17),   # 0.8 * 16 = 12.8 -> 13: nearest, not truncated
    (20, 0, 0.75, 15),  # no warmup: 0.75 * 20 = 15
)


def eq_wsd(t, eta_max, T_warmup, T_stable, T_pre, alpha_pre):  # Eq. (4) / (7)
    if t <= T_warmup:
        return eta_max * t / T_warmup
    elif t <= T_stable:
        return eta_max
    else:
        return eta_max * ((1 - alpha_pre) * (T_pre - t) / (T_pre - T_stable) + alpha_pre)


def eq_wso(t, eta_max, T_warmup, T_pre):  # Eq. (5) / (8)
    if t <= T_warmup:
        return eta_max * t / T_warmup
    else:
        return eta_max


def eq_cosine(t, eta_max, T_warmup, T_pre, alpha_pre):  # Eq. (9)
    if t <= T_warmup:
        return eta_max * t / T_warmup
    else:
        return eta_max * (alpha_pre + (1 - alpha_pre) / 2 * (1 + math.cos((t - T_warmup) / (T_pre - T_warmup) * math.pi)))


def eq_linear(t, eta_max, T_warmup, T_pre, alpha_pre):  # Eq. (10)
    if t <= T_warmup:
        return eta_max * t / T_warmup
    else:
        return eta_max * ((1 - alpha_pre) * (T_pre - t) / (T_pre - T_warmup) + alpha_pre)


def eq_mid(t, eta_at_T_pre, T_pre, T_mid, alpha_mid):  # Eq. (11)
    return eta_at_T_pre * ((1 - alpha_mid) * (T_pre + T_mid - t) / T_mid + alpha_mid)


def eq_sft(t, lr, warmup, total):  # Table 8: cosine with warmup, minimum LR 0
    if t <= warmup:
        return lr * t / warmup
    else:
        return lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def reference(schedule, t, T_pre, T_warmup, T_stable, alpha):
    if schedule == "wso":
        return eq_wso(t, LR_MAX, T_warmup, T_pre)
    if schedule == "wsd":
        return eq_wsd(t, LR_MAX, T_warmup, T_stable, T_pre, alpha)
    if schedule == "cosine":
        return eq_cosine(t, LR_MAX, T_warmup, T_pre, alpha)
    return eq_linear(t, LR_MAX, T_warmup, T_pre, alpha)


def lrs(schedule, T_pre, T_warmup, alpha, **kwargs):
    return [pretrain_lr(t, schedule, lr_max=LR_MAX, warmup_iters=T_warmup, max_iters=T_pre, alpha=alpha, **kwargs)
            for t in range(1, T_pre + 1)]


# --- pre-training -------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", PRETRAIN_SCHEDULES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("T_pre, T_warmup, rho, T_stable", HORIZONS)
def test_pretrain_matches_paper_at_every_step(schedule, alpha, T_pre, T_warmup, rho, T_stable):
    got = lrs(schedule, T_pre, T_warmup, alpha, stable_ratio=rho)
    expected = [reference(schedule, t, T_pre, T_warmup, T_stable, alpha) for t in range(1, T_pre + 1)]
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("T_pre, T_warmup, rho, T_stable", HORIZONS)
def test_wsd_t_stable_by_hand(T_pre, T_warmup, rho, T_stable):
    assert wsd_t_stable(warmup_iters=T_warmup, max_iters=T_pre, stable_ratio=rho) == T_stable


@pytest.mark.parametrize("schedule", ("wsd", "cosine", "linear"))
@pytest.mark.parametrize("alpha", (0.0, 0.1, 0.5))
def test_pretrain_key_steps(schedule, alpha):
    T_pre, T_warmup, T_stable = 20, 4, 16
    lr = dict(zip(range(1, T_pre + 1), lrs(schedule, T_pre, T_warmup, alpha)))
    assert lr[1] == LR_MAX / T_warmup  # update 1 already moves the weights
    assert lr[T_warmup] == LR_MAX
    if schedule == "wsd":
        assert lr[T_warmup + 1] == lr[T_stable] == LR_MAX
        assert lr[T_stable + 1] == pytest.approx(LR_MAX * ((1 - alpha) * 3 / 4 + alpha), rel=1e-12)
    else:
        assert lr[T_warmup + 1] < LR_MAX  # Cosine and Linear decay right after warmup
    assert lr[T_pre] == alpha * LR_MAX  # exactly, not approximately


def test_paper_horizon_table6():
    run = dict(lr_max=3e-4, warmup_iters=1000, max_iters=80_000, alpha=0.1)
    assert wsd_t_stable(warmup_iters=1000, max_iters=80_000, stable_ratio=0.75) == 60_250
    assert pretrain_lr(1, "wsd", **run) == 3e-4 / 1000
    assert pretrain_lr(60_250, "wsd", **run) == 3e-4
    assert pretrain_lr(60_251, "wsd", **run) < 3e-4
    assert pretrain_lr(80_000, "wsd", **run) == pytest.approx(3e-5, rel=1e-12)
    assert pretrain_lr(80_000, "wso", **run) == 3e-4


@pytest.mark.parametrize("schedule", PRETRAIN_SCHEDULES)
def test_alpha_one_is_wso(schedule):
    assert lrs(schedule, 20, 4, 1.0) == lrs("wso", 20, 4, 0.3)


@pytest.mark.parametrize("cooldown", ("linear", "1-sqrt", "cosine"))
@pytest.mark.parametrize("alpha", ALPHAS)
def test_wsd_with_stable_ratio_one_is_wso(cooldown, alpha):
    assert lrs("wsd", 20, 4, alpha, stable_ratio=1.0, cooldown=cooldown) == lrs("wso", 20, 4, alpha)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_wsd_with_stable_ratio_zero_is_linear(alpha):
    assert lrs("wsd", 20, 4, alpha, stable_ratio=0.0) == pytest.approx(lrs("linear", 20, 4, alpha), rel=1e-12)


@pytest.mark.parametrize("cooldown, at_17, at_18, at_19", [
    # T_stable = 16, T_pre = 20, so u = 1/4, 1/2, 3/4; alpha = 0.1, lr_max = 1.
    ("1-sqrt", 0.55, 0.36360390, 0.22057714),  # 0.1 + 0.9 * (1 - sqrt(u))
    ("cosine", 0.86819805, 0.55, 0.23180195),  # 0.1 + 0.9 * (1 + cos(pi u)) / 2
    ("linear", 0.775, 0.55, 0.325),            # 0.1 + 0.9 * (1 - u)
])
def test_cooldown_shapes_by_hand(cooldown, at_17, at_18, at_19):
    lr = [pretrain_lr(t, "wsd", lr_max=1.0, warmup_iters=4, max_iters=20, alpha=0.1, cooldown=cooldown)
          for t in range(1, 21)]
    assert lr[:16] == [0.25, 0.5, 0.75] + [1.0] * 13  # warmup and stable phase do not depend on cooldown
    assert lr[16:19] == pytest.approx([at_17, at_18, at_19], rel=1e-7)
    assert lr[19] == 0.1


@pytest.mark.parametrize("schedule, cooldown", [("wsd", "linear"), ("wsd", "1-sqrt"), ("wsd", "cosine"),
                                                ("cosine", "linear"), ("linear", "linear")])
@pytest.mark.parametrize("alpha", (0.0, 0.1, 0.5))
def test_decay_is_monotone_non_increasing(schedule, cooldown, alpha):
    lr = lrs(schedule, 200, 10, alpha, stable_ratio=0.6, cooldown=cooldown)[9:]  # from t = T_warmup on
    assert all(later <= earlier for earlier, later in zip(lr, lr[1:]))
    assert lr[0] == LR_MAX and lr[-1] == alpha * LR_MAX


@pytest.mark.parametrize("schedule", ("wso", "cosine", "linear"))
def test_cooldown_only_affects_wsd(schedule):
    assert lrs(schedule, 20, 4, 0.1, cooldown="1-sqrt") == lrs(schedule, 20, 4, 0.1, cooldown="linear")


# --- mid-training -------------------------------------------------------------------------

@pytest.mark.parametrize("alpha_mid", ALPHAS)
@pytest.mark.parametrize("alpha_pre", (0.1, 1.0))
def test_midtrain_matches_eq11_at_every_step(alpha_pre, alpha_mid):
    T_pre, T_mid = 20, 8
    eta_at_T_pre = pretrain_lr(T_pre, "wsd", lr_max=LR_MAX, warmup_iters=4, max_iters=T_pre, alpha=alpha_pre)
    got = [midtrain_lr(t, lr_end_of_pretraining=eta_at_T_pre, pretrain_iters=T_pre, mid_iters=T_mid,
                       alpha_mid=alpha_mid) for t in range(T_pre + 1, T_pre + T_mid + 1)]
    expected = [eq_mid(t, alpha_pre * LR_MAX, T_pre, T_mid, alpha_mid) for t in range(T_pre + 1, T_pre + T_mid + 1)]
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_midtrain_alpha_mid_one_continues_the_final_lr():
    lr = [midtrain_lr(t, lr_end_of_pretraining=0.03, pretrain_iters=20, mid_iters=8, alpha_mid=1.0) for t in range(21, 29)]
    assert lr == [0.03] * 8


def test_midtrain_alpha_mid_zero_decays_linearly_to_zero():
    lr = [midtrain_lr(t, lr_end_of_pretraining=0.03, pretrain_iters=20, mid_iters=8, alpha_mid=0.0) for t in range(21, 29)]
    assert lr[0] == pytest.approx(0.03 * 7 / 8, rel=1e-12)  # one step below the pre-training LR at T_pre
    assert lr[-1] == 0.0
    assert [a - b for a, b in zip(lr, lr[1:])] == pytest.approx([0.03 / 8] * 7, rel=1e-9)


def test_midtrain_after_decay_to_zero_stays_zero():
    eta_at_T_pre = pretrain_lr(20, "linear", lr_max=LR_MAX, warmup_iters=4, max_iters=20, alpha=0.0)
    assert eta_at_T_pre == 0.0
    assert midtrain_lr(21, lr_end_of_pretraining=eta_at_T_pre, pretrain_iters=20, mid_iters=8, alpha_mid=1.0) == 0.0


# --- cooldown branched from a constant-LR checkpoint ---------------------------------------

@pytest.mark.parametrize("cooldown, at_17, at_18, at_19", [
    # Branched at n = 16 for M = 4 updates, so u = 1/4, 1/2, 3/4; alpha = 0.1, lr_max = 1.
    ("1-sqrt", 0.55, 0.36360390, 0.22057714),  # 0.1 + 0.9 * (1 - sqrt(u))
    ("cosine", 0.86819805, 0.55, 0.23180195),  # 0.1 + 0.9 * (1 + cos(pi u)) / 2
    ("linear", 0.775, 0.55, 0.325),            # 0.1 + 0.9 * (1 - u)
])
def test_cooldown_shapes_by_hand_end_at_alpha(cooldown, at_17, at_18, at_19):
    lr = [cooldown_lr(t, lr_max=1.0, t_stable=16, cooldown_iters=4, alpha=0.1, cooldown=cooldown)
          for t in range(17, 21)]
    assert lr[:3] == pytest.approx([at_17, at_18, at_19], rel=1e-7)
    assert lr[3] == 0.1


@pytest.mark.parametrize("cooldown", COOLDOWNS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("T_pre, T_warmup, rho, T_stable", HORIZONS)
def test_cooldown_from_t_stable_is_wsd(cooldown, alpha, T_pre, T_warmup, rho, T_stable):
    """WSO + cooldown from update n = WSD with T_stable = n: the same LR at every step."""
    wsd = lrs("wsd", T_pre, T_warmup, alpha, stable_ratio=rho, cooldown=cooldown)
    branch = [cooldown_lr(t, lr_max=LR_MAX, t_stable=T_stable, cooldown_iters=T_pre - T_stable, alpha=alpha,
                          cooldown=cooldown) for t in range(T_stable + 1, T_pre + 1)]
    assert lrs("wso", T_stable, T_warmup, alpha) + branch == wsd


@pytest.mark.parametrize("alpha", ALPHAS)
def test_linear_cooldown_is_eq11_from_eta_max(alpha):
    got = [cooldown_lr(t, lr_max=LR_MAX, t_stable=20, cooldown_iters=8, alpha=alpha) for t in range(21, 29)]
    assert got == pytest.approx([eq_mid(t, LR_MAX, 20, 8, alpha) for t in range(21, 29)], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("t, changes, message", [
    (21, dict(alpha=1.5), "alpha=1.5 is outside [0, 1]"),
    (21, dict(cooldown="sqrt"), "cooldown='sqrt' is not one of"),
    (21, dict(cooldown_iters=0), "cooldown_iters=0 must be >= 1"),
    (21, dict(lr_max=0.0), "lr_max=0.0 must be > 0"),
    (1, dict(t_stable=-1), "t_stable=-1 must be >= 0"),
    (20, {}, "t=20 is outside [21, 28]"),
    (29, {}, "t=29 is outside [21, 28]"),
])
def test_cooldown_rejects_invalid(t, changes, message):
    """The settings once, as a run is configured (validate_cooldown); t at every update."""
    settings = {**dict(lr_max=LR_MAX, t_stable=20, cooldown_iters=8, alpha=0.0), **changes}
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_cooldown(**settings)
        cooldown_lr(t, **settings)


# --- SFT ----------------------------------------------------------------------------------

def test_sft_matches_table8_at_every_step():
    got = [sft_lr(t, lr_max=LR_MAX, warmup_iters=4, max_iters=20) for t in range(1, 21)]
    assert got == pytest.approx([eq_sft(t, LR_MAX, 4, 20) for t in range(1, 21)], rel=1e-12, abs=0)
    assert got[0] == LR_MAX / 4 and got[3] == LR_MAX and got[-1] == 0.0
    assert all(later < earlier for earlier, later in zip(got[3:], got[4:]))


@pytest.mark.parametrize("warmup_iters", (39, 40, 100))
def test_sft_warmup_longer_than_run_is_shortened_to_max_iters_minus_one(warmup_iters):
    got = [sft_lr(t, lr_max=LR_MAX, warmup_iters=warmup_iters, max_iters=40) for t in range(1, 41)]
    assert got == pytest.approx([eq_sft(t, LR_MAX, 39, 40) for t in range(1, 41)], rel=1e-12, abs=0)
    assert got[0] == LR_MAX / 39 and got[38] == LR_MAX and got[39] == 0.0


def test_sft_short_warmup_is_unchanged_and_single_update_is_zero():
    assert sft_lr(1, lr_max=LR_MAX, warmup_iters=100, max_iters=1000) == LR_MAX / 100
    assert sft_lr(1, lr_max=LR_MAX, warmup_iters=100, max_iters=1) == 0.0


# --- invalid inputs -----------------------------------------------------------------------

PRE = dict(lr_max=LR_MAX, warmup_iters=4, max_iters=20, alpha=0.1)


@pytest.mark.parametrize("t, schedule, changes, message", [
    (5, "wsd", dict(alpha=1.5), "alpha=1.5 is outside [0, 1]; alpha is the minimum-LR factor"),
    (5, "wso", dict(alpha=-0.1), "alpha=-0.1 is outside [0, 1]"),
    (5, "cosine", dict(alpha=float("nan")), "alpha=nan is outside [0, 1]"),
    (5, "wsd", dict(stable_ratio=1.2), "stable_ratio=1.2 is outside [0, 1]"),
    (5, "wsd", dict(stable_ratio=-0.5), "stable_ratio=-0.5 is outside [0, 1]"),
    (5, "wsd", dict(warmup_iters=-1), "warmup_iters=-1 is outside [0, 19]"),
    (5, "wsd", dict(warmup_iters=20), "warmup_iters=20 is outside [0, 19]"),
    (1, "wsd", dict(max_iters=0), "max_iters=0 must be >= 1"),
    (5, "wsd", dict(lr_max=0.0), "lr_max=0.0 must be > 0"),
    (5, "linear", dict(lr_max=-1e-3), "lr_max=-0.001 must be > 0"),
    (5, "step", {}, "schedule='step' is not one of ('wso', 'wsd', 'cosine', 'linear')"),
    (5, "wsd", dict(cooldown="sqrt"), "cooldown='sqrt' is not one of ('linear', '1-sqrt', 'cosine')"),
    (0, "wsd", {}, "t=0 is outside [1, 20]"),
    (21, "wso", {}, "t=21 is outside [1, 20]"),
])
def test_pretrain_rejects_invalid(t, schedule, changes, message):
    """The settings once, as a run is configured (validate_pretrain); t at every update."""
    settings = {**PRE, **changes}
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_pretrain(schedule, **settings)
        pretrain_lr(t, schedule, **settings)


@pytest.mark.parametrize("changes, message", [
    (dict(alpha=2), "alpha=2 is outside [0, 1]"),
    (dict(stable_ratio=2), "stable_ratio=2 is outside [0, 1]"),
    (dict(warmup_iters=30), "warmup_iters=30 is outside [0, 19]"),
    (dict(cooldown="cos"), "cooldown='cos' is not one of"),
    (dict(schedule="WSD"), "schedule='WSD' is not one of"),
])
def test_validate_pretrain_rejects_invalid(changes, message):
    config = dict(schedule="wsd", warmup_iters=4, max_iters=20, alpha=0.1, stable_ratio=0.75, cooldown="linear")
    validate_pretrain(**config)  # the valid config passes
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_pretrain(**{**config, **changes})


MID = dict(lr_end_of_pretraining=0.03, pretrain_iters=20, mid_iters=8, alpha_mid=0.0)


@pytest.mark.parametrize("t, changes, message", [
    (21, dict(alpha_mid=1.5), "alpha_mid=1.5 is outside [0, 1]"),
    (21, dict(alpha_mid=-0.1), "alpha_mid=-0.1 is outside [0, 1]"),
    (1, dict(pretrain_iters=0), "pretrain_iters=0 must be >= 1"),
    (21, dict(mid_iters=0), "mid_iters=0 must be >= 1"),
    (21, dict(lr_end_of_pretraining=-0.1), "lr_end_of_pretraining=-0.1 must be >= 0"),
    (20, {}, "t=20 is outside [21, 28]"),
    (29, {}, "t=29 is outside [21, 28]"),
])
def test_midtrain_rejects_invalid(t, changes, message):
    """The settings once, as a run is configured (validate_midtrain); t at every update."""
    settings = {**MID, **changes}
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_midtrain(**settings)
        midtrain_lr(t, **settings)


@pytest.mark.parametrize("t, changes, message", [
    (1, dict(lr_max=0), "lr_max=0 must be > 0"),
    (1, dict(max_iters=0), "max_iters=0 must be >= 1"),
    (1, dict(warmup_iters=-1), "warmup_iters=-1 must be >= 0"),
    (0, {}, "t=0 is outside [1, 20]"),
    (21, {}, "t=21 is outside [1, 20]"),
])
def test_sft_rejects_invalid(t, changes, message):
    """The settings once, before an LR of the sweep fine-tunes (validate_sft); t at every update."""
    settings = {**dict(lr_max=LR_MAX, warmup_iters=4, max_iters=20), **changes}
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_sft(**settings)
        sft_lr(t, **settings)


# --- the script -----------------------------------------------------------------------------

def test_import_is_light():
    code = "import sys, schedules; assert not {'matplotlib', 'torch'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_script_draws_figures_1_and_2(tmp_path):
    result = subprocess.run([sys.executable, "schedules.py", f"--out_dir={tmp_path}"], cwd=REPO_ROOT,
                            check=True, capture_output=True, text=True)
    for name in ("fig1_schedules.png", "fig2_midtraining.png"):
        path = tmp_path / name
        assert str(path) in result.stdout
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
