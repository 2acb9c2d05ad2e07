"""Fuzz target: the framing and the meter's parser, fed arbitrary bytes in arbitrary chunks.

Run it with ``make fuzz`` (a bounded run; pass libFuzzer options after the script, e.g.
``-max_total_time=300``). Invariants checked on every input:

- the lines the splitter hands out, joined with newlines, are exactly the input;
- the meter never raises, whatever the frames are (JSON or not, valid JSON-RPC or not);
- a record is only ever emitted for a request, and at most one per request.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from mcpmeter.metering.calls import C2S, S2C, CallMeter
    from mcpmeter.metering.tags import Tenant
    from mcpmeter.protocol.frame import LineSplitter
    from mcpmeter.record import CallRecord


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    records: list[CallRecord] = []
    meter = CallMeter(
        Tenant(None, None, "fuzz"), records.append, transport="stdio", upstream="stdio", default_server="x"
    )
    lines: list[bytes] = []

    def on_line(line: bytes | bytearray, seen: float) -> None:
        lines.append(bytes(line))
        meter.on_frame(C2S if len(lines) % 2 else S2C, line, seen)

    splitter = LineSplitter(on_line)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    # Chunk sizes come from the payload itself, so the fuzzer explores the boundaries too.
    pos, step = 0, 1
    while pos < len(payload):
        step = (payload[pos] % 17) + 1
        splitter.feed(payload[pos : pos + step], float(pos))
        pos += step
    splitter.finish(float(pos))
    meter.close()
    joined = b"\n".join(lines)
    if joined != payload and joined + b"\n" != payload:
        raise AssertionError("framing changed the bytes")
    if len(records) > meter.stats.requests:
        raise AssertionError("more records than requests")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
