"""The study and comparison commands: ``hsl study submit|status|results|plots`` and ``hsl
compare ID ID ...`` (talking HTTP to a running service through `hsl.client`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import hsl_engine as he

from . import client, studies
from .client import TERMINAL


def _value(text: str) -> Any:
    """An axis value as JSON (``0.4``, ``true``, ``"tanh"``), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def usage_error(message: str) -> SystemExit:
    """Print ``message`` and exit with status 2 (bad input on the command line)."""
    print(f"hsl: {message}", file=sys.stderr)
    return SystemExit(2)


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``model.gamma=0.4,0.6`` -> ``("model.gamma", [0.4, 0.6])``; exit 2 when malformed."""
    path, sep, values = text.partition("=")
    if not sep or not path.strip() or not values.strip():
        raise usage_error(f"--axis {text!r}: expected PATH=V1,V2,... (e.g. model.gamma=0.4,0.6)")
    return path.strip(), [_value(v.strip()) for v in values.split(",")]


def study_body(spec_arg: str, axes: list[str], name: str | None) -> dict[str, Any]:
    """The body of ``POST /v1/studies``: a study preset (its axes, overridden by ``axes``),
    or a spec file or experiment preset as the base with ``axes``."""
    if spec_arg in studies.STUDY_PRESETS:
        body = studies.study_preset(spec_arg)
    else:
        from .cli import load_spec

        body = {"base": load_spec(spec_arg).model_dump(mode="json"), "axes": {}}
        body["name"] = body["base"]["name"]
    for text in axes:
        path, values = parse_axis(text)
        body["axes"][path] = values
    if not body["axes"]:
        raise usage_error(
            "a study needs at least one --axis PATH=V1,V2,... (or a study preset: "
            + ", ".join(studies.study_preset_names())
            + ")"
        )
    try:  # the service checks it again; bad axes fail here before anything is sent
        studies.expand(he.parse_spec(body["base"]), body["axes"], max_members=4096)
    except studies.StudyError as exc:
        lines = "\n".join(f"  {e['field']}: {e['message']}" for e in exc.errors)
        raise usage_error(f"invalid study:\n{lines}") from None
    if name:
        body["name"] = name
    return body


def _bar(doc: dict[str, Any]) -> str:
    from .cli import _duration

    p = doc["progress"]
    width = 28
    fill = int(width * p["fraction"])
    members = ", ".join(f"{n} {s}" for s, n in sorted(p["members"].items()))
    return (
        f"[{'#' * fill}{'.' * (width - fill)}] {p['points_done']}/{p['points_total']} points  "
        f"{doc['status']} ({members})  ETA {_duration(p['eta_seconds'])}"
    )


def wait_study(
    c: client.Client, study_id: str, *, timeout: float | None = None, interval: float = 1.0
) -> int:
    """Poll the study until it is terminal, with a progress line; 0 when it succeeded."""
    tty = sys.stderr.isatty()
    start, last = time.monotonic(), None
    while True:
        doc = c.get_json(f"/v1/studies/{study_id}")
        line = _bar(doc)
        if tty:
            sys.stderr.write("\r" + line.ljust(110))
        elif line != last:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        last = line
        if doc["status"] in TERMINAL:
            if tty:
                sys.stderr.write("\n")
            break
        if timeout is not None and time.monotonic() - start > timeout:
            print(f"hsl: still {doc['status']} after {timeout:g} s", file=sys.stderr)
            return 3
        time.sleep(interval)
    if doc["status"] != "succeeded":
        print(f"hsl: study {study_id} {doc['status']}", file=sys.stderr)
        return 1
    print(
        f"hsl: study {study_id} succeeded; 'hsl study results {study_id}' gets the results",
        file=sys.stderr,
    )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    body = study_body(args.spec, args.axis or [], args.name)
    if args.tag:
        body["tags"] = args.tag
    c = client._client(args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    doc = c.request("POST", "/v1/studies", json=body, headers=headers).json()
    reused = sum(
        1 for m in doc["members"] if m["status"] != "queued" or m["progress"]["points_done"]
    )
    print(
        f"hsl: submitted study {doc['name']} {doc['id']}: {len(doc['members'])} members "
        f"({reused} already under way or done), {doc['progress']['points_total']} points",
        file=sys.stderr,
    )
    print(doc["id"])
    if args.wait:
        return wait_study(c, doc["id"], timeout=args.timeout)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    doc = client._client(args).get_json(f"/v1/studies/{args.id}")
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{doc['name']} {doc['id']}: {doc['status']}  {_bar(doc)}")
    for m in doc["members"]:
        p = m["progress"]
        print(
            f"  {studies.param_label(m['params']):<32} {m['experiment_id'] or '-':<32} "
            f"{m['status']:<10} {p['points_done']}/{p['points_total']}"
        )
    return 0


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def results_table(doc: dict[str, Any]) -> str:
    """Per member: fitted exponent with CI against theory, and n_half / n_half_theory of
    each direction reached."""
    lines = [
        f"{doc['name']} ({doc['status']}): MSE exponent and recovery thresholds per member",
        f"{'member':<28} {'exponent':>9} {'CI':>17} {'theory':>7}  n_half / theory (i = 1..)",
    ]
    for m in doc["members"]:
        pl = m["power_law"] or {}
        ci = pl.get("exponent_ci")
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        ratios = []
        for t in m["thresholds"]:
            if t.get("n_half") and t.get("n_half_theory"):
                ratios.append(f"{t['n_half'] / t['n_half_theory']:.2f}")
            else:
                ratios.append("-")
        lines.append(
            f"{studies.param_label(m['params'])[:28]:<28} {_fmt(pl.get('exponent')):>9} "
            f"{ci_text:>17} {_fmt(pl.get('exponent_theory')):>7}  {' '.join(ratios[:8])}"
        )
    return "\n".join(lines)


def cmd_results(args: argparse.Namespace) -> int:
    doc = client._client(args).get_json(f"/v1/studies/{args.id}/results")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"hsl: wrote {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(results_table(doc))
    return 0


def _download(c: client.Client, links: dict[str, dict[str, str]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, by_format in links.items():
        for fmt, url in by_format.items():
            path = out / f"{name}.{fmt}"
            path.write_bytes(c.request("GET", url).content)
            paths.append(path)
    return paths


def cmd_plots(args: argparse.Namespace) -> int:
    c = client._client(args)
    doc = c.get_json(f"/v1/studies/{args.id}")
    paths = _download(c, doc["links"]["plots"], Path(args.plots))
    print(f"hsl: {len(paths)} plots in {args.plots}/", file=sys.stderr)
    return 0


def compare_table(doc: dict[str, Any]) -> str:
    lines = ["spec differences:"]
    if not doc["differences"]:
        lines.append("  none (the same spec)")
    for path, values in doc["differences"].items():
        lines.append(f"  {path}: " + " | ".join(json.dumps(v) for v in values))
    lines.append("")
    lines.append(f"{'experiment':<34} {'status':<10} {'exponent':>9} {'theory':>7}  n_half_1")
    for e in doc["experiments"]:
        pl = e["power_law"] or {}
        t1 = next((t for t in e["thresholds"] if t["feature"] == 1), None)
        nh = "-"
        if t1:
            nh = f"{_fmt(t1.get('n_half'), '.4g')} (theory {t1['n_half_theory']:.4g})"
        lines.append(
            f"{e['name'][:20] + ' ' + e['experiment_id'][:12]:<34} {e['status']:<10} "
            f"{_fmt(pl.get('exponent')):>9} {_fmt(pl.get('exponent_theory')):>7}  {nh}"
        )
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    if len(args.ids) < 2:
        raise usage_error("compare needs at least two experiment ids")
    c = client._client(args)
    ids = ",".join(args.ids)
    doc = c.request("GET", "/v1/compare", params={"ids": ids}).json()
    print(json.dumps(doc, indent=1) if args.json else compare_table(doc))
    if args.plots:
        links = {
            name: {fmt: f"{url}&x={args.x}" for fmt, url in by.items()}
            for name, by in doc["plots"].items()
        }
        paths = _download(c, links, Path(args.plots))
        print(f"hsl: {len(paths)} plots in {args.plots}/", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    def common(p):
        p.add_argument("--url", help="the service (default $HSL_URL or http://127.0.0.1:8000)")
        p.add_argument("--key", help="API key (default $HSL_API_KEY)")

    study = sub.add_parser("study", help="studies: grids of experiments over spec fields")
    ssub = study.add_subparsers(dest="study_command", required=True)

    p = ssub.add_parser("submit", help="submit a study to a running service")
    p.add_argument(
        "spec",
        help="a study preset (" + ", ".join(studies.study_preset_names()) + "), or a spec "
        "file or experiment preset as the base",
    )
    p.add_argument(
        "--axis",
        action="append",
        metavar="PATH=V1,V2,...",
        help="an axis of the grid, e.g. model.gamma=0.4,0.6 (repeatable; replaces a study "
        "preset's axis of the same path)",
    )
    p.add_argument("--name", help="the study's name (default the preset's or the spec's)")
    p.add_argument("--tag", action="append", help="a tag (repeatable)")
    p.add_argument("--wait", action="store_true", help="then wait for it, with a progress bar")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up (exit 3)")
    p.add_argument("--idempotency-key", help="makes a retried submission safe")
    common(p)
    p.set_defaults(func=cmd_submit)

    p = ssub.add_parser("status", help="a study's status and its members")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print the status document")
    common(p)
    p.set_defaults(func=cmd_status)

    p = ssub.add_parser("results", help="exponents and thresholds per member")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print the results document")
    p.add_argument("--out", help="also write the results document to this file")
    common(p)
    p.set_defaults(func=cmd_results)

    p = ssub.add_parser("plots", help="download the study's figures (mse, exponent, collapse)")
    p.add_argument("id")
    p.add_argument("--plots", metavar="DIR", required=True, help="where to write them")
    common(p)
    p.set_defaults(func=cmd_plots)

    p = sub.add_parser("compare", help="compare experiments: curves, exponents, differences")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--plots", metavar="DIR", help="also download the overlaid figures")
    p.add_argument(
        "--x",
        choices=["n", "n_over_n_half"],
        default="n",
        help="x axis of the figures: n, or n / n_half_theory of the first direction",
    )
    p.add_argument("--json", action="store_true", help="print the comparison document")
    common(p)
    p.set_defaults(func=cmd_compare)
