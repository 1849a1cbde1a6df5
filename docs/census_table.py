"""The census table of docs/families.md: every causal-LM model type of the pinned transformers and its verdict,
from kit.families.census_table(). `python docs/census_table.py` prints it, `--write` puts it in docs/families.md
between its markers; tests/test_census.py checks the page has it."""

import re
import sys
from pathlib import Path

from kit import families

PAGE = Path(__file__).resolve().parent / "families.md"


def write(page: Path = PAGE) -> None:
    """Replace the table between the page's `<!-- census-table ... -->` and `<!-- /census-table -->` markers."""
    text = page.read_text()
    pattern = re.compile(r"(<!-- census-table[^>]*-->\n).*?(\n<!-- /census-table -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: no <!-- census-table --> ... <!-- /census-table --> markers")
    page.write_text(pattern.sub(lambda m: m.group(1) + families.census_table() + m.group(2), text))


if __name__ == "__main__":
    write() if sys.argv[1:] == ["--write"] else print(families.census_table())
