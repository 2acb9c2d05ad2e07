"""Dated prices: models per million tokens, tools per call (and per KB of response).

A price row applies from its ``effective_from`` until the next row of the same model (or
tool pattern). LLM cost is computed at query time from ``model_prices`` (see
:func:`llm_cost_sql`), so adding a dated price re-prices history after that date and
leaves history before it alone; no ledger row is rewritten. Tool cost is stamped on each
audit row when it is written (:class:`ToolPricer`, in the audit writer's thread).

Tool patterns are ``SERVER/TOOL-GLOB`` matched, case-sensitively and fnmatch-style, against
the one string ``server/tool`` (``*`` also matches ``/``). When several patterns match, the
most specific wins: a pattern without wildcards first, then the one with more literal
characters in its tool part (after the first ``/``), then more in its server part, then the
pattern text in alphabetical order. So for ``github/web_search``, ``github/web_search`` beats
``*/web_search``, which beats ``github/*``, which beats ``*/*``. Among the matching patterns,
only those with a price in force at the row's time (``effective_from <= ts``, the latest
such row) compete.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import re
import time
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from mcpmeter.errors import UsageError
from mcpmeter.record import CallRecord, iso_utc
from mcpmeter.store.base import Store
from mcpmeter.timeparse import parse_when

#: ``effective_from`` of the bundled table: it prices all history until a price you set.
BEGINNING = "1970-01-01T00:00:00.000000Z"
#: ``source`` of the rows loaded from the bundled table.
BUNDLED = "bundled"
#: How often (seconds) the writer's pricer re-reads ``tool_prices``.
REFRESH_S = 5.0

_BUNDLED_FILE = "model_prices.json"
_WILDCARDS = re.compile(r"\[[^\]]*\]|[*?]")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- LLM cost at query time ------------------------------------------------------------------


def model_price_in_force_sql(select: str, ledger: str = "l") -> str:
    """A scalar subquery: ``select`` (over ``mp``, a ``model_prices`` row) of the model price in
    force for the ledger row ``ledger`` (a table name or alias), or NULL when none is.

    "In force" is the row of the same model with the latest ``effective_from <= ts``: one
    index seek on the primary key ``(model, effective_from)``. SQLite and Postgres both run it.
    """
    if not _IDENTIFIER.match(ledger):
        raise ValueError(f"not a table name or alias: {ledger!r}")
    return (
        f"(SELECT {select} FROM model_prices mp"
        f" WHERE mp.model = {ledger}.model AND mp.effective_from <= {ledger}.ts"
        " ORDER BY mp.effective_from DESC LIMIT 1)"
    )


def llm_cost_sql(ledger: str = "l") -> str:
    """The SQL expression for one ledger row's cost in USD, at the model price in force at its ``ts``.

    ``cost = ((prompt - cached) x input + cached x cached_price + completion x output) / 1e6``,
    the cached price falling back to the input price when it is null. NULL when the model
    has no price in force at that time. ``ledger`` names the ``llm_calls`` table or its alias::

        SELECT agent_id, sum({llm_cost_sql('l')}) FROM llm_calls l GROUP BY agent_id
    """
    l = ledger  # noqa: E741
    cost = (
        f"(({l}.prompt_tokens - {l}.cached_tokens) * mp.input_per_mtok"
        f" + {l}.cached_tokens * COALESCE(mp.cached_per_mtok, mp.input_per_mtok)"
        f" + {l}.completion_tokens * mp.output_per_mtok) / 1000000.0"
    )
    return model_price_in_force_sql(cost, ledger)


#: :func:`llm_cost_sql` for a ledger aliased ``l``: ``SELECT sum(<LLM_COST_SQL>) FROM llm_calls l``.
LLM_COST_SQL = llm_cost_sql()


# -- price rows --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens of ``model`` from ``effective_from`` on."""

    model: str
    effective_from: str
    input: float
    output: float
    cached: float | None = None
    source: str = "manual"

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "from": self.effective_from,
            "input": self.input,
            "output": self.output,
            "cached": self.cached,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class ToolPrice:
    """USD per call (plus per KiB of response) of tools matching ``pattern`` from ``effective_from`` on."""

    pattern: str
    effective_from: str
    per_call: float
    per_kb: float = 0.0
    source: str = "manual"

    def as_json(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "from": self.effective_from,
            "per_call": self.per_call,
            "per_kb": self.per_kb,
            "source": self.source,
        }


@dataclass(slots=True)
class PriceTable:
    """Model and tool prices read from a file (or the bundled table)."""

    models: list[ModelPrice] = field(default_factory=list)
    tools: list[ToolPrice] = field(default_factory=list)


