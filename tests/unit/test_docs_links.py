"""The project documents itself: every Markdown link in README.md and docs/ points at a
file inside the repository that exists (no links to ../shared or the web)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_doc_link_stays_inside_the_repository() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert (ROOT / "docs" / "architecture.md") in pages
    checked = 0
    for page in pages:
        for target in LINK.findall(page.read_text()):
            assert "://" not in target, f"{page.name} links outside the repository: {target}"
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
            assert path.exists(), f"{page.name} links to a missing file: {target}"
            checked += 1
    assert checked > 10
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
