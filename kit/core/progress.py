"""Progress bars: `tqdm.auto` on every loop over data, shown on the main process only, and all of them
(the Trainer's too) silenced by tqdm's own switch TQDM_DISABLE=1, which an explicit `disable=` would
otherwise override."""

import os

from tqdm.auto import tqdm


def silenced() -> bool:
    """Whether TQDM_DISABLE asks for no progress bars."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def progress(iterable=None, *, show: bool = True, **kwargs):
    """tqdm over `iterable` (its keywords: desc, total, unit, ...), unless `show` is False or bars are silenced."""
    return tqdm(iterable, disable=not show or silenced(), **kwargs)
