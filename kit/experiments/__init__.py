"""Sweeps and reading them: running the evaluations over block sizes, criteria and checkpoints
(`sweep`) and over budgets of parameters for every granularity (`budget`), healing methods compared (`heal_compare`), the result table they write (`results`), and what reads it or a run folder without
evaluating anything (`curves`, `plots`, `readings`), the block picker (`widgets`), and the notebooks
run headless (`reports`)."""

from ..core.lazy import lazy as _lazy

__getattr__, __dir__ = _lazy(__name__, ["budget", "curves", "heal_compare", "plots", "readings", "reports", "results", "sweep", "widgets"])
