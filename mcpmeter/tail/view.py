"""How ``mcpmeter tail`` looks: renderables drawn from a :class:`~mcpmeter.tail.model.Snapshot`.

Each part renders itself at whatever size it is given (``Live`` re-renders at 4 frames a
second, so a resized terminal gets a fitting frame on the next one). No I/O, no clock:
everything comes from the snapshot.

Values from the store (names, tags, notes) are shown through :func:`plain`: as plain
``Text`` (never parsed as rich markup) with control characters escaped, so a tool name
cannot style, move or clear the screen, or write to the clipboard.
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.filesize import decimal
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mcpmeter.output.terminal import printable
from mcpmeter.tail.model import GROUPINGS, BudgetStatus, Snapshot

STATUS_STYLE = {
    "ok": "green",
    "error": "bold red",
    "tool_error": "red",
    "no_response": "yellow",
    "rejected": "bold magenta",
    "cancelled": "dim",
}

#: Below this width the budgets panel goes under the summary instead of beside it.
SIDE_BY_SIDE_MIN_WIDTH = 100
BUDGETS_WIDTH = 40


def plain(value: str | None, style: str = "", empty: str = "-") -> Text:
    """A value from the store as text to draw: control characters escaped, no markup."""
    return Text(printable(value) if value else empty, style=style)


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:,.1f}"


def fmt_usd(usd: float | None) -> str:
    if usd is None:
        return "-"
    if usd == 0:
        return "$0.00"
    return f"${usd:,.2f}" if usd >= 1 else f"${usd:.4f}"


def fmt_bytes(n: int) -> str:
    """``920 B``, ``524.4 kB``, ``1.2 MB`` (powers of 1000, like ``rich.filesize``)."""
    if n < 1000:
        return f"{n} B"
    return decimal(n, precision=1, separator=" ")


def fmt_clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


class Header:
    """The store, the totals since the view started, and whether it is live or paused."""

    def __init__(self, snap: Snapshot, location: str, filters: str) -> None:
        self.snap = snap
        self.location = location
        self.filters = filters

    def __rich__(self) -> RenderableType:
        s = self.snap
        title = Text.assemble(("mcpmeter tail", "bold"), "  ", (printable(self.location), "cyan"))
        state = (
            Text(" PAUSED ", style="bold black on yellow") if s.paused else Text("● live", style="bold green")
        )
        state.append(f"  {fmt_clock(s.now)} UTC", style="dim")
        totals = Text.assemble(
            ("rows ", "dim"),
            (f"{s.rows:,}", "bold"),
            ("   calls/s (1m) ", "dim"),
            (f"{s.per_second:,.2f}", "bold"),
            ("   errors ", "dim"),
            (f"{s.errors:,}", "bold red" if s.errors else "bold"),
            ("   rejected ", "dim"),
            (f"{s.rejected:,}", "bold magenta" if s.rejected else "bold"),
            ("   cost ", "dim"),
            (fmt_usd(s.cost_usd), "bold"),
        )
        if s.first_ts is not None:
            totals.append(f"   since {s.first_ts[11:19]} UTC", style="dim")
        if self.filters:
            totals.append(f"   {printable(self.filters)}", style="dim")
        totals.no_wrap = True
        totals.overflow = "ellipsis"
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        grid.add_column(justify="right", no_wrap=True)
        grid.add_row(title, state)
        return Panel(Group(grid, totals), box=box.ROUNDED, padding=(0, 1))


#: The list's columns: name, justification, share of the spare width, and the narrowest
#: screen that still shows it (narrow terminals drop session, then server, then project).
CALL_COLUMNS: tuple[tuple[str, str, int | None, int], ...] = (
    ("time UTC", "left", None, 0),
    ("project", "left", 2, 90),
    ("agent", "left", 3, 0),
    ("session", "left", None, 110),
    ("server", "left", 3, 100),
    ("tool", "left", 3, 0),
    ("status", "left", None, 0),
    ("ms", "right", None, 0),
    ("bytes", "right", None, 0),
    ("cost", "right", None, 0),
)


class RecentCalls:
    """The latest calls, oldest at the top, as many as fit the height given."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or console.height
        fit = max(0, height - 3)  # the panel's borders and the table's header
        table = Table(
            box=None,
            expand=True,
            padding=(0, 1),
            pad_edge=False,
            header_style="bold dim",
        )
        width = options.max_width
        columns = [c for c in CALL_COLUMNS if width >= c[3]]
        for name, justify, _, _ in columns:
            table.add_column(
                name,
                justify=justify,  # type: ignore[arg-type]
                no_wrap=True,
                overflow="ellipsis",
                min_width=len(name),
            )
        recent = self.snap.recent[-fit:] if fit else ()
        for call in recent:
            cells: dict[str, RenderableType] = {
                "time UTC": call.ts_text[11:23],
                "project": plain(call.project),
                "agent": plain(call.agent),
                "session": plain((call.session or "")[:8]),
                "server": plain(call.server),
                "tool": plain(call.tool, style="" if call.is_tool else "dim"),
                "status": plain(call.status, style=STATUS_STYLE.get(call.status, "")),
                "ms": fmt_ms(call.latency_ms),
                "bytes": fmt_bytes(call.bytes),
                "cost": fmt_usd(call.cost_usd),
            }
            table.add_row(*(cells[c[0]] for c in columns))
        body: RenderableType = table if recent else Group(table, Text("waiting for calls…", style="dim"))
        yield Panel(
            body,
            title=f"[bold]recent calls[/] [dim]({len(recent)} of {self.snap.rows:,})[/]",
            title_align="left",
            box=box.ROUNDED,
            padding=(0, 1),
            height=height,
        )


