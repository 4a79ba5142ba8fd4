"""Sampled mutation testing of the comic maker: mutate one spot, run its tests, count the kills."""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Module (relative to the repository) -> the test files that should notice a change in it.
TARGETS = {
    "anystory_cli/story.py": ["tests/test_story.py"],
    "anystory_cli/plan.py": ["tests/test_plan.py", "tests/test_render*.py"],
    "anystory_cli/layout.py": ["tests/test_layout.py", "tests/test_lettering*.py", "tests/test_render*.py"],
    "anystory_cli/export.py": ["tests/test_export.py", "tests/test_render*.py"],
    "anystory_cli/render/orchestrate.py": ["tests/test_render*.py"],
    "anystory_cli/render/compose.py": ["tests/test_render*.py"],
    "anystory_cli/render/store.py": ["tests/test_render*.py"],
}

# Named mutants: what a broken comic maker looks like (text to find -> its replacement, in
# whichever module under anystory_cli/ holds it), and the tests that should notice.
NAMED = {
    "balloons undrawn": ("        _draw_balloon(draw, origin, balloon, spec.font_path)", "        pass",
                         ["tests/test_layout.py", "tests/test_lettering*.py", "tests/test_render*.py"]),
    "balloon tails dropped": ("        tail = balloon_tail(rect, target, panel_size) if target is not None else None",
                              "        tail = None", ["tests/test_layout.py", "tests/test_lettering*.py"]),
    "never prunes": ("                prune(out, len(plans), len(page_plans), jobs.values())", "                pass",
                     ["tests/test_render*.py"]),
    "regions dropped": ("regions=[c.box for c in plan.characters],", "regions=None,", ["tests/test_render*.py"]),
    "at: ignored for a lone character": ('return [PLACEMENT_BOXES[refs[0].at or "center"]]',
                                          'return [PLACEMENT_BOXES["center"]]', ["tests/test_render*.py"]),
    "subject strength dropped": ("subject_scale=plan.subject_strength,", "subject_scale=1.0,", ["tests/test_render*.py"]),
    "reference strength dropped": ("reference_scale=plan.reference_strength,", "reference_scale=0.0,",
                                   ["tests/test_render*.py"]),
    "guidance interval dropped": ("guidance_interval=plan.guidance_interval,", "guidance_interval=None,",
                                  ["tests/test_render*.py"]),
    "reference guidance dropped": ("reference_guidance=plan.reference_guidance,", "reference_guidance=True,",
                                   ["tests/test_render*.py"]),
    "figure paste dropped": ("paste_at=plan.paste_references_at or None,", "paste_at=None,", ["tests/test_render*.py"]),
    "export key ignores title, order, dpi": ("story.title, story.page.reading_order, story.page.dpi,", "",
                                            ["tests/test_render*.py"]),
    "PDF pages reversed": ('    rgb = [page.convert("RGB") for page in pages]',
                           '    rgb = [page.convert("RGB") for page in pages][::-1]', ["tests/test_export.py", "tests/test_render*.py"]),
    "frame shape not in the panel key": ('key = content_hash("panel", RENDER_KEY_VERSION, plan.content_key, multipliers)',
                                         'key = content_hash("panel", RENDER_KEY_VERSION, plan.content_key)', ["tests/test_render*.py"]),
}

COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
               ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv}


def _in_function(tree: ast.AST) -> dict[int, str]:
    """id(node) -> enclosing function name, for nodes inside a function body."""
    owners: dict[int, str] = {}
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for statement in func.body:
                for node in ast.walk(statement):
                    owners.setdefault(id(node), func.name)
    return owners


def mutation_points(source: str) -> list[tuple[str, int, int, str]]:
    """(kind, line, column, function) of every place a mutant can be made, in a stable order."""
    tree = ast.parse(source)
    owners = _in_function(tree)
    points = []
    for node in ast.walk(tree):
        owner = owners.get(id(node))
        if owner is None:
            continue
        where = (getattr(node, "lineno", 0), getattr(node, "col_offset", 0), owner)
        if isinstance(node, ast.Compare) and type(node.ops[0]) in COMPARE_SWAPS:
            points.append(("compare", *where))
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            points.append(("binop", *where))
        elif isinstance(node, ast.BoolOp):
            points.append(("boolop", *where))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
            points.append(("number", *where))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            points.append(("bool", *where))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            points.append(("drop_call", *where))
        elif isinstance(node, ast.Return) and node.value is not None:
            points.append(("return_none", *where))
    return sorted(set(points), key=lambda p: (p[1], p[2], p[0]))


