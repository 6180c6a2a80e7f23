"""A small HTTP/1.1 load generator for the load scenarios: asyncio streams on loopback, keep-
alive connections, a few microseconds of client work per request (httpx would spend more
CPU than the server on these 2 cores). Every wait is bounded."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

REQUEST_TIMEOUT = 10.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


class Conn:
    """One keep-alive connection; reconnects when the server closed it."""

    def __init__(self, port: int, headers: dict[str, str] | None = None):
        self.port = port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Answer:
        start = time.perf_counter()
        try:
            return await asyncio.wait_for(
                self._request(method, path, body, headers, start), timeout
            )
        except BaseException:
            self.close()
            raise

    async def _request(self, method, path, body, headers, start) -> Answer:
        if self.writer is None:
            await self._open()
        assert self.reader is not None and self.writer is not None
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        length = f"content-length: {len(body)}\r\n".encode() if body or method == "POST" else b""
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n".encode()
            + self.extra
            + extra
            + length
            + b"\r\n"
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
        data = await self.reader.readexactly(int(hdrs.get("content-length", "0")))
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return Answer(status, hdrs, data, time.perf_counter() - start)


@dataclass
class Tally:
    """Latencies and outcomes of a phase."""

    seconds: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, answer: Answer) -> None:
        self.seconds.append(answer.seconds)
        self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1

    def error(self, exc: BaseException) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}"[:200])

    def summary(self, wall: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": len(self.seconds),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": len(self.errors),
        }
        if self.seconds:
            out.update(
                p50_ms=round(percentile(self.seconds, 50) * 1000, 1),
                p99_ms=round(percentile(self.seconds, 99) * 1000, 1),
                max_ms=round(max(self.seconds) * 1000, 1),
            )
        if wall:
            out["per_second"] = round(len(self.seconds) / wall, 1)
            out["seconds"] = round(wall, 2)
        return out


def percentile(values: list[float], p: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, int(p) - 1))]
