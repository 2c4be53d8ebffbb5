"""Typed keys of what the gateway's aiohttp application holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry

from shared.config import Settings
from shared.httpapi import EventStreamHealth, RegistryHealth

from .metrics import GatewayStats
from .runindex import RunIndex

if TYPE_CHECKING:
    from .archiver import Archiver
    from .hub import Hub
    from .live import StreamClient

SETTINGS = web.AppKey("settings", Settings)
STATS = web.AppKey("stats", GatewayStats)
INDEX = web.AppKey("index", RunIndex)
HUB: web.AppKey["Hub"] = web.AppKey("hub")
ZMQ: web.AppKey[zmq.asyncio.Context] = web.AppKey("zmq")
REGISTRY = web.AppKey("registry", CollectorRegistry)
CLIENTS: web.AppKey["set[StreamClient]"] = web.AppKey("clients")
ARCHIVER: web.AppKey["Archiver"] = web.AppKey("archiver")
# cluster mode only: the checks /healthz adds (the event stream, the runner registry)
CLUSTER_HEALTH: web.AppKey["Callable[[], tuple[EventStreamHealth, RegistryHealth]]"] = web.AppKey("cluster_health")
