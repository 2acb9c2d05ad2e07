"""Tables for people: aligned text (``report``), and rich tables (``prices show``, ``budget show``).

Every cell passes through :func:`mcpmeter.output.terminal.printable` here, whatever the
caller did: names in the store are whatever a client or a server sent, and a control
character among them must be shown, not obeyed by the reader's terminal. Cells reach a rich
table as :class:`rich.text.Text` (:func:`store_text`), so nothing in them is read as markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from mcpmeter.output.terminal import printable

if TYPE_CHECKING:
    from rich.text import Text

#: What a table without rows says instead.
NO_ROWS = "(no rows)"


def write_table(
    out: IO[str],
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    numeric: Sequence[bool],
    total: Sequence[str] | None = None,
    notes: Sequence[str] = (),
) -> None:
    """Aligned columns two spaces apart: the header, the rows, then ``notes`` a line each.

    ``rows`` hold the cells as text; a ``numeric`` column is aligned right, the others left.
    With ``total`` and at least one row, a line of dashes and the ``total`` line follow the
    rows; without rows, the table says :data:`NO_ROWS`.
    """
    header = [printable(c) for c in columns]
    cells = [[printable(cell) for cell in row] for row in rows]
    if total is not None and rows:
        cells.append([printable(cell) for cell in total])
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out.write(line(header) + "\n")
    for i, values in enumerate(cells):
        if total is not None and rows and i == len(cells) - 1:
            out.write(line(["-" * w for w in widths]) + "\n")
        out.write(line(values) + "\n")
    if not rows:
        out.write(NO_ROWS + "\n")
    for note in notes:
        out.write(note + "\n")


def store_text(value: object) -> Text:
    """A value from the store as a rich table cell: shown as it is, control characters
    escaped, never read as markup."""
    from rich.text import Text

    return Text(printable(str(value)))


def print_rich(out: IO[str], *renderables: Any, min_width: int | None = None) -> None:
    """Print rich renderables (tables, text) to ``out``, at least ``min_width`` columns wide
    when given (so a pipe or a narrow terminal still gets whole rows)."""
    from rich.console import Console

    console = Console(file=out)
    if min_width is not None:
        console = Console(file=out, width=max(min_width, console.width))
    for renderable in renderables:
        console.print(renderable)
