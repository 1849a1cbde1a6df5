"""Old public names kept working for one release after they move: each use warns with the new name
(kit/__init__.py's alias table serves the names 0.3 moved off the top level)."""

import warnings

REMOVED_IN = "kit 0.4"  # the release that drops the old names


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """A DeprecationWarning pointing at the caller's line (its caller's: stacklevel=4): `old` is now `new`."""
    warnings.warn(f"{old} is deprecated and will be removed in {REMOVED_IN}: use {new}", DeprecationWarning, stacklevel=stacklevel)