_UPSERT_MODEL = (
    "INSERT INTO model_prices"
    " (model, effective_from, input_per_mtok, output_per_mtok, cached_per_mtok, source)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (model, effective_from) DO UPDATE SET input_per_mtok = excluded.input_per_mtok,"
    " output_per_mtok = excluded.output_per_mtok, cached_per_mtok = excluded.cached_per_mtok,"
    " source = excluded.source"
)
_UPSERT_TOOL = (
    "INSERT INTO tool_prices (pattern, effective_from, per_call, per_kb, source) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (pattern, effective_from) DO UPDATE SET per_call = excluded.per_call,"
    " per_kb = excluded.per_kb, source = excluded.source"
)


def check_pattern(pattern: str) -> str:
    """``pattern`` if it is a ``SERVER/TOOL-GLOB``; a :class:`UsageError` otherwise."""
    server, slash, tool = pattern.partition("/")
    if not slash or not server or not tool:
        raise UsageError(
            f"tool price pattern {pattern!r} is not SERVER/TOOL-GLOB"
            " (e.g. github/*, */web_search, github/create_issue)"
        )
    return pattern


def _amount(value: float | None, what: str) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise UsageError(f"{what} must be a non-negative number of USD, got {value}")


def set_model_price(
    store: Store,
    model: str,
    input: float,
    output: float,
    cached: float | None = None,
    effective_from: str | None = None,
    source: str = "manual",
) -> ModelPrice:
    """Add (or replace, at the same ``effective_from``) a model price. Default: in force from now."""
    if not model.strip():
        raise UsageError("the model name is empty")
    for value, what in ((input, "--input"), (output, "--output"), (cached, "--cached")):
        _amount(value, what)
    price = ModelPrice(model, effective_from or iso_utc(time.time()), input, output, cached, source)
    with store.transaction():
        _write_models(store, [price])
    return price


def set_tool_price(
    store: Store,
    pattern: str,
    per_call: float,
    per_kb: float = 0.0,
    effective_from: str | None = None,
    source: str = "manual",
) -> ToolPrice:
    """Add (or replace, at the same ``effective_from``) a tool price. Default: in force from now."""
    check_pattern(pattern)
    _amount(per_call, "--per-call")
    _amount(per_kb, "--per-kb")
    price = ToolPrice(pattern, effective_from or iso_utc(time.time()), per_call, per_kb, source)
    with store.transaction():
        _write_tools(store, [price])
    return price


def _write_models(store: Store, prices: Iterable[ModelPrice]) -> int:
    return store.executemany(
        _UPSERT_MODEL, [(p.model, p.effective_from, p.input, p.output, p.cached, p.source) for p in prices]
    )


def _write_tools(store: Store, prices: Iterable[ToolPrice]) -> int:
    return store.executemany(
        _UPSERT_TOOL, [(p.pattern, p.effective_from, p.per_call, p.per_kb, p.source) for p in prices]
    )


def import_prices(store: Store, table: PriceTable) -> tuple[int, int]:
    """Write every price of ``table`` in one transaction; (model rows, tool rows)."""
    with store.transaction():
        _write_models(store, table.models)
        _write_tools(store, table.tools)
    return len(table.models), len(table.tools)


def model_prices(store: Store) -> list[ModelPrice]:
    """Every model price row, by model then date."""
    rows = store.query(
        "SELECT model, effective_from, input_per_mtok, output_per_mtok, cached_per_mtok, source"
        " FROM model_prices ORDER BY model, effective_from"
    )
    return [ModelPrice(*row) for row in rows]


def tool_prices(store: Store) -> list[ToolPrice]:
    """Every tool price row, by pattern then date."""
    rows = store.query(
        "SELECT pattern, effective_from, per_call, per_kb, source FROM tool_prices"
        " ORDER BY pattern, effective_from"
    )
    return [ToolPrice(*row) for row in rows]


# -- the bundled table -------------------------------------------------------------------------


def bundled_path() -> Path:
    """The package's default model price table (``mcpmeter/data/model_prices.json``)."""
    return Path(__file__).with_name("data") / _BUNDLED_FILE


def bundled_table() -> PriceTable:
    """The bundled default model prices, aliases expanded, each in force from :data:`BEGINNING`."""
    return read_price_file(bundled_path(), source=BUNDLED)


def bundled_as_of() -> str:
    """The date the bundled prices were stated for."""
    return str(json.loads(bundled_path().read_text())["as_of"])


