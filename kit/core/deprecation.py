"""Old public names kept working for one release after they move: each use warns with the new name."""

import warnings
from importlib import import_module

REMOVED_IN = "kit 0.3"  # the release that drops the old names


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """A DeprecationWarning pointing at the caller's line (its caller's: stacklevel=4): `old` is now `new`."""
    warnings.warn(f"{old} is deprecated and will be removed in {REMOVED_IN}: use {new}", DeprecationWarning, stacklevel=stacklevel)


def moved(module: str, homes: dict):
    """A module `__getattr__` serving the names that moved out of `module` to `homes[name]` (a module or
    its dotted name, imported on first use), with a warning: e.g.
    `__getattr__ = moved(__name__, {"outcomes": "kit.experiments.results"})`."""

    def __getattr__(name):
        if name not in homes:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home = homes[name] if not isinstance(homes[name], str) else import_module(homes[name])
        warn(f"{module}.{name}", f"{home.__name__}.{name}")
        return getattr(home, name)

    return __getattr__


def moved_module(old: str, *new: str):
    """The `__getattr__` of an old module path whose content moved to the module `new` (or, split, to
    several: the first that has the name): each of their names is served under `old`, with a warning
    (kit/_moved/ holds one such stub per old path)."""

    def __getattr__(name):
        for home in map(import_module, new):
            if not name.startswith("__") and hasattr(home, name):
                warn(f"{old}.{name}", f"{home.__name__}.{name}")
                return getattr(home, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {' and '.join(new)})")

    return __getattr__
