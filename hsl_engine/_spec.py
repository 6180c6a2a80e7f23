"""The experiment spec: one definition, used by the engine, the service, the worker and the CLI.

Every numeric field carries its allowed range; a value outside it is rejected with a message
that names the field and the range. Sizes that can be astronomically large (the feature
dimension ``D = C(d + q - 1, q)``, the sample sizes ``n = d**alpha``) are checked in log space,
so validating ``d = 10**6`` never evaluates a huge power.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ._errors import SpecError

# Hard limits of the spec itself. A deployment adds its own, smaller, resource limits on top
# (see `estimate_resources`).
MAX_D = 100_000
MAX_N = 10**9
MIN_N = 10
MAX_SEEDS = 1000
MAX_SWEEP_POINTS = 200
# largest D whose whole spectrum a point may store (a dense D x D eigendecomposition)
MAX_FULL_SPECTRUM_DIM = 20_000
# bounds of `LayerwiseSpectral.label_clip`, in standard deviations of the labels
LABEL_CLIP_RANGE = (0.5, 10.0)


def _range(lo: float, hi: float, *, lo_open: bool = False):
    """A validator that rejects values outside ``[lo, hi]`` (``(lo, hi]`` if ``lo_open``)."""
    left = "(" if lo_open else "["

    def check(value: float) -> float:
        below = value <= lo if lo_open else value < lo
        if below or value > hi:
            raise PydanticCustomError(
                "out_of_range",
                "must be in {interval}, got {value}",
                {"interval": f"{left}{lo:g}, {hi:g}]", "value": value},
            )
        return value

    return AfterValidator(check)


def _bounds(lo: float, hi: float, *, lo_open: bool = False) -> dict[str, Any]:
    key = "exclusiveMinimum" if lo_open else "minimum"
    return {key: lo, "maximum": hi}


def Int(lo: int, hi: int, **kw: Any) -> Any:  # noqa: N802 - a type factory
    return Annotated[int, _range(lo, hi), Field(json_schema_extra=_bounds(lo, hi), **kw)]


def Float(lo: float, hi: float, *, lo_open: bool = False, **kw: Any) -> Any:  # noqa: N802
    return Annotated[
        float,
        _range(lo, hi, lo_open=lo_open),
        Field(json_schema_extra=_bounds(lo, hi, lo_open=lo_open), **kw),
    ]


# Characters an experiment name may not hold. The name travels into HTTP headers
# (Content-Disposition), CSV files, logs, terminals and PostgreSQL text columns, so it must be
# printable text:
# - every control character (Unicode Cc: C0 including NUL, TAB, CR and LF; DEL; C1): they end
#   header lines, inject log and CSV lines, and PostgreSQL text cannot hold NUL;
# - the line and paragraph separators U+2028 and U+2029 (Zl, Zp): line breaks in disguise;
# - the bidi embedding, override and isolate controls U+202A-U+202E and U+2066-U+2069: they
#   reorder how the rest of a listing is displayed ("Trojan Source" spoofing,
#   'x\u202egpj.sh' shows as 'xhs.jpg');
# - lone surrogates (Cs): not text, and not encodable as UTF-8.
# The other format characters (Cf) are allowed: the zero-width joiner and non-joiner are part
# of emoji sequences and of Persian and Indic spelling, the left-to-right and right-to-left
# marks U+200E/U+200F only set the direction of neutral characters next to them, and none of
# them breaks a header, a line or a database (headers carry the name percent-encoded).
NAME_FORBIDDEN = r"\u0000-\u001f\u007f-\u009f\u2028-\u202e\u2066-\u2069"
# the JSON Schema pattern of a name (lone surrogates cannot be written in it portably; the
# validator refuses them too)
NAME_PATTERN = rf"^[^{NAME_FORBIDDEN}]*$"
_NAME_FORBIDDEN_RE = re.compile(rf"[{NAME_FORBIDDEN}\ud800-\udfff]")
MAX_NAME_LENGTH = 200


def check_name(value: str) -> str:
    """Refuse a name with a character of `NAME_FORBIDDEN` or a lone surrogate."""
    bad = _NAME_FORBIDDEN_RE.search(value)
    if bad is not None:
        char = bad.group()
        kind = unicodedata.category(char)
        what = {"Cc": "a control character", "Cs": "a lone surrogate"}.get(
            kind, "a line separator" if kind in ("Zl", "Zp") else "a bidi control character"
        )
        raise PydanticCustomError(
            "name_character",
            "must be printable text without control characters: {char} at position {pos} is {what}",
            {"char": f"U+{ord(char):04X}", "pos": bad.start(), "what": what},
        )
    return value


# An experiment name: 1 to 200 characters of printable text (see `NAME_FORBIDDEN`).
Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        json_schema_extra={"pattern": NAME_PATTERN},
    ),
    AfterValidator(check_name),
]


class _Strict(BaseModel):
    # strict: no silent "60" -> 60; allow_inf_nan: NaN/Infinity never reach the engine.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class ModelSpec(_Strict):
    """The teacher: data distribution and hierarchical target (docs/model.md section 1)."""

    d: Int(2, MAX_D, description="input dimension") = 60
    q: Literal[2, 3] = Field(2, description="degree of the Hermite feature lift")
    epsilon: Float(0.0, 1.0, lo_open=True, description="d1 = round(d**epsilon)") = 0.5
    d1: Int(1, 10_000, description="number of hidden features; overrides epsilon") | None = None
    gamma: Float(0.0, 10.0, description="power-law exponent of the second-layer weights") = 1.0
    activation: Literal["id", "tanh", "quadratic"] = "id"
    features: Literal["hermite", "gaussian"] = "hermite"
    noise_std: Float(0.0, 100.0, description="standard deviation of label noise") = 0.0

    @property
    def log_feature_dim(self) -> float:
        """Natural log of D = C(d + q - 1, q), computed without forming D."""
        return math.lgamma(self.d + self.q) - math.lgamma(self.q + 1) - math.lgamma(self.d)

    @property
    def feature_dim(self) -> int:
        """D = C(d + q - 1, q). Only call after validation (it can be large, never absurd)."""
        return math.comb(self.d + self.q - 1, self.q)

    @property
    def hidden_dim(self) -> int:
        """d1: explicit, or round(d**epsilon) (at least 1)."""
        if self.d1 is not None:
            return self.d1
        return max(1, round(self.d**self.epsilon))

    @model_validator(mode="after")
    def _d1_fits(self) -> ModelSpec:
        if math.log(self.hidden_dim) > self.log_feature_dim + 1e-9:
            raise PydanticCustomError(
                "out_of_range",
                "d1 = {d1} exceeds the feature dimension D = C(d + q - 1, q) = {D}",
                {"d1": self.hidden_dim, "D": self.feature_dim, "field": "model.d1"},
            )
        return self


class SweepSpec(_Strict):
    """Sample sizes and seeds."""

    alphas: (
        Annotated[
            list[Float(0.0, 8.0, lo_open=True)],
            Field(min_length=1, max_length=MAX_SWEEP_POINTS),
        ]
        | None
    ) = None
    n_values: (
        Annotated[list[Int(MIN_N, MAX_N)], Field(min_length=1, max_length=MAX_SWEEP_POINTS)] | None
    ) = None
    seeds: Int(1, MAX_SEEDS, description="number of independent seeds") = 3
    seed: Int(0, 2**63 - 1, description="root of all randomness") = 0
    n_test: Int(10, 1_000_000, description="test samples per seed") = 5000

    @model_validator(mode="after")
    def _one_grid(self) -> SweepSpec:
        if (self.alphas is None) == (self.n_values is None):
            raise PydanticCustomError(
                "sweep_grid", "give exactly one of 'alphas' and 'n_values'", {"field": "sweep"}
            )
        return self


class LayerwiseSpectral(_Strict):
    """The layer-wise spectral method (docs/model.md section 2)."""

    name: Literal["layerwise_spectral"]
    sample_split: bool = True
    readout: Literal["fit", "rescale"] = Field(
        "fit",
        description="fit: ridge polynomial of y on the standardised h2_hat (readout_degree, "
        "readout_ridge); rescale: the paper's readout, prediction g(t) with t the h2_hat of "
        "the readout samples rescaled to zero mean and unit std (no fitted parameter)",
    )
    readout_degree: (
        Int(1, 9, description="polynomial degree of the readout; default 1 for id, 5 otherwise")
        | None
    ) = None
    readout_ridge: Float(0.0, 1e6, description="ridge penalty of the readout, per sample") = 1e-3
    spectrum: Literal["top", "full"] = Field(
        "top",
        description="eigenvalues stored per point: top = the d1 + 10 largest by magnitude; "
        "full = all D (for a histogram; dense solver, D <= 20000)",
    )
    label_clip: (
        Float(
            *LABEL_CLIP_RANGE,
            description="an extension, not the paper's algorithm: the first layer's matrix "
            "uses the labels clipped at +-label_clip standard deviations, T(y) = clip((y - "
            "mean) / sd, -c, c) re-centred over the same n samples (the second layer and the "
            "readout keep y); from the exact theory (docs/theory.md section 10), which "
            "predicts earlier recovery for g = id. Unset: T = y, the paper's method",
        )
        | None
    ) = None

    @model_serializer(mode="wrap")
    def _omit_unset_clip(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # label_clip came after specs were stored and hashed: left out of the JSON while unset,
        # so the canonical JSON (and the spec hash) of every earlier spec is unchanged
        data = handler(self)
        if self.label_clip is None:
            data.pop("label_clip", None)
        return data

    @field_validator("readout_degree")
    @classmethod
    def _degree_needs_fit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("readout") == "rescale":
            raise PydanticCustomError(
                "readout_degree",
                "readout 'rescale' fits no polynomial: leave readout_degree unset (got {value})",
                {"value": value},
            )
        return value


class _KernelBase(_Strict):
    ridge: Float(0.0, 1e6, lo_open=True, description="ridge penalty per training sample") = 1e-3
    n_landmarks: Int(
        10,
        20_000,
        description="Nystroem landmarks; exact solve at or below this many training samples",
    ) = 2000
    max_train: (
        Int(
            10,
            MAX_N,
            description="train on at most this many samples (the first ones of the n; the "
            "paper capped kernel training at 4000); unset: all n, Nystroem past n_landmarks",
        )
        | None
    ) = None


class KernelRBF(_KernelBase):
    """RBF kernel ridge regression on x, median-heuristic bandwidth unless given."""

    name: Literal["kernel_rbf"]
    bandwidth: Float(0.0, 1e6, lo_open=True) | None = None


class KernelPoly(_KernelBase):
    """Polynomial kernel ridge regression on x, ``(1 + <x, x'>/d)**degree``."""

    name: Literal["kernel_poly"]
    degree: Int(1, 12, description="kernel degree; default 2q") | None = None


class LatentRBF(_KernelBase):
    """RBF kernel ridge regression on the learned first-layer features h_hat."""

    name: Literal["latent_rbf"]
    sample_split: bool = True
    bandwidth: Float(0.0, 1e6, lo_open=True) | None = None
    n_landmarks: Int(10, 20_000) = 1000


MethodSpec = Annotated[
    LayerwiseSpectral | KernelRBF | KernelPoly | LatentRBF, Field(discriminator="name")
]
METHOD_NAMES = ("layerwise_spectral", "kernel_rbf", "kernel_poly", "latent_rbf")


class SolverSpec(_Strict):
    """Eigensolver and floating-point type of the spectral step."""

    eigensolver: Literal["auto", "dense", "krylov"] = "auto"
    dtype: Literal["float64", "float32"] = "float64"
    tol: (
        Float(
            0.0,
            0.1,
            lo_open=True,
            description="relative residual tolerance of the wanted eigenvectors; default 1e-6 "
            "(float64) or 1e-4 (float32)",
        )
        | None
    ) = None
    max_passes: Int(1, 100_000, description="operator applications per sample size") = 300
    backend: Literal["auto", "numpy", "torch"] = Field(
        "auto",
        description="array library of the hot loop: auto = NumPy on the CPU, PyTorch on CUDA; "
        "torch also runs on the CPU",
    )
    tf32: bool = Field(
        False,
        description="let float32 matrix products on CUDA use TensorFloat-32 (faster, ~1e-3 "
        "relative rounding per product); off unless asked for",
    )


def _default_methods() -> list[Any]:
    return [LayerwiseSpectral(name="layerwise_spectral")]


class ExperimentSpec(_Strict):
    """A whole experiment: teacher, sweep, methods, solver and device."""

    name: Name = "experiment"
    model: ModelSpec = Field(default_factory=ModelSpec)
    sweep: SweepSpec = Field(default_factory=lambda: SweepSpec(alphas=[1.5, 2.0, 2.5]))
    methods: Annotated[list[MethodSpec], Field(min_length=1, max_length=8)] = Field(
        default_factory=_default_methods
    )
    solver: SolverSpec = Field(default_factory=SolverSpec)
    device: Annotated[
        str,
        Field(
            pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$",
            description="auto | cpu | cuda | cuda:N (auto: CUDA when this machine has it)",
        ),
    ] = "auto"

    @model_validator(mode="after")
    def _check_sweep(self) -> ExperimentSpec:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise PydanticCustomError(
                "duplicate_method",
                "each method may appear once, got {names}",
                {"names": names, "field": "methods"},
            )
        if self.solver.backend == "numpy" and self.device.startswith("cuda"):
            raise PydanticCustomError(
                "backend_device",
                "backend 'numpy' runs on the CPU only; device {device!r} needs backend "
                "'torch' or 'auto'",
                {"device": self.device, "field": "solver.backend"},
            )
        for k, m in enumerate(self.methods):
            if getattr(m, "spectrum", "top") != "full":
                continue
            if self.solver.eigensolver == "krylov":
                raise PydanticCustomError(
                    "full_spectrum",
                    "spectrum 'full' needs the dense eigensolver, got solver.eigensolver 'krylov'",
                    {"field": f"methods.{k}.spectrum"},
                )
            if self.model.log_feature_dim > math.log(MAX_FULL_SPECTRUM_DIM):
                raise PydanticCustomError(
                    "full_spectrum",
                    "spectrum 'full' stores all D eigenvalues: D must be <= {limit}, got "
                    "D = C(d + q - 1, q) = {dim}",
                    {
                        "limit": MAX_FULL_SPECTRUM_DIM,
                        "dim": self.model.feature_dim,
                        "field": f"methods.{k}.spectrum",
                    },
                )
        log_d = math.log(self.model.d)
        if self.sweep.alphas is not None:
            ns = []
            for a in self.sweep.alphas:
                log_n = a * log_d
                if log_n > math.log(MAX_N) or log_n < math.log(MIN_N - 0.5):
                    raise PydanticCustomError(
                        "out_of_range",
                        "alpha = {a} gives n = d**alpha outside [{lo}, {hi}] for d = {d}",
                        {
                            "a": a,
                            "lo": MIN_N,
                            "hi": MAX_N,
                            "d": self.model.d,
                            "field": "sweep.alphas",
                        },
                    )
                ns.append(round(math.exp(log_n)))
        else:
            ns = list(self.sweep.n_values or [])
        if len(set(ns)) != len(ns):
            raise PydanticCustomError(
                "duplicate_n",
                "sweep gives the same sample size n twice: {ns}",
                {"ns": ns, "field": "sweep"},
            )
        return self

    # ----------------------------------------------------------------------------------------
    def sample_sizes(self) -> list[tuple[int, float]]:
        """The sweep's ``(n, alpha)`` pairs in ascending n (the order runs execute them)."""
        d = self.model.d
        if self.sweep.alphas is not None:
            pairs = [(int(round(d**a)), float(a)) for a in self.sweep.alphas]
        else:
            pairs = [(int(n), math.log(n) / math.log(d)) for n in self.sweep.n_values or []]
        return sorted(pairs)

    def method(self, name: str) -> Any:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def canonical_json(self) -> str:
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )

    @property
    def spec_hash(self) -> str:
        """``sha256:<hex>`` of the canonical JSON with every default filled in."""
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def tol(self) -> float:
        if self.solver.tol is not None:
            return self.solver.tol
        return 1e-6 if self.solver.dtype == "float64" else 1e-4


def _field_path(loc: tuple[Any, ...]) -> str:
    # pydantic puts the discriminator value in the location of union members
    # (methods.0.kernel_rbf.ridge); drop it so the path is the JSON path.
    parts = [str(p) for p in loc if p not in METHOD_NAMES]
    return ".".join(parts) or "spec"


def parse_spec(data: Any) -> ExperimentSpec:
    """Validate a JSON-like object (or a JSON string) into an `ExperimentSpec`.

    Raises
    ------
    SpecError
        With one ``{field, message}`` entry per problem.
    """
    if isinstance(data, ExperimentSpec):
        return data
    try:
        if isinstance(data, (str, bytes)):
            return ExperimentSpec.model_validate_json(data)
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            # model validators name the field they check in the error context
            field = (err.get("ctx") or {}).get("field") or _field_path(tuple(err["loc"]))
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            errors.append({"field": field, "message": message})
        raise SpecError(errors) from None
