"""Generated tables in the docs' pages: a table lives between `<!-- NAME ... -->` and `<!-- /NAME -->` markers, and
the script that generates it (census_table.py, memory_table.py) rewrites it there with `--write`."""

import re
from pathlib import Path


def replace(page: Path, name: str, table: str) -> None:
    """Put `table` between the page's `<!-- name ... -->` and `<!-- /name -->` markers."""
    text = page.read_text()
    pattern = re.compile(rf"(<!-- {name}[^>]*-->\n).*?(\n<!-- /{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: no <!-- {name} --> ... <!-- /{name} --> markers")
    page.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))
