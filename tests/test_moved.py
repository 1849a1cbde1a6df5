"""The module paths of kit 0.1 keep working for one release: every name of a moved module is the same
object under its old path (`kit.similarity.angular_distances`, `from kit.prune import choose_block`,
`kit.mmlu.fewshot_examples`, ...), and each use warns, naming the new home."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kit

ROOT = Path(__file__).resolve().parents[1]
STUBS = sorted(p.stem for p in (ROOT / "kit" / "_moved").glob("*.py"))
NEW_HOME = re.compile(r'_moved_module\("kit\.(\w+)", "(kit\.[\w.]+)"\)')


def _moved() -> dict[str, str]:
    """{old module path: new module path}, as each stub in kit/_moved/ (and the healing package) says."""
    found = dict(NEW_HOME.search((ROOT / "kit" / "_moved" / f"{stub}.py").read_text()).groups() for stub in STUBS)
    return {f"kit.{old}": [new] for old, new in found.items()} | {"kit.healing": ["kit.healing.lora", "kit.healing.train"]}


MOVED = _moved()
PRUNE_MOVED = {"CRITERIA": "kit.choose.criteria", "Criterion": "kit.choose.criteria", "choose_block": "kit.choose.criteria",
               "Selection": "kit.choose.criteria", "SELECTION_FILE": "kit.choose.criteria", "heuristic_block": "kit.core.block"}


def test_every_stub_names_its_old_path_and_an_existing_module():
    assert len(STUBS) == 32 and set(MOVED) == {f"kit.{stub}" for stub in STUBS} | {"kit.healing"}
    for homes in MOVED.values():
        for new in homes:
            importlib.import_module(new)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_name_of_an_old_module_path_is_the_same_object_and_warns(old):
    module = importlib.import_module(old)
    homes = [importlib.import_module(new) for new in MOVED[old]]
    served = {}  # name -> the home that serves it: the first that has it
    for new in homes:
        for name in vars(new):
            if not name.startswith("_") and not name.endswith("_metrics"):
                served.setdefault(name, new)
    assert served
    for name, new in served.items():
        with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)}\.{name} is deprecated .* use {re.escape(new.__name__)}\.{name}"):
            assert getattr(module, name) is getattr(new, name)
    short, (name, new) = old.removeprefix("kit."), next(iter(served.items()))
    with pytest.warns(DeprecationWarning, match=re.escape(f"use {new.__name__}.{name}")):
        assert getattr(getattr(kit, short), name) is getattr(new, name)  # kit.<old module>.<name>
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        module.no_such_name


@pytest.mark.parametrize("name", sorted(PRUNE_MOVED))
def test_choosing_moved_out_of_prune(name):
    import kit.prune

    home = importlib.import_module(PRUNE_MOVED[name])
    with pytest.warns(DeprecationWarning, match=rf"kit\.prune\.{name} is deprecated .* use {re.escape(home.__name__)}\.{name}"):
        exec(f"from kit.prune import {name} as value", namespace := {})
    assert namespace["value"] is getattr(home, name)
    assert kit.prune.drop_layers is kit.drop_layers  # what stays in prune does not warn


def test_an_old_module_path_runs_as_a_script():
    """`python -m kit.assets ...` (the 0.1 spelling of `python -m kit.loaders.assets`) still runs, warning."""
    result = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "kit.assets", "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "use python -m kit.loaders.assets" in result.stderr
