"""Lazy package attributes, so that `import kit` stays fast and tab completion shows every name:
a package's submodules, and public names exported from the module that defines them, are imported
on first use."""

from importlib import import_module


def lazy(package: str, modules=(), exports: dict | None = None, fallback=None):
    """The `__getattr__` and `__dir__` of `package`: `package.<m>` imports the submodule m (one of
    `modules`), `package.<name>` is `name` of the submodule `exports[name]`; anything else goes to
    `fallback` (a `__getattr__`, e.g. the deprecated names of kit.core.deprecation), or is missing."""
    exports = exports or {}

    def __getattr__(name):
        if name in exports:
            return getattr(import_module(f"{package}.{exports[name]}"), name)
        if name in modules:
            return import_module(f"{package}.{name}")
        if fallback is not None:
            return fallback(name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted({*vars(import_module(package)), *modules, *exports})

    return __getattr__, __dir__
