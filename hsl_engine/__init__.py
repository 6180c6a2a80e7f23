"""hsl_engine: the simulator of the hierarchical scaling-law model (see docs/model.md).

NumPy/SciPy, plus PyTorch for the optional torch backend (CPU or CUDA); no I/O, no
environment variables, no global random state.
"""

from ._backend import (
    Backend,
    cuda_devices,
    cuda_memory_bytes,
    get_backend,
    resolve_device,
    spec_backend,
    torch_available,
)
from ._data import (
    SampleStream,
    SampleView,
    SeedData,
    Teacher,
    make_seed_data,
    make_teacher,
    seed_rng,
)
from ._errors import ConvergenceError, ConvergenceWarning, DeviceError, EngineError, SpecError
from ._estimate import POINT_OVERHEAD_SECONDS, ResourceEstimate, estimate_resources
from ._experiment import (
    ExperimentResult,
    expected_seconds,
    iter_run,
    points_total,
    run_experiment,
    runs,
)
from ._features import feature_dim, lift, sym_to_vec, vec_to_sym
from ._finite_size import FiniteSizePoint, finite_size_curve, n_half_finite_size, teacher_signs
from ._presets import ALIASES, PRESETS, preset, preset_description, preset_names
from ._spec import NAME_FORBIDDEN, ExperimentSpec, Name, parse_spec
from ._summary import (
    CurvePoint,
    ExactTheory,
    Point,
    PowerLaw,
    Summary,
    Threshold,
    exact_theory,
    summarize,
    summary_rng,
)
from ._theory import Theory, exponent_theory, nu1, theory
from ._version import ENGINE_VERSION

__version__ = ENGINE_VERSION

__all__ = [
    "ENGINE_VERSION",
    "POINT_OVERHEAD_SECONDS",
    "ALIASES",
    "PRESETS",
    "Backend",
    "ConvergenceError",
    "ConvergenceWarning",
    "CurvePoint",
    "DeviceError",
    "EngineError",
    "ExactTheory",
    "ExperimentResult",
    "ExperimentSpec",
    "FiniteSizePoint",
    "NAME_FORBIDDEN",
    "Name",
    "Point",
    "PowerLaw",
    "ResourceEstimate",
    "SampleStream",
    "SampleView",
    "SeedData",
    "SpecError",
    "Summary",
    "Teacher",
    "Theory",
    "Threshold",
    "estimate_resources",
    "exact_theory",
    "expected_seconds",
    "exponent_theory",
    "feature_dim",
    "finite_size_curve",
    "get_backend",
    "cuda_devices",
    "cuda_memory_bytes",
    "resolve_device",
    "spec_backend",
    "torch_available",
    "iter_run",
    "lift",
    "make_seed_data",
    "make_teacher",
    "n_half_finite_size",
    "nu1",
    "parse_spec",
    "points_total",
    "preset",
    "preset_description",
    "preset_names",
    "run_experiment",
    "runs",
    "seed_rng",
    "summarize",
    "summary_rng",
    "sym_to_vec",
    "teacher_signs",
    "theory",
    "vec_to_sym",
]
