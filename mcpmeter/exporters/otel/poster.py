"""Sending OTLP/HTTP requests: one POST, its answer, and what a failure means for a retry.

Requests go out with :mod:`http.client` over kept-alive connections: a tenth of httpx's
import time, which ``wrap`` would pay on the relay's GIL. :mod:`http.client` and :mod:`ssl`
are imported on first use (in ``wrap``, on the exporter's thread), not at start-up.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mcpmeter import __version__

if TYPE_CHECKING:
    import http.client
    import ssl

#: Answers after which the collector may take the same request later.
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
#: After a failed POST, the next waits this long, doubling up to BACKOFF_MAX_S.
BACKOFF_S = 0.5
BACKOFF_MAX_S = 30.0


class ExportFailed(Exception):
    """A POST that did not land: ``retryable`` when the collector may take it later."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Poster:
    """POSTs OTLP requests over kept-alive connections (http.client: a fraction of httpx's import).

    TLS is verified with the default context (``SSL_CERT_FILE``/``SSL_CERT_DIR`` are honoured);
    proxy env vars are not used: a collector is reached directly.
    """

    def __init__(self, timeout: float, *, compress: bool = False) -> None:
        self._timeout = timeout
        self._compress = compress
        self._connections: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._tls: ssl.SSLContext | None = None

    def _connection(self, scheme: str, netloc: str) -> tuple[http.client.HTTPConnection, bool]:
        """The connection to ``netloc`` and whether it is new."""
        import http.client  # on the exporter's thread, not wrap's start-up path

        found = self._connections.get((scheme, netloc))
        if found is not None:
            return found, False
        if scheme == "https":
            import ssl

            if self._tls is None:
                self._tls = ssl.create_default_context()
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                netloc, timeout=self._timeout, context=self._tls
            )
        else:
            connection = http.client.HTTPConnection(netloc, timeout=self._timeout)
        self._connections[scheme, netloc] = connection
        return connection, True

    def _forget(self, scheme: str, netloc: str) -> None:
        connection = self._connections.pop((scheme, netloc), None)
        if connection is not None:
            connection.close()

    def post(
        self, url: str, body: bytes, headers: Sequence[tuple[str, str]], timeout: float | None = None
    ) -> None:
        """POST one OTLP/HTTP protobuf request; raise :class:`ExportFailed` unless it is accepted."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = {"Content-Type": "application/x-protobuf", "User-Agent": f"mcpmeter/{__version__}"}
        sent.update(headers)
        if self._compress:
            body = gzip.compress(body, compresslevel=5)
            sent["Content-Encoding"] = "gzip"
        import http.client

        for attempt in (1, 2):
            connection, fresh = self._connection(parts.scheme, parts.netloc)
            connection.timeout = timeout if timeout is not None else self._timeout
            if connection.sock is not None:
                connection.sock.settimeout(connection.timeout)
            try:
                connection.request("POST", target, body=body, headers=sent)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._forget(parts.scheme, parts.netloc)
                # A kept-alive connection the collector closed meanwhile: once more, on a new one.
                if not fresh and attempt == 1 and not isinstance(exc, TimeoutError):
                    continue
                raise ExportFailed(f"{type(exc).__name__}: {exc}", retryable=True) from None
            if response.will_close:
                self._forget(parts.scheme, parts.netloc)
            if response.status // 100 != 2:
                text = data[:200].decode(errors="replace")
                raise ExportFailed(
                    f"HTTP {response.status} {text!r}", retryable=response.status in RETRYABLE_STATUS
                )
            return

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
