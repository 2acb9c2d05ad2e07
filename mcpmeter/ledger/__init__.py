"""The LLM ledger (``llm_calls``): one row per LLM call, joined to tool calls on ``request_id``.

Ways in: :func:`record` (and :class:`Ledger`) for agent runtimes, ``mcpmeter ledger add``,
and :func:`import_file` for files: the ledger's own columns as JSON lines or CSV, LiteLLM
spend logs, OpenAI-style and Anthropic-style responses. Rows are unique on
``(source, request_id)``: writing or importing the same call again adds nothing.

The modules, one idea each:

``rows``
    :class:`LedgerRow`, :class:`BadRow` and the rules every value keeps, wherever it comes
    from (token counts from 0 to :data:`MAX_TOKENS`, times from 1970 to 9999 UTC).
``api``
    :class:`Ledger` and :func:`record`, the documented Python API.
``formats``
    Each import format's records as typed msgspec structs, the fields each reads, and
    telling a file's format from its first record.
``importers``
    :func:`import_file`: a file streamed as records, bad rows skipped and counted (or
    ``--strict``), rows written in batches.
"""

from mcpmeter.ledger.api import Ledger, record
from mcpmeter.ledger.formats import FORMATS, detect_format
from mcpmeter.ledger.importers import BATCH, ImportResult, import_file
from mcpmeter.ledger.rows import COLUMNS, MAX_TOKENS, MILLISECONDS_FROM, BadRow, LedgerRow

__all__ = [
    "BATCH",
    "COLUMNS",
    "FORMATS",
    "MAX_TOKENS",
    "MILLISECONDS_FROM",
    "BadRow",
    "ImportResult",
    "Ledger",
    "LedgerRow",
    "detect_format",
    "import_file",
    "record",
]
