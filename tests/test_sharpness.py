"""sharpness.py: the HVP against explicit Hessians, Hutchinson's estimator against exact
traces and its standard error against theory, the model-level measurement (tied
weights, SDPA backends, no side effects on training), and the CLI end to end."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import model as model_module
import sharpness
import train
from data import loaders
from data.chat import render
from data.formats import Tokenizer, load_meta, load_split, read_jsonl
from model import IGNORE_INDEX, Llama, LlamaConfig
from nanowso.common import parse_args
from study import figures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torch.func.hessian's forward-mode AD loads decompositions written with torch.jit.script
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


def flat_fn(loss_fn, params):
    """loss_fn of a dict -> the same loss of one flat vector (for torch.func.hessian)."""
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [math.prod(s) for s in shapes]

    def f(theta):
        return loss_fn({n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)})
    return f, torch.cat([p.flatten() for p in params.values()])


def exact_hessian(loss_fn, params):
    f, theta = flat_fn(loss_fn, params)
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.hessian(f)(theta)


# ------------------------------------------------------------------ HVP exactness

class TinyAttentionLM(nn.Module):
    """~2.5k parameters: embedding, one causal SDPA head, a tanh MLP, an output layer."""

    def __init__(self, vocab=16, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.Tanh(), nn.Linear(2 * dim, dim))
        self.out = nn.Linear(dim, vocab)

    def forward(self, x, y):
        h = self.embed(x)  # (B, T, C)
        h = h + F.scaled_dot_product_attention(self.wq(h), self.wk(h), self.wv(h), is_causal=True)
        h = h + self.mlp(h)
        return F.cross_entropy(self.out(h).flatten(0, 1), y.flatten())


def test_hvp_equals_explicit_hessian_double_backward_and_finite_differences():
    torch.manual_seed(0)
    model = TinyAttentionLM().double()
    x, y = torch.randint(0, 16, (2, 6)), torch.randint(0, 16, (2, 6))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(p):
        return functional_call(model, p, (x, y))

    v = {n: torch.randn_like(p) for n, p in params.items()}
    v_flat = torch.cat([t.flatten() for t in v.values()])
    H = exact_hessian(loss_fn, params)
    with sdpa_kernel(SDPBackend.MATH):
        hv = sharpness.hessian_vector_product(loss_fn, params)(v)
    hv_flat = torch.cat([hv[n].flatten() for n in params])
    scale = (H @ v_flat).abs().max().item()
    assert scale > 1e-3  # a non-trivial product
    torch.testing.assert_close(hv_flat, H @ v_flat, rtol=1e-10, atol=1e-10 * scale)

    leaves = [p.clone().requires_grad_() for p in params.values()]
    with sdpa_kernel(SDPBackend.MATH):
        g = torch.autograd.grad(loss_fn(dict(zip(params, leaves))), leaves, create_graph=True)
        hv_double = torch.autograd.grad(g, leaves, grad_outputs=list(v.values()))
    torch.testing.assert_close(hv_flat, torch.cat([t.flatten() for t in hv_double]), rtol=1e-10, atol=1e-10 * scale)

    eps = 1e-5
    f, theta = flat_fn(loss_fn, params)
    grad_at = torch.func.grad(f)
    finite_difference = (grad_at(theta + eps * v_flat) - grad_at(theta - eps * v_flat)) / (2 * eps)
    torch.testing.assert_close(hv_flat, finite_difference, rtol=1e-6, atol=1e-6 * scale)


# ------------------------------------------------------------- Hutchinson's estimator

def quadratic(A):
    """0.5 theta^T A theta of the flattened parameter dict: its Hessian is A."""
    def loss_fn(p):
        theta = torch.cat([t.flatten() for t in p.values()])
        return 0.5 * theta @ A @ theta
    return loss_fn


def test_diagonal_hessian_gives_the_exact_trace_with_one_probe():
    params = {"a": torch.zeros(7, dtype=torch.float64), "b": torch.zeros(3, 4, dtype=torch.float64)}
    diag = torch.linspace(-2.0, 5.0, 19, dtype=torch.float64)
    trace, stderr = sharpness.hutchinson_trace(quadratic(torch.diag(diag)), params, 1,
                                               torch.Generator().manual_seed(3))
    assert trace == pytest.approx(diag.sum().item(), rel=1e-12) and math.isnan(stderr)
    trace, stderr = sharpness.hutchinson_trace(quadratic(torch.diag(diag)), params, 5,
                                               torch.Generator().manual_seed(3))
    assert trace == pytest.approx(diag.sum().item(), rel=1e-12) and stderr == pytest.approx(0, abs=1e-12)


def test_dense_hessian_estimate_and_its_standard_error_match_theory():
    torch.manual_seed(0)
    d = 40
    B = torch.randn(d, d, dtype=torch.float64)
    # a large diagonal: Gaussian probes (variance 2 ||A||_F^2) would fail the variance check
    A = B + B.T + torch.diag(torch.linspace(1, 20, d, dtype=torch.float64))
    params = {"a": torch.zeros(10, dtype=torch.float64), "b": torch.zeros(5, 6, dtype=torch.float64)}
    n = 3000
    trace, stderr = sharpness.hutchinson_trace(quadratic(A), params, n, torch.Generator().manual_seed(0))
    exact = A.trace().item()
    variance = 2 * ((A ** 2).sum() - (A.diag() ** 2).sum()).item()  # of z^T A z, z Rademacher
    assert abs(trace - exact) < 4 * stderr
    # sample variance of n draws: relative sd ~ sqrt(2 / n) for near-Gaussian z^T A z
    assert (stderr * math.sqrt(n)) ** 2 == pytest.approx(variance, rel=0.12)
    assert stderr == pytest.approx(math.sqrt(variance / n), rel=0.06)


def test_the_plain_loop_gives_the_exact_trace_and_the_theory_s_standard_error():
    """hutchinson, Eq. 12 as it reads (torch.randint probes): exact on a diagonal Hessian,
    where z^T A z = Tr(A) for every +-1 probe, and unbiased with the standard error that
    2 (||A||_F^2 - sum A_ii^2) predicts on a dense one."""
    params = {"a": torch.zeros(7, dtype=torch.float64), "b": torch.zeros(3, 4, dtype=torch.float64)}
    diag = torch.linspace(-2.0, 5.0, 19, dtype=torch.float64)
    trace, stderr = sharpness.hutchinson(quadratic(torch.diag(diag)), params, 3, torch.Generator().manual_seed(1))
    assert trace == pytest.approx(diag.sum().item(), rel=1e-12) and stderr == pytest.approx(0, abs=1e-12)
    torch.manual_seed(0)
    B = torch.randn(19, 19, dtype=torch.float64)
    A, n = B + B.T + torch.diag(diag), 2000
    trace, stderr = sharpness.hutchinson(quadratic(A), params, n, torch.Generator().manual_seed(0))
    variance = 2 * ((A ** 2).sum() - (A.diag() ** 2).sum()).item()
    assert abs(trace - A.trace().item()) < 4 * stderr
    assert stderr == pytest.approx(math.sqrt(variance / n), rel=0.08)


@pytest.mark.parametrize("width", [1, 3, 11])
def test_the_fast_path_equals_the_plain_loop_on_the_same_probes(width):
    """hutchinson_trace (bit-packed probes, vmapped HVPs) and the plain loop fed the same
    probes (rademacher_like from the same seed) give the same estimate, on a real model."""
    model = tiny_llama(torch.float64)
    (x, y), = labelled_batches([9], seed=4)
    loss_fn = sharpness.batch_loss_fn(model, x, y)
    params = {name: p.detach() for name, p in model.named_parameters()}
    plain = sharpness.hutchinson(loss_fn, params, 11, torch.Generator().manual_seed(2),
                                 probe=sharpness.rademacher_like)
    fast = sharpness.hutchinson_trace(loss_fn, params, 11, torch.Generator().manual_seed(2), probes_per_call=width)
    assert fast == pytest.approx(plain, rel=1e-9)


def test_probes_are_rademacher_and_seeded():
    params = {"a": torch.zeros(1000), "b": torch.zeros(33, 7, dtype=torch.float64)}
    z = sharpness.rademacher_like(params, torch.Generator().manual_seed(0))
    assert z["a"].dtype == torch.float32 and z["b"].dtype == torch.float64 and z["b"].shape == (33, 7)
    flat = torch.cat([t.flatten().double() for t in z.values()])
    assert set(flat.tolist()) == {-1.0, 1.0} and abs(flat.mean().item()) < 4 / math.sqrt(flat.numel())
    again = sharpness.rademacher_like(params, torch.Generator().manual_seed(0))
    other = sharpness.rademacher_like(params, torch.Generator().manual_seed(1))
    assert all(torch.equal(z[n], again[n]) for n in z) and not torch.equal(z["a"], other["a"])



def one_matrix_probe(params, generator):
    """The probe as drawn before it was cut into pieces: every word at once, one (words, 16)
    matrix of bits for the whole model (8 bytes per parameter at its peak)."""
    sizes = [p.numel() for p in params.values()]
    words = torch.randint(0, 2**16, ((sum(sizes) + 15) // 16, 1), generator=generator, dtype=torch.int32)
    bits = (words >> torch.arange(16, dtype=torch.int32)).bitwise_and_(1)
    signs = bits.flatten()[:sum(sizes)].double().mul_(2).sub_(1)
    return {n: z.view_as(p).to(p) for (n, p), z in zip(params.items(), signs.split(sizes))}


@pytest.mark.parametrize("words_at_a_time", [1, 3, 2**16])
def test_probes_drawn_in_pieces_equal_one_draw(monkeypatch, words_at_a_time):
    """The same +-1 entries as one draw for the whole model (so measurements made before
    the change stay comparable), whether a piece ends inside a tensor or spans several."""
    monkeypatch.setattr(sharpness, "PROBE_WORDS", words_at_a_time)
    params = {"a": torch.zeros(21), "b": torch.zeros(3, 5, dtype=torch.float64), "c": torch.zeros(1), "d": torch.zeros(40)}
    got = sharpness.rademacher_like(params, torch.Generator().manual_seed(3))
    want = one_matrix_probe(params, torch.Generator().manual_seed(3))
    assert all(got[n].dtype == params[n].dtype and torch.equal(got[n], want[n]) for n in params)


def test_vmapped_probes_match_one_probe_at_a_time():
    torch.manual_seed(1)
    B = torch.randn(30, 30, dtype=torch.float64)
    params = {"a": torch.zeros(10, dtype=torch.float64), "b": torch.zeros(4, 5, dtype=torch.float64)}
    one = sharpness.hutchinson_trace(quadratic(B + B.T), params, 11, torch.Generator().manual_seed(5))
    for width in (3, 4, 11, 20):  # 11 = 3+3+3+2 = 4+4+3: remainder chunks of 2 and 3
        vmapped = sharpness.hutchinson_trace(quadratic(B + B.T), params, 11, torch.Generator().manual_seed(5),
                                             probes_per_call=width)
        assert vmapped == pytest.approx(one, rel=1e-10, abs=1e-10)
    with pytest.raises(ValueError, match="probes_per_call"):
        sharpness.hutchinson_trace(quadratic(B), params, 2, probes_per_call=0)


# ------------------------------------------------------------------ model level

def tiny_llama(dtype=torch.float64, tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(dim=8, ffn_dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=16,
                      tie_embeddings=tie)
    return Llama(cfg).to(dtype)


def test_tiny_llama_matches_the_exact_trace_and_counts_tied_weights_once():
    model = tiny_llama()
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert "output.weight" not in params and sum(p.numel() for p in params.values()) == model.num_params()
    loss_fn = sharpness.batch_loss_fn(model, x, y)
    H = exact_hessian(loss_fn, params)  # over the deduplicated parameter vector
    exact = H.trace().item()

    # The HVP the estimator uses is H v for the tied model (the model computes its norms
    # and its loss in float32, hence the tolerance).
    v = {n: torch.randn_like(p) for n, p in params.items()}
    with sdpa_kernel(SDPBackend.MATH):
        hv = sharpness.hessian_vector_product(loss_fn, params)(v)
    hv_exact = H @ torch.cat([t.flatten() for t in v.values()])
    torch.testing.assert_close(torch.cat([hv[n].flatten() for n in params]), hv_exact,
                               rtol=1e-5, atol=1e-5 * hv_exact.abs().max().item())

    result = sharpness.model_sharpness(model, [(x, y)], num_samples=1000, seed=0)
    assert result["num_params"] == model.num_params() and result["stderr_over"] == "probes"
    assert abs(result["trace"] - exact) < 4 * result["stderr"], (result["trace"], result["stderr"], exact)

    # The estimate can tell: had the output layer's use of the tied matrix not been
    # differentiated (tie_weights=False), the exact trace would be outside its error bar.
    def embedding_only(p):
        return functional_call(model, p, (x, y), tie_weights=False)[1]
    wrong = exact_hessian(embedding_only, params).trace().item()
    assert abs(wrong - result["trace"]) > 4 * result["stderr"], (wrong, result["trace"], result["stderr"])



def test_tiny_llama_vmapped_probes_match_one_probe_at_a_time():
    model = tiny_llama(torch.float32)
    batches = [(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))) for _ in range(2)]
    assert sharpness.auto_probes_per_call(16) == 4 and sharpness.auto_probes_per_call(1024) == 1
    one = sharpness.model_sharpness(model, batches, num_samples=6, seed=3, probes_per_call=1)
    auto = sharpness.model_sharpness(model, batches, num_samples=6, seed=3)  # 16 tokens: chunks of 4 + 2
    for a, b in zip(one["per_batch"] + [one], auto["per_batch"] + [auto]):
        assert a["trace"] == pytest.approx(b["trace"], rel=1e-5) and a["stderr"] == pytest.approx(b["stderr"], rel=1e-5)



def test_hessian_uses_the_plain_loss_where_training_chunks_it(monkeypatch):
    """At a vocabulary wide enough for model.cross_entropy to chunk (made so here by a
    small LOSS_FULL_ELEMENTS and LOSS_CHUNK_ELEMENTS: 2 positions per chunk), the Hessian still differentiates the
    plain loss (torch.func cannot go through the chunked loss's own backward) and measures
    the same trace."""
    model = tiny_llama(torch.float32)
    batches = [(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))]
    want = sharpness.model_sharpness(model, batches, num_samples=4, seed=1)
    monkeypatch.setattr(model_module, "LOSS_FULL_ELEMENTS", 128)
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 128)
    with torch.enable_grad():
        _, loss = model(*batches[0])
        assert loss.grad_fn.name() == "ChunkedCrossEntropyBackward"  # training takes the chunked path
    got = sharpness.model_sharpness(model, batches, num_samples=4, seed=1)
    assert got["trace"] == want["trace"] and got["loss"] == want["loss"]


def test_the_trace_is_the_same_with_attention_in_blocks(monkeypatch):
    """Sequences longer than model.HESSIAN_ATTENTION_BLOCK go through causal_attention_in_blocks in
    the HVP: the same probes give the same trace and loss, to float32 rounding."""
    model = tiny_llama(torch.float32)
    batches = [(torch.randint(0, 64, (1, 16)), torch.randint(0, 64, (1, 16))) for _ in range(2)]
    want = sharpness.model_sharpness(model, batches, num_samples=4, seed=1)  # 16 <= 256: SDPA's math backend
    monkeypatch.setattr(model_module, "HESSIAN_ATTENTION_BLOCK", 5)
    got = sharpness.model_sharpness(model, batches, num_samples=4, seed=1)
    assert got["trace"] == pytest.approx(want["trace"], rel=1e-4) and got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def labelled_batches(lengths, seed=0):
    """(x, y) of one row each, of the given lengths, the first two labels masked (as a prompt)."""
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, 64, (1, t), generator=g), torch.randint(0, 64, (1, t), generator=g)) for t in lengths]
    for _, y in batches:
        y[:, :2] = IGNORE_INDEX
    return batches


def test_padding_changes_neither_the_loss_nor_the_trace():
    model = tiny_llama()
    batches = labelled_batches([7, 4])
    padded = sharpness.pad_batches(batches, 9)
    assert [x.shape for x, _ in padded] == [(1, 9), (1, 9)]
    params = {n: p.detach() for n, p in model.named_parameters()}
    for (x, y), (xp, yp) in zip(batches, padded):
        assert torch.equal(xp[:, :x.shape[1]], x) and (yp[:, y.shape[1]:] == IGNORE_INDEX).all()
        exact = exact_hessian(sharpness.batch_loss_fn(model, x, y), params).trace().item()
        assert exact_hessian(sharpness.batch_loss_fn(model, xp, yp), params).trace().item() == pytest.approx(exact, rel=1e-10)
        assert model(xp, yp)[1].item() == pytest.approx(model(x, y)[1].item(), rel=1e-12)


@pytest.mark.slow
def test_compiled_estimator_matches_eager_and_compiles_once():
    """--compile: batches of different lengths are padded to one shape and the last chunk
    of probes is padded with zero probes, so one compilation serves every call; the
    numbers are the eager ones up to float32 rounding."""
    model = tiny_llama(torch.float32)
    batches = labelled_batches([8, 5, 8], seed=1)
    eager = sharpness.model_sharpness(model, batches, num_samples=5, seed=2, probes_per_call=2)
    torch._dynamo.reset()  # forget compilations of other tests' models
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = sharpness.model_sharpness(model, batches, num_samples=5, seed=2, probes_per_call=2, compile=True)
    for a, b in zip(eager["per_batch"] + [eager], compiled["per_batch"] + [compiled]):
        assert a["trace"] == pytest.approx(b["trace"], rel=1e-4) and a["stderr"] == pytest.approx(b["stderr"], rel=1e-3)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"]


def test_default_sdpa_backend_is_left_alone_outside_the_estimator():
    model = tiny_llama(torch.float32)
    x, y = torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8))
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss_fn = sharpness.batch_loss_fn(model, x, y)
    result = sharpness.model_sharpness(model, [(x, y)], num_samples=3, seed=0)
    assert math.isfinite(result["trace"])
    # afterwards the fused CPU kernel is selected again: it has no double backward ...
    with pytest.raises((RuntimeError, NotImplementedError)):
        sharpness.hessian_vector_product(loss_fn, params)(params)
    # ... and an ordinary training step works
    _, loss = model(x, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_measurement_leaves_training_undisturbed():
    model = tiny_llama(torch.float32)
    model.train()
    batches = [(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8))) for _ in range(2)]
    _, loss = model(*batches[0])
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    out = sharpness.sharpness_during_training(model, batches, num_samples=4, seed=0)
    assert set(out) == {"sharpness", "sharpness_stderr"} and math.isfinite(out["sharpness"])
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_the_estimator_runs_in_true_float32_whatever_the_caller_set(monkeypatch):
    """Defect: train.py turns TF32 on for the whole process (and a caller may hold autocast),
    so in-training sharpness ran its HVPs in TF32 while sharpness.py ran true fp32."""
    model = tiny_llama(torch.float32)
    batches = labelled_batches([8, 6], seed=3)
    plain = sharpness.model_sharpness(model, batches, num_samples=4, seed=0)
    seen, real = [], sharpness.hutchinson_trace

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.is_autocast_enabled("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(sharpness, "hutchinson_trace", spy)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py sets them
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = sharpness.model_sharpness(model, batches, num_samples=4, seed=0)
        assert seen == [(False, False, False)] * 2
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert [b["trace"] for b in inside["per_batch"]] == [b["trace"] for b in plain["per_batch"]]


def test_dropout_in_training_mode_and_low_precision_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 3))
    model.forward = lambda x, y: (None, F.cross_entropy(nn.Sequential.forward(model, x), y))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        sharpness.batch_loss_fn(model, x, y)
    result = sharpness.model_sharpness(model, [(x, y)], num_samples=2, seed=0)  # measures in eval mode
    assert math.isfinite(result["trace"]) and model.training
    with pytest.raises(ValueError, match="float32"):
        sharpness.model_sharpness(tiny_llama(torch.bfloat16), [(x, y)], num_samples=2, seed=0)


def test_same_seed_same_bits_other_seed_differs():
    model = tiny_llama(torch.float32)
    batches = [(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8))) for _ in range(3)]

    def run(seed):
        result = sharpness.model_sharpness(model, batches, num_samples=5, seed=seed)
        return [(r["trace"], r["stderr"]) for r in result["per_batch"]], result["trace"], result["stderr"]

    assert run(0) == run(0)
    assert run(0)[1] != run(1)[1]
    generator_run = [sharpness.hutchinson_trace(sharpness.batch_loss_fn(model, *batches[0]),
                                                dict(model.named_parameters()), 4,
                                                torch.Generator().manual_seed(7)) for _ in range(2)]
    assert generator_run[0] == generator_run[1]


# ------------------------------------------------------------------- data and CLI

@pytest.fixture(scope="module")
def checkpoint(testbed, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    train.main(train.TrainConfig(dataset=str(testbed / "pretrain"), out_dir=str(out_dir), batch_size=2, seq_len=32,
                                 max_iters=3, warmup_iters=1, log_interval=1, eval_interval=3, eval_tokens=256,
                                 compile=False, device="cpu"))
    return out_dir / "ckpt.pt"


@pytest.mark.parametrize("split", ["val", "train"])
def test_pretrain_batches_are_the_split_in_order(testbed, split):
    batches = loaders.pretrain_batches(str(testbed / "pretrain"), seq_len=16, batch_size=2, num_batches=3,
                                         split=split)
    tokens = np.concatenate([np.asarray(s) for s in load_split(str(testbed / "pretrain"), split)]).astype(np.int64)
    assert len(batches) == 3 and all(x.shape == (2, 16) and y.shape == (2, 16) for x, y in batches)
    x, y = batches[1]
    assert x[1].tolist() == tokens[48:64].tolist() and y[1].tolist() == tokens[49:65].tolist()


def test_sft_batches_supervise_only_the_answers(testbed):
    tokenizer = Tokenizer.from_dict(load_meta(str(testbed))["tokenizer"])
    path = str(testbed / "sft_select.jsonl")
    batches = loaders.sft_batches(path, tokenizer, seq_len=64, batch_size=3, num_batches=2)
    rows = read_jsonl(path)[:6]
    assert len(batches) == 2
    for b, (x, y) in enumerate(batches):
        for i in range(3):
            ids, labels = render(rows[3 * b + i]["messages"], tokenizer)
            n = len(ids) - 1
            assert x[i, :n].tolist() == ids[:-1] and y[i, :n].tolist() == labels[1:]
            assert (y[i, n:] == IGNORE_INDEX).all() and (x[i, n:] == tokenizer.eot).all()
            answer = tokenizer.encode(rows[3 * b + i]["messages"][-1]["content"]) + [tokenizer.eot]
            assert [t for t in y[i].tolist() if t != IGNORE_INDEX] == answer
    # a cut that leaves no answer token: the conversation is skipped, and none left is an error
    with pytest.raises(ValueError, match="no conversation"):
        loaders.sft_batches(path, tokenizer, seq_len=4, batch_size=1, num_batches=2)


@pytest.mark.slow
def test_cli_end_to_end(checkpoint, capsys):
    cfg = parse_args(sharpness.SharpnessConfig, [f"--ckpt={checkpoint}", "--num_batches=2", "--num_samples=3"])
    results = sharpness.main(cfg)
    printed = capsys.readouterr().out
    assert "pretrain batch 2/2" in printed and "ETA" in printed and "sharpness Tr(H) =" in printed
    with open(checkpoint.parent / "sharpness.json") as f:
        saved = json.load(f)
    assert set(saved) == {"ckpt", "step", "settings", "results"} and saved["step"] == 3
    assert saved["settings"]["seq_len"] == 32 and "label != -100" in saved["settings"]["loss_normalization"]
    assert saved["results"]["sft"]["data"].endswith("sft_select.jsonl")
    for name in ("pretrain", "sft"):
        r = saved["results"][name]
        assert {"trace", "stderr", "per_batch", "num_samples", "num_batches", "loss", "tokens"} <= set(r)
        assert r["num_batches"] == 2 and r["num_samples"] == 3 and math.isfinite(r["trace"])
        assert r["trace"] == pytest.approx(np.mean([b["trace"] for b in r["per_batch"]]))
        assert r["trace"] == results[name]["trace"]


@pytest.mark.slow
def test_cli_errors(checkpoint, tmp_path):
    missing = subprocess.run([sys.executable, "sharpness.py", f"--ckpt={tmp_path / 'nope.pt'}"], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "no checkpoint at" in missing.stderr
    with pytest.raises(SystemExit, match="no SFT data"):
        sharpness.main(parse_args(sharpness.SharpnessConfig, [f"--ckpt={checkpoint}", "--datasets=sft",
                                                              f"--sft_data={tmp_path / 'none.jsonl'}"]))
    with pytest.raises(SystemExit, match="datasets"):
        parse_args(sharpness.SharpnessConfig, ["--datasets=val"])

    def sft_data(rows, name):
        path = tmp_path / name
        path.write_text("".join(rows))
        sharpness.main(parse_args(sharpness.SharpnessConfig, [f"--ckpt={checkpoint}", "--datasets=sft",
                                                              f"--sft_data={path}"]))

    # defects: an empty file and one without answers were blamed on seq_len
    with pytest.raises(SystemExit, match="empty.jsonl has no rows"):
        sft_data([], "empty.jsonl")
    with pytest.raises(SystemExit, match="a conversation without an assistant turn"):
        sft_data(['{"messages": [{"role": "user", "content": "hi"}]}\n'], "no_answer.jsonl")
    with pytest.raises(SystemExit, match="bad.jsonl line 1 is not JSON"):
        sft_data(['{"messages": \n'], "bad.jsonl")
    with pytest.raises(SystemExit, match="no_such_data: no such directory"):
        sharpness.main(parse_args(sharpness.SharpnessConfig, [f"--ckpt={checkpoint}", "--datasets=pretrain",
                                                              f"--pretrain_data={tmp_path / 'no_such_data'}"]))


# ------------------------------------------------------------------------ plots

def test_plots(tmp_path):
    runs = {"WSO": [(100, 1.0, 0.1), (200, 1.1, 0.1)], "WSD": [(100, 1.0, 0.1), (200, 2.5, 0.2)]}
    path = figures.plot_sharpness_curves(runs, t_stable=150, path=str(tmp_path / "fig3.png"))
    assert os.path.getsize(path) > 0
    points = {"WSO": (1.0, 0.6), "WSD": (2.0, 0.5), "Cosine": (3.0, 0.45), "Linear": (2.5, 0.47)}
    r = figures.plot_sharpness_vs_score(points, path=str(tmp_path / "fig4.png"))
    s, score = zip(*points.values())
    assert r == pytest.approx(np.corrcoef(s, score)[0, 1]) and r < -0.9
    assert os.path.getsize(tmp_path / "fig4.png") > 0
    assert math.isnan(figures.plot_sharpness_vs_score({"WSO": (1.0, 0.6)}, path=str(tmp_path / "one.png")))


@pytest.mark.slow
def test_figures_3_and_4_from_training_runs(testbed, tmp_path):
    root = testbed
    runs = []
    for schedule, score in (("wso", 40.0), ("wsd", 30.0), ("cosine", 20.0)):
        out = tmp_path / schedule
        train.main(train.TrainConfig(dataset=str(root / "pretrain"), out_dir=str(out), schedule=schedule, alpha=0.0,
                                     max_iters=4, warmup_iters=1, batch_size=2, seq_len=32, eval_interval=4,
                                     eval_tokens=256, compile=False, device="cpu", sharpness_interval=2,
                                     sharpness_batches=1, sharpness_samples=2))
        (out / "sft").mkdir()
        (out / "sft" / "summary.json").write_text(json.dumps({"sft_task_avg": score}))
        runs.append(str(out))
    written = sharpness.main(sharpness.SharpnessConfig(figures=",".join(runs), figures_dir=str(tmp_path / "figs")))
    for key in ("fig3_pretrain", "fig3_sft", "fig4"):
        assert os.path.getsize(written[key]) > 0
    finals = []
    for run in runs:
        records = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
        finals.append([r["sharpness_pretrain"] for r in records if "sharpness_pretrain" in r][-1])
    assert written["pearson_r"] == pytest.approx(np.corrcoef(finals, [40.0, 30.0, 20.0])[0, 1])
    with pytest.raises(SystemExit, match="not a train.py run"):
        sharpness.draw_figures([str(tmp_path / "nowhere")], str(tmp_path))


# ------------------------------------------------------- AdamW-preconditioned sharpness

def test_preconditioned_trace_is_exact_on_a_diagonal_hessian_and_unbiased_on_a_dense_one():
    """Tr(D^-1 H): every +-1 probe gives it exactly when H is diagonal; on a dense H the mean
    of 3000 probes lands within 4 standard errors of it."""
    params = {"a": torch.zeros(7, dtype=torch.float64), "b": torch.zeros(3, 4, dtype=torch.float64)}
    d = {"a": torch.linspace(0.5, 2.0, 7, dtype=torch.float64), "b": torch.full((3, 4), 4.0, dtype=torch.float64)}
    d_flat = torch.cat([d["a"], d["b"].flatten()])
    diag = torch.linspace(-2.0, 5.0, 19, dtype=torch.float64)
    probe = sharpness.preconditioned_probe(d)
    trace, _ = sharpness.hutchinson(quadratic(torch.diag(diag)), params, 2, torch.Generator().manual_seed(0), probe)
    assert trace == pytest.approx((diag / d_flat).sum().item(), rel=1e-12)
    torch.manual_seed(0)
    B = torch.randn(19, 19, dtype=torch.float64)
    A = B + B.T + torch.diag(diag)
    trace, stderr = sharpness.hutchinson(quadratic(A), params, 3000, torch.Generator().manual_seed(1), probe)
    assert abs(trace - (A.diag() / d_flat).sum().item()) < 4 * stderr


def test_adam_denominators_are_the_optimizer_s_own_and_scale_the_trace():
    """The divisors read from a state_dict equal sqrt(v_hat) + eps of AdamW's live state for
    every named parameter (its groups reorder them); denominators all c divide the model's
    preconditioned trace by c exactly (a scaled copy)."""
    from nanowso.optim import make_optimizer
    model = tiny_llama(torch.float32, tie=False)
    cfg = train.TrainConfig(learning_rate=1e-3, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg, "cpu")
    (x, y), = labelled_batches([9], seed=1)
    for _ in range(3):
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    got = sharpness.adam_denominators(model, optimizer.state_dict())
    assert sorted(got) == sorted(n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        want = (state["exp_avg_sq"].double() / (1 - 0.95 ** float(state["step"]))).sqrt() + 1e-8
        torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=0)
    batches = labelled_batches([8, 6], seed=2)
    ones = sharpness.preconditioned_sharpness(model, {n: torch.ones_like(p) for n, p in model.named_parameters()},
                                              batches, num_samples=3)
    fours = sharpness.preconditioned_sharpness(model, {n: torch.full_like(p, 4.0) for n, p in model.named_parameters()},
                                               batches, num_samples=3)
    assert fours["per_batch"] == pytest.approx([t / 4 for t in ones["per_batch"]], rel=1e-5)
    assert ones["per_batch"] != pytest.approx(fours["per_batch"])


@pytest.mark.slow
def test_cli_preconditioned_trace_is_the_checkpoint_s_adamw_view(checkpoint, tmp_path):
    """--preconditioned: beside Tr(H), Tr(D^-1 H) with D read from the checkpoint's AdamW state,
    on the same batches, equal to preconditioned_sharpness called directly; a checkpoint
    without AdamW state is refused by name."""
    from nanowso.checkpoint import load_checkpoint, load_model
    out = tmp_path / "s.json"
    args = [f"--ckpt={checkpoint}", "--datasets=pretrain", "--num_batches=2", "--num_samples=3",
            "--preconditioned=true", f"--out={out}"]
    results = sharpness.main(parse_args(sharpness.SharpnessConfig, args))
    ckpt = load_checkpoint(str(checkpoint))
    model = load_model(ckpt, "cpu")
    batches = loaders.pretrain_batches(ckpt["config"]["dataset"], seq_len=32, batch_size=1, num_batches=2)
    want = sharpness.preconditioned_sharpness(model, sharpness.adam_denominators(model, ckpt["optimizer"]),
                                              batches, 3)
    got = json.loads(out.read_text())["results"]["pretrain"]["preconditioned"]
    assert got == results["pretrain"]["preconditioned"]
    assert got["per_batch"] == pytest.approx(want["per_batch"], rel=1e-6)
    no_adam = tmp_path / "weights_only.pt"
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, no_adam)
    with pytest.raises(SystemExit, match="holds no AdamW state"):
        sharpness.main(parse_args(sharpness.SharpnessConfig, [f"--ckpt={no_adam}", "--datasets=pretrain",
                                                              "--preconditioned=true", f"--out={out}"]))


def test_preconditioned_trace_during_training_equals_sharpness_py_on_the_checkpoint(testbed, tmp_path):
    """train.py --sharpness_preconditioned: Tr(D^-1 H) logged at each sharpness step (none at
    step 0, before AdamW has a second moment) equals sharpness.py --preconditioned on the same
    step's checkpoint (the same held-out batches, probes and seed); it needs --sharpness_interval."""
    out_dir = tmp_path / "run"
    cfg = train.TrainConfig(dataset=str(testbed / "pretrain"), out_dir=str(out_dir), batch_size=2, seq_len=32,
                            max_iters=4, warmup_iters=1, log_interval=1, eval_interval=2, eval_tokens=256,
                            sharpness_interval=2, sharpness_batches=2, sharpness_samples=3,
                            sharpness_preconditioned=True, compile=False, device="cpu", seed=5)
    train.main(cfg)
    records = [r for r in read_jsonl(str(out_dir / "log.jsonl")) if "sharpness_pretrain" in r]
    assert [r["step"] for r in records if "sharpness_preconditioned" in r] == [2, 4]
    args = [f"--ckpt={out_dir / 'ckpt.pt'}", "--datasets=pretrain", "--num_batches=2", "--num_samples=3", "--seed=5",
            "--preconditioned=true", f"--out={tmp_path / 's.json'}"]
    after = sharpness.main(parse_args(sharpness.SharpnessConfig, args))["pretrain"]["preconditioned"]
    assert records[-1]["sharpness_preconditioned"] == pytest.approx(after["trace"], rel=1e-6)
    assert records[-1]["sharpness_preconditioned_stderr"] == pytest.approx(after["stderr"], rel=1e-5)
    with pytest.raises(ValueError, match="set --sharpness_interval"):
        train.TrainConfig(sharpness_preconditioned=True)


def write_run(run_dir, train_cfg, records):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"train": train_cfg}, f)
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_trace_against_loss_reads_each_sharpness_step(tmp_path):
    """study/regimes.py: at each in-training sharpness step, the held-out loss evaluated there, or
    the training loss averaged over the window up to it; a WSD branch continues its WSO run's
    records (study.figures.run_records); runs of one label average step by step."""
    from study import regimes
    wso, branch, wso2 = (str(tmp_path / n) for n in ("wso", "wsd", "wso2"))
    logged = [{"step": s, "loss": float(s)} for s in range(10, 101, 10)]
    sharp = [{"step": s, "sharpness_train_text": 2.0 * s, "sharpness_pretrain": 3.0 * s} for s in (50, 100)]
    evals = [{"step": s, "val_loss": s / 10} for s in (50, 100)]
    write_run(wso, {"schedule": "wso", "alpha": 1.0}, logged + sharp + evals)
    write_run(wso2, {"schedule": "wso", "alpha": 1.0}, [{**r, "loss": r["loss"] + 2} if "loss" in r else r
                                                       for r in logged + sharp + evals])
    write_run(branch, {"schedule": "wso", "stage": "cooldown", "alpha": 0.0, "init_from": os.path.join(wso, "ckpt_000070.pt")},
              [{"step": 80, "loss": 1.0}, {"step": 90, "loss": 1.0}, {"step": 100, "loss": 1.0},
               {"step": 100, "sharpness_train_text": 7.0, "sharpness_pretrain": 9.0}, {"step": 100, "val_loss": 0.5}])
    assert regimes.trace_loss_path(wso, "train_text") == [(50, 30.0, 100.0), (100, 80.0, 200.0)]  # (10+...+50)/5
    assert regimes.trace_loss_path(wso, "pretrain") == [(50, 5.0, 150.0), (100, 10.0, 300.0)]
    # the branch: steps 60 and 70 from WSO, 80-100 its own
    assert regimes.trace_loss_path(branch, "train_text") == [(50, 30.0, 100.0), (100, (60 + 70 + 3) / 5, 7.0)]
    assert [regimes.run_label(d) for d in (wso, branch)] == ["WSO", "WSD to 0"]
    # a study's runs read from another directory: init_from relative to where the study ran finds the sibling
    moved = str(tmp_path / "moved")
    with open(os.path.join(branch, "config.json")) as f:
        cfg = json.load(f)["train"]
    write_run(moved, {**cfg, "init_from": "runs/seed0/wso/ckpt_000070.pt"}, read_jsonl(os.path.join(branch, "log.jsonl")))
    assert regimes.trace_loss_path(moved, "train_text") == regimes.trace_loss_path(branch, "train_text")
    paths = regimes.mean_paths([wso, wso2, branch], "train_text")
    assert paths["WSO"] == [(50, 31.0, 100.0), (100, 81.0, 200.0)]
    out = tmp_path / "fig.png"
    regimes.main(regimes.RegimesConfig(memorization=f"{wso},{branch}", entropy=wso2, out=str(out)))
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit, match="no log.jsonl"):
        regimes.main(regimes.RegimesConfig(memorization=str(tmp_path / "nothing"), out=str(out)))
