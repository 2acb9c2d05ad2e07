"""The bundled model price table (``prices/data/model_prices.json``) and how a store gets it.

The table is public list prices on its ``as_of`` date, each in force from :data:`BEGINNING`,
so it prices all history until a price you set. A store loads it the first time it is used
for prices (:func:`ensure_bundled`); a newer table, after an upgrade, loads with
``mcpmeter prices import --bundled``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mcpmeter.prices.files import PriceTable, read_price_file
from mcpmeter.prices.models import UPSERT_MODEL_SQL, ModelPrice, model_prices, write_model_prices
from mcpmeter.prices.tools import ToolPrice, tool_prices
from mcpmeter.store.base import Store

#: ``effective_from`` of the bundled table: it prices all history until a price you set.
BEGINNING = "1970-01-01T00:00:00.000000Z"
#: ``source`` of the rows loaded from the bundled table.
BUNDLED = "bundled"

_BUNDLED_FILE = "model_prices.json"


def bundled_path() -> Path:
    """The package's default model price table (``mcpmeter/prices/data/model_prices.json``)."""
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
    with store.transaction():
        write_model_prices(store, table.models, UPSERT_MODEL_SQL + " WHERE model_prices.source = 'bundled'")
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
