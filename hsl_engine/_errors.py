"""The engine's exception and warning hierarchy."""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class SpecError(EngineError, ValueError):
    """An experiment spec is invalid.

    Attributes
    ----------
    errors : list of dict
        One ``{"field": "model.d", "message": "..."}`` entry per problem, with the dotted
        path of the offending field and a message that names the allowed range.
    """

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        lines = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        super().__init__(f"invalid experiment spec: {lines}")


class DeviceError(EngineError):
    """The requested compute device is not available in this installation."""


class ConvergenceError(EngineError):
    """An iterative eigensolver stopped before reaching its tolerance.

    Attributes
    ----------
    result : object
        The partial result (best Ritz pairs found so far), like SciPy's
        ``ArpackNoConvergence.eigenvalues``/``eigenvectors``.
    """

    def __init__(self, message: str, result: Any):
        super().__init__(message)
        self.result = result


class ConvergenceWarning(RuntimeWarning):
    """An eigensolve did not reach its tolerance; the partial result was used."""
