"""The results document as an object: the same whether the experiment ran through the service
(`hsl.Client.results`) or locally (`hsl run` writes the document; `Results.from_file` reads it).

Tables come as pandas DataFrames (the optional extra ``pandas``); Parquet needs pyarrow (the
extra ``parquet``). Without them the methods say which extra to install.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .document import CSV_COLUMNS, PROVENANCE_FIELDS, points_csv


class MissingDependency(ImportError):
    """An optional package a method needs is not installed (the message names the extra)."""


def _pandas():
    try:
        import pandas
    except ImportError:
        raise MissingDependency(
            "this needs pandas, which is not installed: pip install 'hsl[pandas]' "
            "(or pip install pandas)"
        ) from None
    return pandas


class Results:
    """One experiment's results document (docs/reference.md, "The results document").

    ``Results(document)`` wraps a parsed document; ``Results.from_file(path)`` reads the JSON
    that ``hsl run`` or ``hsl results --out`` wrote. The document itself is ``.document``.
    """

    def __init__(self, document: Mapping[str, Any]):
        if not isinstance(document, Mapping) or "points" not in document or "spec" not in document:
            raise ValueError("not an hsl results document (it needs 'spec' and 'points')")
        self.document: dict[str, Any] = dict(document)

    @classmethod
    def from_file(cls, path: str | Path) -> Results:
        text = Path(path).read_text()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        try:
            return cls(doc)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        return (
            f"<Results {self.name!r} {self.experiment_id or 'local'}: "
            f"{len(self.points)} points, {state}>"
        )

    # -- the document's parts ---------------------------------------------------------
    @property
    def experiment_id(self) -> str | None:
        return self.document.get("experiment_id")

    @property
    def name(self) -> str:
        return self.document["spec"].get("name", "")

    @property
    def spec(self) -> dict[str, Any]:
        return self.document["spec"]

    @property
    def spec_hash(self) -> str | None:
        return self.document.get("spec_hash")

    @property
    def complete(self) -> bool:
        return bool(self.document.get("complete"))

    @property
    def points(self) -> list[dict[str, Any]]:
        return self.document["points"]

    @property
    def curves(self) -> dict[str, list[dict[str, Any]]]:
        return self.document.get("curves") or {}

    @property
    def thresholds(self) -> list[dict[str, Any]]:
        return self.document.get("thresholds") or []

    @property
    def power_law(self) -> dict[str, Any] | None:
        return self.document.get("power_law")

    @property
    def theory(self) -> dict[str, Any]:
        return self.document.get("theory") or {}

    # -- tables -------------------------------------------------------------------------
    def _d1(self) -> int:
        return int(self.document.get("d1") or 0)

    def points_frame(self):
        """One row per point: the CSV's columns (``method, seed, n, alpha, mse, overlap,
        recovered, n_train_used, seconds``, then ``cos2_1..cos2_d1`` and ``eig_1..eig_k``) and
        the provenance (``engine_version, device, backend``)."""
        pd = _pandas()
        d1 = self._d1()
        k = max((len(p.get("eigenvalues") or []) for p in self.points), default=0)
        rows = []
        for p in self.points:
            row = {c: p.get(c) for c in CSV_COLUMNS}
            cos2 = p.get("cos2") or [None] * d1
            row.update({f"cos2_{i + 1}": v for i, v in enumerate(cos2)})
            eig = list(p.get("eigenvalues") or []) + [None] * k
            row.update({f"eig_{i + 1}": eig[i] for i in range(k)})
            row.update({f: p.get(f) for f in PROVENANCE_FIELDS})
            rows.append(row)
        columns = [
            *CSV_COLUMNS,
            *(f"cos2_{i + 1}" for i in range(d1)),
            *(f"eig_{i + 1}" for i in range(k)),
            *PROVENANCE_FIELDS,
        ]
        return pd.DataFrame(rows, columns=columns)

    def curves_frame(self):
        """One row per (method, n): the seed means and their SEMs, ``cos2_mean_1..d1``."""
        pd = _pandas()
        rows = []
        for method, curve in self.curves.items():
            for c in curve:
                row = {"method": method}
                row.update({k: v for k, v in c.items() if k != "cos2_mean"})
                row.update(
                    {f"cos2_mean_{i + 1}": v for i, v in enumerate(c.get("cos2_mean") or [])}
                )
                rows.append(row)
        return pd.DataFrame(rows)

    def thresholds_frame(self):
        """One row per teacher direction: measured and theory recovery thresholds."""
        return _pandas().DataFrame(self.thresholds)

    # -- export -------------------------------------------------------------------------
    def to_csv(self, path: str | Path | None = None) -> str:
        """The points as CSV (the service's ``results.csv``, byte for byte); written to
        ``path`` when given. Returns the text."""
        text = points_csv(self.document)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_parquet(self, path: str | Path) -> Path:
        """The points table (`points_frame`) as Parquet; needs pyarrow (``hsl[parquet]``)."""
        frame = self.points_frame()
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise MissingDependency(
                "Parquet needs pyarrow, which is not installed: pip install 'hsl[parquet]' "
                "(or pip install pyarrow); to_csv() needs nothing"
            ) from None
        frame.to_parquet(path, index=False)
        return Path(path)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.document, indent=1) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def summary(self) -> str:
        """Thresholds and the fitted exponent against theory, as ``hsl run`` prints them."""
        from .cli import summary_text

        return summary_text(self.document)

    def write_plots(self, directory: str | Path) -> list[Path]:
        """The figures (``mse, overlap, cos2, spectrum`` as PNG and SVG) drawn locally."""
        from . import plots

        return [Path(p) for p in plots.write_plots(self.document, directory)]
