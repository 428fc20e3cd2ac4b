"""Fixtures shared by several test modules."""

import pytest
import torch

from data.testbed.prepare import prepare as prepare_testbed


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    """The offline testbed of 40 people (data/testbed/prepare.py, seed 0), prepared once per
    session: pretrain/, mid/ and the SFT files. A test that changes it works on a copy."""
    root = tmp_path_factory.mktemp("testbed")
    prepare_testbed(str(root), seed=0, n_people=40)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and on a shared machine every op of a
    multi-threaded run can stall at OpenMP barriers (100x slower HVPs were seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
