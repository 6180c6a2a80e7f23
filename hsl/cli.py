"""The ``hsl`` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import hsl_engine as he

from . import client, document, server


def load_spec(arg: str) -> he.ExperimentSpec:
    """A spec from a JSON file path or a preset name."""
    path = Path(arg)
    if path.suffix == ".json" or path.exists():
        try:
            text = path.read_text()
        except OSError as exc:
            raise SystemExit(f"hsl: cannot read spec file {arg}: {exc.strerror}") from None
        try:
            return he.parse_spec(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"hsl: {arg} is not valid JSON: {exc}") from None
    try:
        return he.preset(arg)
    except KeyError:
        raise SystemExit(
            f"hsl: {arg!r} is neither a spec file nor a preset; presets: "
            + ", ".join(he.preset_names())
        ) from None


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A one-line progress bar on a terminal; one line per point otherwise."""

    def __init__(self, spec: he.ExperimentSpec, stream: TextIO, *, enabled: bool = True):
        self.spec = spec
        self.total = he.points_total(spec)
        self.done: list[he.Point] = []
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self.start = time.perf_counter()

    def __call__(self, p: he.Point) -> None:
        self.done.append(p)
        if not self.enabled:
            return
        k = len(self.done)
        eta = he.expected_seconds(self.spec, self.done)
        width = 28
        fill = int(width * k / self.total)
        bar = "#" * fill + "." * (width - fill)
        line = (
            f"[{bar}] {k}/{self.total} points  "
            f"elapsed {_duration(time.perf_counter() - self.start)}"
            f"  ETA {_duration(eta)}  ({p.method} seed {p.seed} n={p.n}: mse {p.mse:.3f})"
        )
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
            if k == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def summary_text(doc: dict[str, Any]) -> str:
    """Thresholds against theory, and the fitted exponent against theory, as text tables."""
    lines = []
    spec = doc["spec"]
    m = spec["model"]
    lines.append(
        f"{spec['name']}: d={m['d']} q={m['q']} d1={doc['d1']} D={doc['feature_dim']} "
        f"gamma={m['gamma']} g={m['activation']} features={m['features']}"
    )
    lines.append("")
    lines.append("per-feature recovery threshold (n where seed-mean cos2 reaches 1/2)")
    lines.append(f"{'i':>3} {'|lambda_i|':>10} {'n_half':>10} {'theory':>10} {'ratio':>6}")
    for t in doc["thresholds"]:
        ratio = t["n_half"] / t["n_half_theory"] if t["n_half"] and t["n_half_theory"] else None
        mark = " (<=, already at the first n)" if t.get("censored") == "left" else ""
        lines.append(
            f"{t['feature']:>3} {t['weight']:>10.4f} {_fmt(t['n_half'], '>10.4g')} "
            f"{_fmt(t['n_half_theory'], '>10.4g')} {_fmt(ratio, '>6.2f')}{mark}"
        )
    lines.append("")
    pl = doc.get("power_law")
    if pl is None:
        lines.append("power law: not enough points in the recovery window yet")
    elif pl.get("exponent") is None:
        lines.append(f"power law ({pl['method']}): not fitted: {pl.get('reason')}")
    else:
        ci = pl["exponent_ci"]
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        lines.append(
            f"power law ({pl['method']}, n in [{pl['n_range'][0]}, {pl['n_range'][1]}], "
            f"{pl['n_points']} points, {len(pl.get('seeds') or [])} seeds): exponent "
            f"{pl['exponent']:.3f}{ci_text} (95 % t interval over seeds)"
        )
        lines.append(
            f"  theory: asymptotic {_fmt(pl['exponent_theory'], '.3f')}, "
            f"theory curve over the same window {_fmt(pl['exponent_theory_curve'], '.3f')}"
        )
    lines.append("")
    lines.append("final MSE by method (largest n, mean over seeds)")
    for method, rows in doc["curves"].items():
        if rows:
            last = rows[-1]
            lines.append(
                f"  {method:<20} n={last['n']:<9} mse {last['mse_mean']:.4f}"
                + (f" +- {last['mse_sem']:.4f}" if last["mse_sem"] is not None else "")
            )
    return "\n".join(lines)


# Sustained rates of the engine's operator, for quoting what hardware a spec needs:
# measured 2-core CPU (float32 ~125, float64 ~65 GFLOP/s; see README, Performance) and a
# nominal data-centre GPU (float32 ~30 TFLOP/s sustained; not measured here).
CPU_FLOPS = {"float32": 1.2e11, "float64": 6e10}
GPU_FLOPS = 3e13


def _work_time(seconds: float) -> str:
    """A long duration in its largest unit: ``19.5 h``, ``663 days``."""
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.2g} s"


def hardware_quote(spec: he.ExperimentSpec, est: he.ResourceEstimate) -> str:
    """Estimated peak memory and work, and the time that work takes on 2 CPU cores and on
    one GPU, so a user sees which hardware a spec needs before it starts."""
    cpu = est.flops / CPU_FLOPS[spec.solver.dtype]
    gpu = est.flops / GPU_FLOPS
    streamed = ", samples streamed" if est.streamed else ""
    return (
        f"estimated peak memory {est.peak_bytes / 2**30:.2f} GiB{streamed}, "
        f"{est.flops:.2e} flops: ~{_work_time(cpu)} on 2 CPU cores, ~{_work_time(gpu)} on one GPU"
    )


