"""train.py --parallel=fsdp (nanowso/parallel.py) on CPU with gloo: two processes equal one, sharded
checkpoints resume bit-exactly on as many processes and reshard onto fewer, and every
single-file reader (tools/convert_checkpoint.py, nanowso.checkpoint.load_checkpoint, tools/merge.py) takes them."""

import json
import os
import subprocess
import sys

import pytest
import torch

import train
from data.formats import Tokenizer
from nanowso import parallel, start
from nanowso.checkpoint import load_checkpoint
from tools import convert_checkpoint, merge
from tools.merge import MergeConfig

pytestmark = pytest.mark.slow  # integration: real training runs, subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--batch_size=2", "--seq_len=64", "--warmup_iters=1", "--log_interval=1", "--eval_interval=2",
          "--eval_tokens=1024", "--compile=false", "--device=cpu", f"--tokens_per_step={8 * 64}"]


def torchrun(n, out_dir, testbed, *args):
    """train.py under torchrun with n CPU processes (one thread each), --parallel=fsdp."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "train.py", f"--dataset={testbed / 'pretrain'}", f"--out_dir={out_dir}", "--parallel=fsdp",
                           *COMMON, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def records(out_dir, kind="loss"):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if kind in r]


def one_process(testbed, out_dir, **overrides):
    cfg = dict(dataset=str(testbed / "pretrain"), out_dir=str(out_dir), batch_size=2, seq_len=64, warmup_iters=1,
               log_interval=1, eval_interval=2, eval_tokens=1024, compile=False, device="cpu",
               tokens_per_step=8 * 64, max_iters=4)
    train.main(train.TrainConfig(**{**cfg, **overrides}))


@pytest.fixture(scope="module")
def runs(testbed, tmp_path_factory):
    """FSDP on 2 processes for 4 steps keeping sharded weights every 2; the same 2 + 2 with a
    resume; the first 2 resumed on 1 process; one process without FSDP."""
    root = tmp_path_factory.mktemp("fsdp")
    torchrun(2, root / "fsdp", testbed, "--max_iters=4", "--keep_every=2")
    torchrun(2, root / "resumed", testbed, "--max_iters=2")
    torchrun(2, root / "resumed", testbed, "--max_iters=4", "--init_from=resume")
    torchrun(2, root / "resharded", testbed, "--max_iters=2")
    torchrun(1, root / "resharded", testbed, "--max_iters=4", "--init_from=resume")
    one_process(testbed, root / "one")
    return root


def test_two_fsdp_processes_match_one_process(runs):
    """The same global batch (2 ranks x 2 micro-batches against 1 x 4) and the same initial
    weights (made once on rank 0, broadcast): per-step losses as close as the DDP test's."""
    fsdp, one = records(runs / "fsdp"), records(runs / "one")
    assert [r["step"] for r in fsdp] == [r["step"] for r in one] == [1, 2, 3, 4]
    assert fsdp[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)  # the same initial weights
    for a, b in zip(fsdp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    for a, b in zip(records(runs / "fsdp", "val_loss"), records(runs / "one", "val_loss")):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    sharded, single = load_checkpoint(str(runs / "fsdp" / "ckpt_sharded")), load_checkpoint(str(runs / "one" / "ckpt.pt"))
    assert set(sharded) == set(single) and sharded["step"] == 4
    for k, w in single["model"].items():
        torch.testing.assert_close(sharded["model"][k], w, atol=1e-4, rtol=1e-3)


def test_a_sharded_resume_is_bit_exact_and_reshards_onto_one_process(runs):
    full = [(r["loss"], r["grad_norm"]) for r in records(runs / "fsdp")]
    assert [(r["loss"], r["grad_norm"]) for r in records(runs / "resumed")] == full
    a = load_checkpoint(str(runs / "fsdp" / "ckpt_sharded"))["model"]
    b = load_checkpoint(str(runs / "resumed" / "ckpt_sharded"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    resharded = records(runs / "resharded")  # saved by 2 processes at step 2, resumed by 1
    assert [(r["loss"], r["grad_norm"]) for r in resharded[:2]] == full[:2]
    for (loss, grad_norm), r in zip(full[2:], resharded[2:]):
        assert r["loss"] == pytest.approx(loss, rel=1e-5) and r["grad_norm"] == pytest.approx(grad_norm, rel=1e-3)


def test_sharded_checkpoints_are_atomic_directories_every_reader_takes(runs, tmp_path, capsys):
    directory = runs / "fsdp" / "ckpt_sharded"
    assert parallel.is_sharded(str(directory)) and not os.path.exists(f"{directory}.tmp")
    assert sorted(n for n in os.listdir(runs / "fsdp") if n.startswith("ckpt")) == \
        ["ckpt_000002_sharded", "ckpt_000004_sharded", "ckpt_sharded"]
    assert "optimizer" not in load_checkpoint(str(runs / "fsdp" / "ckpt_000002_sharded"))  # kept: weights only
    convert_checkpoint.main([str(directory), str(tmp_path / "ckpt.pt")])
    assert "wrote" in capsys.readouterr().out
    converted, gathered = load_checkpoint(str(tmp_path / "ckpt.pt")), load_checkpoint(str(directory))
    assert all(torch.equal(converted["model"][k], w) for k, w in gathered["model"].items())
    # the AdamW state keyed as one process keys it: a single-process run resumes from the file
    one = load_checkpoint(str(runs / "one" / "ckpt.pt"))["optimizer"]
    assert converted["optimizer"]["param_groups"][0]["params"] == one["param_groups"][0]["params"]
    torch.testing.assert_close(converted["optimizer"]["state"][0]["exp_avg"], one["state"][0]["exp_avg"],
                               atol=1e-6, rtol=1e-3)
    # tools/merge.py finds kept sharded checkpoints in a run's directory
    merged = merge.main(MergeConfig(ckpts=str(runs / "fsdp"), last=1, out=str(tmp_path / "merge" / "ckpt.pt")))
    assert merged["merge"]["steps"] == [2, 4]
    with pytest.raises(SystemExit, match="not a sharded checkpoint"):
        convert_checkpoint.main([str(tmp_path), str(tmp_path / "x.pt")])


def test_fsdp_mid_training_from_a_single_file_checkpoint_matches_one_process(runs, testbed, tmp_path):
    """A ckpt.pt of one process (weights and AdamW keyed by index) into FSDP shards on 2
    processes (parallel.load_full_state, by_name): Eq. 11 mid-training continues as it does in
    one process."""
    pre = str(runs / "one" / "ckpt.pt")
    mid = ["--stage=mid", f"--init_from={pre}", "--max_iters=3", "--alpha_mid=0.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", f"--dataset={testbed / 'mid'}", f"--out_dir={tmp_path / 'fsdp'}",
                           "--parallel=fsdp", *COMMON, *mid], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one_process(testbed, tmp_path / "one", dataset=str(testbed / "mid"), stage="mid", init_from=pre, max_iters=3,
                alpha_mid=0.0)
    fsdp, one = records(tmp_path / "fsdp"), records(tmp_path / "one")
    assert [r["step"] for r in fsdp] == [r["step"] for r in one] == [5, 6, 7]
    for a, b in zip(fsdp, one):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_fsdp_cooldown_from_weights_only_shards_is_refused(runs, testbed):
    """A kept sharded checkpoint holds no AdamW state (parallel.holds_optimizer reads DCP's
    metadata); a cooldown continues AdamW, so it says so instead of failing inside dcp.load."""
    kept, full = runs / "fsdp" / "ckpt_000002_sharded", runs / "fsdp" / "ckpt_sharded"
    assert not parallel.holds_optimizer(str(kept)) and parallel.holds_optimizer(str(full))
    tokenizer = Tokenizer.from_dict(load_checkpoint(str(full))["tokenizer"])
    cfg = train.TrainConfig(dataset=str(testbed / "pretrain"), parallel="fsdp", stage="cooldown", alpha=0.0,
                            max_iters=2, init_from=str(kept), batch_size=2, seq_len=64, warmup_iters=1,
                            tokens_per_step=8 * 64, device="cpu")
    with pytest.raises(SystemExit, match="holds weights without AdamW's state"):
        start.starting_point(cfg, tokenizer, 2)


def test_fsdp_refuses_in_training_sharpness():
    with pytest.raises(ValueError, match="measure the saved checkpoints with sharpness.py"):
        train.TrainConfig(parallel="fsdp", sharpness_interval=10)


def test_sharpness_split_over_two_processes_equals_one(runs, tmp_path):
    """sharpness.py under torchrun: batches b = rank, rank + 2, ... with the probe seeds of one
    process, gathered in batch order: the same per-batch traces and the same estimate."""
    ckpt = str(runs / "one" / "ckpt.pt")
    args = [f"--ckpt={ckpt}", "--datasets=pretrain", "--num_batches=5", "--num_samples=3", "--seq_len=32",
            "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n, out in ((2, "two.json"), (1, "one.json")):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
        done = subprocess.run([sys.executable, *launcher, "sharpness.py", *args, f"--out={tmp_path / out}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two, one = (json.load(open(tmp_path / name))["results"]["pretrain"] for name in ("two.json", "one.json"))
    assert [r["batch"] for r in two["per_batch"]] == [0, 1, 2, 3, 4]
    for a, b in zip(two["per_batch"], one["per_batch"]):
        assert a["trace"] == pytest.approx(b["trace"], rel=1e-6) and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert two["trace"] == pytest.approx(one["trace"], rel=1e-6) and two["stderr"] == pytest.approx(one["stderr"], rel=1e-6)
