"""Studies: a base spec and axes over its fields, expanded into the grid of member specs.

One definition for the service (``POST /v1/studies``) and the command line (``hsl study``):
the axes' dotted paths are checked against the spec, every member spec goes through the
engine's own validator, and a problem names ``axes.<path>`` and the value that caused it.
Also the named studies (the paper's Fig. 3 and Fig. 5, with CPU-sized versions).

Members keep the base spec's ``name``: the spec hash includes the name, so two studies (or a
study and an experiment submitted on its own) that share a grid point share its experiment.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from typing import Any

import hsl_engine as he

MAX_AXES = 8
MAX_AXIS_VALUES = 64
DEFAULT_MAX_MEMBERS = 64
# a dotted path into the spec: keys and list indices (methods.0.ridge)
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]{1,2}))*")


class StudyError(ValueError):
    """A study is invalid; ``errors`` holds one ``{field, message}`` per problem."""

    def __init__(self, errors: list[dict[str, str]], *, too_large: bool = False):
        self.errors = errors
        self.too_large = too_large
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _set(tree: Any, parts: list[str], value: Any) -> str | None:
    """Put ``value`` at ``parts`` inside ``tree`` (JSON-like, changed in place); returns why
    not when the path does not lead to a field of the spec."""
    node = tree
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        where = ".".join(parts[: k + 1])
        if isinstance(node, dict):
            if part.isdigit():
                return f"{where}: a list index where the spec has an object"
            if last:
                node[part] = copy.deepcopy(value)
                return None
            if part not in node or not isinstance(node[part], (dict, list)):
                return f"{where}: not an object or list of the spec"
            node = node[part]
        elif isinstance(node, list):
            if not part.isdigit():
                return f"{where}: a list of the spec needs an index here"
            i = int(part)
            if i >= len(node):
                return f"{where}: index {i} beyond the {len(node)} items of the base spec"
            if last:
                node[i] = copy.deepcopy(value)
                return None
            node = node[i]
        else:
            return f"{where}: not an object or list of the spec"
    return "empty path"


def _check_axes(axes: Any, max_members: int) -> dict[str, list[Any]]:
    if not isinstance(axes, dict) or not axes:
        raise StudyError([{"field": "axes", "message": "must be an object of path: [values]"}])
    if len(axes) > MAX_AXES:
        raise StudyError(
            [{"field": "axes", "message": f"at most {MAX_AXES} axes, got {len(axes)}"}]
        )
    errors, out = [], {}
    for path, values in axes.items():
        field = f"axes.{path}"
        if not isinstance(path, str) or len(path) > 100 or not _PATH.fullmatch(path):
            errors.append(
                {
                    "field": f"axes.{path[:40] if isinstance(path, str) else _short(path, 40)}",
                    "message": "must be a dotted path of the spec, e.g. model.gamma",
                }
            )
            continue
        if path == "name":
            errors.append({"field": field, "message": "the members keep the base spec's name"})
            continue
        if not isinstance(values, list) or not values:
            errors.append({"field": field, "message": "must be a non-empty list of values"})
            continue
        if len(values) > MAX_AXIS_VALUES:
            errors.append(
                {"field": field, "message": f"at most {MAX_AXIS_VALUES} values, got {len(values)}"}
            )
            continue
        keys = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(keys)) != len(keys):
            errors.append({"field": field, "message": "the same value twice"})
            continue
        out[path] = values
    if errors:
        raise StudyError(errors)
    paths = sorted(out)
    for a, b in itertools.combinations(paths, 2):
        if b.startswith(a + "."):
            raise StudyError(
                [{"field": f"axes.{b}", "message": f"lies inside the axis {a}; use one of them"}]
            )
    size = math.prod(len(v) for v in out.values())
    if size > max_members:
        raise StudyError(
            [
                {
                    "field": "axes",
                    "message": f"the grid has {size} members; the limit is {max_members} "
                    "(HSL_MAX_STUDY_MEMBERS)",
                }
            ],
            too_large=True,
        )
    return out


def member_params(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The grid product, in the axes' order (the last axis varies fastest)."""
    paths = list(axes)
    return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*axes.values())]


def _field_of(error_field: str, params: dict[str, Any]) -> str | None:
    for path in params:
        if error_field == path or error_field.startswith(path + "."):
            return path
        if path.startswith(error_field + "."):
            return path
    return None


