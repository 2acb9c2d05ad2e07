"""Price files: model and tool prices read from JSON or CSV, checked, and written in one go.

JSON is ``{"models": [...], "tools": [...]}`` (with an optional top-level ``from``); CSV has a
header of :data:`CSV_COLUMNS`, one price a row. The bundled table
(:mod:`mcpmeter.prices.bundled`) is a price file too.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcpmeter.errors import UsageError
from mcpmeter.prices.models import ModelPrice, write_model_prices
from mcpmeter.prices.tools import ToolPrice, check_pattern, write_tool_prices
from mcpmeter.record import iso_utc
from mcpmeter.store.base import Store
from mcpmeter.timeparse import parse_when

_MODEL_KEYS = {"model", "input", "output", "cached", "from", "aliases", "source"}
_TOOL_KEYS = {"pattern", "per_call", "per_kb", "from", "source"}
_TOP_KEYS = {"models", "tools", "from", "as_of", "notes", "sources"}
CSV_COLUMNS = ("kind", "name", "input", "output", "cached", "per_call", "per_kb", "from")


@dataclass(slots=True)
class PriceTable:
    """Model and tool prices read from a file (or the bundled table)."""

    models: list[ModelPrice] = field(default_factory=list)
    tools: list[ToolPrice] = field(default_factory=list)


def import_prices(store: Store, table: PriceTable) -> tuple[int, int]:
    """Write every price of ``table`` in one transaction; (model rows, tool rows)."""
    with store.transaction():
        write_model_prices(store, table.models)
        write_tool_prices(store, table.tools)
    return len(table.models), len(table.tools)


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
