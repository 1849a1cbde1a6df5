"""kit.assets moved to kit.loaders.assets in 0.2: this path warns on use and goes in kit 0.3."""

import runpy as _runpy

from kit.core.deprecation import moved_module as _moved_module
from kit.core.deprecation import warn as _warn

__getattr__ = _moved_module("kit.assets", "kit.loaders.assets")

if __name__ == "__main__":
    _warn("python -m kit.assets", "python -m kit.loaders.assets")
    _runpy.run_module("kit.loaders.assets", run_name="__main__", alter_sys=True)