def mutate(source: str, point: tuple[str, int, int, str]) -> str:
    kind, line, column, _ = point
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    for node in ast.walk(tree):
        if (getattr(node, "lineno", None), getattr(node, "col_offset", None)) != (line, column):
            continue
        if kind == "compare" and isinstance(node, ast.Compare):
            node.ops[0] = COMPARE_SWAPS[type(node.ops[0])]()
        elif kind == "binop" and isinstance(node, ast.BinOp):
            node.op = BINOP_SWAPS[type(node.op)]()
        elif kind == "boolop" and isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif kind == "number" and isinstance(node, ast.Constant) and type(node.value) in (int, float):
            node.value = node.value + 1
        elif kind == "bool" and isinstance(node, ast.Constant) and isinstance(node.value, bool):
            node.value = not node.value
        elif kind == "drop_call" and isinstance(node, ast.Expr):
            node.value = ast.Constant(None)
        elif kind == "drop_keyword" and isinstance(node, ast.keyword):
            call = node.parent  # type: ignore[attr-defined]
            call.keywords = [k for k in call.keywords if k is not node]
        elif kind == "return_none" and isinstance(node, ast.Return):
            node.value = ast.Constant(None)
        else:
            continue
        return ast.unparse(ast.fix_missing_locations(tree))
    raise ValueError(f"no {kind} at {line}:{column}")


def _points_with_keywords(source: str):
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=30, help="mutants to sample over all modules")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tree", type=Path, default=ROOT, help="source tree to mutate (a copy is made)")
    parser.add_argument("--tests-from", type=Path, default=None, help="take tests/ from this tree")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None, help="write the per-mutant results here")
    parser.add_argument("--named", action="store_true", help="run the NAMED mutants instead of a sample")
    args = parser.parse_args()
    if args.named:
        return run_named(args)

    points = []
    for module in TARGETS:
        source = (args.tree / module).read_text()
        # keywords need parents to be found: annotate before listing
        tree = _points_with_keywords(source)
        listed = mutation_points(source)
        owners = _in_function(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg is not None and id(node) in owners:
                listed.append(("drop_keyword", node.value.lineno, node.value.col_offset, owners[id(node)]))
        points += [(module, p) for p in sorted(set(listed))]
    sample = random.Random(args.seed).sample(points, min(args.count, len(points)))
    results = []
    with tempfile.TemporaryDirectory(prefix="anystory-mutants-") as scratch:
        work = Path(scratch) / "tree"
        shutil.copytree(args.tree, work, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv*", "out*"))
        if args.tests_from is not None:
            shutil.rmtree(work / "tests")
            shutil.copytree(args.tests_from / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        for number, (module, point) in enumerate(sample, start=1):
            original = (work / module).read_text()
            kind, line, column, owner = point
            if kind == "drop_keyword":
                mutated = _drop_keyword(original, line, column)
            else:
                mutated = mutate(original, point)
            (work / module).write_text(mutated)
            tests = sorted({str(p.relative_to(work)) for pattern in TARGETS[module] for p in work.glob(pattern)})
            start = time.time()
            try:
                run = subprocess.run(
                    [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                    cwd=work, env={**os.environ, "PYTHONPATH": str(work)}, capture_output=True,
                    timeout=args.timeout)
                outcome = "survived" if run.returncode == 0 else "killed"
            except subprocess.TimeoutExpired:
                outcome = "killed (timeout)"
            finally:
                (work / module).write_text(original)
            seconds = time.time() - start
            results.append({"module": module, "kind": kind, "line": line, "function": owner,
                            "outcome": outcome, "seconds": round(seconds, 1)})
            print(f"{number:3d}/{len(sample)} {outcome:17s} {module}:{line} {owner} {kind} ({seconds:.0f} s)",
                  flush=True)
    killed = sum(r["outcome"].startswith("killed") for r in results)
    print(f"killed {killed} of {len(results)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def run_named(args) -> int:
    results = []
    with tempfile.TemporaryDirectory(prefix="anystory-mutants-") as scratch:
        work = Path(scratch) / "tree"
        shutil.copytree(args.tree, work, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv*", "out*"))
        if args.tests_from is not None:
            shutil.rmtree(work / "tests")
            shutil.copytree(args.tests_from / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        for name, (old, new, patterns) in NAMED.items():
            holders = [p for p in sorted((work / "anystory_cli").rglob("*.py")) if old in p.read_text()]
            if len(holders) != 1:
                print(f"{name}: found in {len(holders)} modules, skipped", flush=True)
                continue
            (module,) = holders
            original = module.read_text()
            module.write_text(original.replace(old, new, 1))
            tests = sorted({str(p.relative_to(work)) for pattern in patterns for p in work.glob(pattern)})
            start = time.time()
            try:
                run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                     cwd=work, env={**os.environ, "PYTHONPATH": str(work)}, capture_output=True,
                                     timeout=args.timeout)
                outcome = "survived" if run.returncode == 0 else "killed"
            except subprocess.TimeoutExpired:
                outcome = "timeout"
            finally:
                module.write_text(original)
            results.append({"mutant": name, "outcome": outcome, "seconds": round(time.time() - start, 1)})
            print(f"{outcome:9s} {name} ({time.time() - start:.0f} s)", flush=True)
    killed = sum(r["outcome"] == "killed" for r in results)
    print(f"killed {killed} of {len(results)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _drop_keyword(source: str, line: int, column: int) -> str:
    tree = _points_with_keywords(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and (node.value.lineno, node.value.col_offset) == (line, column):
            call = node.parent  # type: ignore[attr-defined]
            call.keywords = [k for k in call.keywords if k is not node]
            return ast.unparse(ast.fix_missing_locations(tree))
    raise ValueError(f"no keyword at {line}:{column}")


if __name__ == "__main__":
    raise SystemExit(main())
