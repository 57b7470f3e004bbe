"""Where a Prometheus endpoint listens, checked the same way for the aggregator and the sites.

Both `server.exporter` (the aggregator's dashboard and /metrics) and `client.site_metrics` (a
site's /metrics) take their port and host from here, so the two refuse a bad value with the same
message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_HOST = "127.0.0.1"


class MetricsPortError(ValueError):
    """The metrics port cannot be listened on; the message says which flag to change."""


@dataclass(frozen=True)
class MetricsSettings:
    """Where the exporter listens; port 0 turns it off."""

    port: int = 0
    host: str = DEFAULT_HOST

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise MetricsPortError(
                f"metrics-port must be between 0 (off) and 65535, got {self.port!r}"
            )
        if not self.host:
            raise MetricsPortError("metrics-host must not be empty; use e.g. 127.0.0.1")

    @classmethod
    def split_run_config(
        cls, run_config: Mapping[str, Any]
    ) -> tuple[MetricsSettings, dict[str, Any]]:
        """Take `metrics-port`/`metrics-host` out of a Flower run config; returns the rest."""
        rest = dict(run_config)
        raw_port = rest.pop("metrics-port", 0)
        host = str(rest.pop("metrics-host", DEFAULT_HOST))
        try:
            port = int(raw_port)
        except (TypeError, ValueError):
            raise MetricsPortError(
                f"metrics-port must be a whole number (0 turns metrics off), got {raw_port!r}"
            ) from None
        return cls(port=port, host=host), rest