def expand(
    base: he.ExperimentSpec, axes: Any, *, max_members: int = DEFAULT_MAX_MEMBERS
) -> list[tuple[dict[str, Any], he.ExperimentSpec]]:
    """The members of a study: ``[(params, spec)]`` in grid order.

    Raises
    ------
    StudyError
        naming ``axes.<path>`` and the value for a path that is not a field of the spec or
        a value the spec refuses; a member invalid for another reason (a combination of
        values: d and alphas give n beyond the limit) names the member's parameters.
    """
    checked = _check_axes(axes, max_members)
    data = base.model_dump(mode="json")
    # a path that is no field of the spec: from the first value, once per axis
    errors = []
    for path, values in checked.items():
        why = _set(copy.deepcopy(data), path.split("."), values[0])
        if why is not None:
            errors.append({"field": f"axes.{path}", "message": f"unknown field ({why})"})
    if errors:
        raise StudyError(errors)
    members, seen = [], set()
    for params in member_params(checked):
        tree = copy.deepcopy(data)
        for path, value in params.items():
            _set(tree, path.split("."), value)
        try:
            spec = he.parse_spec(tree)
        except he.SpecError as exc:
            for err in exc.errors:
                path = _field_of(err["field"], params)
                if path is not None:
                    key = (path, json.dumps(params[path], sort_keys=True), err["message"])
                    if key in seen:
                        continue
                    seen.add(key)
                    errors.append(
                        {
                            "field": f"axes.{path}",
                            "message": f"value {_short(params[path])}: {err['field']}: "
                            f"{err['message']}",
                        }
                    )
                else:
                    errors.append(
                        {
                            "field": err["field"],
                            "message": f"for the member {_short(params, 120)}: {err['message']}",
                        }
                    )
            continue
        members.append((params, spec))
    if errors:
        raise StudyError(errors[:50])
    return members


def study_hash(base: he.ExperimentSpec, axes: dict[str, list[Any]]) -> str:
    """``sha256:<hex>`` of the base spec's hash and the canonical JSON of the axes."""
    canonical = json.dumps(
        {"base": base.spec_hash, "axes": axes}, sort_keys=True, separators=(",", ":")
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def param_label(params: dict[str, Any]) -> str:
    """``gamma=0.4, d=30``: the last part of each path and its value."""
    return ", ".join(f"{p.rsplit('.', 1)[-1]}={_short(v, 20)}" for p, v in params.items())


# -- named studies -------------------------------------------------------------------------

_GAMMAS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def _from_preset(preset: str, name: str, **changes: Any) -> dict[str, Any]:
    spec = he.preset(preset).model_dump(mode="json")
    spec["name"] = name
    for path, value in changes.items():
        _set(spec, path.split("__"), value)
    return spec


def _build() -> dict[str, dict[str, Any]]:
    return {
        "fig3-study": {
            "description": "Fig. 3: MSE vs n for gamma in {0, 0.2, ..., 1.0} at d = 400 "
            "(the paper's setting: Hermite features, 10 seeds; GPU-sized)",
            "study": {
                "name": "fig3-study",
                "base": _from_preset("fig3-gamma0.4", "fig3"),
                "axes": {"model.gamma": _GAMMAS},
            },
        },
        "fig3-study-cpu": {
            "description": "CPU Fig. 3: the MSE exponent against gamma (Gaussian-equivalent, "
            "d = 30, d1 = 8, gamma in {0, 0.2, ..., 1.0}, 2 seeds)",
            "study": {
                "name": "fig3-study-cpu",
                "base": _from_preset("fig3-cpu", "fig3-cpu-study", sweep__seeds=2),
                "axes": {"model.gamma": _GAMMAS},
            },
        },
        "fig5-study": {
            "description": "Fig. 5: g = tanh at d in {120, 250, 400}, gamma 0.4 (GPU-sized)",
            "study": {
                "name": "fig5-study",
                "base": _from_preset("fig5-d120", "fig5"),
                "axes": {"model.d": [120, 250, 400]},
            },
        },
        "fig5-study-cpu": {
            "description": "CPU Fig. 5: g = tanh, Gaussian-equivalent features, d in "
            "{20, 30, 40}, d1 = 6, gamma 0.6, 2 seeds",
            "study": {
                "name": "fig5-study-cpu",
                "base": _from_preset(
                    "fig4-cpu",
                    "fig5-cpu-study",
                    model__activation="tanh",
                    model__d1=6,
                    sweep__seeds=2,
                ),
                "axes": {"model.d": [20, 30, 40]},
            },
        },
    }


STUDY_PRESETS: dict[str, dict[str, Any]] = _build()


def study_preset_names() -> list[str]:
    return sorted(STUDY_PRESETS)


def study_preset(name: str) -> dict[str, Any]:
    """A copy of the named study's body (``{name, base, axes}``); KeyError when unknown."""
    try:
        return copy.deepcopy(STUDY_PRESETS[name]["study"])
    except KeyError:
        raise KeyError(
            f"unknown study preset {name!r}; known: {', '.join(study_preset_names())}"
        ) from None
