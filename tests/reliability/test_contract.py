"""Issue 4, item 14: the service against its own OpenAPI document, and the spec validator
under property tests.

- Schemathesis generates requests for every operation of ``/openapi.json``, schema-valid
  (positive) and schema-invalid (negative) ones, with a valid test key, and checks each
  answer: no 5xx, status code, content type and body as the document declares them, negative
  data rejected with a 4xx, and every error ``application/problem+json`` with ``type, title,
  status, detail`` (docs/reliability.md, promise 7).
- Hypothesis throws arbitrary JSON and mutated valid specs at ``hsl_engine.parse_spec``: it
  either returns a spec or raises ``SpecError`` naming the offending field, never anything
  else; valid specs round-trip with the same hash; and the same bodies POSTed to the service
  never get a 5xx.

Both run against a real ``hsl serve`` process (uvicorn, its SQLite database under the test's
folder, keys required) over loopback: Schemathesis loads the document from the server's
``/openapi.json`` and sends every case over the network; the POSTed bodies of the property
tests go the same way. The validator properties themselves call ``parse_spec`` in process.
"""

from __future__ import annotations

import json
import math
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.core.failures import FailureGroup

import hsl_engine as he
from tests.integration.processes import wait_status
from tests.reliability.server import cancel_everything
from tests.service.api import tiny_spec

PROBLEM = "application/problem+json"

# Per operation and generation mode. Enough to reach every parameter and the error paths
# of each route; the whole file stays well within a few minutes on two cores.
SCHEMATHESIS_EXAMPLES = 50

# What each response is checked against (besides the problem+json check below).
# positive_data_acceptance is left out on purpose: the OpenAPI document describes each
# field of the spec, but not the rules that span fields and that JSON Schema cannot state
# (exactly one of sweep.alphas and sweep.n_values; d1 <= C(d + q - 1, q); n = d**alpha within
# [10, 1e9]; each method once; the deployment's resource limits), nor that integers are
# strict (4283.0 is a JSON Schema integer, the spec refuses it). Schema-valid specs that
# break them are rightly answered 422. The contract for such data is checked instead by
# not_a_server_error and the problem+json check.
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
]


# The limits have tests of their own (scenarios 09 and 13); here they would only turn
# requests into 429s.
GENEROUS = {"submit_rate": 1e6, "submit_burst": 10**6, "max_active_experiments": 10**6}


def problem_errors(status: int, content_type: str, body: bytes) -> list[str]:
    """What is wrong with an error response, measured against RFC 9457 and docs/reference.md."""
    if status < 400:
        return []
    wrong = []
    if content_type.split(";")[0].strip().lower() != PROBLEM:
        wrong.append(f"{status} with content type {content_type!r}, not {PROBLEM}")
    try:
        doc = json.loads(body)
    except ValueError:
        return wrong + [f"{status} with a body that is not JSON: {body[:200]!r}"]
    if not isinstance(doc, dict):
        return wrong + [f"{status} with a body that is not an object: {body[:200]!r}"]
    for field in ("type", "title", "detail"):
        if not isinstance(doc.get(field), str) or not doc[field]:
            wrong.append(f"{status}: {field!r} missing or empty in {body[:300]!r}")
    if doc.get("status") != status:
        wrong.append(f"{status}: 'status' is {doc.get('status')!r}")
    errors = doc.get("errors")
    if errors is not None and not (
        isinstance(errors, list)
        and all(isinstance(e, dict) and isinstance(e.get("field"), str) for e in errors)
    ):
        wrong.append(f"{status}: 'errors' is not a list of {{field, message}}: {errors!r}")
    return wrong


# ---------------------------------------------------------------------------------------------
# Schemathesis: every operation, positive and negative data


def _strategies(operation, mode: GenerationMode, headers, known: dict[str, list[dict]]):
    """Generated cases; positive ones also on existing experiments and presets, so that the
    success answers (status documents, results, CSV, plots) are checked too, not only 404s."""
    base = operation.as_strategy(generation_mode=mode, headers=headers)
    if mode is not GenerationMode.POSITIVE:
        return base
    names = {p.name for p in operation.iter_parameters() if p.location == "path"}
    fixed = [
        pp
        for pp in known.get(operation.method.upper() + " " + operation.path, known["*"])
        if set(pp) <= names
    ]
    if not names or not fixed:
        return base
    return base | st.sampled_from(fixed).flatmap(
        lambda pp: operation.as_strategy(generation_mode=mode, headers=headers, path_parameters=pp)
    )


