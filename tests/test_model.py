"""model.py against independent references: torch's own ops, the RoPE equations in
complex form, exact parameter counts from the paper, and Hugging Face's Llama."""

import math

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import (
    PRESETS,
    Attention,
    Llama,
    LlamaConfig,
    RMSNorm,
    apply_rope,
    build_config,
    cross_entropy,
    precompute_rope,
    repeat_kv,
)

SMALL = LlamaConfig(dim=64, ffn_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 48)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (48,), norm.weight, eps=1e-5))


def test_repeat_kv_matches_repeat_interleave():
    x = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))


def test_rope_matches_complex_rotation():
    """Pair i of the rotate_half layout is (x_i, x_{i+hd/2}); as a complex number it is
    multiplied by exp(j * p * theta^(-2i/hd)) at position p."""
    hd, T, theta = 16, 9, 10000.0
    x = torch.randn(2, 3, T, hd, dtype=torch.float64)
    cos, sin = precompute_rope(hd, T, theta)
    got = apply_rope(x, cos.double(), sin.double())
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:])
    freqs = torch.tensor([theta ** (-2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    want = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # tables are built in float32


def test_rope_depends_on_relative_position_only():
    hd = 32
    cos, sin = precompute_rope(hd, 64, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, hd), cos[m], sin[m])
        kn = apply_rope(k.view(1, 1, 1, hd), cos[n], sin[n])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score(0, 0), (q * k).sum(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_gqa_attention_matches_sdpa_enable_gqa():
    torch.manual_seed(0)
    attn = Attention(SMALL)
    B, T = 2, 11
    x = torch.randn(B, T, SMALL.dim)
    cos, sin = precompute_rope(SMALL.head_dim, T, SMALL.rope_theta)
    hd, nh, nkv = SMALL.head_dim, SMALL.n_heads, SMALL.n_kv_heads
    q = apply_rope((x @ attn.wq.weight.T).view(B, T, nh, hd).transpose(1, 2), cos, sin)
    k = apply_rope((x @ attn.wk.weight.T).view(B, T, nkv, hd).transpose(1, 2), cos, sin)
    v = (x @ attn.wv.weight.T).view(B, T, nkv, hd).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = y.transpose(1, 2).reshape(B, T, -1) @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, cos, sin), want)


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Llama(SMALL).eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = Llama(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (3, 12))
    targets = torch.randint(0, SMALL.vocab_size, (3, 12))
    targets[0, :5] = -100
    logits, _ = model(idx)
    assert logits.shape == (3, 12, SMALL.vocab_size)
    no_logits, loss = model(idx, targets)
    assert no_logits is None  # training never reads them: the compiled graph does not return them
    mask = targets != -100
    want = F.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask].neg().mean()
    torch.testing.assert_close(loss, want)
    assert model(idx)[1] is None
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, SMALL.max_seq_len + 1, dtype=torch.long))


def test_tied_embeddings_share_one_matrix():
    model = Llama(LlamaConfig(**{**SMALL.to_dict(), "tie_embeddings": True}))
    assert model.output.weight is model.tok_embeddings.weight
    untied = Llama(SMALL)
    assert model.num_params() == untied.num_params() - SMALL.vocab_size * SMALL.dim


def test_initialization_scales():
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=256, ffn_dim=512, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=512)
    model = Llama(cfg)
    assert abs(model.layers[0].attention.wq.weight.std().item() - 0.02) < 1e-3
    assert abs(model.layers[0].feed_forward.w2.weight.std().item() - 0.02 / math.sqrt(16)) < 3e-4
    assert torch.equal(model.norm.weight, torch.ones(256))


