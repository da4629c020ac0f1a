"""Fixtures shared by every test package (areas add their own conftest.py)."""

from __future__ import annotations

import os

import pytest

# Tests are CPU tests: keep torch from oversubscribing the two cores of CI.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def single_process_parallel():
    """Megatron-Core parallel state for one process (TP=PP=DP=1), shared by a session."""
    from megatron_sfm.config import ParallelConfig
    from megatron_sfm.model.parallel import initialize_parallel

    initialize_parallel(ParallelConfig())
    yield