class Tally:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.problems_checked = 0
        self.answered_2xx: set[str] = set()
        self.no_negative_data: list[str] = []
        self.failures: list[str] = []


def fuzz(
    operation,
    mode: GenerationMode,
    strategy,
    tally: Tally,
    base_url: str,
    session: requests.Session,
) -> None:
    """Run one operation's cases in one generation mode against the server at ``base_url``
    (over ``session``'s keep-alive connections); a failure (after Hypothesis has shrunk it)
    is recorded, and the other operations still run."""

    @given(case=strategy)
    @settings(
        max_examples=SCHEMATHESIS_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        # the strategies are schemathesis' own; large spec bodies and its internal
        # filtering are inherent to them, not a sign of a badly written test
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    def check_case(case) -> None:
        response = case.call(base_url=base_url, session=session)
        tally.requests[mode.value] += 1
        tally.statuses[f"{response.status_code // 100}xx"] += 1
        if response.status_code < 300:
            tally.answered_2xx.add(operation.label)
        case.validate_response(response, checks=CHECKS, headers=case.headers)
        if response.status_code >= 400:
            tally.problems_checked += 1
            ctype = (response.headers.get("content-type") or [""])[0]
            wrong = problem_errors(response.status_code, ctype, response.content)
            assert not wrong, f"{wrong}\n{case.as_curl_command()}"

    try:
        check_case()
    except Unsatisfiable as exc:
        if mode is GenerationMode.NEGATIVE:
            # every request this operation can receive is schema-valid (see the figures)
            tally.no_negative_data.append(operation.label)
        else:
            tally.failures.append(f"{operation.label} ({mode.value}): no case generated: {exc}")
    except (Exception, FailureGroup) as exc:
        detail = "".join(traceback.format_exception_only(exc))
        tally.failures.append(f"{operation.label} ({mode.value}): {detail}")


def test_every_operation_conforms_to_the_openapi_document(start_server, scenario):
    # the embedded service executes runs with its in-process worker: one experiment is run
    # to the end before the fuzzing
    server = start_server("contract", embedded_workers=1, **GENEROUS)
    sc = scenario("14-schemathesis")
    sc.database(server.database_url)
    sc.service(server.url)
    (key,) = server.keys("schemathesis")
    headers = {"Authorization": f"Bearer {key}"}

    # One experiment finished (points, results, plots), one queued, one to be deleted.
    with server.client(key) as client:
        done = client.post("/v1/experiments", json=tiny_spec(name="done"))
        assert done.status_code == 201, done.text
        finished = wait_status(
            client, done.json()["id"], timeout=60, procs=server.procs, alive=True
        )
        assert finished["status"] == "succeeded", finished
    # The same server again, on the same database, without its worker: the experiments the
    # fuzzing submits stay queued (schema-valid specs within the default limits may ask for
    # hours of work), and so does the queued one the cases are pointed at, as a client would
    # see it before a worker is free.
    server.restart(embedded_workers=0)
    with server.client(key) as client:
        queued = client.post(
            "/v1/experiments", json=tiny_spec(name="queued", sweep={"alphas": [1.5], "seeds": 1})
        )
        doomed = client.post(
            "/v1/experiments", json=tiny_spec(name="doomed", sweep={"alphas": [2.0], "seeds": 1})
        )
        assert [r.status_code for r in (queued, doomed)] == [201, 201]
    ids = [done.json()["id"], queued.json()["id"]]
    plots = [f"{n}.{f}" for n in ("mse", "overlap", "cos2", "spectrum") for f in ("png", "svg")]
    known = {
        "*": [{"experiment_id": i} for i in ids]
        + [{"experiment_id": i, "filename": p} for i in ids for p in plots]
        + [{"name": n} for n in he.preset_names()],
        # deleting one of the others would turn the later operations' cases into 404s
        "DELETE /v1/experiments/{experiment_id}": [{"experiment_id": doomed.json()["id"]}],
    }

    # the document as the server serves it; every case sent over loopback
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=30)
    tally = Tally()
    operations = [result.ok() for result in schema.get_all_operations()]
    with requests.Session() as session:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = _strategies(operation, mode, headers, known)
                fuzz(operation, mode, strategy, tally, server.url, session)
    server.procs.assert_alive()
    # the experiments the cases submitted, cancelled (the invariant check wants them terminal)
    cancelled = cancel_everything(server, key)

    sc.figures.update(
        {
            "operations": len(operations),
            "operations_with_negative_data": len(operations) - len(tally.no_negative_data),
            # nothing to make invalid: no parameters, or only free-form strings in the path
            "operations_without_negative_data": tally.no_negative_data,
            "max_examples_per_operation_and_mode": SCHEMATHESIS_EXAMPLES,
            "requests": sum(tally.requests.values()),
            "requests_positive": tally.requests["positive"],
            "requests_negative": tally.requests["negative"],
            "responses_by_class": dict(sorted(tally.statuses.items())),
            "operations_answered_2xx": len(tally.answered_2xx),
            "error_responses_checked_problem_json": tally.problems_checked,
            "checks": [c.__name__ for c in CHECKS] + ["problem+json (type, title, status, detail)"],
            "failures": len(tally.failures),
            "server": "hsl serve (uvicorn) over loopback, schema from its /openapi.json",
            "submitted_then_cancelled": cancelled,
        }
    )
    assert not tally.failures, "\n\n".join(tally.failures)
    assert tally.statuses["5xx"] == 0
    # the operations that take data beyond free-form strings did get invalid data
    assert {"POST /v1/experiments", "GET /v1/experiments"}.isdisjoint(tally.no_negative_data)
    # the fixed cases reached every success path too (documents, CSV, plots), not only 404s
    assert tally.answered_2xx == {op.label for op in operations}


