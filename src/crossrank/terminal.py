"""The rich console the commands print results on, as wide as the content when piped.

Why: rich lays a table out for 80 columns when the output is not a terminal, so ``crossrank
eval | tee log`` cut headers to "task (querie…" and folded every passage. Piped, the console
is :data:`PIPED_WIDTH` columns wide and tables (which do not expand) take only what their
content needs; on a terminal, the terminal's width.
"""

from __future__ import annotations

from rich.console import Console

#: Columns available to a table when the output is a pipe or a file.
PIPED_WIDTH = 240


def output_console(*, stderr: bool = False) -> Console:
    """A console for results: the terminal's width, or :data:`PIPED_WIDTH` when piped."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=PIPED_WIDTH)