def with_device(spec: he.ExperimentSpec, device: str | None, backend: str | None):
    """The spec with ``device`` and ``solver.backend`` overridden (validated again)."""
    if device is None and backend is None:
        return spec
    data = spec.model_dump(mode="json")
    if device is not None:
        data["device"] = device
    if backend is not None:
        data["solver"]["backend"] = backend
    try:
        return he.parse_spec(data)
    except he.SpecError as exc:
        raise SystemExit(f"hsl: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    spec = with_device(load_spec(args.spec), args.device, args.backend)
    try:  # a device this machine lacks fails here, before anything runs
        backend = he.spec_backend(spec, threads=args.threads)
    except he.DeviceError as exc:
        print(f"hsl: {exc}", file=sys.stderr)
        return 2
    est = he.estimate_resources(spec, device=backend.device)
    print(
        f"hsl run {spec.name} on {backend.device} ({backend.array_backend}): {est.points} points, "
        f"{hardware_quote(spec, est)}",
        file=sys.stderr,
    )
    progress = Progress(spec, sys.stderr, enabled=not args.quiet)
    try:
        result = he.run_experiment(spec, on_point=progress, threads=args.threads)
    except he.EngineError as exc:
        print(f"hsl: {exc}", file=sys.stderr)
        return 2
    doc = document.results_document(spec, result.points, complete=True)
    out = Path(args.out) if args.out else Path(f"{spec.name}-results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(summary_text(doc))
    print(f"\nresults: {out}")
    if args.plots:
        from . import plots

        paths = plots.write_plots(doc, args.plots)
        print(f"plots: {', '.join(str(p) for p in paths)}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({n: he.PRESETS[n] for n in he.preset_names()}, indent=1))
        return 0
    for name in he.preset_names():
        spec = he.preset(name)
        est = he.estimate_resources(spec)
        cpu = _work_time(est.flops / CPU_FLOPS[spec.solver.dtype])
        print(
            f"{name:<16} {est.points:>4} points  ~{est.flops:8.1e} flops  "
            f"{est.peak_bytes / 2**30:6.2f} GiB  ~{cpu:>10} on 2 cores  "
            f"{he.preset_description(name)}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.device is not None or args.backend == "torch":
        return bench.main_device(
            device=args.device or "cpu", quick=args.quick, threads=args.threads
        )
    return bench.main(quick=args.quick, threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsl", description="Simulate the hierarchical scaling-law model."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a spec or preset locally, with a progress bar")
    run.add_argument("spec", help="a spec JSON file or a preset name (see 'hsl presets')")
    run.add_argument("--out", help="results JSON path (default: NAME-results.json)")
    run.add_argument("--plots", metavar="DIR", help="write PNG and SVG figures to DIR")
    run.add_argument("--threads", type=int, default=None, help="worker threads (default: cores)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--device", help="override the spec's device: auto, cpu, cuda, cuda:N")
    run.add_argument(
        "--backend", choices=["auto", "numpy", "torch"], help="override solver.backend"
    )
    run.set_defaults(func=cmd_run)

    presets = sub.add_parser("presets", help="list the named specs")
    presets.add_argument("--json", action="store_true", help="print the specs as JSON")
    presets.set_defaults(func=cmd_presets)

    bench = sub.add_parser(
        "bench", help="measure the engine against matmul peak and a dense reference"
    )
    bench.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument(
        "--device",
        default=None,
        help="bench the PyTorch backend on this device (cuda, cuda:N, or cpu): GEMM peaks, "
        "operator TFLOP/s, a fig2-d120 sweep, agreement with NumPy",
    )
    bench.add_argument(
        "--backend", choices=["numpy", "torch"], default="numpy", help="torch: as --device cpu"
    )
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser(
        "serve", help="the API with the embedded default (SQLite under ./.hsl/, in-process worker)"
    )
    serve.add_argument("--host", default=None, help="default 127.0.0.1 (or $HSL_HOST)")
    serve.add_argument("--port", type=int, default=None, help="default 8000 (or $HSL_PORT)")
    serve.set_defaults(func=lambda a: server.serve(a.host, a.port))

    api = sub.add_parser("api", help="the API of the distributed stack (HSL_BROKER_URL, ...)")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=int, default=None)
    api.set_defaults(func=lambda a: server.api(a.host, a.port))

    worker = sub.add_parser("worker", help="a Celery worker executing runs")
    worker.add_argument("--queues", default="cpu", help="comma-separated: cpu, gpu (default cpu)")
    worker.add_argument("--concurrency", type=int, default=1, help="processes (default 1)")
    worker.set_defaults(func=lambda a: server.worker(a.queues, a.concurrency))

    reaper = sub.add_parser("reaper", help="requeue runs of lost workers, publish unclaimed runs")
    reaper.set_defaults(func=lambda a: server.reaper())

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply the migrations to HSL_DATABASE_URL").set_defaults(
        func=lambda a: server.db_upgrade()
    )

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="mint a key for a tenant (printed once)")
    create.add_argument("--tenant", required=True)
    create.set_defaults(func=lambda a: server.keys_create(a.tenant))
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its first characters")
    revoke.add_argument("prefix")
    revoke.set_defaults(func=lambda a: server.keys_revoke(a.prefix))

    client.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except he.SpecError as exc:
        print("hsl: invalid spec:", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err['field']}: {err['message']}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