@pytest.mark.parametrize("name,expected", [("1b", 1_235_814_400), ("8b", 8_030_261_248)])
def test_paper_presets_parameter_counts_on_meta_device(name, expected):
    cfg = build_config(name)
    assert (cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == {
        "1b": (2048, 8192, 16, 32, 8, 64), "8b": (4096, 14336, 32, 32, 8, 128)}[name]
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.tok_embeddings.weight.is_meta
    assert model.num_params() == expected


def test_small_presets_are_the_sizes_they_are_named():
    for name, lo, hi in [("125m", 115e6, 135e6), ("350m", 330e6, 370e6)]:
        with torch.device("meta"):
            n = Llama(build_config(name, vocab_size=100352)).num_params()
        assert lo < n < hi, (name, n)
    assert "tiny" in PRESETS


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("13b")
    with pytest.raises(ValueError, match="vocab_size"):
        build_config("tiny")


def test_matches_huggingface_llama():
    """Same weights (a key rename, no permutation) give the same logits as transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=64, ffn_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                      max_seq_len=32, tie_embeddings=True)
    ours = Llama(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    renames = [("tok_embeddings", "model.embed_tokens"), ("layers.", "model.layers."),
               ("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
               ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
               ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
               ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
               ("ffn_norm", "post_attention_layernorm"), ("output", "lm_head")]
    state = {}
    for key, value in ours.state_dict().items():
        if key == "norm.weight":
            key = "model.norm.weight"
        for a, b in renames:
            key = key.replace(a, b)
        state[key] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 5, 7, 36, 0])
def test_chunked_cross_entropy_equals_torch(chunk):
    """Loss and both gradients equal F.cross_entropy of the full fp32 logits, for chunks that
    divide the 36 positions unevenly, one position, all of them, and chunk=0 (no chunking)."""
    torch.manual_seed(0)
    h = torch.randn(3, 12, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 12))
    targets[0, :5] = targets[2, 7] = -100
    loss = cross_entropy(h, weight, targets, chunk)
    got = torch.autograd.grad(loss, (h, weight))
    want_loss = F.cross_entropy((h @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    want = torch.autograd.grad(want_loss, (h, weight))
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_chunked_cross_entropy_never_keeps_the_full_logits():
    """What autograd saves for backward while the model's loss is computed: with a chunk of 8
    positions no saved tensor holds logits of more than 8 positions (rows of V values), and
    the loss and gradients equal the unchunked ones (the model's default at this vocabulary).
    A wide vocabulary against small activations, as in the 1B/8B models."""
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=32, ffn_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=2000, max_seq_len=32)
    model = Llama(cfg)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 2, 24))
    logit_rows = []

    def pack(t):  # every tensor autograd keeps for backward
        logit_rows.append(t.numel() // cfg.vocab_size if t.ndim and t.shape[-1] == cfg.vocab_size else 0)
        return t

    def loss_and_grads(chunk):
        logit_rows.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(idx, targets, loss_chunk=chunk)
        return loss, torch.autograd.grad(loss, list(model.parameters())), max(logit_rows)

    full_loss, full_grads, full_rows = loss_and_grads(None)
    loss, grads, rows = loss_and_grads(8)
    assert full_rows == 48  # the check sees the logits of all 2 x 24 positions when they are kept
    assert rows <= 8
    torch.testing.assert_close(loss, full_loss)
    for g, w in zip(grads, full_grads):
        torch.testing.assert_close(g, w)


def test_attention_in_blocks_equals_sdpa_to_second_order():
    """causal_attention_in_blocks (blocks of 4 over 10 positions: the last one short) against SDPA's
    math backend: the output, the gradient and a Hessian-vector product (double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model import causal_attention_in_blocks
    torch.manual_seed(0)
    q, k, v, w = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(4))
    z = [torch.randn_like(t) for t in (q, k, v)]

    def derivatives(attend):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*inputs)
        grads = torch.autograd.grad((out * w).sum(), inputs, create_graph=True)
        hvp = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, z)), inputs)
        return [out, *grads, *hvp]

    with sdpa_kernel(SDPBackend.MATH):
        want = derivatives(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    for block in (4, 1, 10):
        for got, expected in zip(derivatives(lambda q, k, v: causal_attention_in_blocks(q, k, v, block)), want):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_hessian_attention_blocks_only_inside_and_past_the_block():
    """Inside hessian_attention(block) the model's causal attention runs in blocks where T > block,
    with the same logits; outside it, and with T <= block, SDPA as always."""
    torch.manual_seed(0)
    model = Llama(SMALL).double()
    idx = torch.randint(0, SMALL.vocab_size, (2, 12))
    calls = []
    original = model_module.causal_attention_in_blocks
    with torch.no_grad():
        want = model(idx)[0]
        model_module.causal_attention_in_blocks = lambda *a: calls.append(a[-1]) or original(*a)
        try:
            with model_module.hessian_attention(block=5):
                got = model(idx)[0]
            with model_module.hessian_attention(block=12):
                model(idx)
            model(idx)
        finally:
            model_module.causal_attention_in_blocks = original
    assert calls == [5] * SMALL.n_layers and model_module.attention_block == 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_loss_chunks_only_past_the_memory_bound(monkeypatch):
    """By default the full logits are kept up to LOSS_FULL_ELEMENTS values (the plain loss, a few
    percent faster) and chunked past it, LOSS_CHUNK_ELEMENTS at a time; the loss is the same."""
    torch.manual_seed(0)
    h = torch.randn(4, 6, 8, requires_grad=True)  # 24 positions x 50 = 1200 logits
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (4, 6))
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 500)  # 10 positions per chunk
    names = {}
    for bound in (1200, 1199):
        monkeypatch.setattr(model_module, "LOSS_FULL_ELEMENTS", bound)
        loss = cross_entropy(h, weight, targets)
        names[bound] = (loss.grad_fn.name(), loss)
    assert names[1200][0] == "NllLossBackward0"  # F.cross_entropy of the full logits
    assert names[1199][0] == "ChunkedCrossEntropyBackward"
    torch.testing.assert_close(names[1199][1], names[1200][1])


def test_chunked_cross_entropy_under_bf16_autocast():
    """Under bf16 autocast (CUDA's training dtype; CPU runs it too) the chunked loss and its
    gradients equal the plain loss's to bf16 rounding."""
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=32, ffn_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=2000, max_seq_len=32)
    model = Llama(cfg)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 2, 24))
    targets[1, 3:9] = -100
    results = []
    for chunk in (8, 0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets, loss_chunk=chunk)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss, grads), (want_loss, want_grads) = results
    assert loss.dtype == want_loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=0)
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype
        # relative to the gradient's norm: the chunks round their bf16 products one by one
        assert (g - w).norm() <= 1e-2 * w.norm()
