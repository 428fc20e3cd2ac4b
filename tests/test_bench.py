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


def test_gpt2_reference_equals_transformers_gpt2():
    """The GPT-2 speed reference (bench.GPT2, nanoGPT's model) against Hugging Face's GPT2LMHeadModel
    with the same weights (its Conv1D stores them transposed): the same logits and loss; its FLOPs
    per token count the tied matrix once and not the position table."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = build_config("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=97, max_seq_len=16)
    ours = bench.GPT2(cfg).eval()
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                    activation_function="gelu", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    state = {"transformer.wte.weight": ours.wte.weight, "transformer.wpe.weight": ours.wpe.weight,
             "transformer.ln_f.weight": ours.ln_f.weight, "transformer.ln_f.bias": ours.ln_f.bias}
    for i, block in enumerate(ours.h):
        for hf_name, layer in [("ln_1", block.ln_1), ("ln_2", block.ln_2)]:
            state[f"transformer.h.{i}.{hf_name}.weight"], state[f"transformer.h.{i}.{hf_name}.bias"] = layer.weight, layer.bias
        for hf_name, layer in [("attn.c_attn", block.c_attn), ("attn.c_proj", block.c_proj),
                               ("mlp.c_fc", block.c_fc), ("mlp.c_proj", block.mlp_proj)]:
            state[f"transformer.h.{i}.{hf_name}.weight"] = layer.weight.T
            state[f"transformer.h.{i}.{hf_name}.bias"] = layer.bias
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    idx, targets = torch.randint(0, 97, (2, 2, 16))
    with torch.no_grad():
        logits, loss = ours(idx, targets)
        want = hf(idx).logits
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, F.cross_entropy(want.flatten(0, 1), targets.flatten()), atol=1e-5, rtol=1e-5)
    per_layer = 32 * 96 + 32 * 32 + 2 * 32 * 128  # c_attn, c_proj, c_fc, mlp_proj weights
    assert ours.flops_per_token(16) == 6 * (97 * 32 + 2 * per_layer) + 12 * 2 * 32 * 16


@pytest.mark.parametrize("loss", ["plain", "chunked"])
def test_bench_times_each_loss_path(loss, monkeypatch):
    """--losses: 'plain' keeps the full logits, 'chunked' goes through ChunkedCrossEntropy (here
    at 64 logits per chunk), whatever the shape's default."""
    monkeypatch.setattr(bench.model_module, "LOSS_CHUNK_ELEMENTS", 64)
    import torch
    cfg = build_config("tiny", dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, max_seq_len=8)
    model = bench.Llama(cfg)
    x, y = torch.randint(0, 32, (2, 2, 8))
    _, out = model(x, y, loss_chunk=bench.loss_chunk(loss, 32))
    assert out.grad_fn.name() == {"plain": "NllLossBackward0", "chunked": "ChunkedCrossEntropyBackward"}[loss]
