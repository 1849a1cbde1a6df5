"""Step 1, the scan: one pass over texts measuring how far the residual stream moves across every
block of layers (`similarity.angular_distances`), and its result (`distances.Distances`)."""

from ..core.lazy import lazy as _lazy

__getattr__, __dir__ = _lazy(__name__, ["distances", "similarity"])