# ---------------------------------------------------------------------------------------------
# Hypothesis: the spec validator

METHODS = ["layerwise_spectral", "kernel_rbf", "kernel_poly", "latent_rbf"]
FIELD_NAMES = [
    "name", "model", "sweep", "methods", "solver", "device", "d", "q", "epsilon", "d1",
    "gamma", "activation", "features", "noise_std", "alphas", "n_values", "seeds", "seed",
    "n_test", "sample_split", "readout_degree", "readout_ridge", "ridge", "n_landmarks",
    "bandwidth", "degree", "eigensolver", "dtype", "tol", "max_passes",
]  # fmt: skip

WORDS = METHODS + ["id", "tanh", "quadratic", "hermite", "gaussian", "auto", "cpu", "cuda",
                   "dense", "krylov", "float32", "float64"]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 2**31, 2**63, 2**64, 10**6, 10**100, -(10**400)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(WORDS)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=25,
)

# Valid specs to mutate: the contract's example, the tiny test spec and every preset.
BASES = [
    tiny_spec(),
    {
        "name": "fig2-cpu",
        "model": {"d": 60, "q": 2, "epsilon": 0.5, "d1": None, "gamma": 1.0,
                  "activation": "id", "features": "hermite", "noise_std": 0.0},
        "sweep": {"alphas": [1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0], "n_values": None,
                  "seeds": 3, "seed": 0, "n_test": 5000},
        "methods": [{"name": "layerwise_spectral", "sample_split": True}, {"name": "kernel_rbf"}],
        "solver": {"eigensolver": "auto", "dtype": "float64"},
        "device": "auto",
    },
] + [he.preset(name).model_dump(mode="json") for name in he.preset_names()]  # fmt: skip

