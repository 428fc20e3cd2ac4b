"""nanowso/common.py: the RNG states a checkpoint keeps, --help's layout, output to a pipe."""

import os
import random
import select
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanowso import checkpoint
from nanowso.common import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rng_state_round_trips_and_leaves_cuda_alone(monkeypatch):
    """Defect: every visible GPU's CUDA RNG state was saved, and restoring it on a node with
    fewer GPUs raised IndexError; nothing draws from the CUDA generator."""
    def refuse(*args):
        raise AssertionError("the CUDA RNG is neither saved nor restored")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    state = checkpoint.rng_state()
    assert set(state) == {"python", "numpy", "torch"}
    draws = random.random(), np.random.rand(), torch.rand(1).item()
    checkpoint.set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8})  # an older checkpoint's
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == pytest.approx(draws, abs=0)


def test_help_aligns_its_columns(capsys):
    """Defect: the comment column moved with each option's name."""
    import train
    with pytest.raises(SystemExit):
        parse_args(train.TrainConfig, ["--help"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    starts = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in lines if len(line.split()) > 1
              and len(line.split()[0]) < 40}
    assert len(lines) > 20 and len(starts) == 1, starts


def test_output_reaches_a_pipe_as_printed():
    """Defect: with stdout to a pipe (`| tee`, nohup, a log file) progress lines came in one block
    at exit. parse_args, which every script calls first, makes stdout line-buffered."""
    script = ("import dataclasses, time\nfrom nanowso import common\n"
              "@dataclasses.dataclass\nclass C:\n    x: int = 0\n"
              "common.parse_args(C, [])\nprint('progress line')\ntime.sleep(60)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE)
    try:  # the line must come within 30 s, while the process sleeps for 60
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and os.read(proc.stdout.fileno(), 100) == b"progress line\n" and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_paired_interval_and_detectable_effect_on_constructed_examples():
    """study.tables.paired: constant differences give a zero-width interval at the constant;
    1..5 give mean 3, sd sqrt(2.5) and the t-test's detectable effect (2.776 + 0.941) sd / sqrt(5);
    and that effect is detected about 80% of the time when it is the true mean (simulated)."""
    from study.tables import paired
    p = paired([0.5] * 4)
    assert (p["mean"], p["low"], p["high"], p["boot_low"], p["detectable"]) == (0.5, 0.5, 0.5, 0.5, 0.0)
    p = paired([1, 2, 3, 4, 5])
    assert p["mean"] == 3 and p["sd"] == pytest.approx(np.sqrt(2.5))
    assert p["detectable"] == pytest.approx((2.776 + 0.941) * np.sqrt(2.5) / np.sqrt(5))
    assert (p["low"], p["high"]) == pytest.approx((3 - 2.776 * np.sqrt(0.5), 3 + 2.776 * np.sqrt(0.5)))
    assert 1 <= p["boot_low"] < 3 < p["boot_high"] <= 5  # the bootstrap never leaves the data's range
    # ratios on the log scale: 2x and 8x average to 4x, and a factor's detectable is its distance from 1
    q = paired([2.0, 8.0], ratio=True)
    assert q["mean"] == pytest.approx(4.0) and q["low"] < 4 < q["high"]
    assert q["detectable"] == pytest.approx(np.expm1((12.706 + 1.376) * np.log(4) / np.sqrt(2) / np.sqrt(2)))
    assert np.isnan(paired([1.0])["low"]) and np.isnan(paired([1.0])["detectable"])
    rng = np.random.default_rng(0)
    x = rng.normal(loc=(2.776 + 0.941) / np.sqrt(5), size=(20_000, 5))
    t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / np.sqrt(5))
    assert 0.75 < np.mean(np.abs(t) > 2.776) < 0.85


def test_paired_rows_pair_each_run_with_wso_seed_by_seed():
    """study.tables.paired_rows on constructed rows: differences and ratios per seed, only on the
    seeds both runs have, and no ratio where a value is not positive (no SFT answer right)."""
    from study.tables import paired_rows
    rows = [{"run": "wso", "seed": 0, "valid_loss": 4.0, "sft_em_over_recall": 0.5},
            {"run": "wso", "seed": 1, "valid_loss": 4.1, "sft_em_over_recall": 0.4},
            {"run": "wsd_a0", "seed": 0, "valid_loss": 3.9, "sft_em_over_recall": 0.25},
            {"run": "wsd_a0", "seed": 1, "valid_loss": 4.0, "sft_em_over_recall": 0.0},
            {"run": "wsd_a0", "seed": 2, "valid_loss": 3.0, "sft_em_over_recall": 0.3}]  # no WSO seed 2
    got = paired_rows(rows)
    assert got[("wsd_a0", "valid_loss")] == pytest.approx([-0.1, -0.1])
    assert got[("wsd_a0", "sft_em_over_recall")] == pytest.approx([0.5])


def test_the_score_over_lrs_is_the_mean_of_the_sweeps_scores():
    from study.tables import score_over_lrs
    assert score_over_lrs([(0.001, 20.0, 1e-4), (0.1, 10.0, 1e-3), (0.01, 18.0, 3e-4)]) == pytest.approx(16.0)
    assert score_over_lrs([]) is None


def test_the_score_at_a_fixed_forgetting_interpolates_the_frontier_in_log_forgetting():
    from study.tables import score_at_forgetting
    points = [(0.001, 20.0, 1e-4), (0.1, 10.0, 1e-3), (0.01, 18.0, 3e-4)]  # any order
    assert score_at_forgetting(points, 0.01) == 18.0
    assert score_at_forgetting(points, 10 ** -1.5) == pytest.approx(14.0)  # halfway in log between 0.01 and 0.1
    assert score_at_forgetting(points, 0.5) is None and score_at_forgetting(points, 1e-4) is None
