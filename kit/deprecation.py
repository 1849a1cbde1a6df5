"""Old public names kept working for one release after they move: each use warns with the new name."""

import warnings

REMOVED_IN = "kit 0.3"  # the release that drops the old names


def warn(old: str, new: str) -> None:
    """A DeprecationWarning pointing at the caller's line: `old` is now `new`."""
    warnings.warn(f"{old} is deprecated and will be removed in {REMOVED_IN}: use {new}", DeprecationWarning, stacklevel=3)


def moved(module: str, homes: dict):
    """A module `__getattr__` serving the names that moved out of `module` to `homes[name]` (a module),
    with a warning: e.g. `__getattr__ = moved(__name__, {"outcomes": kit.results})`."""

    def __getattr__(name):
        if name not in homes:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home = homes[name]
        warn(f"{module}.{name}", f"{home.__name__}.{name}")
        return getattr(home, name)

    return __getattr__