# Errors that model-level validators report on a field of their own choosing, whatever
# field the mutation touched (a bigger d moves n = d**alpha out of range, and so on).
MODEL_LEVEL = {"spec", "sweep", "sweep.alphas", "methods", "model.d1"}


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def _objects(value: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        yield path
        for k, v in value.items():
            yield from _objects(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _objects(v, (*path, i))


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[path[0]] = _set(doc[path[0]], path[1:], value)
    return copy


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "spec"


# Any JSON value, or one of the kind a field holds (so that some mutations stay valid).
replacements = (
    json_values
    | st.integers(-2, 5000)
    | st.floats(-1.0, 10.0)
    | st.booleans()
    | st.sampled_from(WORDS)
)


@st.composite
def mutated_specs(draw) -> tuple[Any, tuple]:
    """A valid spec with one leaf replaced by any JSON value or nudged (a number scaled, a
    flag flipped), or an unknown key added to one of its objects; returns the document and
    the path that was touched."""
    base = draw(st.sampled_from(BASES))
    how = draw(st.sampled_from(["replace", "nudge", "add"]))
    if how != "add":
        path = draw(st.sampled_from(list(_leaves(base))))
        old = _get(base, path)
        if how == "nudge" and isinstance(old, bool):
            new = not old
        elif how == "nudge" and isinstance(old, int):
            new = old + draw(st.integers(-3, 3))
        elif how == "nudge" and isinstance(old, float):
            new = old * draw(st.floats(0.5, 1.5))
        else:
            new = draw(replacements)
        return _set(base, path, new), path
    where = draw(st.sampled_from(list(_objects(base))))
    name = "unknown_" + draw(st.text(max_size=6))
    return _set(base, where, {**_get(base, where), name: draw(json_values)}), (*where, name)


def _related(field: str, path: tuple) -> bool:
    """Whether an error on ``field`` can be the consequence of touching ``path``."""
    # A method's discriminator re-types the whole method: any of its fields may then be wrong.
    if len(path) == 3 and path[0] == "methods" and path[2] == "name":
        path = path[:2]
    touched = _dotted(path)
    return (
        field in MODEL_LEVEL
        or field == touched
        or touched.startswith(field + ".")
        or field.startswith(touched + ".")
    )


def _spec_errors(exc: he.SpecError) -> list[dict]:
    assert isinstance(exc.errors, list) and exc.errors, exc
    for e in exc.errors:
        assert isinstance(e, dict) and set(e) >= {"field", "message"}, e
        assert isinstance(e["field"], str) and e["field"], e
        assert isinstance(e["message"], str) and e["message"], e
    return exc.errors


def _outcome(data: Any, stats: Counter) -> he.ExperimentSpec | list[dict]:
    """parse_spec's answer: the spec, or the SpecError's errors. Any other exception escapes
    and fails the property."""
    try:
        spec = he.parse_spec(data)
    except he.SpecError as exc:
        stats["spec_errors"] += 1
        errors = _spec_errors(exc)
        stats["error_entries_checked"] += len(errors)
        return errors
    assert isinstance(spec, he.ExperimentSpec)
    stats["parsed"] += 1
    return spec


HYPOTHESIS = {"deadline": None, "derandomize": True, "database": None}


@given(value=json_values)
@settings(max_examples=600, **HYPOTHESIS)
def any_json_value(stats: Counter, value: Any) -> None:
    _outcome(value, stats)
    # and the same value as JSON text (NaN and Infinity as the literals Python writes)
    _outcome(json.dumps(value), stats)
    stats["examples"] += 1


@given(mutation=mutated_specs())
@settings(max_examples=600, **HYPOTHESIS)
def mutated_valid_spec(stats: Counter, mutation: tuple[Any, tuple]) -> None:
    doc, path = mutation
    outcome = _outcome(doc, stats)
    stats["examples"] += 1
    if isinstance(path[-1], str) and path[-1].startswith("unknown_"):
        assert isinstance(outcome, list), "an unknown field was accepted"
        assert {"field": _dotted(path), "message": "unknown field"} in outcome, outcome
    if isinstance(outcome, list):
        unrelated = [e for e in outcome if not _related(e["field"], path)]
        assert not unrelated, f"touched {_dotted(path)!r}, errors name {unrelated}"


@st.composite
def valid_specs(draw) -> dict[str, Any]:
    """Specs within every range (the cross-field rules are left to parse_spec and assume)."""
    d = draw(st.integers(2, 400))
    model = {
        "d": d,
        "q": draw(st.sampled_from([2, 3])),
        "epsilon": draw(st.floats(0.01, 1.0)),
        "gamma": draw(st.floats(0.0, 10.0)),
        "activation": draw(st.sampled_from(["id", "tanh", "quadratic"])),
        "features": draw(st.sampled_from(["hermite", "gaussian"])),
        "noise_std": draw(st.floats(0.0, 100.0)),
    }
    if draw(st.booleans()):
        model["d1"] = draw(st.integers(1, 20))
    log_d = math.log(d)
    if draw(st.booleans()):
        lo, hi = math.log(10) / log_d, min(8.0, math.log(10**9) / log_d)
        grid = {"alphas": draw(st.lists(st.floats(lo + 1e-9, hi - 1e-9), min_size=1, max_size=8))}
    else:
        grid = {
            "n_values": draw(st.lists(st.integers(10, 10**9), min_size=1, max_size=8, unique=True))
        }
    methods = draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=4, unique=True))
    return {
        "name": draw(st.text(min_size=1, max_size=40)),
        "model": model,
        "sweep": {
            **grid,
            "seeds": draw(st.integers(1, 1000)),
            "seed": draw(st.integers(0, 2**63 - 1)),
            "n_test": draw(st.integers(10, 10**6)),
        },
        "methods": [{"name": m} for m in methods],
        "solver": {
            "eigensolver": draw(st.sampled_from(["auto", "dense", "krylov"])),
            "dtype": draw(st.sampled_from(["float64", "float32"])),
        },
        "device": draw(st.sampled_from(["auto", "cpu", "cuda"])),
    }


