"""Tags and notes on experiments and studies: the researcher's labels, never part of a spec
(so never of its hash), settable at submit and editable with PATCH.

- ``tags``: at most `MAX_TAGS` strings of 1 to `MAX_TAG_LENGTH` characters from letters,
  digits and ``- _ . : / + =``, starting with a letter or digit; repeats are dropped (the
  first occurrence keeps its place).
- ``notes``: text up to `MAX_NOTES_LENGTH` characters; line breaks and tabs are allowed, other
  control characters, the line separators and the bidi controls are not (the name rules).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import String, cast, exists, func, select
from sqlalchemy.dialects.postgresql import JSONB

from .errors import InvalidSpec

MAX_TAGS = 20
MAX_TAG_LENGTH = 64
MAX_NOTES_LENGTH = 10_000
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/+=-]*$"
_TAG = re.compile(TAG_PATTERN)
# the name's forbidden characters less TAB, LF and CR
_NOTES_FORBIDDEN = re.compile(
    r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u2028-\u202e\u2066-\u2069"
    r"\ud800-\udfff]"
)


class InvalidLabels(InvalidSpec):
    title = "Invalid tags or notes"


def tag_problem(tag: Any) -> str | None:
    """Why ``tag`` is not a valid tag, or None."""
    if not isinstance(tag, str):
        return "must be a string"
    if not 1 <= len(tag) <= MAX_TAG_LENGTH:
        return f"must be 1 to {MAX_TAG_LENGTH} characters, got {len(tag)}"
    if not _TAG.fullmatch(tag):
        return "may hold letters, digits and - _ . : / + = only, starting with a letter or digit"
    return None


def check_tags(tags: Any, field: str = "tags") -> list[str]:
    """The tags, validated and without repeats; `InvalidLabels` (422) naming the field."""
    if not isinstance(tags, list):
        raise InvalidLabels(
            f"{field}: must be a list of strings",
            errors=[{"field": field, "message": "must be a list of strings"}],
        )
    errors = []
    for i, tag in enumerate(tags[: MAX_TAGS + 1]):
        why = tag_problem(tag)
        if why is not None:
            errors.append({"field": f"{field}[{i}]", "message": why})
    out = list(dict.fromkeys(t for t in tags if isinstance(t, str)))
    if len(out) > MAX_TAGS:
        errors.append({"field": field, "message": f"at most {MAX_TAGS} tags, got {len(out)}"})
    if errors:
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise InvalidLabels(detail, errors=errors)
    return out


def check_notes(notes: Any, field: str = "notes") -> str | None:
    """The notes (None clears them), validated; `InvalidLabels` (422) naming the field."""
    if notes is None:
        return None
    message = None
    if not isinstance(notes, str):
        message = "must be a string or null"
    elif len(notes) > MAX_NOTES_LENGTH:
        message = f"at most {MAX_NOTES_LENGTH} characters, got {len(notes)}"
    elif (bad := _NOTES_FORBIDDEN.search(notes)) is not None:
        message = (
            f"must be printable text (line breaks and tabs allowed): U+{ord(bad.group()):04X} "
            f"at position {bad.start()} is not"
        )
    if message is not None:
        raise InvalidLabels(f"{field}: {message}", errors=[{"field": field, "message": message}])
    return notes


def check_tag_filter(tag: str) -> str:
    """A ``?tag=`` filter: the tag rules, 422 naming ``tag``."""
    why = tag_problem(tag)
    if why is not None:
        raise InvalidLabels(f"tag: {why}", errors=[{"field": "tag", "message": why}])
    return tag


def has_tag(column: Any, tag: str, dialect: str) -> Any:
    """A condition: the JSON list ``column`` holds ``tag`` (json_each on SQLite, jsonb
    containment on PostgreSQL)."""
    if dialect == "postgresql":
        return cast(column, JSONB).contains([tag])
    each = func.json_each(column).table_valued("value")
    return exists(select(1).select_from(each).where(cast(each.c.value, String) == tag))
