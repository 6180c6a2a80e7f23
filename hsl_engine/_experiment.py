"""Units of work: one (method, seed) run sweeping n upward, and whole experiments."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import Backend, spec_backend
from ._data import SeedData, make_seed_data
from ._estimate import ResourceEstimate, estimate_resources
from ._kernels import KernelRidgeSweep
from ._simd import lifted_pass
from ._spec import ExperimentSpec, parse_spec
from ._spectral import (
    FirstLayerSolver,
    HiddenView,
    LayerwiseSpectral,
    heldout_features,
    normalised_mse,
    overlaps,
)
from ._summary import ExactTheory, Point, Summary, summarize, summary_rng
from ._version import ENGINE_VERSION


@dataclass(frozen=True)
class Measurement:
    mse: float
    n_train_used: int
    cos2: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    extra: dict | None = None


class _Spectral:
    def __init__(self, spec, method, data: SeedData, backend: Backend, rng):
        self.impl = LayerwiseSpectral(spec, method, data, backend, rng=rng)

    def measure(self, n: int) -> Measurement:
        fit = self.impl.fit(n)
        f = fit.first
        return Measurement(
            fit.mse,
            fit.n_train_used,
            fit.cos2,
            f.eigenvalues,
            {
                "eigensolver": f.solver,
                "passes": f.passes,
                "converged": f.converged,
                "operator_flops": f.flops,
            },
        )


def _capped(n: int, max_train: int | None) -> int:
    """Training samples of a kernel fit: n, or the first ``max_train`` of them."""
    return n if max_train is None else min(n, max_train)


class _KernelOnInputs:
    """kernel_rbf / kernel_poly on the raw inputs (x, or z in Gaussian mode)."""

    def __init__(self, spec, method, data: SeedData, backend: Backend, rng):
        self.data = data
        self.max_train = method.max_train
        if method.name == "kernel_rbf":
            kw = {"bandwidth": method.bandwidth}
            kernel = "rbf"
        else:
            kw = {"degree": method.degree or 2 * spec.model.q}
            kernel = "poly"
        self.krr = KernelRidgeSweep(
            kernel,
            ridge=method.ridge,
            n_landmarks=method.n_landmarks,
            incremental=True,
            rng=rng,
            threads=backend.threads,
            **kw,
        )

    def measure(self, n: int) -> Measurement:
        view = self.data.train.view(_capped(n, self.max_train))
        fit = self.krr.fit_predict(view, view.y, self.data.test_inputs)
        return Measurement(
            normalised_mse(fit.predictions, self.data.test_labels),
            fit.n_train_used,
            extra={
                "solver": fit.solver,
                "n_landmarks": fit.n_landmarks,
                "bandwidth": fit.bandwidth,
            },
        )


class _LatentRBF:
    """RBF kernel ridge on the learned first-layer features h_hat."""

    def __init__(self, spec, method, data: SeedData, backend: Backend, rng):
        self.spec, self.method, self.data = spec, method, data
        solver_rng, krr_rng = rng.spawn(2)
        self.first = FirstLayerSolver(spec, backend, rng=solver_rng)
        self.krr = KernelRidgeSweep(
            "rbf",
            ridge=method.ridge,
            n_landmarks=method.n_landmarks,
            bandwidth=method.bandwidth,
            incremental=False,
            rng=krr_rng,
            threads=backend.threads,
        )

    def measure(self, n: int) -> Measurement:
        first = self.first.fit(self.data.train.view(n))
        stream = self.data.second if self.method.sample_split else self.data.train
        second = stream.view(_capped(n, self.method.max_train))
        h = HiddenView(self.spec, second, first.directions)
        h_test = heldout_features(self.spec, self.data.test_inputs, first.directions)
        fit = self.krr.fit_predict(h, second.y, h_test)
        used = (n if self.method.sample_split else 0) + fit.n_train_used
        return Measurement(
            normalised_mse(fit.predictions, self.data.test_labels),
            used,
            overlaps(self.data.teacher.directions, first.directions),
            first.eigenvalues,
            {
                "eigensolver": first.solver,
                "passes": first.passes,
                "converged": first.converged,
                "solver": fit.solver,
                "n_landmarks": fit.n_landmarks,
                "bandwidth": fit.bandwidth,
            },
        )


_METHODS = {
    "layerwise_spectral": _Spectral,
    "kernel_rbf": _KernelOnInputs,
    "kernel_poly": _KernelOnInputs,
    "latent_rbf": _LatentRBF,
}
_METHOD_STREAM = {name: i for i, name in enumerate(_METHODS)}


def iter_run(
    spec: ExperimentSpec,
    method: str,
    seed: int,
    *,
    skip: Collection[int] = (),
    data: SeedData | None = None,
    backend: Backend | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[Point]:
    """Execute one run: ``method`` on seed ``seed``, yielding a `Point` per n (ascending).

    Parameters
    ----------
    skip : collection of int
        Sample sizes already stored (a resumed run): not measured, not yielded. Methods that
        accumulate over nested samples still process those samples when a later n needs them.
    data : SeedData, optional
        Shared seed data (lets several methods of one seed reuse teacher and samples).
    should_stop : callable, optional
        Checked before each point; True ends the run (cancellation at a point boundary).

    The numbers depend only on (spec, method, seed, n), never on ``skip`` or on which
    other runs exist, except that the Krylov warm start follows the previous n measured.
    """
    backend = backend or spec_backend(spec)
    if data is None:
        data = make_seed_data(
            spec, seed, sample_budget_bytes=backend.sample_budget_bytes, backend=backend
        )
    if not backend.is_torch and spec.model.q == 2 and spec.model.features == "hermite":
        # compile the lifted pass (0.43-0.58 s a dtype, once per process) before the first
        # point's clock starts: its seconds then say what the point costs, and so does the ETA
        # made from them. float64 for the teacher's labels and the test set, the solver's
        # type for the operator and the hidden features
        for dtype in {"float64", spec.solver.dtype}:
            lifted_pass(spec.model.d, dtype)
    method_spec = spec.method(method)
    # each method gets its own stream, fixed by its name, so adding methods changes nothing
    rng = data.method_rng(_METHOD_STREAM[method])
    runner = _METHODS[method](spec, method_spec, data, backend, rng)
    for n, alpha in spec.sample_sizes():
        if n in skip:
            continue
        if should_stop is not None and should_stop():
            return
        t0 = time.perf_counter()
        m = runner.measure(n)
        seconds = time.perf_counter() - t0
        cos2 = None if m.cos2 is None else tuple(float(c) for c in m.cos2)
        yield Point(
            method=method,
            seed=seed,
            n=n,
            alpha=float(alpha),
            mse=float(m.mse),
            overlap=None if cos2 is None else float(np.mean(cos2)),
            cos2=cos2,
            eigenvalues=None if m.eigenvalues is None else tuple(float(v) for v in m.eigenvalues),
            recovered=None if cos2 is None else int(sum(c > 0.5 for c in cos2)),
            n_train_used=int(m.n_train_used),
            seconds=float(seconds),
            extra={
                **(m.extra or {}),
                "engine_version": ENGINE_VERSION,
                "device": backend.device,
                "backend": backend.array_backend,
            },
        )


def runs(spec: ExperimentSpec) -> list[tuple[str, int]]:
    """The experiment's units of work: (method, seed) pairs, seeds outermost."""
    return [(m.name, s) for s in range(spec.sweep.seeds) for m in spec.methods]


