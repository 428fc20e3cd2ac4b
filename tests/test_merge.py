"""Checkpoint merging (WSM Theorem 3.1): the weights of each decay shape against the
multipliers written out by hand, tools/merge.py on real checkpoints of a short WSO run against
theta_n + sum_i w_i (theta_{n+i} - theta_{n+i-1}), and each input tools/merge.py refuses."""

import math
import os
import subprocess
import sys

import pytest
import torch

import schedules
import train
from model import Llama, LlamaConfig
from nanowso.checkpoint import load_checkpoint
from tools import merge
from tools.merge import MergeConfig

pytestmark = pytest.mark.slow  # integration: real training runs, subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def multipliers_by_hand(k, shape):  # w_1..w_k, the decay each shape emulates (schedules.py docstring)
    u = [i / (k + 1) for i in range(1, k + 1)]
    if shape == "linear":
        return [1 - x for x in u]
    if shape == "cosine":
        return [(1 + math.cos(math.pi * x)) / 2 for x in u]
    if shape == "1-sqrt":
        return [1 - math.sqrt(x) for x in u]
    return [(i + 1) ** -0.5 for i in range(1, k + 1)]  # inverse-sqrt


# --- the weights --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", schedules.MERGE_SHAPES)
@pytest.mark.parametrize("k", (1, 2, 3, 7, 20))
def test_weights_are_a_mean_that_reproduces_the_decay(shape, k):
    c = schedules.merge_weights(k, shape)
    assert len(c) == k + 1 and all(cj >= 0 for cj in c)
    assert sum(c) == pytest.approx(1, rel=1e-12)
    w = [sum(c[i:]) for i in range(1, k + 1)]  # w_i = sum_{j >= i} c_j
    assert w == pytest.approx(multipliers_by_hand(k, shape), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("k", (1, 2, 4, 9))
def test_linear_is_the_uniform_mean(k):
    assert schedules.merge_weights(k, "linear") == pytest.approx([1 / (k + 1)] * (k + 1), rel=1e-12)


@pytest.mark.parametrize("shape", schedules.COOLDOWNS)
def test_a_merge_emulates_the_cooldown_of_its_shape(shape):
    """w_i is the LR factor a cooldown to 0 over k + 1 checkpoint intervals gives interval i."""
    k, c = 5, schedules.merge_weights(5, shape)
    cooldown = [schedules.cooldown_lr(i, lr_max=1.0, t_stable=0, cooldown_iters=k + 1, alpha=0.0, cooldown=shape)
                for i in range(1, k + 1)]
    assert [sum(c[i:]) for i in range(1, k + 1)] == pytest.approx(cooldown, rel=1e-12, abs=1e-15)


def test_merge_weights_rejects_invalid():
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        schedules.merge_weights(0, "linear")
    with pytest.raises(ValueError, match="shape='exp' is not one of"):
        schedules.merge_weights(3, "exp")


# --- tools/merge.py on a real run ---------------------------------------------------------------

def run_config(testbed, out_dir, **overrides):
    base = dict(dataset=str(testbed / "pretrain"), out_dir=str(out_dir), preset="tiny", batch_size=4, seq_len=32,
                max_iters=12, warmup_iters=2, keep_every=3, log_interval=4, eval_interval=100, eval_tokens=256,
                compile=False, device="cpu")
    return train.TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def runs(testbed, tmp_path_factory, one_thread):
    """A WSO run keeping ckpt_000003..12.pt, and a short one with another learning rate."""
    root = tmp_path_factory.mktemp("merge")
    train.main(run_config(testbed, root / "wso"))
    train.main(run_config(testbed, root / "other", max_iters=3, learning_rate=1e-3))
    return root


def kept(runs, *steps, run="wso"):
    return [str(runs / run / f"ckpt_{s:06d}.pt") for s in steps]


@pytest.mark.parametrize("shape", schedules.MERGE_SHAPES)
def test_merge_is_theta_n_plus_the_decayed_updates(runs, tmp_path, shape):
    paths = kept(runs, 3, 6, 9, 12)
    merged = merge.main(MergeConfig(ckpts=",".join(paths), shape=shape, out=str(tmp_path / "ckpt.pt")))
    thetas = [load_checkpoint(p)["model"] for p in paths]
    w = multipliers_by_hand(3, shape)
    written = load_checkpoint(str(tmp_path / "ckpt.pt"))
    for name, theta_n in thetas[0].items():
        want = theta_n.double() + sum(w[i - 1] * (thetas[i][name].double() - thetas[i - 1][name].double())
                                      for i in range(1, 4))
        assert written["model"][name].dtype == theta_n.dtype
        torch.testing.assert_close(written["model"][name].double(), want, rtol=1e-6, atol=1e-7)
    newest = load_checkpoint(paths[-1])
    assert set(written) == set(newest) | {"merge"} and written["step"] == 12
    assert written["merge"]["steps"] == [3, 6, 9, 12] and written["merge"]["shape"] == shape
    assert written["merge"]["weights"] == pytest.approx(schedules.merge_weights(3, shape))
    assert merged["merge"] == written["merge"]
    Llama(LlamaConfig.from_dict(written["model_config"])).load_state_dict(written["model"])  # evaluate.py, sft.py


def test_a_directory_and_last_take_the_last_kept(runs, tmp_path):
    merge.main(MergeConfig(ckpts=str(runs / "wso"), last=2, out=str(tmp_path / "ckpt.pt")))
    written = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert written["merge"]["steps"] == [6, 9, 12] and written["merge"]["weights"] == pytest.approx([1 / 3] * 3)
    mean = {name: sum(load_checkpoint(p)["model"][name].double() for p in kept(runs, 6, 9, 12)) / 3
            for name in written["model"]}
    for name, value in written["model"].items():
        torch.testing.assert_close(value.double(), mean[name], rtol=1e-6, atol=1e-7)


def test_explicit_weights(runs, tmp_path):
    merge.main(MergeConfig(ckpts=",".join(kept(runs, 9, 12)), weights="0,1", out=str(tmp_path / "ckpt.pt")))
    written, newest = load_checkpoint(str(tmp_path / "ckpt.pt")), load_checkpoint(kept(runs, 12)[0])
    assert written["merge"]["shape"] == "custom"
    assert all(torch.equal(written["model"][k], newest["model"][k]) for k in newest["model"])


@pytest.mark.parametrize("changes, message", [
    (dict(ckpts="{wso}/ckpt_000006.pt,{other}/ckpt_000003.pt"),
     r"not from the same run as .*ckpt_000006.pt:\n  --learning_rate: 0.003 vs 0.001"),
    (dict(ckpts="{wso}/ckpt_000006.pt,{wso}/ckpt_000003.pt"), "at step 3, not after 6; list the checkpoints"),
    (dict(ckpts="{wso}/ckpt_000006.pt,{wso}/ckpt_000006.pt"), "at step 6, not after 6"),
    (dict(ckpts="{wso}/ckpt_000006.pt"), "at least two checkpoints"),
    (dict(ckpts="{wso}"), "is a directory; pass --last=k"),
    (dict(ckpts="{wso}", last=4), "holds 4 kept checkpoints .* fewer than --last\\+1=5"),
    (dict(ckpts="{wso}/ckpt_000006.pt,{wso}/ckpt_000009.pt", last=1), "--last=k takes a directory"),
    # defect: a missing directory was told "--last=k takes a directory as --ckpts"
    (dict(ckpts="{wso}/no_such_run", last=2), "no_such_run: no such directory"),
    (dict(ckpts="{wso}/ckpt_000006.pt,{wso}/ckpt_000009.pt", weights="0.5,0.6"), "non-negative and sum to 1"),
    (dict(ckpts="{wso}/ckpt_000006.pt,{wso}/ckpt_000009.pt", weights="1.5,-0.5"), "non-negative and sum to 1"),
    (dict(ckpts="{wso}/ckpt_000006.pt,{wso}/ckpt_000009.pt", weights="1"), "1 values for 2 checkpoints"),
    (dict(ckpts="{wso}/ckpt_000006.pt,{wso}/ckpt_000009.pt", out="{wso}/merged.pt"), "beside the checkpoints"),
    (dict(ckpts="{wso}/ckpt_000006.pt,{wso}/nothing.pt"), "no checkpoint at"),
    (dict(ckpts="{wso}/ckpt_000006.pt,{wso}/ckpt_000009.pt", out=""), "pass --out"),
])
def test_bad_merges_are_refused(runs, tmp_path, changes, message):
    fields = {**dict(out=str(tmp_path / "ckpt.pt")), **changes}
    fields = {k: v.format(wso=runs / "wso", other=runs / "other") if isinstance(v, str) else v
              for k, v in fields.items()}
    with pytest.raises(SystemExit, match=message):
        merge.main(MergeConfig(**fields))
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_a_merge_is_not_merged_again(runs, tmp_path):
    merge.main(MergeConfig(ckpts=",".join(kept(runs, 9, 12)), out=str(tmp_path / "a" / "ckpt.pt")))
    with pytest.raises(SystemExit, match="is itself a merge"):
        merge.main(MergeConfig(ckpts=f"{tmp_path / 'a' / 'ckpt.pt'},{kept(runs, 12)[0]}",
                               out=str(tmp_path / "ckpt.pt")))


def test_command_line(runs, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "tools/merge.py", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = run(f"--ckpts={runs / 'wso'}", "--last=1", "--shape=1-sqrt", f"--out={tmp_path / 'ckpt.pt'}")
    assert out.returncode == 0, out.stderr
    assert "merged steps 9, 12 (1-sqrt)" in out.stdout and os.path.isfile(tmp_path / "ckpt.pt")
    out = run("--shape=exp")
    assert out.returncode != 0 and "shape='exp' is not one of" in out.stderr
    out = run("--help")
    assert out.returncode == 0 and "--ckpts=" in out.stdout and "--last=0" in out.stdout
