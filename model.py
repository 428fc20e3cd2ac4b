"""
The Llama-3 decoder the paper trains (Appendix A, Table 5), written out by hand.

    RMSNorm -> grouped-query attention with rotary position embeddings -> residual
    RMSNorm -> SwiGLU feed-forward                                     -> residual

Parameter names follow Meta's reference (meta-llama/llama3 `llama/model.py`), and
RoPE rotates halves (`rotate_half`) like Hugging Face's `LlamaForCausalLM`, so a
checkpoint maps to Hugging Face by renaming keys alone (transformers'
models/llama/modeling_llama.py; tools/export_hf.py).

Notation used in shape comments:
    B  batch size            T  sequence length        C  dim (hidden size)
    nh n_heads               nkv n_kv_heads            hd head_dim = C // nh
    V  vocab_size

Count the paper's models without allocating them:
    python model.py
"""

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class LlamaConfig:
    dim: int = 128  # hidden size C
    ffn_dim: int = 384  # inner size of the SwiGLU feed-forward
    n_layers: int = 4
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads; n_heads // n_kv_heads queries share each (GQA)
    vocab_size: int = 100277  # cl100k_base; the paper's Llama-3 tokenizer has 128256
    rope_theta: float = 10000.0  # the paper's value (Table 5); Llama-3 itself uses 500000
    norm_eps: float = 1e-5
    max_seq_len: int = 2048  # longest sequence RoPE tables are built for
    tie_embeddings: bool = False  # share tok_embeddings and output (Llama-3.2-1B does)

    def __post_init__(self):
        for f in ("dim", "ffn_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)} must be a positive integer")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Named model sizes. "1b" and "8b" are the paper's Table 5 (Llama-3.2-1B and
# Llama-3.1-8B shapes). The small ones have vocab_size=None: it is taken from the
# data set (the offline testbed stores a compact vocabulary of ~1k ids).
PRESETS = {
    # ~0.9M parameters on the testbed: trains in minutes on a 2-core CPU.
    "tiny": dict(dim=128, ffn_dim=384, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=None, tie_embeddings=True),
    # One GPU, cl100k vocabulary (100277 ids), tied embeddings.
    "125m": dict(dim=768, ffn_dim=2048, n_layers=8, n_heads=12, n_kv_heads=4, vocab_size=None, tie_embeddings=True),
    "350m": dict(dim=1024, ffn_dim=2816, n_layers=22, n_heads=16, n_kv_heads=4, vocab_size=None, tie_embeddings=True),
    "1b": dict(dim=2048, ffn_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, tie_embeddings=True),
    "8b": dict(dim=4096, ffn_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, tie_embeddings=False),
}


IGNORE_INDEX = -100  # the label of a position outside the loss (F.cross_entropy's ignore_index)
# model.cross_entropy keeps the full logits up to 2^28 fp32 values (1 GiB, and 1 GiB more for their
# gradient: 2048 x 128256 at most, the whole 8 x 256 x 50304 CPU benchmark); past that it computes
# the loss 2^25 values at a time (128 MiB; 256 positions at V = 128256).
LOSS_FULL_ELEMENTS = 2**28
LOSS_CHUNK_ELEMENTS = 2**25


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as Hugging Face's Llama)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def precompute_rope(head_dim, max_seq_len, theta):
    """cos and sin tables, each (max_seq_len, head_dim): position p, frequency theta^(-2i/hd)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T_max, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T_max, hd): rotate_half pairs dim i with i + hd/2
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+hd/2}) pair of x (B, n, T, hd) by the angle of its position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated_half * sin).type_as(x)


def repeat_kv(x, n_rep):
    """(B, nkv, T, hd) -> (B, nkv * n_rep, T, hd): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


# Queries per block of causal_attention_in_blocks inside hessian_attention() (sharpness.py); 0 while outside.
HESSIAN_ATTENTION_BLOCK = 128
attention_block = 0


@contextmanager
def hessian_attention(block=None):
    """Attention that can be differentiated twice (the Hessian): the fused SDPA kernels have
    neither double backward nor forward-mode AD (PyTorch issues 116350, 128971), so inside,
    SDPA runs its math backend, and causal self-attention over more than `block` positions
    runs causal_attention_in_blocks instead (block None: HESSIAN_ATTENTION_BLOCK)."""
    global attention_block
    previous, attention_block = attention_block, HESSIAN_ATTENTION_BLOCK if block is None else block
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        attention_block = previous


