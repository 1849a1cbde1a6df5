"""Installed as a user would: the clone built into a wheel and installed (not editable, no dev extra) in a fresh
virtualenv, which imports the kit from its own site-packages, lists the command line's steps and finds the notebooks
that `make reports` runs. The dependencies come from this environment (a .pth file), so nothing is downloaded."""

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

from kit.experiments.reports import NOTEBOOKS


def _run(*command, cwd) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def user_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    source = root / "clone"
    tracked = _run("git", "ls-files", cwd=REPO).splitlines()
    for name in tracked:  # the clone's files as they are now
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", root / "wheels", source, cwd=root)
    (wheel,) = (root / "wheels").glob("deeper_layers_kit-*.whl")
    _run(sys.executable, "-m", "venv", "--without-pip", root / "venv", cwd=root)
    python = root / "venv" / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")  # torch & co. from this environment
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=root)
    return python, site, root


def test_the_installed_kit_imports_from_its_own_site_packages(user_env):
    python, site, root = user_env
    where = _run(python, "-c", "import kit; print(kit.__file__, kit.__version__)", cwd=root)
    assert where.startswith(str(site / "kit" / "__init__.py")), where
    names = _run(python, "-c", "from importlib.metadata import metadata; m = metadata('deeper-layers-kit'); print(m['Name'])", cwd=root)
    assert names.strip() == "deeper-layers-kit"


def test_the_installed_command_line_lists_every_step(user_env):
    python, _, root = user_env
    from kit.steps import STEPS

    listing = _run(python, "-m", "kit", "--help", cwd=root)
    assert all(re.search(rf"^    {name}\b", listing, re.M) for name in STEPS)
    assert "--n-texts" in _run(python, "-m", "kit", "scan", "--help", cwd=root)


def test_the_installed_kit_finds_its_notebooks(user_env):
    python, _, root = user_env
    folder = Path(_run(python, "-c", "from kit.experiments.reports import find_notebooks; print(find_notebooks())", cwd=root).strip())
    assert folder.parts[-3:] == ("share", "deeper-layers-kit", "notebooks") and str(folder).startswith(str(root))
    assert sorted(p.stem for p in folder.glob("*.ipynb")) == sorted(NOTEBOOKS)
