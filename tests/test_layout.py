"""The layering the README's Development section describes: low-level modules import nothing from the
kit, numeric code never imports the loaders, and the code passes the linter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ["text", "block", "config", "stats", "device", "layers", "artifacts"]  # import nothing from the kit
NUMERIC = ["similarity", "distances", "scoring", "loss", "recall", "metrics", "curves", "oracle", "prune"]  # never the loaders
LOADERS = {"data", "assets", "models"}


def kit_imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / "kit" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kit"):
            found.add(node.module.removeprefix("kit").lstrip(".") or "kit")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("kit.") for a in node.names if a.name.startswith("kit")}
    return {name.split(".")[0] for name in found}


@pytest.mark.parametrize("module", LEAVES)
def test_leaf_modules_import_nothing_from_the_kit(module):
    assert kit_imports(module) == set()


@pytest.mark.parametrize("module", NUMERIC)
def test_numeric_modules_never_import_the_loaders(module):
    assert kit_imports(module) & LOADERS == set()


def test_no_import_cycles():
    modules = [p.stem for p in (ROOT / "kit").glob("*.py") if p.stem not in ("__init__", "__main__")]
    graph = {m: kit_imports(m) & set(modules) for m in modules}
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
        if m not in done:
            stack.append(m)
            for dep in graph[m]:
                visit(dep)
            stack.pop()
            done.add(m)

    for m in modules:
        visit(m)


def test_ruff_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "kit", "bench", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_and_export_is_reachable_from_kit():
    import kit

    modules = {p.stem for p in (ROOT / "kit").glob("*.py") if not p.stem.startswith("__")}
    assert modules <= set(kit.__all__), f"add to kit.__all__: {sorted(modules - set(kit.__all__))}"
    for name in kit.__all__:
        assert getattr(kit, name) is not None