def load_bundled(store: Store) -> int:
    """Write the bundled prices (source ``bundled``); rows you set at the same date are kept."""
    table = bundled_table()
    sql = _UPSERT_MODEL + " WHERE model_prices.source = 'bundled'"
    with store.transaction():
        store.executemany(
            sql, [(p.model, p.effective_from, p.input, p.output, p.cached, p.source) for p in table.models]
        )
    return len(table.models)


def ensure_bundled(store: Store) -> bool:
    """Load the bundled prices the first time a store is used for prices; True when loaded now.

    Call it before computing LLM cost. A newer table (after an upgrade) loads with
    ``mcpmeter prices import --bundled``.
    """
    if store.query_one("SELECT 1 FROM model_prices WHERE source = ? LIMIT 1", (BUNDLED,)) is not None:
        return False
    load_bundled(store)
    return True


# -- price files -------------------------------------------------------------------------------

_MODEL_KEYS = {"model", "input", "output", "cached", "from", "aliases", "source"}
_TOOL_KEYS = {"pattern", "per_call", "per_kb", "from", "source"}
_TOP_KEYS = {"models", "tools", "from", "as_of", "notes", "sources"}
CSV_COLUMNS = ("kind", "name", "input", "output", "cached", "per_call", "per_kb", "from")


def read_price_file(path: Path, *, source: str = "import", now: float | None = None) -> PriceTable:
    """Read a price file: JSON (``{"models": [...], "tools": [...]}``) or CSV (:data:`CSV_COLUMNS`).

    Dates (``from``) default to the file's top-level ``from`` (JSON), else now. Errors name
    the file and the line (CSV) or entry (JSON) and the field.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # the same rule and message as ``ledger import``
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise UsageError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at column {column}): convert the file"
            " to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    default_from = iso_utc(time.time() if now is None else now)
    if text.lstrip().startswith("{"):
        return _read_json_prices(path, text, source, default_from)
    return _read_csv_prices(path, text, source, default_from)


def _number(value: Any, where: str, *, required: bool) -> float | None:
    if value is None or value == "":
        if required:
            raise UsageError(f"{where}: missing")
        return None
    if isinstance(value, bool):
        raise UsageError(f"{where}: expected a number of USD, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected a number of USD, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise UsageError(f"{where}: expected a non-negative number of USD, got {value!r}")
    return number


def _when(value: Any, where: str, default: str) -> str:
    if value is None or value == "":
        return default
    try:
        return parse_when(str(value))
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _read_json_prices(path: Path, text: str, source: str, default_from: str) -> PriceTable:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: expected a JSON object with models and/or tools")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r} (expected models, tools, from)")
    file_from = _when(doc.get("from"), f"{path} from", default_from)
    table = PriceTable()
    for kind, keys in (("models", _MODEL_KEYS), ("tools", _TOOL_KEYS)):
        entries = doc.get(kind, [])
        if not isinstance(entries, list):
            raise UsageError(f"{path} {kind}: expected a list")
        for index, entry in enumerate(entries):
            where = f"{path} {kind}[{index}]"
            if not isinstance(entry, dict):
                raise UsageError(f"{where}: expected an object")
            unknown = sorted(set(entry) - keys)
            if unknown:
                raise UsageError(f"{where}.{unknown[0]}: unknown field (expected {', '.join(sorted(keys))})")
            when = _when(entry.get("from"), f"{where}.from", file_from)
            if kind == "models":
                table.models.extend(_model_entry(entry, f"{where}.", when, source))
            else:
                table.tools.append(_tool_entry(entry, f"{where}.", when, source))
    return table


def _model_entry(
    entry: Mapping[str, Any], at: str, when: str, source: str, name_field: str = "model"
) -> Iterator[ModelPrice]:
    """``at`` prefixes each field's name in errors: ``"prices.json models[2]."``, ``"prices.csv:4 "``."""
    model = entry.get(name_field)
    if not isinstance(model, str) or not model.strip():
        raise UsageError(f"{at}{name_field}: expected a model name")
    input = _number(entry.get("input"), f"{at}input", required=True)
    output = _number(entry.get("output"), f"{at}output", required=True)
    cached = _number(entry.get("cached"), f"{at}cached", required=False)
    assert input is not None and output is not None
    aliases = entry.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise UsageError(f"{at}aliases: expected a list of model names")
    for name in (model.strip(), *aliases):
        yield ModelPrice(name, when, input, output, cached, source)


