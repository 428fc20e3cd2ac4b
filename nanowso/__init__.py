"""The library under the top-level scripts: checkpoints, the process a loop runs in, AdamW,
where a run starts, the SFT sweep's bookkeeping, scoring, the lm-eval adapter, the AlpacaEval judge and FSDP2."""
