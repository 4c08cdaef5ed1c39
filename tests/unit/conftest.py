"""Unit-test fixtures: the tiny model files of both families (see ``families.py``), one intra-op thread."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_file(fam)``: the family's tiny checkpoint (its published layout, seed 0), written once per session."""
    from families import tiny_file_writer  # imported here so that collecting other tests imports no family

    return tiny_file_writer(tmp_path_factory.mktemp("tiny_families"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny matmuls
    on a shared 2-core machine run several times faster on one thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dit_file(tmp_path_factory) -> Path:
    """The tiny K5 DiT file (official layout), written once per session."""
    from cinetune.k5.tiny import write_tiny_dit

    return write_tiny_dit(tmp_path_factory.mktemp("dit") / "tiny_k5.safetensors")
