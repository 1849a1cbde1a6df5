"""kit 0.3's top level: `kit.__all__` is the planned surface (of the names that exist so far), `import kit`
imports nothing more, the names 0.3 moved are served by the one alias table in kit/__init__.py, each use
warning at the caller's line until kit 0.4, docs/migration.md lists them all, what 0.2 announced for
removal in 0.3 is gone, and test modules never import one another."""

import ast
import inspect
import re
import subprocess
import sys
import warnings
from importlib import import_module
from pathlib import Path

import pytest

import kit

ROOT = Path(__file__).resolve().parents[1]
# kit.__all__ as planned for 0.3. NOT_YET: planned names that do not exist yet; each joins kit.__all__
# when it is written (the healing methods' configs too, whatever their names: any *Config may join).
PLANNED = ["Run", "run", "steps", "ScanConfig", "PruneConfig", "HealConfig", "EvaluateConfig", "SweepConfig", "CriteriaConfig",
           "BudgetConfig", "load_model", "angular_distances", "Distances", "Block", "Layers", "Sublayers", "Selection",
           "drop_layers", "save_pruned", "heal", "merge_adapter", "data", "metrics", "plots", "readings", "widgets", "healing",
           "testing", "families", "core", "loaders", "scan", "choose", "prune", "evaluate", "experiments"]  # fmt: skip
NOT_YET: set[str] = set()
SHORT = {"data": "kit.loaders.data", "metrics": "kit.evaluate.metrics", "plots": "kit.experiments.plots",
         "readings": "kit.experiments.readings", "widgets": "kit.experiments.widgets"}  # fmt: skip
MIGRATION = ROOT / "docs" / "migration.md"
TABLE_START = "<!-- generated from the alias table in kit/__init__.py; tests/test_aliases.py keeps the two equal -->\n"
TABLE_END = "\n<!-- end of the generated table -->"


def resolve(dotted: str):
    """kit.a.b.c by attribute access from kit, as a user writes it."""
    value = kit
    for part in dotted.split(".")[1:]:
        value = getattr(value, part)
    return value


def test_all_is_the_planned_surface_of_the_names_that_exist():
    extra = [name for name in kit.__all__ if name not in PLANNED]
    assert all(name.endswith("Config") for name in extra), f"not in the 0.3 surface: {extra}"
    assert len(set(kit.__all__)) == len(kit.__all__)
    for name in set(PLANNED) - set(kit.__all__):
        assert name in NOT_YET, f"kit.__all__ lacks {name}"
        assert not hasattr(kit, name), f"kit.{name} exists: add it to kit.__all__ (kit/__init__.py) and drop it from NOT_YET"
    assert not {"tiny_model", "TINY_ARCHITECTURES"} & set(kit.__all__)  # test fixtures live in kit.testing only


def test_every_name_in_all_resolves_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        values = {name: getattr(kit, name) for name in kit.__all__}
    for name, module in SHORT.items():
        assert values[name] is import_module(module)
    assert set(kit.__all__) <= set(dir(kit))


def test_import_kit_imports_nothing_else():
    code = "import sys, kit; print(sorted(m for m in sys.modules if m.split('.')[0] in ('kit', 'torch', 'transformers')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['kit', 'kit.core', 'kit.core.lazy']"


@pytest.mark.parametrize("old", list(kit._ALIASES))
def test_every_alias_is_its_new_home_and_warns_at_the_callers_line(old):
    new = kit._ALIASES[old]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        target = resolve(new)  # the new home itself never warns
    message = f"{old} is deprecated and will be removed in kit 0.4: use {new}"
    with pytest.warns(DeprecationWarning, match=f"^{re.escape(message)}$") as caught:
        value = getattr(kit, old.removeprefix("kit."))
    assert value is target
    assert {w.filename for w in caught if issubclass(w.category, DeprecationWarning)} == {__file__}
    assert old.removeprefix("kit.") not in dir(kit)  # tab completion offers the new names only


def test_from_kit_import_an_alias_warns_at_the_importing_line():
    with pytest.warns(DeprecationWarning, match="kit.tiny_model is deprecated .* use kit.testing.tiny_model") as caught:
        from kit import tiny_model
    assert tiny_model is kit.testing.tiny_model
    assert {w.filename for w in caught if issubclass(w.category, DeprecationWarning)} == {__file__}


def test_the_tests_turn_an_alias_into_an_error():
    """pyproject's filterwarnings make the kit's own deprecations errors in the tests, so they use the new names."""
    with pytest.raises(DeprecationWarning, match="will be removed in kit 0.4"):
        kit.tiny_model  # noqa: B018


