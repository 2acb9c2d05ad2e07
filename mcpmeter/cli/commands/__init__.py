"""The commands other than ``wrap``: one module per command group, each with ``register(app)``.

Each module keeps its command functions thin and imports the work lazily.
"""

from __future__ import annotations

from mcpmeter.cli.commands import budget, export, ledger, prices, report, tail, verify

COMMAND_MODULES = (export, report, tail, ledger, prices, budget, verify)
