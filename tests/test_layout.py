"""The layering the Development page (docs/development.md) describes: the core imports nothing from the rest of
the kit, numeric code never reaches the loaders (directly or through another module), the readers of
a result table never reach the evaluators, there is no import cycle, and the code passes the linter.

Modules are named by their dotted path under kit ("core.stats", "evaluate.loss"); a package is named
by its own path ("evaluate": its __init__), and importing a module imports its packages too."""

import ast
import subprocess
import sys
from importlib import import_module
from importlib.util import resolve_name
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _file(module: str, root: Path) -> Path | None:
    """The source of kit.<module> under root/kit: a module file or a package's __init__."""
    base = root / "kit" / Path(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _packages(module: str) -> set[str]:
    """The packages importing kit.<module> imports first: "evaluate" for "evaluate.loss"."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def kit_imports(module: str) -> set[str]:
    """The kit modules that kit.<module> imports itself (anywhere in the file), with their packages."""
    path = _file(module, ROOT)
    package = f"kit.{module}" if path.name == "__init__.py" else f"kit.{module}".rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module or ""
            if base == "kit" or base.startswith("kit."):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names if _file(f"{base}.{a.name}".removeprefix("kit."), ROOT)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kit.")}
    names = {name.removeprefix("kit.") for name in found if name != "kit"}
    return (names | {p for n in names for p in _packages(n)}) - {module}


def _modules() -> list[str]:
    """Every module and package of kit (not kit itself or its CLI)."""
    found = []
    for path in (ROOT / "kit").rglob("*.py"):
        parts = path.relative_to(ROOT / "kit").with_suffix("").parts
        if parts in (("__init__",), ("__main__",)):
            continue
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(found)


MODULES = _modules()
CORE = [m for m in MODULES if m.split(".")[0] == "core"]  # import only the core
NUMERIC = ["scan.similarity", "scan.distances", "evaluate.scoring", "evaluate.loss", "evaluate.recall_task",
           "experiments.results", "experiments.curves", "choose.oracle", "choose.criteria", "prune"]  # never reach the loaders
LOADERS = {m for m in MODULES if m.split(".")[0] == "loaders"}
READERS = ["experiments.results", "experiments.curves", "experiments.plots", "experiments.readings"]  # read a saved result table
EVALUATORS = {m for m in MODULES if m.split(".")[0] == "evaluate"} | {"experiments.sweep", "experiments.budget"}


def reached(module: str) -> set[str]:
    """Every kit module that importing `module` imports, through any chain of imports."""
    seen = _packages(module)
    todo = [module, *seen]
    while todo:
        for dep in kit_imports(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen - {module}


def test_reached_follows_imports_through_other_modules_and_packages(tmp_path, monkeypatch):
    sources = {"a.py": "from . import b\n", "b.py": "from .p.c import f\n", "p/__init__.py": "from ..d import g\n",
               "p/c.py": "import os\n", "d.py": "", "e.py": "from .p import c\n"}  # fmt: skip
    for name, source in sources.items():
        (tmp_path / "kit" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "kit" / name).write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert reached("a") == {"b", "p", "p.c", "d"} and reached("p.c") == {"p", "d"} and reached("d") == set()
    assert kit_imports("e") == {"p", "p.c"}


def test_the_layout_is_the_pipeline():
    """The folders of the pipeline: no module left loose at the top but run, prune, families and testing."""
    top = {m.split(".")[0] for m in MODULES}
    assert top == {"run", "steps", "core", "loaders", "scan", "choose", "prune", "healing", "evaluate", "experiments",
                   "families", "testing"}  # fmt: skip


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[0] not in ("steps", "run")])
def test_the_steps_sit_on_top(module):
    """kit.run and kit.steps are the top of the stack: the library below them never reaches either; the run imports
    only the core."""
    assert reached(module) & {m for m in MODULES if m.split(".")[0] in ("steps", "run")} == set()
    assert reached("run") <= set(CORE)


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_nothing_from_the_kit_but_the_core(module):
    assert reached(module) <= set(CORE)


@pytest.mark.parametrize("module", NUMERIC)
def test_numeric_modules_never_reach_the_loaders(module):
    assert reached(module) & LOADERS == set()


def test_no_import_cycles():
    graph = {m: kit_imports(m) & set(MODULES) for m in MODULES}
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
        if m not in done:
            stack.append(m)
            for dep in sorted(graph[m]):
                visit(dep)
            stack.pop()
            done.add(m)

    for m in MODULES:
        visit(m)


def test_ruff_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "kit", "bench", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_and_export_is_reachable_from_kit():
    """`kit.<package>.<module>` is that module (after `import kit` alone); `kit.<name>` is the object its
    home module defines (not a re-export)."""
    import kit

    top = sorted({m.split(".")[0] for m in MODULES})
    assert set(top) <= set(kit.__all__), f"add to kit.__all__: {sorted(set(top) - set(kit.__all__))}"
    for name in MODULES:
        value = kit
        for part in name.split("."):
            value = getattr(value, part)
        assert value is import_module(f"kit.{name}")
    for name, home in kit._EXPORTS.items():
        value = getattr(kit, name)
        assert value is getattr(import_module(f"kit.{home}"), name)
        assert getattr(value, "__module__", f"kit.{home}") == f"kit.{home}", f"{name} is defined in {value.__module__}"


def test_evaluate_functions_survive_importing_every_submodule():
    """No module of kit.evaluate is named after one of its functions, so importing them all leaves
    `kit.evaluate.mmlu` (and the rest) the function users call."""
    import kit.evaluate

    for name in MODULES:
        import_module(f"kit.{name}")
    for name in ["mmlu", "boolq", "recall", "cost", "validation_loss", "lm_eval_mmlu"]:
        function = getattr(kit.evaluate, name)
        assert callable(function) and not isinstance(function, type(kit)), name
    assert not set(kit.evaluate._EXPORTS) & {m.split(".")[-1] for m in MODULES}


@pytest.mark.parametrize("reader", READERS)
def test_the_readers_of_results_never_reach_the_evaluators(reader):
    assert reached(reader) & EVALUATORS == set()


@pytest.mark.parametrize("writer", ["experiments.sweep", "experiments.budget"])
def test_the_sweeps_write_through_the_result_table_not_its_readers(writer):
    imports = kit_imports(writer)
    assert "experiments.results" in imports and imports & {"experiments.curves", "experiments.plots", "experiments.readings"} == set()


def test_tab_completion_shows_every_public_name():
    import kit

    assert set(kit.__all__) <= set(dir(kit))
    for package in {m.split(".")[0] for m in MODULES if "." in m}:
        submodules = {m.split(".")[1] for m in MODULES if m.startswith(f"{package}.")}
        assert submodules <= set(dir(getattr(kit, package))), package
    assert set(kit.evaluate.__all__) <= set(dir(kit.evaluate))


@pytest.mark.parametrize("reader", READERS)
def test_the_readers_of_results_import_neither_transformers_nor_the_evaluators(reader):
    """Drawing or reading a saved table needs no model code: `import kit.<reader>` in a fresh process."""
    code = f"import sys, kit.{reader}; print(sorted(m for m in sys.modules if m == 'transformers' or m.startswith('kit.evaluate')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
