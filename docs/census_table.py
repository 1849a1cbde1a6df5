"""The census table of docs/families.md: every causal-LM model type of the pinned transformers and its verdict,
from kit.families.census_table(). `python docs/census_table.py` prints it, `--write` puts it in docs/families.md
between its markers; tests/test_census.py checks the page has it."""

import sys
from pathlib import Path

import marked_table  # docs/marked_table.py, beside this script

from kit import families

PAGE = Path(__file__).resolve().parent / "families.md"


def write(page: Path = PAGE) -> None:
    """Replace the table between the page's `<!-- census-table ... -->` and `<!-- /census-table -->` markers."""
    marked_table.replace(page, "census-table", families.census_table())


if __name__ == "__main__":
    write() if sys.argv[1:] == ["--write"] else print(families.census_table())
