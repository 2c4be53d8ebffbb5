"""Fixtures shared by the suite: services as real processes, always stopped at the end of a test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Service


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    """Append started `Service`s here; each is stopped (and its output shown on failure) afterwards."""
    started: list[Service] = []
    yield started
    errors = []
    for svc in reversed(started):
        try:
            svc.stop()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        raise AssertionError("\n".join(errors))
