"""Entry point of the gateway: load the config, refuse an unsafe bind, serve until SIGINT/SIGTERM."""

from __future__ import annotations

from shared.config import Settings
from shared.entry import service_main

from .security import check_bind
from .service import GatewayService


def main(argv: list[str] | None = None) -> int:
    def check(settings: Settings) -> None:
        check_bind(settings.config.gateway.host, settings.token, settings.path)

    return service_main("gateway", "runwire gateway: live events and the HTTP API", argv, GatewayService, check)
