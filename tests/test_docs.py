"""The module lists of the README and of docs/architecture.md name exactly the modules there are."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> set[str]:
    top = {f"hookd/{p.name}" for p in (ROOT / "hookd").glob("*.py") if p.name != "__init__.py"}
    return top | {"hookd/backends/"}


def named(text: str) -> set[str]:
    return set(re.findall(r"`(hookd/(?:backends/|\w+\.py))`", text))


def test_the_readme_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture\n", 1)[1].split("\n## ", 1)[0]
    assert named(section) == modules()


def test_the_architecture_page_describes_every_module() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    table = page.split("## Modules\n", 1)[1].split("\n## ", 1)[0]
    assert named(table) == modules()
