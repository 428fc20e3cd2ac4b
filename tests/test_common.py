"""common.py: the RNG states a checkpoint keeps."""

import random

import numpy as np
import pytest
import torch

import common


def test_rng_state_round_trips_and_leaves_cuda_alone(monkeypatch):
    """Defect: every visible GPU's CUDA RNG state was saved, and restoring it on a node with
    fewer GPUs raised IndexError; nothing draws from the CUDA generator."""
    def refuse(*args):
        raise AssertionError("the CUDA RNG is neither saved nor restored")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    state = common.rng_state()
    assert set(state) == {"python", "numpy", "torch"}
    draws = random.random(), np.random.rand(), torch.rand(1).item()
    common.set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8})  # an older checkpoint's
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == pytest.approx(draws, abs=0)
