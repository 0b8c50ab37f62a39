"""Fixtures shared by the tests; the helpers they share are in tests/helpers.py."""

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, write_corpus


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora: $TSA_DATA_DIR, else ../shared/data beside the checkout."""
    root = Path(os.environ.get("TSA_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (root / "tinyshakespeare" / "input.txt").exists():
        pytest.skip(f"real corpora not found under {root}; set TSA_DATA_DIR")
    return root


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")
