"""Endpoints as other hosts reach them: what a runner and a scheduler record in the cluster's state
(the runner registry, the scheduler lease) for the others to connect to."""

from __future__ import annotations

import socket

_WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]"})


def reachable_endpoint(endpoint: str) -> str:
    """A wildcard bind (tcp://*:5556, tcp://0.0.0.0:5556) names this host by its fully qualified name;
    any other endpoint is given as configured."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if sep and host in _WILDCARD_HOSTS:
        return f"tcp://{socket.getfqdn()}:{port}"
    return endpoint
