"""hsl: scaling laws from sequential feature recovery, simulated.

``from hsl import Client, Results`` for notebooks: `hsl.client.Client` talks to a running
service, `hsl.results.Results` wraps a results document from the service or ``hsl run``.
"""

from __future__ import annotations

from typing import Any

_CLIENT = (
    "Client",
    "HslError",
    "NotFound",
    "ValidationError",
    "Unauthorized",
    "Conflict",
    "ServiceUnavailable",
    "Unreachable",
    "RateLimited",
    "NotAnHslService",
    "WaitTimeout",
)

__all__ = [*_CLIENT, "Results"]


def __getattr__(name: str) -> Any:  # imported on first use: ``import hsl`` stays light
    if name in _CLIENT:
        from . import client

        return getattr(client, name)
    if name == "Results":
        from .results import Results

        return Results
    raise AttributeError(f"module 'hsl' has no attribute {name!r}")
