"""The ``hsl`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import hsl_engine as he

from . import cli_study, client, document, server


class UsageError(Exception):
    """A bad spec, spec file or argument: reported on stderr, exit status 2."""


def load_spec(arg: str) -> he.ExperimentSpec:
    """A spec from a JSON file path or a preset name.

    Raises
    ------
    UsageError
        For a file that cannot be read or is not JSON (naming the line and column), or a
        name that is neither a file nor a preset.
    hsl_engine.SpecError
        For a spec that breaks the rules (each bad field and its allowed range).
    """
    path = Path(arg)
    if path.suffix == ".json" or path.exists():
        return he.parse_spec(read_json(path, "spec file"))
    try:
        return he.preset(arg)
    except KeyError:
        raise UsageError(
            f"{arg!r} is neither a spec file nor a preset; presets: " + ", ".join(he.preset_names())
        ) from None


def read_json(path: Path, what: str) -> Any:
    """The JSON value in ``path``; `UsageError` naming the file and the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text: {exc.reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
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
    """A one-line progress bar on a terminal; one line per point otherwise.

    The ETA is the engine's (`hsl_engine.expected_seconds`, the service's too): the
    estimated work of the points left at the seconds per unit of work measured so far.
    ``done`` are points measured before (a resumed run): counted, and used to calibrate.
    """

    def __init__(
        self,
        spec: he.ExperimentSpec,
        stream: TextIO,
        *,
        enabled: bool = True,
        done: list[he.Point] | None = None,
        estimate: he.ResourceEstimate | None = None,
    ):
        self.spec = spec
        self.total = he.points_total(spec)
        self.done: list[he.Point] = list(done or [])
        self.estimate = estimate or he.estimate_resources(spec)
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self.start = time.perf_counter()

    def __call__(self, p: he.Point) -> None:
        self.done.append(p)
        if not self.enabled:
            return
        k = len(self.done)
        eta = he.expected_seconds(self.spec, self.done, estimate=self.estimate)
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
    exact = any(t.get("n_half_finite_size") is not None for t in doc["thresholds"])
    lines.append(
        f"{'i':>3} {'|lambda_i|':>10} {'n_half':>10} {'asymptotic':>10} {'ratio':>6}"
        + (f" {'exact':>10} {'ratio':>6}" if exact else "")
    )
    for t in doc["thresholds"]:
        ratio = t["n_half"] / t["n_half_theory"] if t["n_half"] and t["n_half_theory"] else None
        mark = " (<=, already at the first n)" if t.get("censored") == "left" else ""
        row = (
            f"{t['feature']:>3} {t['weight']:>10.4f} {_fmt(t['n_half'], '>10.4g')} "
            f"{_fmt(t['n_half_theory'], '>10.4g')} {_fmt(ratio, '>6.2f')}"
        )
        if exact:
            fs = t.get("n_half_finite_size")
            fs_ratio = t["n_half"] / fs if t["n_half"] and fs else None
            row += f" {_fmt(fs, '>10.4g')} {_fmt(fs_ratio, '>6.2f')}"
        lines.append(row + mark)
    if exact:
        lines.append(
            "  asymptotic: the BBP formula; exact: the finite-size theory (docs/theory.md)"
        )
    elif doc.get("theory", {}).get("finite_size_note"):
        lines.append(f"  no exact finite-size theory: {doc['theory']['finite_size_note']}")
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


# A nominal data-centre GPU's sustained rate (float32 ~30 TFLOP/s; not measured here), for
# quoting what hardware a spec needs. The 2-core CPU time comes from the engine's cost model.
GPU_FLOPS = 3e13


def cpu_seconds(spec: he.ExperimentSpec, est: he.ResourceEstimate) -> float:
    """Estimated seconds on 2 CPU cores: the engine's cost model (`ResourceEstimate.seconds`,
    the one the ETA, `hsl_engine.expected_seconds`, calibrates on the measured points)."""
    return est.seconds


def _work_time(seconds: float) -> str:
    """A long duration in its largest unit: ``19.5 h``, ``663 days``."""
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.2g} s"


def hardware_quote(spec: he.ExperimentSpec, est: he.ResourceEstimate) -> str:
    """Estimated peak memory and work, and the time that work takes on 2 CPU cores and on
    one GPU, so a user sees which hardware a spec needs before it starts."""
    cpu = cpu_seconds(spec, est)
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
    return he.parse_spec(data)  # a SpecError exits 2, naming the field