@given(doc=valid_specs())
@settings(max_examples=300, **HYPOTHESIS)
def valid_spec_round_trips(stats: Counter, doc: dict[str, Any]) -> None:
    outcome = _outcome(doc, stats)
    # the generator keeps each field in range; what is left are the cross-field rules
    # (a d1 above the feature dimension, two alphas rounding to the same n)
    assume(isinstance(outcome, he.ExperimentSpec))
    spec = outcome
    again = he.parse_spec(spec.model_dump(mode="json"))
    assert again == spec
    assert again.spec_hash == spec.spec_hash
    assert he.parse_spec(spec.canonical_json()).spec_hash == spec.spec_hash
    assert he.parse_spec(json.dumps(doc)).spec_hash == spec.spec_hash
    stats["examples"] += 1


bodies = json_values | mutated_specs().map(lambda m: m[0]) | valid_specs()


@given(body=bodies)
@settings(max_examples=120, **HYPOTHESIS)
def posted_bodies_never_5xx(stats: Counter, client: httpx.Client, body: Any) -> None:
    resp = client.post(
        "/v1/experiments",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    stats[f"http_{resp.status_code}"] += 1
    assert resp.status_code < 500, resp.text[:2000]
    if resp.status_code in (200, 201):
        assert resp.json()["spec_hash"] == he.parse_spec(body).spec_hash
    else:
        assert 400 <= resp.status_code < 500, resp.status_code
        wrong = problem_errors(resp.status_code, resp.headers["content-type"], resp.content)
        assert not wrong, wrong
        stats["error_responses_checked"] += 1
    stats["examples"] += 1


def test_spec_validator_properties(start_server, scenario):
    # the POSTed bodies go to a real server; what they submit stays queued (no worker) and is
    # cancelled at the end
    server = start_server("properties", embedded_workers=0, **GENEROUS)
    sc = scenario("14-hypothesis-spec")
    sc.database(server.database_url)
    sc.service(server.url)
    (key,) = server.keys("hypothesis")
    results: dict[str, Counter] = {}
    failures: list[str] = []
    with server.client(key) as client:
        for prop, args in (
            (any_json_value, ()),
            (mutated_valid_spec, ()),
            (valid_spec_round_trips, ()),
            (posted_bodies_never_5xx, (client,)),
        ):
            stats = results[prop.__name__] = Counter()
            try:
                prop(stats, *args)
            except Exception as exc:  # the falsifying example is in the message
                failures.append(f"{prop.__name__}: {''.join(traceback.format_exception(exc))}")
    server.procs.assert_alive()
    cancelled = cancel_everything(server, key)
    sc.figures.update({name: dict(sorted(c.items())) for name, c in results.items()})
    sc.figures["failures"] = len(failures)
    sc.figures["posted_to"] = "hsl serve (uvicorn) over loopback"
    sc.figures["submitted_then_cancelled"] = cancelled
    assert not failures, "\n\n".join(failures)
    # the properties were not vacuous: both outcomes were seen where both are possible
    assert results["any_json_value"]["spec_errors"] > 0
    assert results["mutated_valid_spec"]["parsed"] > 0
    assert results["mutated_valid_spec"]["spec_errors"] > 0
    assert results["valid_spec_round_trips"]["examples"] > 100
    assert {"http_201", "http_422"} <= set(results["posted_bodies_never_5xx"])