def causal_attention_in_blocks(q, k, v, block):
    """softmax(q k^T / sqrt(hd) + causal mask) v by its formula, `block` queries at a time, each
    block against only the keys up to its last query: SDPA's math backend to float rounding,
    without the masked upper triangle of its T x T scores: n = T / block blocks do (n + 1) / 2n of
    the T x T work, 9/16 at T = 1024 in blocks of 128 (docs/speed.md: 128 beat 256 and 512)."""
    T = q.shape[2]
    q = q * q.shape[-1] ** -0.5
    out = []
    for start in range(0, T, block):
        end = min(start + block, T)
        scores = q[:, :, start:end] @ k[:, :, :end].transpose(-2, -1)  # (B, nh, end - start, end)
        visible = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out.append(scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v[:, :, :end])
    return torch.cat(out, dim=2)  # (B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: the keys and values of every position so far
            k, v = cache.update(k, v)  # (B, nkv, S, hd), S = positions cached before + T
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, nh, S, hd)
        S = k.shape[2]
        if S == T and 0 < attention_block < T:  # inside hessian_attention()
            y = causal_attention_in_blocks(q, k, v, attention_block)
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        else:  # T new queries after S - T cached positions: query i sees keys 0 .. S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class LayerCache:
    """One layer's keys and values, (B, nkv, max_len, hd) each, allocated on first use in
    the dtype the layer computes them in (bf16 under autocast)."""

    def __init__(self, cache):
        self.cache, self.k, self.v = cache, None, None

    def update(self, k, v):
        """Store k, v (B, nkv, T, hd) after the cached positions; return all positions so far."""
        start, end = self.cache.length, self.cache.length + k.shape[2]
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.cache.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for greedy generation, so each new token costs one
    position instead of the whole sequence again (gpt-fast's KVCache, allocated once).
    model(idx, cache=cache) appends idx's positions; keep(rows) drops finished sequences."""

    def __init__(self, n_layers, max_len):
        self.length, self.max_len = 0, max_len
        self.layers = [LayerCache(self) for _ in range(n_layers)]

    def keep(self, rows):
        """Keep only the sequences `rows` (a list of batch indices), in that order."""
        for layer in self.layers:
            if layer.k is not None:
                index = torch.tensor(rows, device=layer.k.device)
                layer.k, layer.v = layer.k[index], layer.v[index]

    def expand(self, n):
        """One cached sequence as n copies, each to be continued its own way (the choices
        that follow one prompt are scored on its cached positions, not on n copies of it)."""
        for layer in self.layers:
            if layer.k is not None:
                layer.k, layer.v = layer.k.expand(n, -1, -1, -1).clone(), layer.v.expand(n, -1, -1, -1).clone()


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = precompute_rope(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not saved in checkpoints: they are a function of the config.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def init_rope(self):
        """Recompute the RoPE tables in place: a model built on the meta device and then
        materialized with to_empty (parallel.shard_model) has them uninitialized."""
        cfg = self.config
        cos, sin = precompute_rope(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def reset_parameters(self):
        """Initialization (GPT-2 / OLMo style, what small Llama reproductions use):
        every matrix ~ N(0, 0.02^2); the two projections that write into the residual
        stream (wo, w2) get std 0.02 / sqrt(2 * n_layers), so the residual's variance
        does not grow with depth (GPT-2, Radford et al. 2019); RMSNorm gains are 1.
        With tied embeddings the shared matrix is initialized once, as an embedding."""
        if self.tok_embeddings.weight.is_meta:
            return
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, loss_chunk=None, cache=None):
        """idx (B, T) token ids -> (logits (B, T, V) for every position, None); with targets
        (B, T): (None, the mean next-token cross-entropy over targets != IGNORE_INDEX), computed by
        cross_entropy without the full logits (loss_chunk: positions per chunk, see there).
        With a KVCache, idx continues the sequences the cache holds (generation)."""
        B, T = idx.shape
        pos = cache.length if cache is not None else 0  # position of idx[:, 0]
        if pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {pos + T} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]  # (T, hd)
        x = self.tok_embeddings(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += T
        h = self.norm(x)  # (B, T, C)
        if targets is None:
            return self.output(h), None  # (B, T, V)
        return None, cross_entropy(h, self.output.weight, targets, loss_chunk)

    def num_params(self):
        """Parameters, a tied matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), as in PaLM's MFU (Appendix B):
        6 per weight that takes part in a matrix multiply (all but the norms and the
        input embedding lookup; a tied matrix counts once, as the output layer), plus
        12 * n_layers * C * T for attention's QK^T and AV over the full T x T scores."""
        cfg = self.config
        n_matmul = self.num_params() - sum(p.numel() for p in self.parameters() if p.ndim == 1)
        if not cfg.tie_embeddings:
            n_matmul -= self.tok_embeddings.weight.numel()
        return 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq_len


def upcast(logits):
    """bf16/fp16 logits in float32 for the softmax; float32 and float64 as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def chunk_loss_sum(h, weight, targets):
    """Summed cross-entropy of the logits h @ weight^T (N, V), in float32 or wider."""
    return F.cross_entropy(upcast(F.linear(h, weight)), targets, ignore_index=IGNORE_INDEX, reduction="sum")


class ChunkedCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of h @ weight^T, its gradients computed chunk by chunk during
    the forward pass (as Liger-Kernel's fused linear cross-entropy): d loss / d logits =
    (softmax - one_hot(target)) / n per target row, 0 for ignored rows, each chunk's
    gradient multiplied into d h and d weight and dropped. The same FLOPs as the plain
    loss, and backward only scales the two stored gradients."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):  # h (N, C), weight (V, C), targets (N,)
        n = (targets != IGNORE_INDEX).sum()
        wide = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64
        loss = torch.zeros((), dtype=wide, device=h.device)
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight, dtype=wide)
        for start in range(0, h.shape[0], chunk):
            h_c, t_c = h[start:start + chunk], targets[start:start + chunk]
            raw = F.linear(h_c, weight)  # (chunk, V); bf16 under autocast
            rows = torch.arange(len(t_c), device=h.device)
            valid, target = t_c != IGNORE_INDEX, t_c.clamp(min=0)
            # the elementwise work of F.cross_entropy's forward and backward, no more: one
            # log_softmax, then softmax = exp(log_softmax) in place, minus one_hot(target)
            g = F.log_softmax(upcast(raw), -1)  # (chunk, V)
            loss -= (g[rows, target] * valid).sum()
            g.exp_()[rows, target] -= 1
            g = g.to(raw.dtype)  # as autograd returns it through the upcast
            keep = valid[:, None].to(h.dtype)  # ignored rows are zeroed in the (chunk, C) factors, V/C times smaller
            grad_h[start:start + chunk] = (g @ weight) * keep
            grad_w += g.T @ (h_c * keep)
        ctx.save_for_backward(grad_h / n, (grad_w / n).to(weight.dtype))
        return loss / n  # 0/0 = nan without targets, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None


def cross_entropy(h, weight, targets, chunk=None):
    """The mean cross-entropy of logits h @ weight^T (h (B, T, C), weight (V, C)) against
    targets (B, T) over targets != IGNORE_INDEX: F.cross_entropy(upcast(logits), ...) without its
    memory. The full fp32 logits are B*T*V*4 bytes, and as much again for their gradient:
    ~2 GB per 2048-token sequence at V = 128256. Here positions go through `chunk` at a time
    (None: all of them while the logits are at most LOSS_FULL_ELEMENTS, else
    LOSS_CHUNK_ELEMENTS // V), and with gradients on, ChunkedCrossEntropy computes them chunk by
    chunk, so one chunk's logits exist at a time. Chunking saves memory, not time: below the
    bound the plain loss is a few percent faster on a CPU (tools/bench.py --losses=plain,chunked).
    One chunk or chunk=0 is F.cross_entropy itself: chunk=0 is for torch.func (the Hessian),
    which differentiates through the ops and cannot use a hand-written backward."""
    h, targets = h.flatten(0, 1), targets.flatten()  # (N, C), (N,)
    if chunk is None:
        full = h.shape[0] * weight.shape[0] <= LOSS_FULL_ELEMENTS
        chunk = 0 if full else max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    if chunk == 0 or h.shape[0] <= chunk:
        return F.cross_entropy(upcast(F.linear(h, weight)), targets, ignore_index=IGNORE_INDEX)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(h, weight, targets, chunk)
    total = sum(chunk_loss_sum(h_c, weight, t_c) for h_c, t_c in zip(h.split(chunk), targets.split(chunk)))
    return total / (targets != IGNORE_INDEX).sum()


def build_config(preset, **overrides):
    """A LlamaConfig from a named preset plus field overrides (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if values.get("vocab_size") is None:
        raise ValueError(f"preset {preset!r} takes vocab_size from the data set; pass vocab_size=")
    return LlamaConfig(**values)


if __name__ == "__main__":
    for name in PRESETS:
        cfg = build_config(name, vocab_size=PRESETS[name]["vocab_size"] or 100277)
        with torch.device("meta"):
            model = Llama(cfg)
        print(f"{name:>5}: {model.num_params():>14,} parameters  {cfg}")
