"""The shape of the package (docs/design.md): the product does not depend on the lab or on
training, the comic modules do not need torch, and no two modules import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "anystory_cli"

# story file -> pages: what `anystory validate` / `render` and `import anystory_cli.render` run.
RENDER_PATH = ["story", "plan", "layout", "export", "masks", "cache", "atomic", "errors", "overlay",
               "model_loading", "default_model", "render", "sd", "cli/rendering.py"]
NO_TORCH = ["story", "plan", "layout", "export"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files(names: list[str]) -> list[Path]:
    files = []
    for name in names:
        path = PACKAGE / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path if path.suffix else path.with_suffix(".py")]
    return files


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function, as absolute names."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def test_the_render_path_imports_nothing_from_the_lab_or_training():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(n for n in _imports(path)
                                               if n.startswith(("anystory_cli.lab", "anystory_cli.train")))
        for path in _files(RENDER_PATH)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_comic_modules_do_not_import_torch():
    offenders = {str(path.relative_to(PACKAGE)): sorted(n for n in _imports(path) if n.split(".")[0] in
                                                         ("torch", "diffusers", "transformers"))
                 for path in _files(NO_TORCH)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_renderer_loads_neither_the_lab_nor_torch():
    code = ("import sys, anystory_cli.render, anystory_cli.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('anystory_cli.lab', 'anystory_cli.train', "
            "'torch', 'diffusers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]"


def test_no_module_imports_another_that_imports_it_back():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module_name(path)] = set()
    for path in PACKAGE.rglob("*.py"):
        for name in _imports(path):
            while name and name not in graph:
                name = name.rpartition(".")[0]
            if name and name != _module_name(path):
                graph[_module_name(path)].add(name)
    # a package's __init__ importing its own modules is how it re-exports them, not a cycle
    for module, targets in graph.items():
        targets.discard(module.rpartition(".")[0])

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo += graph[current]
        return False

    cycles = sorted((a, b) for a in graph for b in graph[a] if a < b and reaches(b, a))
    assert cycles == []