def points_total(spec: ExperimentSpec) -> int:
    return len(runs(spec)) * len(spec.sample_sizes())


@dataclass(frozen=True)
class ExperimentResult:
    spec: ExperimentSpec
    points: list[Point]
    summary: Summary


def run_experiment(
    spec,
    *,
    on_point: Callable[[Point], None] | None = None,
    threads: int | None = None,
    done: Iterable[Point] = (),
    should_stop: Callable[[], bool] | None = None,
    exact: ExactTheory | None = None,
) -> ExperimentResult:
    """Run every (method, seed) of a spec in this process and summarise.

    Seeds run one after another; the methods of a seed share its teacher and samples.

    Parameters
    ----------
    done : iterable of Point
        Points already measured (a resumed experiment): not measured again, and part of the
        result. A seed whose points are all there is not even set up.
    should_stop : callable, optional
        Checked before each point; True ends the experiment at that point boundary (the
        result then holds the points measured so far).
    """
    spec = parse_spec(spec)
    backend = spec_backend(spec, threads=threads)
    points: list[Point] = list(done)
    stored = {(p.method, p.seed, p.n) for p in points}
    sizes = [n for n, _ in spec.sample_sizes()]
    for seed in range(spec.sweep.seeds):
        skips = {m.name: {n for n in sizes if (m.name, seed, n) in stored} for m in spec.methods}
        if all(len(skip) == len(sizes) for skip in skips.values()):
            continue
        if should_stop is not None and should_stop():
            break
        data = make_seed_data(
            spec, seed, sample_budget_bytes=backend.sample_budget_bytes, backend=backend
        )
        for m in spec.methods:
            for p in iter_run(
                spec,
                m.name,
                seed,
                skip=skips[m.name],
                data=data,
                backend=backend,
                should_stop=should_stop,
            ):
                points.append(p)
                if on_point is not None:
                    on_point(p)
            if should_stop is not None and should_stop():
                break
    summary = summarize(spec, points, rng=summary_rng(spec), exact=exact)
    return ExperimentResult(spec, points, summary)


def expected_seconds(
    spec: ExperimentSpec, done: Iterable[Any], *, estimate: ResourceEstimate | None = None
) -> float | None:
    """Seconds left to compute the points not in ``done``, from the engine's cost model.

    Each point's cost is its estimated seconds on the reference machine (``point_seconds``
    of `estimate_resources`: a fixed cost plus its work at the rate of its kind of work);
    the ratio of measured to estimated seconds of the points so far (``done``: objects with
    ``method``, ``seed``, ``n`` and ``seconds``) scales the rest: per method once it has
    points, else over all of them. None before the first point.
    """
    est = estimate or estimate_resources(spec)
    sizes = {n: i for i, (n, _) in enumerate(spec.sample_sizes())}

    def work(method: str, n: int) -> float | None:
        per_n = est.point_seconds.get(method)
        i = sizes.get(n)
        return None if per_n is None or i is None else per_n[i]

    spent: dict[str, list[float]] = {}
    keys = set()
    for p in done:
        w = work(p.method, p.n)
        if w is None or p.seconds is None:
            continue
        keys.add((p.method, p.seed, p.n))
        acc = spent.setdefault(p.method, [0.0, 0.0])
        acc[0] += float(p.seconds)
        acc[1] += w
    if not spent:
        return None
    overall = sum(a[0] for a in spent.values()) / sum(a[1] for a in spent.values())
    left = 0.0
    for method, seed in runs(spec):
        acc = spent.get(method)
        rate = acc[0] / acc[1] if acc else overall
        for n, _ in spec.sample_sizes():
            if (method, seed, n) not in keys:
                left += rate * work(method, n)
    return left if math.isfinite(left) else None
