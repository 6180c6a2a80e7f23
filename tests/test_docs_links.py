"""The documentation stands alone (issue 11 item 4): every relative link in README.md and
docs/*.md names a file of the repository (and, with ``#anchor``, a heading of it), and no text
sends the reader to the project's internal briefs outside the repository.

Links are read as GitHub renders Markdown: inline ``[text](target)`` and reference
definitions ``[label]: target``, outside fenced code blocks and code spans; anchors are
GitHub's heading slugs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# where a reference to the briefs could hide: the docs, the code, the configuration
TEXT_SUFFIXES = {".md", ".py", ".toml", ".yml", ".yaml", ".cfg", ".ini", ".txt", ".mako"}
# (and every folder whose name starts with a dot: .git, .venv, caches, .hsl)
SKIP_DIRS = {"venv", "node_modules", "__pycache__", "build", "dist"}
# the briefs live in a folder beside the repository; this file names them, so it is the one
# file the scan leaves out
BRIEF_RE = re.compile(r"shared[/\\]|\b(?:MODEL|API|RELIABILITY|STYLE)\.md\b")

FENCE_RE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN_RE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
INLINE_LINK_RE = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE_RE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The Markdown without fenced code blocks and code spans (links there are not links)."""
    text = FENCE_RE.sub("", text)
    return CODE_SPAN_RE.sub("", text)


def links(path: Path) -> list[str]:
    prose = _prose(path.read_text(encoding="utf-8"))
    return INLINE_LINK_RE.findall(prose) + REFERENCE_RE.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text in lower case, punctuation dropped
    (word characters, spaces and hyphens kept), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE_RE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING_RE.findall(text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def _relative_links() -> list[tuple[Path, str]]:
    found = []
    for doc in DOCS:
        for target in links(doc):
            parts = urlsplit(target)
            if parts.scheme or parts.netloc:  # http:, https:, mailto: ...
                continue
            found.append((doc, target))
    return found


def _id(case: tuple[Path, str]) -> str:
    doc, target = case
    return f"{doc.relative_to(ROOT)}->{target}"


RELATIVE_LINKS = _relative_links()


def test_the_docs_folder_has_its_guides():
    names = {p.name for p in DOCS}
    assert {"README.md", "model.md", "reference.md", "reliability.md"} <= names
    # the index and the README link every guide
    index = {t.split("#")[0] for t in links(ROOT / "docs" / "README.md")}
    readme = {t.split("#")[0] for t in links(ROOT / "README.md")}
    for guide in ("model.md", "theory.md", "reference.md", "reliability.md"):
        assert guide in index, guide
        assert f"docs/{guide}" in readme, guide
    assert "theory.md" in {t.split("#")[0] for t in links(ROOT / "docs" / "model.md")}


def test_links_are_found_where_they_are(tmp_path):
    # the parser itself: links in prose count, links in code do not
    sample = (
        "see [a](docs/x.md#y) and [b][r]\n\n[r]: ../z.md\n\n"
        "`[c](no.md)`\n```\n[d](no2.md)\n```\n![img](fig.png)\n"
    )
    path = tmp_path / "sample.md"
    path.write_text(sample, encoding="utf-8")
    assert sorted(links(path)) == ["../z.md", "docs/x.md#y", "fig.png"]
    assert slug("6. Cost model (`hsl_engine/_estimate.py`)") == "6-cost-model-hsl_engine_estimatepy"
    assert slug("5. The paper's experiments") == "5-the-papers-experiments"


@pytest.mark.parametrize("case", RELATIVE_LINKS, ids=[_id(c) for c in RELATIVE_LINKS])
def test_relative_link_resolves_inside_the_repository(case):
    doc, target = case
    parts = urlsplit(target)
    file = doc if not parts.path else (doc.parent / unquote(parts.path)).resolve()
    assert file.is_relative_to(ROOT), f"{_id(case)} leaves the repository"
    assert file.exists(), f"{_id(case)}: no {file.relative_to(ROOT)} in the repository"
    if parts.fragment and file.suffix == ".md":
        assert parts.fragment in anchors(file), (
            f"{_id(case)}: no heading with anchor #{parts.fragment} in "
            f"{file.relative_to(ROOT)} (has {sorted(anchors(file))})"
        )


def test_there_are_relative_links_to_check():
    assert len(RELATIVE_LINKS) >= 20


def _text_files() -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [
            d
            for d in dirs
            if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
        ]
        for name in files:
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
                out.append(path)
    return out


def test_no_text_sends_the_reader_outside_the_repository():
    offenders = []
    files = _text_files()
    assert ROOT / "service" / "app.py" in files and ROOT / "docs" / "model.md" in files
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if BRIEF_RE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)
    # and the check sees what it must
    assert BRIEF_RE.search("see ../shared/MODEL.md") and BRIEF_RE.search("API.md section 2")
    assert not BRIEF_RE.search("docs/model.md, docs/reference.md")
