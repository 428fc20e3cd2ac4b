"""
What the presets need on N GPUs, on paper (docs/scale.md): memory per GPU
under DDP and FSDP2, and days for the paper's token budgets at a stated MFU. Counts come from
model.py on the meta device; nothing is measured.

    python tools/sizes.py                     # 8 GPUs, 989 TFLOP/s (H100/H200 SXM bf16), 40% MFU
    python tools/sizes.py --gpus=64 --mfu=0.45

Per GPU, AdamW in fp32: weights, gradients and two moments are 16 bytes per parameter P under
DDP, 16P/N under FSDP2 plus two gathered bf16 blocks and their bf16 gradients (8 bytes per
block parameter); activations ~34*C*T*L bytes per sequence (Korthikanti et al. 2022, Eq. 2,
without the T x T scores flash attention does not keep). Days = tokens * flops_per_token /
(N * peak * MFU).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Runnable as `python tools/<name>.py` (or `python -m tools.<name>`): the repo root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import PRESETS, Llama, build_config
from nanowso.common import parse_args

MICRO_BATCH = {"125m": 16, "350m": 8, "1b": 4, "8b": 1}  # sequences of seq_len per GPU, recommended
BUDGETS = {"1b": [("Table 6", 350e9), ("Table 7", 2e12)], "8b": [("Table 6", 500e9)]}  # the paper's tokens


@dataclass
class SizesConfig:
    gpus: int = 8
    seq_len: int = 2048
    peak: float = 989e12  # FLOP/s per GPU (bench.BF16_PEAKS)
    mfu: float = 0.40


def main(cfg):
    gib = 2**30
    print(f"{cfg.gpus} GPUs, seq_len {cfg.seq_len}, {cfg.peak / 1e12:.0f} TFLOP/s at {100 * cfg.mfu:.0f}% MFU")
    for name, micro in MICRO_BATCH.items():
        model_cfg = build_config(name, vocab_size=PRESETS[name]["vocab_size"] or 100288, max_seq_len=cfg.seq_len)
        with torch.device("meta"):
            model = Llama(model_cfg)
        params, block = model.num_params(), sum(p.numel() for p in model.layers[0].parameters())
        activations = 34 * model_cfg.dim * cfg.seq_len * model_cfg.n_layers * micro
        ddp, fsdp = 16 * params + activations, 16 * params / cfg.gpus + 8 * block + activations
        days = ", ".join(f"{table} {tokens / 1e9:,.0f}B tokens: "
                         f"{tokens * model.flops_per_token(cfg.seq_len) / (cfg.gpus * cfg.peak * cfg.mfu) / 86400:.1f} days"
                         for table, tokens in BUDGETS.get(name, []))
        print(f"{name:>5}: {params:,} parameters, micro-batch {micro}, activations {activations / gib:.1f} GiB, "
              f"per GPU: DDP {ddp / gib:.1f} GiB, FSDP2 {fsdp / gib:.1f} GiB{'; ' + days if days else ''}")


if __name__ == "__main__":
    main(parse_args(SizesConfig, description=__doc__))
