"""Unit-test fixtures: the tiny model files of both families (see ``families.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_file(fam)``: the family's tiny checkpoint (its published layout, seed 0), written once per session."""
    from families import tiny_file_writer  # imported here so that collecting other tests imports no family

    return tiny_file_writer(tmp_path_factory.mktemp("tiny_families"))
