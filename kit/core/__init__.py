"""The core: what every step uses and what imports nothing from the rest of the kit (the block, the
settings, statistics, the device policy, the architecture facts, artifacts on disk, data parallelism,
progress bars, tokenising, deprecation, the memory a step holds: measured and planned)."""

from .lazy import lazy as _lazy

__getattr__, __dir__ = _lazy(__name__, ["artifacts", "block", "config", "deprecation", "device", "distributed", "layers",
                                       "lazy", "ledger", "memory", "progress", "stats", "sums", "text"])
