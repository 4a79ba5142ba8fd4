"""The documentation says what the code does: the generated CLI reference is current, the README's
commands are the ones CI runs, and every relative link points at a file that exists."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "tools" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_current():
    generated = _generator().render()
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == generated, "docs/cli.md is out of date: run python tools/gen_cli_docs.py"


def test_the_reference_names_every_command():
    text = _generator().render()
    for command in ("validate", "schema", "encode-character", "render", "train",
                    "world sample", "evaluate adapter", "evaluate compare"):
        assert f"## `anystory {command}`" in text


def test_the_readmes_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    quick = re.search(r"^pip install (.*?) && pytest\b", readme, re.MULTILINE)
    assert quick, "the README's quick start has no 'pip install ... && pytest' line"
    assert f"pip install {quick.group(1)}" in ci
    assert re.search(r"^(exec )?python -m pytest\b", ci, re.MULTILINE)
    assert re.search(r"^pip install torch==\S+ -e \. && anystory render stories/demo\.yaml", readme, re.MULTILINE)


def test_the_readme_is_a_short_guide():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_relative_links_in_the_docs_point_at_files():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
