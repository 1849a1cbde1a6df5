"""Step 2, choosing what to remove: the rules (`criteria`: CRITERIA, choose_block, choose_units, Selection),
the ablation oracle that judges the block rules (`oracle`: the true loss of removing every block), the greedy
removal (`greedy`) and the held-out regret of chosen sets (`regret`), on shared parts (`replay`: stored layer
inputs re-run; `branches`: the units and their removal by hooks)."""

from ..core.lazy import lazy as _lazy

__getattr__, __dir__ = _lazy(__name__, ["criteria", "oracle", "replay", "branches", "greedy", "regret"])
