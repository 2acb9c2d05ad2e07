"""Dated prices: models per million tokens, tools per call (and per KB of response)."""

from __future__ import annotations

from collections.abc import Sequence

from mcpmeter.record import CallRecord
from mcpmeter.store.base import Store


def tool_pricer(store: Store) -> ToolPricer:
    """The writer's pricer for ``store``: fills ``cost_usd`` of ``tools/call`` rows."""
    return ToolPricer(store)


class ToolPricer:
    """Prices ``tools/call`` records with the tool price in force at their time."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __call__(self, records: Sequence[CallRecord]) -> Sequence[CallRecord]:
        return records
