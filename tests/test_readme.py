"""The README stays true: every setting is documented and the two set-up commands exist."""

from __future__ import annotations

from pathlib import Path

from gateway.settings import fields

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [f.name for f in fields() if f"| `{f.name}` |" not in readme]
    assert not missing, f"settings missing from README's configuration table: {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make serve" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
