"""The layering the README's Development section describes: the core imports nothing from the rest of
the kit, numeric code never reaches the loaders (directly or through another module), there is no
import cycle, and the code passes the linter."""

import ast
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["progress", "text", "block", "config", "stats", "device", "layers", "artifacts", "distributed", "deprecation"]  # import only the core
NUMERIC = ["similarity", "distances", "scoring", "loss", "recall", "results", "curves", "oracle", "prune"]  # never reach the loaders
LOADERS = {"data", "assets", "models"}
READERS = ["results", "curves", "plots", "readings"]  # read a saved result table
EVALUATORS = {"metrics", "evaluate", "mmlu", "boolq", "recall", "loss", "cost", "scoring", "harness", "sweep"}


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
    return {name.split(".")[0] for name in found} - {"kit"}


MODULES = sorted(p.stem for p in (ROOT / "kit").glob("*.py") if p.stem not in ("__init__", "__main__"))


def reached(module: str) -> set[str]:
    """Every kit module that importing `module` imports, through any chain of imports."""
    seen, todo = set(), [module]
    while todo:
        for dep in kit_imports(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_reached_follows_imports_through_other_modules(tmp_path, monkeypatch):
    for name, source in {"a": "from . import b\n", "b": "from .c import f\n", "c": "import os\n"}.items():
        (tmp_path / "kit").mkdir(exist_ok=True)
        (tmp_path / "kit" / f"{name}.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert reached("a") == {"b", "c"} and reached("b") == {"c"} and reached("c") == set()


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_nothing_from_the_kit_but_the_core(module):
    assert reached(module) <= set(CORE)


@pytest.mark.parametrize("module", NUMERIC)
def test_numeric_modules_never_reach_the_loaders(module):
    assert reached(module) & LOADERS == set()


def test_no_import_cycles():
    modules = MODULES
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
    """`kit.<module>` is that module; `kit.<name>` is the object its home module defines (not a re-export)."""
    import kit

    assert set(MODULES) <= set(kit.__all__), f"add to kit.__all__: {sorted(set(MODULES) - set(kit.__all__))}"
    for name in MODULES:
        assert getattr(kit, name) is import_module(f"kit.{name}")
    for name, home in kit._EXPORTS.items():
        value = getattr(kit, name)
        assert value is getattr(import_module(f"kit.{home}"), name)
        assert getattr(value, "__module__", f"kit.{home}") == f"kit.{home}", f"{name} is defined in {value.__module__}"


@pytest.mark.parametrize("reader", READERS)
def test_the_readers_of_results_never_reach_the_evaluators(reader):
    assert reached(reader) & EVALUATORS == set()


def test_the_sweep_writes_through_the_result_table_not_its_readers():
    assert "results" in kit_imports("sweep") and kit_imports("sweep") & {"curves", "plots", "readings"} == set()


def test_tab_completion_shows_every_public_name():
    import kit

    assert set(kit.__all__) <= set(dir(kit))


@pytest.mark.parametrize("reader", READERS)
def test_the_readers_of_results_import_neither_transformers_nor_the_evaluators(reader):
    """Drawing or reading a saved table needs no model code: `import kit.<reader>` in a fresh process."""
    code = f"import sys, kit.{reader}; print(sorted(m for m in ('transformers', 'kit.metrics', 'kit.evaluate') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