class Summary:
    """Per group (tool, agent, project or server) over the last minute."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or console.height
        fit = max(0, height - 3)
        s = self.snap
        table = Table(box=None, expand=True, padding=(0, 1), pad_edge=False, header_style="bold dim")
        table.add_column(s.group_by, ratio=1, no_wrap=True, overflow="ellipsis")
        for name in ("calls/s", "calls", "errors", "p50 ms", "p95 ms", "bytes", "cost"):
            table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
        groups = s.groups
        shown = groups[: fit - 1] if len(groups) > fit else groups
        for g in shown:
            table.add_row(
                plain(g.key),
                f"{g.per_second:,.2f}",
                f"{g.calls:,}",
                Text(f"{g.errors:,}", style="red" if g.errors else ""),
                fmt_ms(g.p50_ms),
                fmt_ms(g.p95_ms),
                fmt_bytes(g.bytes),
                fmt_usd(g.cost_usd or None),
            )
        if len(shown) < len(groups):
            table.add_row(Text(f"+{len(groups) - len(shown)} more", style="dim"))
        body: RenderableType = (
            table if groups else Group(table, Text("no calls in the last minute", style="dim"))
        )
        yield Panel(
            body,
            title=f"[bold]by {s.group_by}[/] [dim]· last minute[/]",
            title_align="left",
            box=box.ROUNDED,
            padding=(0, 1),
            height=height,
        )


class Budgets:
    """Budgets, most used first: yellow from 80 %, red once spent."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or console.height
        fit = max(0, height - 2)
        lines: list[Text] = []
        if self.snap.budget_note:
            lines.append(plain(self.snap.budget_note, style="yellow"))
        budgets = sorted(self.snap.budgets or (), key=lambda b: (-b.used, b.scope, b.subject))
        if not budgets and not self.snap.budget_note:
            lines.append(Text("no budgets", style="dim"))
        room = fit - len(lines)
        shown = budgets[: room - 1] if len(budgets) > room else budgets
        lines.extend(budget_line(b) for b in shown)
        if len(shown) < len(budgets):
            lines.append(Text(f"+{len(budgets) - len(shown)} more", style="dim"))
        yield Panel(
            Group(*lines),
            title="[bold]budgets[/]",
            title_align="left",
            box=box.ROUNDED,
            padding=(0, 1),
            height=height,
        )


def budget_line(b: BudgetStatus) -> Text:
    used = b.used
    style = "bold red" if used >= 1 else "yellow" if used >= 0.8 else ""
    amount = (
        f"{fmt_usd(b.spent)}/{fmt_usd(b.limit)}"
        if b.unit == "usd"
        else f"{b.spent:,.0f}/{b.limit:,.0f} calls"
    )
    percent = "over" if used == float("inf") else f"{used:.0%}"
    return Text.assemble(
        (f"{percent:>5} ", style or "bold"),
        (printable(f"{b.scope} {b.subject}"), style),
        (printable(f"  {amount} {b.window}"), "dim"),
        no_wrap=True,
        overflow="ellipsis",
    )


class Footer:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def __rich__(self) -> Text:
        nxt = GROUPINGS[(GROUPINGS.index(self.snap.group_by) + 1) % len(GROUPINGS)]
        return Text.assemble(
            (" q", "bold"),
            (" quit   ", "dim"),
            ("p", "bold"),
            (" resume   " if self.snap.paused else " pause   ", "dim"),
            ("g", "bold"),
            (f" group by {nxt}", "dim"),
            no_wrap=True,
            overflow="ellipsis",
        )


class TailView:
    """The whole screen: header, recent calls, the summary and budgets, the keys."""

    def __init__(self, snap: Snapshot, *, location: str, filters: str = "", keys: bool = True) -> None:
        self.snap = snap
        self.location = location
        self.filters = filters
        self.keys = keys  # the key line: only while the keys work

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        s = self.snap
        width = options.max_width
        height = options.height or console.height
        side_by_side = width >= SIDE_BY_SIDE_MIN_WIDTH
        budget_rows = 1 if s.budgets is None else max(1, len(s.budgets)) + bool(s.budget_note)
        summary_rows = max(1, len(s.groups)) + 3
        if not side_by_side:
            summary_rows += budget_rows + 2
        bottom = min(max(summary_rows, budget_rows + 2, 6), max(6, (height - 5) // 2))

        layout = Layout()
        layout.split_column(
            Layout(Header(s, self.location, self.filters), name="header", size=4),
            Layout(RecentCalls(s), name="calls", ratio=1),
            Layout(name="bottom", size=bottom),
            *([Layout(Footer(s), name="footer", size=1)] if self.keys else []),
        )
        if side_by_side:
            layout["bottom"].split_row(
                Layout(Summary(s), name="summary", ratio=1),
                Layout(Budgets(s), name="budgets", size=BUDGETS_WIDTH),
            )
        else:
            budgets = min(budget_rows + 2, bottom - 4)
            layout["bottom"].split_column(
                Layout(Summary(s), name="summary", ratio=1),
                Layout(Budgets(s), name="budgets", size=max(3, budgets)),
            )
        yield from layout.__rich_console__(console, options.update(height=height))
