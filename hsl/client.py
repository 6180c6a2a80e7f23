"""The client commands: submit, status, wait, results (talking HTTP to a running service)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(SystemExit):
    pass


class Client:
    def __init__(self, url: str, key: str | None, timeout: float = 30.0):
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kw: Any):
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ClientError(
                f"hsl: cannot reach the service at {self.url} ({exc}); "
                "start one with 'hsl serve' or pass --url"
            ) from None
        if r.status_code >= 400:
            raise ClientError(_problem_text(r))
        return r

    def get_json(self, path: str) -> Any:
        return self.request("GET", path).json()


def _problem_text(r) -> str:
    try:
        body = r.json()
    except ValueError:
        return f"hsl: HTTP {r.status_code}: {r.text[:300]}"
    lines = [f"hsl: {body.get('title', 'error')} ({r.status_code}): {body.get('detail', '')}"]
    for err in body.get("errors") or []:
        lines.append(f"  {err.get('field')}: {err.get('message')}")
    return "\n".join(lines)


def _client(args: argparse.Namespace) -> Client:
    from service.config import Settings

    settings = Settings()
    key = args.key or (settings.api_key.get_secret_value() if settings.api_key else None)
    return Client(args.url or settings.url, key)


def cmd_submit(args: argparse.Namespace) -> int:
    from .cli import load_spec

    spec = load_spec(args.spec)
    client = _client(args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    r = client.request(
        "POST", "/v1/experiments", json=spec.model_dump(mode="json"), headers=headers
    )
    doc = r.json()
    note = "submitted" if r.status_code == 201 else "already submitted (same spec)"
    print(
        f"hsl: {note}: {doc['name']} {doc['id']} ({doc['status']}, "
        f"{doc['progress']['points_total']} points)",
        file=sys.stderr,
    )
    print(doc["id"])
    if args.wait:
        return _wait(client, doc["id"], quiet=False, timeout=None)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    doc = _client(args).get_json(f"/v1/experiments/{args.id}")
    print(json.dumps(doc, indent=1))
    return 0


def _bar(doc: dict[str, Any]) -> str:
    from .cli import _duration

    p = doc["progress"]
    width = 28
    fill = int(width * p["fraction"])
    return (
        f"[{'#' * fill}{'.' * (width - fill)}] {p['points_done']}/{p['points_total']} "
        f"points  {doc['status']}  ETA {_duration(p['eta_seconds'])}"
    )


def _wait(
    client: Client, exp_id: str, *, quiet: bool, timeout: float | None, interval: float = 1.0
) -> int:
    tty = sys.stderr.isatty()
    start = time.monotonic()
    last = None
    while True:
        doc = client.get_json(f"/v1/experiments/{exp_id}")
        if not quiet:
            line = _bar(doc)
            if tty:
                sys.stderr.write("\r" + line.ljust(100))
            elif line != last:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()
            last = line
        if doc["status"] in TERMINAL:
            if not quiet and tty:
                sys.stderr.write("\n")
            break
        if timeout is not None and time.monotonic() - start > timeout:
            print(f"hsl: still {doc['status']} after {timeout:g} s", file=sys.stderr)
            return 3
        time.sleep(interval)
    if doc["status"] != "succeeded":
        err = doc.get("error") or {}
        print(
            f"hsl: experiment {exp_id} {doc['status']}"
            + (f": {err.get('reason')}: {err.get('message')}" if err else ""),
            file=sys.stderr,
        )
        return 1
    print(
        f"hsl: experiment {exp_id} succeeded; 'hsl results {exp_id}' gets the results",
        file=sys.stderr,
    )
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    return _wait(_client(args), args.id, quiet=args.quiet, timeout=args.timeout)


def cmd_results(args: argparse.Namespace) -> int:
    client = _client(args)
    base = f"/v1/experiments/{args.id}"
    if args.csv:
        text = client.request("GET", f"{base}/results.csv").text
    else:
        text = json.dumps(client.get_json(f"{base}/results"), indent=1) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"hsl: wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.plots:
        from .plots import FORMATS, PLOT_NAMES

        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        for name in PLOT_NAMES:
            for fmt in FORMATS:
                path = out / f"{name}.{fmt}"
                path.write_bytes(client.request("GET", f"{base}/plots/{name}.{fmt}").content)
        print(f"hsl: plots in {out}/", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    def common(p):
        p.add_argument("--url", help="the service (default $HSL_URL or http://127.0.0.1:8000)")
        p.add_argument("--key", help="API key (default $HSL_API_KEY)")

    p = sub.add_parser("submit", help="submit a spec file or preset to a running service")
    p.add_argument("spec", help="a spec JSON file or a preset name")
    p.add_argument("--wait", action="store_true", help="then wait for it, with a progress bar")
    p.add_argument("--idempotency-key", help="makes a retried submission safe")
    common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="print an experiment's status document")
    p.add_argument("id")
    common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", help="wait for an experiment to finish, with a progress bar")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, default=None, help="give up after SECONDS (exit 3)")
    p.add_argument("--quiet", action="store_true")
    common(p)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("results", help="fetch an experiment's results (JSON, CSV, plots)")
    p.add_argument("id")
    p.add_argument("--csv", action="store_true", help="the points as CSV instead of JSON")
    p.add_argument("--out", help="write to a file instead of stdout")
    p.add_argument("--plots", metavar="DIR", help="also download the PNG and SVG plots")
    common(p)
    p.set_defaults(func=cmd_results)
