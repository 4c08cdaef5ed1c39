"""Shared fixtures: real tokenizers and media provisioned by ``scripts/provision_test_data.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import provision_test_data  # noqa: E402


@pytest.fixture(scope="session")
def test_data() -> dict[str, Path]:
    """Paths by name: ``qwen_tokenizer``, ``clip_tokenizer`` (folders), ``bbb`` (mp4), photos."""
    return provision_test_data.provision()


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(test_data) -> Path:
    return test_data["qwen_tokenizer"]


@pytest.fixture(scope="session")
def clip_tokenizer_dir(test_data) -> Path:
    return test_data["clip_tokenizer"]
