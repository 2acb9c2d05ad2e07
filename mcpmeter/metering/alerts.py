"""Budget alerts to a webhook: a JSON POST with a Slack-compatible ``text`` field.

Alerts are queued and sent from a background thread (never on the relay's path), each
retried a few times with a growing pause; one that cannot be delivered is reported on
stderr and dropped.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from mcpmeter.log import warn
from mcpmeter.threads import quiet_thread

RETRIES = 3
TIMEOUT_S = 5.0


class WebhookAlerter:
    def __init__(self, url: str, *, retries: int = RETRIES, backoff_s: float = 0.5) -> None:
        self._url = url
        self._retries = retries
        self._backoff_s = backoff_s
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mcpmeter-alerts", daemon=True)
        self._thread.start()

    def __call__(self, message: str, details: dict[str, Any]) -> None:
        self._queue.put({"text": f"mcpmeter: {message}", **details})

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (bounded), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        quiet_thread()
        import httpx

        with httpx.Client(timeout=TIMEOUT_S) as client:
            while (payload := self._queue.get()) is not None:
                self._send(client, payload)

    def _send(self, client: Any, payload: dict[str, Any]) -> None:
        stop = threading.Event()
        for attempt in range(self._retries):
            try:
                response = client.post(self._url, json=payload)
                if response.status_code < 500:
                    if response.status_code >= 400:
                        warn(f"alert webhook refused the alert: HTTP {response.status_code}")
                    return
            except Exception:  # any transport failure: retry
                pass
            stop.wait(self._backoff_s * 2**attempt)
        warn(f"alert webhook unreachable after {self._retries} tries; alert dropped")
