"""The project's own documentation stays true to the code: the recipe reference is the config models,
the data-check codes are validate.CODES, and nothing cites a file that a clone of the repository lacks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tunelab import recipe_doc
from tunelab.config import Recipe
from tunelab.data.validate import CODES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_recipe_reference_is_generated_from_the_config_models():
    text = (DOCS / "recipe.md").read_text(encoding="utf-8")
    assert recipe_doc.generated_part(text) == recipe_doc.render(), (
        "docs/recipe.md disagrees with src/tunelab/config.py: run `python -m tunelab.recipe_doc`")


def test_every_recipe_key_is_documented_with_a_meaning():
    rendered = recipe_doc.render()
    keys = [name for name in Recipe.model_fields]
    for section, field in Recipe.model_fields.items():
        model = recipe_doc._section_model(field.annotation)
        if model is not None:
            keys.remove(section)
            keys += [f"{section}.{name}" for name in model.model_fields]
    for key in keys:
        [row] = [line for line in rendered.splitlines() if line.startswith(f"| `{key}` |")]
        assert not row.endswith("|  |"), f"{key}: give it a Field(description=...) in config.py"


def test_a_stale_recipe_reference_is_rewritten_by_the_update_command(tmp_path):
    page = tmp_path / "recipe.md"
    page.write_text(f"intro\n\n{recipe_doc.GENERATED_START}\n| `old.key` |\n{recipe_doc.GENERATED_END}\n\noutro\n")
    assert recipe_doc.update(page) is True
    text = page.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\noutro\n") and "old.key" not in text
    assert recipe_doc.generated_part(text) == recipe_doc.render()
    assert recipe_doc.update(page) is False


def test_data_checks_page_lists_every_code_with_its_severity_and_no_other():
    text = (DOCS / "data-checks.md").read_text(encoding="utf-8")
    for code, (severity, _) in CODES.items():
        assert f"| `{code}` | {severity} |" in text, code
    listed = set(re.findall(r"^\| `([a-z0-9_]+)` \| (?:error|warning) \|", text, flags=re.MULTILINE))
    assert listed == set(CODES), f"codes in docs/data-checks.md but not in validate.CODES: {listed - set(CODES)}"


def test_no_file_cites_documents_that_are_not_in_the_repository():
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "src", "tests", "bench", "examples", "docs", "README.md"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not tracked:  # not a git checkout (e.g. an unpacked sdist): check the files on disk
        tracked = [str(p.relative_to(ROOT)) for d in ("src", "tests", "bench", "examples", "docs")
                   for p in (ROOT / d).rglob("*") if p.is_file()] + ["README.md"]
    absent = ("DESIGN" + ".md", "FACTS" + ".md", "STYLE" + ".md")  # split so this file does not cite them
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".yaml", ".sh", ".jinja") and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            assert not any(a in text for a in absent), f"{name} cites a document that is not in the repository"


def test_every_docs_link_points_to_a_file_that_exists():
    pages = [ROOT / "README.md", *DOCS.glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
