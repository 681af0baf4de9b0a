"""Shared fixtures: a tiny model built offline (the servers the tests run come from testkit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", size="tiny")
