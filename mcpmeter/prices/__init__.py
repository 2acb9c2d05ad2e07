"""Dated prices: models per million tokens, tools per call (and per KB of response).

A price row applies from its ``effective_from`` until the next row of the same model (or
tool pattern). LLM cost is computed at query time (:func:`llm_cost_sql`), so a dated price
re-prices only history from its date on; tool cost is stamped on each audit row as it is
written (:class:`ToolPricer`).

The modules, one idea each:

``models``
    Model prices and the SQL that prices a ledger row with the one in force at its time.
``tools``
    Tool prices, their ``SERVER/TOOL-GLOB`` patterns (the most specific wins) and the
    audit writer's :class:`ToolPricer`.
``files``
    Price files (JSON or CSV), read and checked, and imported in one transaction.
``bundled``
    The bundled list prices, loaded into a store on first use; :func:`current_prices`.

``mcpmeter prices show`` renders the rows in :mod:`mcpmeter.cli.commands.prices`.
"""

from mcpmeter.prices.bundled import (
    BEGINNING,
    BUNDLED,
    bundled_as_of,
    bundled_path,
    bundled_table,
    current_prices,
    ensure_bundled,
    load_bundled,
)
from mcpmeter.prices.files import CSV_COLUMNS, PriceTable, import_prices, read_price_file
from mcpmeter.prices.models import (
    LLM_COST_SQL,
    ModelPrice,
    llm_cost_sql,
    model_price_in_force_sql,
    model_prices,
    set_model_price,
)
from mcpmeter.prices.tools import (
    REFRESH_S,
    ToolPrice,
    ToolPricer,
    check_pattern,
    set_tool_price,
    specificity,
    tool_pricer,
    tool_prices,
)

__all__ = [
    "BEGINNING",
    "BUNDLED",
    "CSV_COLUMNS",
    "LLM_COST_SQL",
    "REFRESH_S",
    "ModelPrice",
    "PriceTable",
    "ToolPrice",
    "ToolPricer",
    "bundled_as_of",
    "bundled_path",
    "bundled_table",
    "check_pattern",
    "current_prices",
    "ensure_bundled",
    "import_prices",
    "llm_cost_sql",
    "load_bundled",
    "model_price_in_force_sql",
    "model_prices",
    "read_price_file",
    "set_model_price",
    "set_tool_price",
    "specificity",
    "tool_pricer",
    "tool_prices",
]
