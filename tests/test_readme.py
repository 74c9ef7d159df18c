"""README and docs/ stay true: every setting documented, links resolve, set-up commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.settings import fields

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"


def test_every_setting_is_in_the_configuration_page() -> None:
    page = CONFIGURATION.read_text(encoding="utf-8")
    missing = [f.name for f in fields() if f"| `{f.name}` |" not in page]
    assert not missing, f"settings missing from docs/configuration.md's table: {missing}"


def test_readme_is_a_guide_that_links_the_configuration_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250, "README.md is a guide; reference text goes in docs/"
    assert "(docs/configuration.md)" in readme


def test_relative_links_in_readme_and_docs_resolve() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if not path or "://" in path:
                continue
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to missing files: {broken}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make serve" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