def test_an_unknown_name_is_missing_from_kit():
    with pytest.raises(AttributeError, match="module 'kit' has no attribute 'no_such_name'"):
        kit.no_such_name  # noqa: B018
    assert not hasattr(kit, "__wrapped__")


def moved_table() -> str:
    """The migration page's table of the names 0.3 moved, from the alias table."""
    return "\n".join(["| 0.2 | 0.3 |", "|---|---|", *(f"| `{old}` | `{new}` |" for old, new in kit._ALIASES.items())])


def test_the_migration_page_lists_every_alias():
    page = MIGRATION.read_text()
    assert TABLE_START in page and TABLE_END in page
    table = page[page.index(TABLE_START) + len(TABLE_START):page.index(TABLE_END)]
    assert table == moved_table(), f"docs/migration.md: replace the generated table with\n{moved_table()}"


OLD_MODULE_PATHS = ["progress", "text", "block", "config", "stats", "device", "layers", "artifacts", "distributed", "deprecation",
                    "assets", "data", "models", "similarity", "distances", "oracle", "merge", "mmlu", "boolq", "recall", "cost",
                    "scoring", "loss", "harness", "metrics", "sweep", "results", "curves", "plots", "widgets", "readings",
                    "reports"]  # fmt: skip


@pytest.mark.parametrize("old", OLD_MODULE_PATHS)
def test_the_module_paths_of_0_1_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        import_module(f"kit.{old}")
    assert hasattr(kit, old) == (old in SHORT)  # kit.data, kit.metrics, ... are 0.3's short names
    assert kit.__path__ == [str(ROOT / "kit")]


@pytest.mark.parametrize("module, name", [
    *(("kit.prune", name) for name in ("CRITERIA", "Criterion", "choose_block", "Selection", "SELECTION_FILE", "heuristic_block")),
    *(("kit.healing", name) for name in ("heal", "HealResult", "lora_model", "target_modules")),
    *(("kit.evaluate.metrics", name) for name in ("mmlu_metrics", "boolq_metrics", "recall_metrics", "loss_metrics",
                                                  "cost_metrics", "CHANCE")),
    *(("kit.experiments.curves", name) for name in ("outcomes", "encode_outcomes", "chance_level")),
    ("kit.experiments.sweep", "table"), ("kit.experiments.sweep", "STRATEGIES"), ("kit.loaders.models", "weight_bytes"),
    ("kit.experiments.results", "column"),
    *(("kit.core.deprecation", name) for name in ("moved", "moved_module", "renamed_arguments", "renamed_attribute")),
])  # fmt: skip
def test_the_names_0_2_deprecated_are_gone(module, name):
    assert not hasattr(import_module(module), name)


def test_strategy_is_gone_for_criterion():
    from kit.__main__ import parser
    from kit.experiments import plots, sweep, widgets

    with pytest.raises(TypeError, match="strategy"):
        kit.PruneConfig(n=4, strategy="heuristic")
    assert not hasattr(kit.PruneConfig(), "strategy") and not hasattr(widgets.BlockPicker, "strategy")
    for function, old in ((sweep.sweep, "strategy"), (sweep.sweeps, "strategies"), (widgets.BlockPicker, "strategy"),
                          (plots.quality_cost_figure, "cost")):  # fmt: skip
        assert old not in inspect.signature(function).parameters
    with pytest.raises(SystemExit):
        parser().parse_args(["sweep", "--model", "m", "--out", "o", "--ns", "0", "--strategy", "heuristic"])
    assert "STRATEGY" not in (ROOT / "notebooks" / "02_select_and_prune.ipynb").read_text()


def imported_test_modules(source: str, test_modules: set[str]) -> list[str]:
    """The test modules (of `test_modules`, by name) that a module's source imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module and node.module != "tests" else []
            if node.module in (None, "tests"):  # from . import test_x, from tests import test_x
                names += [alias.name for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            names = [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        found += [name for name in names if name.removeprefix("tests.").split(".")[0] in test_modules]
    return found


def test_test_modules_never_import_one_another():
    """Shared builders live in tests/conftest.py or kit.testing: importing a test module runs its collection
    twice and ties the two files' fixtures together."""
    paths = sorted((ROOT / "tests").glob("test_*.py"))
    names = {path.stem for path in paths}
    assert imported_test_modules("from test_readings import rows\nimport tests.test_cli\nfrom . import test_sweep\n"
                                 "importlib.import_module('test_heal')\nfrom conftest import tiny\nimport testing\n", names) == [
        "test_readings", "tests.test_cli", "test_sweep", "test_heal"]  # fmt: skip
    offenders = {path.name: found for path in paths if (found := imported_test_modules(path.read_text(), names))}
    assert offenders == {}, "move what they share to tests/conftest.py or kit.testing"
