"""tools/bench.py's model sizes (its timings are measurements, never tested)."""

import os
import subprocess
import sys

import pytest

from model import build_config
from nanowso.common import parse_args
from tools import bench

pytestmark = pytest.mark.slow  # integration: real training runs, subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preset_is_benchmarked_at_its_own_size():
    """Defect: the size defaults overrode --preset, so --preset=125m benchmarked width 256."""
    cfg = parse_args(bench.BenchConfig, ["--preset=125m", "--seq_len=1024"])
    assert bench.model_config(cfg) == build_config("125m", vocab_size=100288, max_seq_len=1024)
    reference = parse_args(bench.BenchConfig, ["--dim=256", "--ffn_dim=768", "--vocab_size=50304"])  # docs/speed.md's
    assert bench.model_config(reference) == build_config("tiny", dim=256, ffn_dim=768, vocab_size=50304,
                                                         max_seq_len=256)


def test_gpu_check_runs_every_check_on_a_cpu(tmp_path):
    """tools/gpu_check.py's checks on the tiny preset (how it is tested without a GPU): every line
    printed, each PASS; the flash-attention line says it is CUDA-only."""
    from tools import gpu_check
    report = gpu_check.main(parse_args(gpu_check.CheckConfig, ["--device=cpu", "--compile=false", "--steps=12",
                                                               f"--work_dir={tmp_path}"]))
    names = [line.split()[0] for line in report.lines]
    assert names == ["train", "resume", "flash", "mfu", "hvp", "fsdp"], report.lines
    assert not report.failed, report.lines
    assert "difference 0.0e+00" in report.lines[1]  # a resume on a CPU is bit-exact


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_bench_runs_under_torchrun(parallel):
    """tools/bench.py with 2 CPU processes (gloo): one line for the run, summed tokens/s (timings
    themselves are never tested)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tools/bench.py", f"--parallel={parallel}", "--vocab_size=512", "--batch_size=2", "--seq_len=32",
                           "--steps=2", "--modes=eager", "--device=cpu"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"x 2 processes ({parallel})" in done.stdout and done.stdout.count("eager:") == 1


def test_sizes_prints_the_readme_table(capsys):
    """tools/sizes.py: the figures of docs/scale.md's table (16 bytes per parameter under DDP; 8b does not fit)."""
    from tools import sizes
    sizes.main(sizes.SizesConfig())
    out = capsys.readouterr().out
    assert "8b: 8,030,261,248 parameters" in out and "DDP 128.2 GiB, FSDP2 25.1 GiB" in out
    assert "Table 6 350B tokens: 10.5 days" in out