class StopAtBoundary:
    """SIGINT (Ctrl-C) asks the run to stop at the next point boundary; a second one stops
    it at once (KeyboardInterrupt). Installed for the duration of a ``with`` block."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.requested = False
        self._previous: Any = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.stream.write(
            "\nhsl: interrupted: stopping after the point in progress (Ctrl-C again to stop now)\n"
        )
        self.stream.flush()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopAtBoundary:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def write_document(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def load_partial(path: Path) -> tuple[he.ExperimentSpec, list[he.Point]]:
    """The spec and points of a results document written by ``hsl run`` (to resume it)."""
    doc = read_json(path, "results document")
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        raise UsageError(f"{path} is not a results document of 'hsl run' (no spec)")
    spec = he.parse_spec(doc["spec"])
    sizes = {n for n, _ in spec.sample_sizes()}
    methods = {m.name for m in spec.methods}
    points = []
    for i, raw in enumerate(doc.get("points") or []):
        try:
            p = document.point_from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{path}: points[{i}] is not a point: {exc}") from None
        if p.method not in methods or p.n not in sizes or not 0 <= p.seed < spec.sweep.seeds:
            raise UsageError(
                f"{path}: points[{i}] ({p.method}, seed {p.seed}, n={p.n}) is not a point of "
                "its spec"
            )
        points.append(p)
    return spec, points


def cmd_run(args: argparse.Namespace) -> int:
    if (args.spec is None) == (args.resume is None):
        raise UsageError("give a spec file or preset, or --resume FILE (not both)")
    done: list[he.Point] = []
    if args.resume is not None:
        spec, done = load_partial(Path(args.resume))
    else:
        spec = load_spec(args.spec)
    spec = with_device(spec, args.device, args.backend)
    try:  # a device this machine lacks fails here, before anything runs
        backend = he.spec_backend(spec, threads=args.threads)
    except he.DeviceError as exc:
        print(f"hsl: {exc}", file=sys.stderr)
        return 2
    est = he.estimate_resources(spec, device=backend.device)
    resumed = f", {len(done)} stored in {args.resume}" if args.resume else ""
    print(
        f"hsl run {spec.name} on {backend.device} ({backend.array_backend}): {est.points} points"
        f"{resumed}, {hardware_quote(spec, est)}",
        file=sys.stderr,
    )
    out = Path(args.out or args.resume or f"{spec.name}-results.json")
    progress = Progress(spec, sys.stderr, enabled=not args.quiet, done=done, estimate=est)
    points = list(done)
    # the exact finite-size theory depends on the spec alone: computed once, first, so that
    # every document written (the partial ones too) carries it without computing it again
    exact = document.exact_theory(spec)

    def on_point(p: he.Point) -> None:
        points.append(p)
        # the document on disk always holds every point measured: an interruption, even a
        # kill, loses at most the point in progress
        write_document(out, document.results_document(spec, points, complete=False, exact=exact))
        progress(p)

    with StopAtBoundary(sys.stderr) as stop:
        try:
            result = he.run_experiment(
                spec,
                on_point=on_point,
                threads=args.threads,
                done=done,
                should_stop=stop,
                exact=document.exact_from_json(exact),
            )
        except he.EngineError as exc:
            print(f"hsl: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            result = None
    complete = result is not None and len(result.points) == est.points
    doc = document.results_document(spec, points, complete=complete, exact=exact)
    write_document(out, doc)
    if not complete:
        print(
            f"hsl: stopped at a point boundary: {len(points)} of {est.points} points in {out}; "
            f"continue with: hsl run --resume {out}",
            file=sys.stderr,
        )
        return 130  # 128 + SIGINT, as a shell reports an interrupted command
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
    width = max(len(n) for n in he.preset_names())
    print(
        f"{'preset':<{width}} {'points':>6}  {'memory':>9}  {'work':>9}  {'time on 2 cores':>15}  "
        "description"
    )
    for name in he.preset_names():
        spec = he.preset(name)
        est = he.estimate_resources(spec)
        print(
            f"{name:<{width}} {est.points:>6}  {est.peak_bytes / 2**30:>5.2f} GiB  "
            f"{est.flops:>9.2e}  {'~' + _work_time(cpu_seconds(spec, est)):>15}  "
            f"{he.preset_description(name)}"
        )
    print(
        "\nmemory: estimated peak of one run; work: estimated flops of the whole experiment; "
        "time: the engine's cost model on 2 cores (a fixed cost per point plus its work at "
        "the rate measured for its kind of work)"
    )
    return 0


def version_text() -> str:
    """The package's and the engine's versions (they may differ: the engine's numbers change
    only with its own version)."""
    try:
        package = metadata.version("hsl")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        package = "unknown (not installed)"
    return f"hsl {package} (engine {he.ENGINE_VERSION})"


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
    parser.add_argument(
        "--version", action="version", version=version_text(), help="print the versions"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a spec or preset locally, with a progress bar",
        description="Run a spec or preset in this process. The results document is written "
        "after every point; Ctrl-C stops at the next point boundary (twice: at once) and "
        "--resume continues from the document without computing its points again.",
    )
    run.add_argument(
        "spec", nargs="?", help="a spec JSON file or a preset name (see 'hsl presets')"
    )
    run.add_argument(
        "--resume",
        metavar="FILE",
        help="continue the partial results document FILE (written by an interrupted run)",
    )
    run.add_argument(
        "--out", help="results JSON path (default: FILE with --resume, else NAME-results.json)"
    )
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
    cli_study.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"hsl: {exc}", file=sys.stderr)
        return 2
    except he.SpecError as exc:
        print("hsl: invalid spec:", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err['field']}: {err['message']}", file=sys.stderr)
        return 2
    except client.HslError as exc:  # the client's typed errors: a message and an exit code
        return client.report(exc)
    except BrokenPipeError:
        # the reader went away ('hsl presets | head'): no traceback; stdout goes to /dev/null
        # so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
