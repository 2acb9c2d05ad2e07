"""Where and how to send OTLP: the ``--otlp-endpoint`` flag and the standard ``OTEL_*`` env vars.

:func:`config_from` reads them as the OpenTelemetry SDKs do, for the two signals mcpmeter
sends: spans and the duration histogram, both OTLP/HTTP protobuf.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from mcpmeter import __version__
from mcpmeter.errors import UsageError
from mcpmeter.log import warn_once

_TRUE = frozenset({"true", "1", "yes"})


class OtlpConfig(NamedTuple):
    """Where and how to send. A signal whose URL is None is not sent."""

    traces_url: str | None
    metrics_url: str | None
    traces_headers: tuple[tuple[str, str], ...] = ()
    metrics_headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0
    gzip: bool = False
    resource: tuple[tuple[str, str], ...] = ()
    #: How often ``wrap`` sends the histogram (it always sends it at exit too).
    metrics_interval: float = 60.0


def signal_url(base: str, signal: str) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` semantics: the base URL plus ``/v1/traces`` or ``/v1/metrics``."""
    return base.rstrip("/") + "/v1/" + signal


def _check_url(url: str, source: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{source} must be an http:// or https:// URL, got {url!r}")
    return url


def parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """A W3C-baggage-like ``k=v,k2=v2`` list (``OTEL_EXPORTER_OTLP_HEADERS``), values percent-decoded."""
    pairs: list[tuple[str, str]] = []
    for member in text.split(","):
        key, sep, value = member.partition("=")
        if sep and key.strip():
            pairs.append((key.strip(), unquote(value.strip())))
    return tuple(pairs)


def config_from(
    endpoint: str | None, environ: Mapping[str, str], *, source: str = "--otlp-endpoint"
) -> OtlpConfig | None:
    """The OTLP set-up from a flag (a base URL, like ``OTEL_EXPORTER_OTLP_ENDPOINT``) and the env.

    Spans are sent when the flag, ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (a full URL) names a collector; the histogram
    when the flag, ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``
    does. The flag wins over the env. ``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER=none``
    and ``OTEL_METRICS_EXPORTER=none`` turn them off. None when nothing is to be sent.
    """
    env = environ.get
    if env("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE and endpoint is None:
        return None
    if endpoint is not None:
        base = _check_url(endpoint, source)
        traces: str | None = signal_url(base, "traces")
        metrics: str | None = signal_url(base, "metrics")
    else:
        base = env("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        if base:
            base = _check_url(base, "OTEL_EXPORTER_OTLP_ENDPOINT")
        traces = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or None
        metrics = env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip() or None
        traces = _check_url(traces, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") if traces else None
        metrics = _check_url(metrics, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") if metrics else None
        traces = traces or (signal_url(base, "traces") if base else None)
        metrics = metrics or (signal_url(base, "metrics") if base else None)
        if env("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            traces = None
        if env("OTEL_METRICS_EXPORTER", "").strip().lower() == "none":
            metrics = None
    if traces is None and metrics is None:
        return None
    for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        protocol = env(name, "").strip()
        if protocol and protocol != "http/protobuf":
            warn_once("otlp-protocol", f"{name}={protocol} ignored: mcpmeter sends OTLP/HTTP protobuf")
    common = parse_pairs(env("OTEL_EXPORTER_OTLP_HEADERS", ""))
    try:
        timeout_ms = float(env("OTEL_EXPORTER_OTLP_TIMEOUT", "") or 10_000)
        interval_ms = float(env("OTEL_METRIC_EXPORT_INTERVAL", "") or 60_000)
    except ValueError as exc:
        raise UsageError(f"OTEL_EXPORTER_OTLP_TIMEOUT / OTEL_METRIC_EXPORT_INTERVAL: {exc}") from None
    return OtlpConfig(
        traces_url=traces,
        metrics_url=metrics,
        traces_headers=common + parse_pairs(env("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "")),
        metrics_headers=common + parse_pairs(env("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "")),
        timeout=max(timeout_ms, 1.0) / 1000.0,
        gzip=env("OTEL_EXPORTER_OTLP_COMPRESSION", "").strip().lower() == "gzip",
        resource=_resource(environ),
        metrics_interval=max(interval_ms, 100.0) / 1000.0,
    )


def _resource(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``service.name`` (``OTEL_SERVICE_NAME``, default ``mcpmeter``), ``OTEL_RESOURCE_ATTRIBUTES``.

    ``service.instance.id`` is a new UUID per process unless given: each ``wrap`` sends its
    own cumulative histogram, and two processes must not look like one series.
    """
    attributes = dict(parse_pairs(environ.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    service = environ.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        attributes["service.name"] = service
    attributes.setdefault("service.name", "mcpmeter")
    attributes.setdefault("service.version", __version__)
    attributes.setdefault("service.instance.id", str(uuid.uuid4()))
    return tuple(attributes.items())
