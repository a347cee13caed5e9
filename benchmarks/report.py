"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections alone.

Each benchmark script owns the text between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->``;
rerunning a script replaces only its own section, so results measured on different machines
(CPU here, a lent GPU) live side by side in one document.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every number below was measured by a script in `benchmarks/`, with the command given in "
    "its section, peers side by side in the same run. Speed targets are judged here as ratios, "
    "never as timed asserts in the test suite.\n"
)


def write_section(name: str, markdown: str, path: Path = DEFAULT_DOC) -> Path:
    """Replace (or append) the section ``name`` of the benchmarks document."""
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{block}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return path
