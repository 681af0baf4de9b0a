"""Shared fixtures for every level (unit/, proxy/, e2e/, kernels/): a tiny model built offline. The servers the
tests start come from testkit."""

from __future__ import annotations

from pathlib import Path

import pytest

# Imported up front, as when this file also served the router: the CLI imports transformers, hence torch and
# triton, so tests/kernels/test_kernels.py re-runs its tests in a child process with TRITON_INTERPRET=1 instead of
# setting that variable in this process, where every later subprocess (vLLM replicas among them) would inherit it.
import preble_router.cli  # noqa: F401
from testkit.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", size="tiny")
