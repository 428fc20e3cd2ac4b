"""bench.py's model sizes (its timings are measurements, never tested)."""

import bench
from common import parse_args
from model import build_config


def test_preset_is_benchmarked_at_its_own_size():
    """Defect: the size defaults overrode --preset, so --preset=125m benchmarked width 256."""
    cfg = parse_args(bench.BenchConfig, ["--preset=125m", "--seq_len=1024"])
    assert bench.model_config(cfg) == build_config("125m", vocab_size=100288, max_seq_len=1024)
    reference = parse_args(bench.BenchConfig, ["--dim=256", "--ffn_dim=768", "--vocab_size=50304"])  # README's
    assert bench.model_config(reference) == build_config("tiny", dim=256, ffn_dim=768, vocab_size=50304,
                                                         max_seq_len=256)


def test_gpu_check_runs_every_check_on_a_cpu(tmp_path):
    """gpu_check.py's checks on the tiny preset (how it is tested without a GPU): every line
    printed, each PASS; the flash-attention line says it is CUDA-only."""
    import gpu_check
    report = gpu_check.main(parse_args(gpu_check.CheckConfig, ["--device=cpu", "--compile=false", "--steps=12",
                                                               f"--work_dir={tmp_path}"]))
    names = [line.split()[0] for line in report.lines]
    assert names == ["train", "resume", "flash", "mfu", "hvp", "fsdp"], report.lines
    assert not report.failed, report.lines
    assert "difference 0.0e+00" in report.lines[1]  # a resume on a CPU is bit-exact
