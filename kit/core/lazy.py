"""Lazy package attributes, so that `import kit` stays fast and tab completion shows every name:
a package's submodules, and public names exported from the module that defines them, are imported
on first use."""

from importlib import import_module


def lazy(package: str, modules=(), exports: dict | None = None, fallback=None):
    """The `__getattr__` and `__dir__` of `package`.

    Args:
        package: the package's `__name__`.
        modules: its submodules, `package.<m>` importing `package.m`; or a dict {attribute: module path
            relative to the package}, e.g. `{"data": "loaders.data"}` for a module served under a shorter name.
        exports: {name: module path relative to the package}: `package.<name>` is `name` of that module.
        fallback: the `__getattr__` of every other name (e.g. kit's alias table); without it they are missing.
    """
    modules = modules if isinstance(modules, dict) else {m: m for m in modules}
    exports = exports or {}

    def __getattr__(name):
        if name in exports:
            return getattr(import_module(f"{package}.{exports[name]}"), name)
        if name in modules:
            return import_module(f"{package}.{modules[name]}")
        if fallback is not None:
            return fallback(name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted({*vars(import_module(package)), *modules, *exports})

    return __getattr__, __dir__
