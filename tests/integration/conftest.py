"""Fixtures shared by the integration tests."""

import os
from pathlib import Path

import pytest

from imgembed.store import embedded


@pytest.fixture
def data_dir():
    """This test's data directory (set by tests/conftest.py); its embedded server is stopped
    afterwards, whoever started it."""
    folder = Path(os.environ["IMGEMBED_DATA_DIR"])
    yield folder
    embedded.stop(folder)
