"""Step 2, choosing the block to remove: the rules (`criteria`: CRITERIA, choose_block, Selection) and
the ablation oracle that judges them (`oracle`: the true loss of removing every block)."""

from ..core.lazy import lazy as _lazy

__getattr__, __dir__ = _lazy(__name__, ["criteria", "oracle", "replay", "branches", "greedy", "regret"])
