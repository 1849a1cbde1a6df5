"""kit.metrics moved to kit.evaluate.metrics in 0.2: this path warns on use and goes in kit 0.3."""

from kit.core.deprecation import moved_module as _moved_module

__getattr__ = _moved_module("kit.metrics", "kit.evaluate.metrics")
