"""Shared fixtures: one tiny synthetic dataset per test session (written once, read-only after)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glad import synth

TINY_CATEGORIES = ("nut", "weave")

# The test machines have 2 shared cores. Intra-op threads there oversubscribe the CPU: small
# GEMM loops (K-MLE iterations) ran 10-40x slower with 2 threads than with 1 under load.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synth "tiny" preset for nut and weave, MVTec layout, seed 0. Treat it as read-only."""
    root = tmp_path_factory.mktemp("synth_tiny")
    folders = synth.generate_dataset(root, TINY_CATEGORIES, synth.PRESETS["tiny"], seed=0)
    assert [f.name for f in folders] == list(TINY_CATEGORIES)
    return root
