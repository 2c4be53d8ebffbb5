"""The test harness itself: ports from below the kernel's ephemeral range (where outgoing connections
take their source ports), and a service that cannot start leaves no open log file behind (the suite
turns warnings into errors, so a leaked file fails some later, unrelated test)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.harness import Service, _ephemeral_low, free_port, write_config


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    if _ephemeral_low() - 15000 >= 2000:
        assert max(ports) < _ephemeral_low()
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_service_that_cannot_start_fails_with_its_log_and_closes_it(tmp_path: Path) -> None:
    cfg, ports = write_config(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.runner_control))
        squatter.listen()
        svc = Service("runner_svc", cfg, tmp_path)
        with pytest.raises(AssertionError, match="Address already in use"):
            svc.start(timeout=30)
    assert svc._log.closed
    assert svc.proc is not None and svc.proc.poll() is not None
