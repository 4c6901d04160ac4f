"""Fixtures of the metadata tests: a fresh view with only the root directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from efsish.meta.view import View
from tests.meta.views import T0


@pytest.fixture
def view(tmp_path: Path) -> View:
    v = View(tmp_path / "view.db")
    v.init_root("uuid", T0)
    return v
