"""Named specs: the paper's figures and CPU-sized versions (read-only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

import hsl_engine as he

from .deps import get_tenant
from .errors import NotFound
from .experiments.routes import ERRORS
from .experiments.schemas import PresetOut

# keyed like the rest of /v1 (and as the OpenAPI document declares)
router = APIRouter(prefix="/v1/presets", tags=["presets"], dependencies=[Depends(get_tenant)])


def _preset(name: str) -> dict[str, Any]:
    spec = he.preset(name)
    est = he.estimate_resources(spec)
    return {
        "name": name,
        "description": he.preset_description(name),
        "spec": spec.model_dump(mode="json"),
        "estimate": {
            "points": est.points,
            "feature_dim": est.feature_dim,
            "peak_bytes": est.peak_bytes,
            "flops": est.flops,
        },
    }


@router.get("", response_model=list[PresetOut], responses=ERRORS)
def list_presets() -> Any:
    return [_preset(n) for n in he.preset_names()]


@router.get("/{name}", response_model=PresetOut, responses=ERRORS)
def get_preset(name: str) -> Any:
    if name not in he.preset_names():
        raise NotFound(f"no preset {name!r}; presets: {', '.join(he.preset_names())}")
    return _preset(name)
