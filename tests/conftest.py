"""Fixtures shared by the suite: services as real processes, always stopped at the end of a test; and a
check that no test leaves a ZeroMQ context or socket of this process open."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.harness import Service


def _open_zmq() -> dict[int, str]:
    """Every ZeroMQ context and socket of this process not closed yet, by id, with what it is."""
    found = {}
    for obj in gc.get_objects():
        if isinstance(obj, (zmq.Context, zmq.Socket)) and not obj.closed:
            if getattr(type(obj), "_instance", None) is obj:
                continue  # Context.instance(): the process-wide context, by design never terminated
            kind = "context" if isinstance(obj, zmq.Context) else f"socket type {obj.type}"
            found[id(obj)] = f"{type(obj).__module__}.{type(obj).__qualname__} ({kind})"
    return found


@pytest.fixture(autouse=True)
def no_zmq_left_open(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test that leaves a ZeroMQ context or socket open (after collecting garbage): a leak here
    is a leak in a service run in-process, or a peer that would hold a port into the next test."""
    before = _open_zmq()
    yield
    gc.collect()
    left = {k: v for k, v in _open_zmq().items() if k not in before}
    if left:
        pytest.fail(f"{request.node.nodeid} left {len(left)} ZeroMQ object(s) open: {sorted(left.values())}",
                    pytrace=False)


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
