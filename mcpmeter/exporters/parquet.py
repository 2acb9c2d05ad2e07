"""``mcpmeter export --format parquet``: audit rows as a Parquet file, streamed in row groups.

Rows are read from the store's cursor and written :data:`ROW_GROUP` at a time, each chunk
one row group, so memory stays flat however many rows match. Types are the store's, made
explicit: ``ts`` a UTC timestamp in microseconds, integers ``int64``, reals ``float64``,
text ``string`` (``tags`` is the JSON text). pandas metadata in the file makes
``pandas.read_parquet`` give nullable ``Int64`` columns, not floats, where a count or a code
may be null. Needs pyarrow (``pip install 'mcpmeter[parquet]'``), imported only here.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import IO, Any

from mcpmeter import __version__
from mcpmeter.errors import UsageError
from mcpmeter.output.json import json_bytes
from mcpmeter.record import COLUMNS

#: Rows per row group (held in memory as Arrow arrays until written).
ROW_GROUP = 65_536
#: Rows converted from Python objects at a time.
CHUNK = 8_192
_INT = frozenset({"id", "request_bytes", "response_bytes", "error_code"})
_FLOAT = frozenset({"latency_ms", "cost_usd"})


def _pyarrow() -> Any:
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.parquet  # type: ignore[import-untyped]
    except ImportError:
        raise UsageError("--format parquet needs pyarrow: pip install 'mcpmeter[parquet]'") from None
    return pyarrow


def schema() -> Any:
    """The file's schema: every exported column, in order, with pandas metadata."""
    pa = _pyarrow()
    fields = []
    pandas_columns = []
    for name in COLUMNS:
        if name == "ts":
            kind, pandas_type, numpy_type = pa.timestamp("us", tz="UTC"), "datetimetz", "datetime64[us]"
        elif name in _INT:
            kind, pandas_type, numpy_type = pa.int64(), "int64", "Int64"
        elif name in _FLOAT:
            kind, pandas_type, numpy_type = pa.float64(), "float64", "float64"
        else:
            kind, pandas_type, numpy_type = pa.string(), "unicode", "object"
        nullable = name not in ("id", "ts", "session_id", "transport", "upstream", "direction", "method")
        fields.append(pa.field(name, kind, nullable=nullable))
        pandas_columns.append(
            {
                "name": name,
                "field_name": name,
                "pandas_type": pandas_type,
                "numpy_type": numpy_type,
                "metadata": {"timezone": "UTC"} if name == "ts" else None,
            }
        )
    pandas = {
        "index_columns": [],
        "column_indexes": [],
        "columns": pandas_columns,
        "creator": {"library": "mcpmeter", "version": __version__},
        "pandas_version": "2.0.0",
    }
    return pa.schema(fields, metadata={b"pandas": json_bytes(pandas)})


def write_parquet(rows: Iterable[tuple[Any, ...]], out: IO[bytes], row_group: int = ROW_GROUP) -> int:
    """Write ``rows`` (``record.COLUMNS`` order) to the binary file ``out``; returns how many.

    ``out`` is left open. Give it :func:`mcpmeter.output.files.atomic_output`'s file, so that a
    failed export leaves no half file and an existing file as it was.
    """
    pa = _pyarrow()
    file_schema = schema()
    types = [field.type for field in file_schema]
    ts_index = COLUMNS.index("ts")
    text = pa.string()
    count = 0
    iterator = iter(rows)
    with pa.parquet.ParquetWriter(out, file_schema, compression="zstd") as writer:
        batches: list[Any] = []
        pending = 0
        while chunk := list(islice(iterator, min(CHUNK, row_group))):
            columns = list(zip(*chunk, strict=True))
            arrays = [
                pa.array(values, text).cast(kind) if index == ts_index else pa.array(values, kind)
                for index, (values, kind) in enumerate(zip(columns, types, strict=True))
            ]
            batches.append(pa.record_batch(arrays, schema=file_schema))
            pending += len(chunk)
            count += len(chunk)
            del chunk, columns, arrays
            if pending >= row_group:
                writer.write_table(pa.Table.from_batches(batches), row_group_size=row_group)
                batches, pending = [], 0
        if batches:
            writer.write_table(pa.Table.from_batches(batches), row_group_size=row_group)
    return count