def _tool_entry(
    entry: Mapping[str, Any], at: str, when: str, source: str, name_field: str = "pattern"
) -> ToolPrice:
    pattern = entry.get(name_field)
    if not isinstance(pattern, str):
        raise UsageError(f"{at}{name_field}: expected SERVER/TOOL-GLOB")
    try:
        check_pattern(pattern)
    except UsageError as exc:
        raise UsageError(f"{at}{name_field}: {exc}") from None
    per_call = _number(entry.get("per_call"), f"{at}per_call", required=True)
    per_kb = _number(entry.get("per_kb"), f"{at}per_kb", required=False)
    assert per_call is not None
    return ToolPrice(pattern, when, per_call, per_kb or 0.0, source)


def _read_csv_prices(path: Path, text: str, source: str, default_from: str) -> PriceTable:
    reader = csv.reader(text.splitlines())
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in ("kind", "name") if c not in header]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if missing or unknown:
        raise UsageError(
            f"{path}:1: expected a JSON object or a CSV header of {', '.join(CSV_COLUMNS)}"
            f" ({'missing ' + missing[0] if missing else 'unknown column ' + unknown[0]})"
        )
    table = PriceTable()
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UsageError(f"{path}:{line}: expected {len(header)} columns, got {len(row)}")
        entry = {k: v.strip() for k, v in zip(header, row, strict=True) if v.strip()}
        kind = entry.pop("kind", "")
        at = f"{path}:{line} "
        when = _when(entry.pop("from", None), f"{at}from", default_from)
        if kind == "model":
            extra = sorted(set(entry) - {"name", "input", "output", "cached"})
            if extra:
                raise UsageError(f"{at}{extra[0]}: not a model price field")
            table.models.extend(_model_entry(entry, at, when, source, name_field="name"))
        elif kind == "tool":
            extra = sorted(set(entry) - {"name", "per_call", "per_kb"})
            if extra:
                raise UsageError(f"{at}{extra[0]}: not a tool price field")
            table.tools.append(_tool_entry(entry, at, when, source, name_field="name"))
        else:
            raise UsageError(f"{at}kind: expected model or tool, got {kind!r}")
    return table


# -- tool prices on audit rows -----------------------------------------------------------------


def _literal_chars(glob: str) -> int:
    return len(_WILDCARDS.sub("", glob))


def specificity(pattern: str) -> tuple[bool, int, int, str]:
    """Sort key of a pattern, most specific first (see the module's docstring)."""
    server, _, tool = pattern.partition("/")
    return (_WILDCARDS.search(pattern) is not None, -_literal_chars(tool), -_literal_chars(server), pattern)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class _Pattern:
    """One pattern's price timeline: ``times[i]`` (POSIX) starts ``prices[i]`` (per call, per KiB)."""

    pattern: str
    match: Any  # a compiled regex's fullmatch
    times: tuple[float, ...]
    prices: tuple[tuple[float, float], ...]

    def at(self, ts: float) -> tuple[float, float] | None:
        index = bisect_right(self.times, ts) - 1
        return self.prices[index] if index >= 0 else None


_COST = CallRecord._fields.index("cost_usd")
_new_record = tuple.__new__  # CallRecord._replace, without its keyword machinery


def tool_pricer(store: Store) -> ToolPricer:
    """The writer's pricer for ``store``: fills ``cost_usd`` of ``tools/call`` rows."""
    return ToolPricer(store)


