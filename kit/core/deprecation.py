"""Old public names kept working for one release after they move or are renamed: each use warns with the new name."""

import inspect
import sys
import warnings
from functools import wraps
from importlib import import_module

REMOVED_IN = "kit 0.3"  # the release that drops the old names


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """A DeprecationWarning pointing at the caller's line (its caller's: stacklevel=4): `old` is now `new`."""
    warnings.warn(f"{old} is deprecated and will be removed in {REMOVED_IN}: use {new}", DeprecationWarning, stacklevel=stacklevel)


def moved(module: str, homes: dict, renamed: dict | None = None):
    """A module `__getattr__` serving old names of `module`, with a warning.

    Args:
        module: the module's `__name__`.
        homes: names that moved out of it, each to its home (a module or its dotted name, imported on first
            use), e.g. `{"outcomes": "kit.experiments.results"}`.
        renamed: names of its own that changed, old to new, e.g. `{"STRATEGIES": "PAPER_CRITERIA"}`.
    """
    renamed = renamed or {}

    def __getattr__(name):
        if name in renamed:
            warn(f"{module}.{name}", f"{module}.{renamed[name]}")
            return getattr(sys.modules[module], renamed[name])
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


def renamed_arguments(**renames: str):
    """A decorator keeping a function's or a class's renamed keywords working, old=new each (e.g.
    `@renamed_arguments(strategy="criterion")`): a call passing the old keyword (None counts as not passed)
    warns and passes its value as the new one. On a class (a dataclass too) it wraps `__init__`, so that
    `dataclasses.replace`, `fields` and `asdict` see only the new names.

    Args:
        renames: each old keyword, naming the parameter that replaced it.

    Raises:
        TypeError, on a call that also sets the new keyword to anything but its default (left at its default,
        as notebook 02 passes both, the old keyword's value wins).
    """

    def decorate(target):
        func = target.__init__ if isinstance(target, type) else target
        where = f"{target.__module__}.{target.__qualname__}"
        signature = inspect.signature(func)
        if missing := [new for new in renames.values() if new not in signature.parameters]:
            raise TypeError(f"{where} has no parameter {', '.join(missing)}: renamed_arguments maps each old keyword to a parameter it has")

        @wraps(func)
        def wrapper(*args, **kwargs):
            given = {old: value for old in renames if (value := kwargs.pop(old, None)) is not None}
            if not given:
                return func(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs)
            for old, value in given.items():
                new = renames[old]
                default = signature.parameters[new].default
                if bound.arguments.get(new, default) != default:
                    raise TypeError(f"{where}() got both {old}= and {new}=: {old}= is the deprecated name of {new}=, pass only {new}=")
                warn(f"{where}({old}=)", f"{new}=")
                bound.arguments[new] = value
            return func(*bound.args, **bound.kwargs)

        if isinstance(target, type):
            target.__init__ = wrapper
            return target
        return wrapper

    return decorate


class renamed_attribute:
    """A class attribute kept under its old name, read-only: `strategy = renamed_attribute("criterion")` in a
    class body makes `obj.strategy` warn and return `obj.criterion`.

    Args:
        new: the attribute's name today.
    """

    def __init__(self, new: str):
        self.new = new

    def __set_name__(self, owner, name):
        self.old = f"{owner.__module__}.{owner.__qualname__}.{name}"

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        warn(self.old, self.new)
        return getattr(obj, self.new)

    def __set__(self, obj, value):
        raise AttributeError(f"{self.old} is the deprecated, read-only name of {self.new}: set {self.new}")
