"""docs/architecture.md stays the map of the code: it names every module of the package tree and no
other, and its list of layers is the one `lint-imports` checks (pyproject.toml)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tunelab"
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _layers_contract() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    [contract] = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return contract["layers"]


def test_the_module_map_names_every_module_of_the_package_and_no_other():
    modules = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    section = PAGE[PAGE.index("## Module map"):]
    mapped = set(re.findall(r"^\| [a-z]+ \| `([a-z_/]+\.py)` \|", section, flags=re.MULTILINE))
    assert modules - mapped == set(), "modules missing from docs/architecture.md's module map"
    assert mapped - modules == set(), "docs/architecture.md's module map names modules that do not exist"


def test_the_documented_layers_are_the_checked_ones():
    block = re.search(r"<!-- layers: the same list as pyproject.toml -->\n```\n(.*?)```", PAGE, flags=re.DOTALL)
    assert block is not None
    assert block.group(1).splitlines() == _layers_contract()


def test_every_top_level_module_and_package_has_a_layer():
    layered = {name.strip() for layer in _layers_contract() for name in layer.split("|")}
    top_level = {f"tunelab.{path.stem}" for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}
    top_level |= {f"tunelab.{path.parent.name}" for path in PACKAGE.glob("*/__init__.py")}
    assert top_level - layered == set(), "place new top-level modules in a layer (pyproject.toml and docs/architecture.md)"
    assert layered - top_level == set()