class ToolPricer:
    """Prices ``tools/call`` records with the tool price in force at their time.

    ``cost_usd = per_call + per_kb * response_bytes / 1024``; None when no pattern has a
    price in force. Rows already priced and ``rejected`` rows (never forwarded) are left as
    they are. Tool prices are read once, then again at most every ``refresh_s`` seconds;
    the patterns matching each (server, tool) are cached, so a row costs a dict lookup and
    a bisect.
    """

    def __init__(self, store: Store, *, refresh_s: float = REFRESH_S) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._loaded_at = -math.inf
        self._rows: list[tuple[Any, ...]] | None = None
        self._patterns: list[_Pattern] = []
        self._matches: dict[tuple[str | None, str | None], tuple[_Pattern, ...]] = {}

    def __call__(self, records: Sequence[CallRecord]) -> Sequence[CallRecord]:
        now = time.monotonic()
        if now - self._loaded_at >= self._refresh_s:
            self._refresh(now)
        if not self._patterns:
            return records
        priced: list[CallRecord] | None = None
        for index, record in enumerate(records):
            if record.method != "tools/call" or record.cost_usd is not None or record.status == "rejected":
                continue
            cost = self.cost(record.server, record.tool, record.ts, record.response_bytes)
            if cost is None:
                continue
            if priced is None:
                priced = list(records)
            priced[index] = _new_record(CallRecord, (*record[:_COST], cost, *record[_COST + 1 :]))
        return records if priced is None else priced

    def cost(
        self, server: str | None, tool: str | None, ts: float, response_bytes: int | None
    ) -> float | None:
        """The price of one call of ``server``/``tool`` at ``ts`` (POSIX seconds), or None."""
        matches = self._matches.get((server, tool))
        if matches is None:
            matches = self._match(server, tool)
        for pattern in matches:
            price = pattern.at(ts)
            if price is not None:
                per_call, per_kb = price
                return per_call + per_kb * (response_bytes or 0) / 1024 if per_kb else per_call
        return None

    def _match(self, server: str | None, tool: str | None) -> tuple[_Pattern, ...]:
        name = f"{server or ''}/{tool or ''}"
        matches = tuple(p for p in self._patterns if p.match(name))
        self._matches[server, tool] = matches
        return matches

    def _refresh(self, now: float) -> None:
        try:
            rows = list(
                self._store.query(
                    "SELECT pattern, effective_from, per_call, per_kb FROM tool_prices"
                    " ORDER BY pattern, effective_from"
                )
            )
        except Exception:
            if self._rows is None:
                raise
            rows = self._rows  # keep pricing with what was read last; try again later
        self._loaded_at = now
        if rows == self._rows:
            return
        self._rows = rows
        timelines: dict[str, list[tuple[float, float, float]]] = {}
        for pattern, effective_from, per_call, per_kb in rows:
            timelines.setdefault(pattern, []).append((_epoch(effective_from), per_call, per_kb or 0.0))
        self._patterns = [
            _Pattern(
                pattern,
                re.compile(fnmatch.translate(pattern)).fullmatch,
                tuple(t for t, _, _ in timeline),
                tuple((c, k) for _, c, k in timeline),
            )
            for pattern, timeline in sorted(timelines.items(), key=lambda item: specificity(item[0]))
        ]
        self._matches.clear()


# -- showing -----------------------------------------------------------------------------------


def current_prices(db: str | None) -> tuple[list[ModelPrice], list[ToolPrice]]:
    """Every price row of the store at ``db`` (the bundled table loaded first if needed); the
    bundled table alone when there is no store yet. A store opened read-only is not written
    to: the bundled rows it lacks are shown as they would load."""
    from mcpmeter.store import open_store, resolve_db

    def by_model(models: Iterable[ModelPrice]) -> list[ModelPrice]:
        return sorted(models, key=lambda p: (p.model, p.effective_from))

    location = resolve_db(db)
    if "://" not in location and not Path(location).exists():
        return by_model(bundled_table().models), []
    store = open_store(location, create=False)
    try:
        if getattr(store, "read_only", False):
            models = model_prices(store)
            if not any(m.source == BUNDLED for m in models):
                models = by_model([*models, *bundled_table().models])
            return models, tool_prices(store)
        ensure_bundled(store)
        return model_prices(store), tool_prices(store)
    finally:
        store.close()


def render_prices(db: str | None, format: str, out: IO[str]) -> None:
    """``mcpmeter prices show``: two rich tables, or one JSON object in the import file's shape."""
    models, tools = current_prices(db)
    if format == "json":
        doc = {"models": [p.as_json() for p in models], "tools": [p.as_json() for p in tools]}
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from mcpmeter.output.terminal import printable

    def text(value: str) -> Text:  # a name from the store: no markup, control characters escaped
        return Text(printable(value))

    console = Console(file=out, width=max(100, Console(file=out).width))
    table = Table(title="Model prices (USD per million tokens)", title_justify="left")
    for name in ("model", "from", "input", "output", "cached", "source"):
        table.add_column(name, justify="right" if name in ("input", "output", "cached") else "left")
    for m in models:
        cached = "" if m.cached is None else f"{m.cached:g}"
        table.add_row(
            text(m.model), _day(m.effective_from), f"{m.input:g}", f"{m.output:g}", cached, text(m.source)
        )
    console.print(table)
    table = Table(title="Tool prices (USD)", title_justify="left")
    for name in ("pattern", "from", "per call", "per KB", "source"):
        table.add_column(name, justify="right" if name.startswith("per") else "left")
    for t in sorted(tools, key=lambda t: (specificity(t.pattern), t.effective_from)):
        table.add_row(
            text(t.pattern), _day(t.effective_from), f"{t.per_call:g}", f"{t.per_kb:g}", text(t.source)
        )
    if not tools:
        table.caption = "none set: mcpmeter prices set tool 'SERVER/TOOL-GLOB' --per-call USD"
    console.print(table)


def _day(iso: str) -> str:
    """``2026-11-01T00:00:00.000000Z`` -> ``2026-11-01``; other times to the second."""
    return iso[:10] if iso[10:] == "T00:00:00.000000Z" else iso[:19].replace("T", " ")
