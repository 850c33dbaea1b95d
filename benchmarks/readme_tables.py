"""Copy each benchmark's latest Markdown table into the README and the docs pages.

The README's benchmark sections (and docs/*.md) hold a marked block per results file:

    <!-- results: benchmarks/results/core.md -->
    ...the table, rewritten by this script...
    <!-- /results -->

Headings inside a results file are demoted to sit below the README's `###` sections.

    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- results: (\S+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)


def demote(markdown: str) -> str:
    """Headings `#`..`###` of a results file become `####`."""
    return re.sub(r"^#{1,3} ", "#### ", markdown, flags=re.MULTILINE)


def refresh(readme: str) -> str:
    def fill(match: re.Match) -> str:
        body = demote((ROOT / match.group(2)).read_text()).strip()
        return f"{match.group(1)}{body}\n{match.group(4)}"

    return BLOCK.sub(fill, readme)


def main() -> None:
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        if BLOCK.search(text):
            path.write_text(refresh(text))


if __name__ == "__main__":
    main()
