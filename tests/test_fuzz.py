"""The fuzz target runs clean for a bounded number of inputs, and what it found stays fixed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT

from mcpmeter.metering.calls import C2S, CallMeter
from mcpmeter.metering.tags import Tenant
from mcpmeter.record import CallRecord

FUZZ = ROOT / "fuzz"


def test_invalid_utf8_inside_a_json_string_is_counted_as_not_json_and_never_raises() -> None:
    # Found by the fuzzer: msgspec raises UnicodeDecodeError (not DecodeError) for these.
    records: list[CallRecord] = []
    meter = CallMeter(
        Tenant(None, None, "s"), records.append, transport="stdio", upstream="stdio", default_server="x"
    )
    for frame in (b'{"jsonrpc":"2.0","id":1,"method":"\xa2"}', b'[{"id":"\xff"}]', b'"\xc3"'):
        meter.on_frame(C2S, frame, 0.0)
    assert meter.stats.not_json + meter.stats.not_jsonrpc == 3 and records == []


def test_the_frame_fuzz_target_survives_a_bounded_run_from_its_seed_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus", corpus)
    result = subprocess.run(
        [PYTHON, str(FUZZ / "frame_fuzz.py"), "-runs=20000", "-seed=1", str(corpus)],
        capture_output=True,
        cwd=tmp_path,  # a crash would write its reproducer here
        timeout=180,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    assert b"Done 20000 runs" in result.stderr
