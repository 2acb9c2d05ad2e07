"""Model prices: USD per million tokens, dated, and the SQL that prices a ledger row with them.

A price row applies from its ``effective_from`` until the next row of the same model. LLM
cost is computed at query time from ``model_prices`` (see :func:`llm_cost_sql`), so adding a
dated price re-prices history after that date and leaves history before it alone; no ledger
row is rewritten.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mcpmeter.errors import UsageError
from mcpmeter.record import iso_utc
from mcpmeter.store.base import Store

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Add a model price, or replace the one of the same model and ``effective_from``.
UPSERT_MODEL_SQL = (
    "INSERT INTO model_prices"
    " (model, effective_from, input_per_mtok, output_per_mtok, cached_per_mtok, source)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (model, effective_from) DO UPDATE SET input_per_mtok = excluded.input_per_mtok,"
    " output_per_mtok = excluded.output_per_mtok, cached_per_mtok = excluded.cached_per_mtok,"
    " source = excluded.source"
)


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
        """The price as a price file's ``models`` entry gives it."""
        return {
            "model": self.model,
            "from": self.effective_from,
            "input": self.input,
            "output": self.output,
            "cached": self.cached,
            "source": self.source,
        }


def check_usd(value: float | None, what: str) -> None:
    """A :class:`UsageError` naming the flag ``what`` unless ``value`` is absent or a finite,
    non-negative number of USD (model and tool prices alike)."""
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
        check_usd(value, what)
    price = ModelPrice(model, effective_from or iso_utc(time.time()), input, output, cached, source)
    with store.transaction():
        write_model_prices(store, [price])
    return price


def write_model_prices(store: Store, prices: Iterable[ModelPrice], sql: str = UPSERT_MODEL_SQL) -> int:
    """Upsert ``prices`` with ``sql`` (default :data:`UPSERT_MODEL_SQL`), in the caller's transaction."""
    return store.executemany(
        sql, [(p.model, p.effective_from, p.input, p.output, p.cached, p.source) for p in prices]
    )


def model_prices(store: Store) -> list[ModelPrice]:
    """Every model price row, by model then date."""
    rows = store.query(
        "SELECT model, effective_from, input_per_mtok, output_per_mtok, cached_per_mtok, source"
        " FROM model_prices ORDER BY model, effective_from"
    )
    return [ModelPrice(*row) for row in rows]
